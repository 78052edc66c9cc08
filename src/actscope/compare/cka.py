"""Centered kernel alignment (CKA) on arrays: linear, debiased, RBF, minibatch, conventions.

Conventions, stated once because the CKA packages disagree:

* ``cka`` returns a *similarity* in [0, 1] (1 = identical up to rotation and isotropic scale),
  as in Kornblith et al. (2019). ``cka_distance(c) = 1 - c`` is anatome's convention;
  ``cka_angle(c) = arccos(c)`` is netrep's (a metric, in radians).
* ``debiased=True`` replaces the biased HSIC estimator by the unbiased U-statistic of Song et
  al. (2012). With few samples and many features the biased value is inflated towards 1;
  the debiased one is not, and can be slightly negative.
* ``minibatch_cka`` (Nguyen et al. 2021) averages unbiased HSIC over minibatches before taking
  the ratio. It converges to the *debiased* full-data value, not to ``cka(X, Y)``: it has its
  own name so that the two are never confused.
* Linear CKA is dominated by dimensions with very large variance (the "massive activations" of
  LLM residual streams). ``outlier_report`` says when a few dimensions carry most of the
  variance; ``standardize=True`` (per-dimension z-scoring) and excluding position 0 are the
  usual guards.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import ActscopeError
from ._arrays import as_f64

log = logging.getLogger("actscope")


class OutlierWarning(UserWarning):
    """A few dimensions carry most of the variance: linear CKA mostly measures those."""


# --- conventions -------------------------------------------------------------------------------
def cka_distance(c: float | np.ndarray) -> float | np.ndarray:
    """anatome's convention: ``1 - CKA`` (0 = identical)."""
    return 1.0 - np.asarray(c, dtype=np.float64) if np.ndim(c) else 1.0 - float(c)


def cka_angle(c: float | np.ndarray) -> float | np.ndarray:
    """netrep's convention: ``arccos(CKA)`` in radians (a metric; 0 = identical, pi/2 = unrelated)."""
    out = np.arccos(np.clip(np.asarray(c, dtype=np.float64), -1.0, 1.0))
    return out if np.ndim(c) else float(out)


# --- the outlier guard -------------------------------------------------------------------------
@dataclass
class OutlierReport:
    """Which dimensions carry the variance. ``flagged``: the top ``top`` carry >= ``threshold``."""

    dims: list[int]
    share: float
    top: int
    threshold: float
    flagged: bool

    def to_dict(self) -> dict:
        return {"dims": self.dims, "share": self.share, "top": self.top, "threshold": self.threshold,
                "flagged": self.flagged}

    def message(self, name: str = "input") -> str:
        return (f"{name}: {len(self.dims)} of the dimensions ({', '.join(map(str, self.dims))}) carry "
                f"{self.share:.0%} of the variance; linear CKA mostly compares those. Try standardize=True "
                "or exclude_positions=[0]")


def outlier_report_from_variances(var: np.ndarray, top: int = 3, threshold: float = 0.5) -> OutlierReport:
    """The guard from per-dimension variances (what the streaming accumulators already hold)."""
    var = np.clip(np.asarray(var, dtype=np.float64), 0, None)
    total = float(var.sum())
    k = min(top, len(var))
    dims = np.argsort(-var, kind="stable")[:k]
    share = float(var[dims].sum() / total) if total > 0 else 0.0
    # a few dims holding half the variance is only remarkable when there are many dims
    flagged = share >= threshold and len(var) >= 4 * k
    return OutlierReport([int(d) for d in dims], share, k, threshold, flagged)


def outlier_report(X: Any, top: int = 3, threshold: float = 0.5) -> OutlierReport:
    """Report whether ``top`` dimensions of ``X [n, d]`` carry at least ``threshold`` of its variance."""
    return outlier_report_from_variances(as_f64(X, name="X").var(axis=0), top, threshold)


# --- linear CKA from sufficient statistics -----------------------------------------------------
def _hsic_debiased_sum(xty: float, ssr_dot: float, sn_x: float, sn_y: float, n: int) -> float:
    """n(n-3) x the unbiased HSIC of centred data, from feature-space sums (Song et al. 2012).

    ``xty`` = ||Xc^T Yc||_F^2, ``ssr_dot`` = sum_i ||xc_i||^2 ||yc_i||^2, ``sn_*`` = ||Xc||_F^2.
    The common factor n(n-3) cancels in the CKA ratio.
    """
    return xty - n / (n - 2.0) * ssr_dot + sn_x * sn_y / ((n - 1.0) * (n - 2.0))


def _ratio(num: float, a: float, b: float) -> float:
    den = math.sqrt(a * b) if a > 0 and b > 0 else 0.0
    return num / den if den > 0 else float("nan")


def linear_cka_from_centered(Xc: np.ndarray, Yc: np.ndarray, debiased: bool = False) -> float:
    """Feature-space linear CKA of already column-centred float64 arrays."""
    n = Xc.shape[0]
    xty = float(np.sum((Xc.T @ Yc) ** 2))
    xtx = float(np.sum((Xc.T @ Xc) ** 2))
    yty = float(np.sum((Yc.T @ Yc) ** 2))
    if not debiased:
        return _ratio(xty, xtx, yty)
    if n < 4:
        raise ActscopeError(f"debiased CKA needs at least 4 samples, got {n}")
    rx, ry = np.einsum("ij,ij->i", Xc, Xc), np.einsum("ij,ij->i", Yc, Yc)
    sx, sy = float(rx.sum()), float(ry.sum())
    return _ratio(_hsic_debiased_sum(xty, float(rx @ ry), sx, sy, n),
                  _hsic_debiased_sum(xtx, float(rx @ rx), sx, sx, n),
                  _hsic_debiased_sum(yty, float(ry @ ry), sy, sy, n))


# --- Gram space ----------------------------------------------------------------------------------
def gram_linear(X: Any) -> np.ndarray:
    X = as_f64(X, name="X")
    return X @ X.T


def gram_rbf(X: Any, threshold: float = 1.0) -> np.ndarray:
    """RBF Gram matrix with bandwidth ``sigma = threshold * median distance``.

    The median is taken over all n x n squared distances, the zero diagonal included (Kornblith
    et al.'s convention), so ``threshold=0.5`` reproduces their published demo value.
    """
    X = as_f64(X, name="X")
    dot = X @ X.T
    sq = np.diag(dot)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2 * dot, 0, None)
    med = float(np.median(d2))
    if med <= 0:
        raise ActscopeError("RBF CKA: the median pairwise distance is 0 (too many identical rows)")
    return np.exp(-d2 / (2 * threshold ** 2 * med))


def center_gram(K: np.ndarray, unbiased: bool = False) -> np.ndarray:
    """H K H, or with ``unbiased=True`` the U-centring whose inner product is n(n-3) x unbiased HSIC."""
    K = np.array(K, dtype=np.float64, copy=True)
    if not np.allclose(K, K.T, rtol=1e-8, atol=1e-10 * max(1.0, float(np.abs(K).max()))):
        raise ActscopeError("a Gram matrix must be symmetric")
    n = K.shape[0]
    if unbiased:
        np.fill_diagonal(K, 0)
        means = K.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        K -= means[:, None]
        K -= means[None, :]
        np.fill_diagonal(K, 0)
    else:
        means = K.mean(0)
        K -= means[:, None]
        K -= means[None, :]
        K += means.mean()
    return K


def cka_gram(K: Any, L: Any, debiased: bool = False) -> float:
    """CKA between two [n, n] Gram matrices."""
    Kc = center_gram(as_f64(K, name="K"), unbiased=debiased)
    Lc = center_gram(as_f64(L, name="L"), unbiased=debiased)
    return _ratio(float(np.sum(Kc * Lc)), float(np.sum(Kc * Kc)), float(np.sum(Lc * Lc)))


# --- the public entry point ------------------------------------------------------------------
def _prepare(X: Any, name: str, standardize: bool, exclude_positions: Sequence[int], seq_len: int | None) -> np.ndarray:
    A = as_f64(X, name=name)
    if exclude_positions:
        if not seq_len:
            raise ActscopeError("exclude_positions needs seq_len (rows are token i at position i % seq_len)")
        A = A[~np.isin(np.arange(A.shape[0]) % seq_len, list(exclude_positions))]
    A = A - A.mean(0)
    if standardize:
        sd = A.std(0)
        A = A / np.where(sd > 0, sd, 1.0)
    return A


def cka(X: Any, Y: Any, *, kernel: str = "linear", debiased: bool = False, threshold: float = 1.0,
        standardize: bool = False, exclude_positions: Sequence[int] = (), seq_len: int | None = None,
        warn: bool = True) -> float:
    """CKA similarity of ``X [n, d1]`` and ``Y [n, d2]`` (rows: the same n inputs), in float64.

    ``kernel="linear"`` works in feature space (memory d1 x d2); ``kernel="rbf"`` builds n x n
    Gram matrices with bandwidth ``threshold`` x the median distance. ``standardize`` z-scores
    each dimension first; ``exclude_positions`` (with ``seq_len``) drops rows at those positions.
    Logs an ``OutlierWarning`` message when a few dimensions carry most of the variance.
    """
    if kernel not in ("linear", "rbf"):
        raise ActscopeError(f"unknown CKA kernel {kernel!r}: use 'linear' or 'rbf'")
    Xc = _prepare(X, "X", standardize, exclude_positions, seq_len)
    Yc = _prepare(Y, "Y", standardize, exclude_positions, seq_len)
    if Xc.shape[0] != Yc.shape[0]:
        raise ActscopeError(f"X and Y need the same rows (inputs): {Xc.shape[0]} vs {Yc.shape[0]}")
    if warn and kernel == "linear" and not standardize:
        for name, A in (("X", Xc), ("Y", Yc)):
            rep = outlier_report_from_variances(A.var(axis=0))
            if rep.flagged:
                import warnings

                warnings.warn(rep.message(name), OutlierWarning, stacklevel=2)
    if kernel == "linear":
        return linear_cka_from_centered(Xc, Yc, debiased)
    return cka_gram(gram_rbf(Xc, threshold), gram_rbf(Yc, threshold), debiased)


# --- minibatch CKA (Nguyen et al. 2021) ------------------------------------------------------
def _zero_diag_grams(batch: Sequence[Any], name: str) -> tuple[np.ndarray, np.ndarray]:
    """Each array's linear Gram matrix with its diagonal zeroed, flattened: ``[m, n*n]``, and
    the row sums ``[m, n]``: the two things unbiased HSIC needs from each side."""
    grams = []
    for x in batch:
        x = as_f64(x, name=name)
        K = x @ x.T
        np.fill_diagonal(K, 0)
        grams.append(K.reshape(-1))
    flat = np.stack(grams)
    n = int(round(math.sqrt(flat.shape[1])))
    return flat, flat.reshape(len(grams), n, n).sum(1)


def _hsic1(kl: np.ndarray, sums: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """Unbiased HSIC (Song et al. 2012, eq. 5) from its three terms, for zero-diagonal Grams K
    and L: tr(K L), (1'K1)(1'L1) and (K1)'(L1)."""
    return (kl + sums / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * rows) / (n * (n - 3))


def _self_hsic1(flat: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return _hsic1(np.einsum("ij,ij->i", flat, flat), rows.sum(1) ** 2, np.einsum("ij,ij->i", rows, rows), rows.shape[1])


def minibatch_cka_matrix(batches: Iterable[tuple[Sequence[Any], Sequence[Any]]]) -> np.ndarray:
    """Minibatch CKA of every pair of several sites at once: ``batches`` yields ``(xs, ys)``,
    lists of arrays over the same rows (``xs[i]`` [n, d_i]); returns ``[len(xs), len(ys)]``.

    Mean unbiased HSIC over minibatches, then the CKA ratio, as ``minibatch_cka``. tr(K L) for
    every pair is one product of the flattened Gram matrices, so each Gram matrix and each
    self-HSIC is computed once per batch, not once per pair.
    """
    xy = xx = yy = 0.0
    k = 0
    for xs, ys in batches:
        fx, rx = _zero_diag_grams(xs, "x batch")
        fy, ry = (fx, rx) if ys is xs else _zero_diag_grams(ys, "y batch")
        n = rx.shape[1]
        if ry.shape[1] != n:
            raise ActscopeError(f"minibatch_cka: x and y batches need the same rows, got {n} and {ry.shape[1]}")
        if n < 4:
            continue
        xy = xy + _hsic1(fx @ fy.T, np.outer(rx.sum(1), ry.sum(1)), rx @ ry.T, n)
        xx = xx + _self_hsic1(fx, rx)
        yy = yy + _self_hsic1(fy, ry)
        k += 1
    if k == 0:
        raise ActscopeError("minibatch_cka: no batch of at least 4 rows")
    den = np.sqrt(np.outer(np.clip(xx, 0, None), np.clip(yy, 0, None)))
    return np.where(den > 0, xy / np.where(den > 0, den, 1.0), np.nan)


def minibatch_cka(batches: Iterable[tuple[Any, Any]] | None = None, X: Any = None, Y: Any = None, *,
                  batch_size: int = 256, seed: int | None = 0) -> float:
    """Minibatch CKA: mean unbiased HSIC over minibatches, then the CKA ratio.

    Pass ``batches`` (an iterable of ``(x_batch, y_batch)``) or whole ``X`` and ``Y`` split into
    ``batch_size`` rows (shuffled with ``seed``; ``seed=None`` keeps the order). Estimates the
    *debiased* CKA, not the biased full-data ``cka(X, Y)``. Linear kernel, float64. For many
    pairs of sites, ``minibatch_cka_matrix`` forms each Gram matrix once.
    """
    if batches is None:
        if X is None or Y is None:
            raise ActscopeError("minibatch_cka needs batches, or X and Y")
        Xa, Ya = as_f64(X, name="X"), as_f64(Y, name="Y")
        order = np.arange(len(Xa)) if seed is None else np.random.default_rng(seed).permutation(len(Xa))
        batches = ((Xa[order[i:i + batch_size]], Ya[order[i:i + batch_size]])
                   for i in range(0, len(Xa) - batch_size + 1, batch_size))
    return float(minibatch_cka_matrix(([xb], [yb]) for xb, yb in batches)[0, 0])
