"""Representational similarity analysis: RDMs, RDM comparisons, bootstrap CIs, noise ceilings.

Conventions (chosen to equal rsatoolbox 0.3's values, which the tests check to 1e-8):

* RDMs come back in the *caller's* condition order: the order of ``order`` if given, else the
  order in which conditions first appear. (rsatoolbox sorts condition labels, so its RDM rows
  can silently differ from the input order.)
* ``metric="euclidean"`` is the **squared** euclidean distance **divided by the number of
  channels**, as in rsatoolbox, so RDMs of layers with different widths are comparable.
* ``metric="correlation"`` is 1 - Pearson r between condition patterns (mean over channels removed).
* ``metric="crossnobis"`` is the cross-validated Mahalanobis distance over runs (folds), with a
  noise precision matrix (identity if none), divided by the number of channels.
* Comparisons use the upper triangle without the diagonal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy.stats import kendalltau

from ..errors import ActscopeError
from ._arrays import as_f64, average_ranks, dense_ranks
from .report import ensure_folder, heatmap_png, png_img, write_json

METRICS = ("correlation", "euclidean", "crossnobis")
METHODS = ("spearman", "corr", "cosine", "tau-a", "rho-a")


def _condition_index(conditions: Sequence[Any], order: Sequence[Any] | None) -> tuple[list, np.ndarray]:
    labels = list(conditions)
    if order is None:
        order = list(dict.fromkeys(labels))
    pos = {c: i for i, c in enumerate(order)}
    missing = [c for c in dict.fromkeys(labels) if c not in pos]
    if missing:
        raise ActscopeError(f"conditions {missing[:3]} are not in the given order")
    return list(order), np.array([pos[c] for c in labels])


def _average(X: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    counts = np.bincount(idx, minlength=k).astype(np.float64)
    if (counts == 0).any():
        raise ActscopeError("every condition in the order needs at least one measurement")
    sums = np.zeros((k, X.shape[1]))
    np.add.at(sums, idx, X)
    return sums / counts[:, None]


def rdm(X: Any, metric: str = "correlation", *, conditions: Sequence[Any] | None = None,
        order: Sequence[Any] | None = None, runs: Sequence[Any] | None = None,
        noise: Any = None) -> np.ndarray:
    """An [n_conditions, n_conditions] dissimilarity matrix of ``X [n_measurements, channels]``.

    With ``conditions`` (one label per row), rows of a condition are averaged first. Crossnobis
    needs ``conditions`` and uses ``runs`` as cross-validation folds (default: the k-th
    measurement of each condition is in fold k); ``noise`` is a channel precision matrix.
    """
    if metric not in METRICS:
        raise ActscopeError(f"unknown RDM metric {metric!r}: use one of {', '.join(METRICS)}")
    X = as_f64(X, name="X")
    n_ch = X.shape[1]
    if metric == "crossnobis":
        return _crossnobis(X, conditions, order, runs, noise)
    if conditions is not None:
        if len(conditions) != len(X):
            raise ActscopeError(f"{len(conditions)} condition labels for {len(X)} rows")
        names, idx = _condition_index(conditions, order)
        X = _average(X, idx, len(names))
    if metric == "euclidean":
        sq = np.einsum("ij,ij->i", X, X)[:, None]  # no [n, channels] temporary
        # X @ X.T first: numpy runs a product of an array with its own transpose as a symmetric
        # rank-k update (half the work); ``2 * X @ X.T`` would scale X first and lose that
        D = (sq + sq.T - 2 * (X @ X.T)) / n_ch
    else:
        Z = X - X.mean(axis=1, keepdims=True)
        Z = Z / np.sqrt(np.einsum("ij,ij->i", Z, Z))[:, None]
        D = 1 - Z @ Z.T
    np.fill_diagonal(D, 0.0)
    return D


def _crossnobis(X: np.ndarray, conditions, order, runs, noise) -> np.ndarray:
    if conditions is None:
        raise ActscopeError("crossnobis needs conditions (several measurements per condition)")
    names, idx = _condition_index(conditions, order)
    k, n_ch = len(names), X.shape[1]
    if runs is None:  # the k-th repetition of each condition forms fold k
        seen: dict[int, int] = {}
        runs = []
        for c in idx:
            runs.append(seen.get(c, 0))
            seen[c] = seen.get(c, 0) + 1
    runs = np.asarray(list(runs))
    folds = list(dict.fromkeys(runs.tolist()))
    if len(folds) < 2:
        raise ActscopeError("crossnobis needs at least two runs (folds)")
    P = np.eye(n_ch) if noise is None else as_f64(noise, name="noise")
    total = np.zeros((k, k))
    for f in folds:
        test = runs == f
        train_m = _average(X[~test], idx[~test], k)
        test_m = _average(X[test], idx[test], k)
        K = train_m @ P @ test_m.T
        d = np.diag(K)
        total += d[:, None] + d[None, :] - K - K.T
    D = total / len(folds) / n_ch
    np.fill_diagonal(D, 0.0)
    return D


def upper(rdm_or_vector: Any) -> np.ndarray:
    """The upper triangle (without diagonal) of a square RDM, row by row; vectors pass through."""
    a = as_f64(rdm_or_vector, ndim=None, name="RDM")
    if a.ndim == 1:
        return a
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ActscopeError(f"an RDM must be square or a condensed vector, got shape {a.shape}")
    return a[np.triu_indices(a.shape[0], k=1)]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.sqrt(a @ a), np.sqrt(b @ b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def _tau_a(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-a: (concordant - discordant) / all pairs, ties counting as neither.

    scipy's compiled O(n log n) routine gives tau-b = (C - D) / sqrt((N - Ta)(N - Tb)); tau-a is
    (C - D) / N, so rescaling by the tie counts (from integer bincounts, exact) converts one into
    the other without counting the pairs twice.
    """
    n = len(a)
    tot = n * (n - 1) / 2

    def tied_pairs(v: np.ndarray) -> float:
        counts = np.bincount(dense_ranks(v)).astype(np.float64)
        return float((counts * (counts - 1) / 2).sum())

    ta, tb = tied_pairs(a), tied_pairs(b)
    if tot == 0 or ta == tot or tb == tot:  # a constant vector: no pair is ordered
        return 0.0
    tau_b = kendalltau(a, b).statistic
    return float(np.clip(tau_b * np.sqrt((tot - ta) * (tot - tb)) / tot, -1, 1))


def _compare_vectors(a: np.ndarray, b: np.ndarray, method: str) -> float:
    if method == "cosine":
        return _cos(a, b)
    if method == "corr":
        return _cos(a - a.mean(), b - b.mean())
    if method in ("spearman", "rho-a"):
        ra, rb = average_ranks(a), average_ranks(b)
        ra, rb = ra - ra.mean(), rb - rb.mean()
        if method == "spearman":
            return _cos(ra, rb)
        n = len(a)
        return float(ra @ rb / (n ** 3 - n) * 12)
    if method == "tau-a":
        return _tau_a(a, b)
    raise ActscopeError(f"unknown RDM comparison {method!r}: use one of {', '.join(METHODS)}")


def compare_rdms(a: Any, b: Any, method: str = "spearman") -> float:
    """Similarity of two RDMs (square or condensed) over their upper triangles."""
    va, vb = upper(a), upper(b)
    if va.shape != vb.shape:
        raise ActscopeError(f"RDMs of different sizes: {va.shape[0]} vs {vb.shape[0]} pairs")
    ok = np.isfinite(va) & np.isfinite(vb)
    return _compare_vectors(va[ok], vb[ok], method)


@dataclass
class RSAComparison:
    """An RDM comparison with a bootstrap confidence interval over conditions."""

    method: str
    value: float
    low: float
    high: float
    level: float
    samples: np.ndarray = field(repr=False)
    rdm_a: np.ndarray | None = field(default=None, repr=False)
    rdm_b: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"method": self.method, "value": self.value, "ci": [self.low, self.high], "level": self.level,
                "n_bootstrap": len(self.samples), "resampled": "conditions"}

    def save(self, folder: str | os.PathLike) -> Path:
        """``rsa.json`` and, with the RDMs attached, ``rdm_a.png`` / ``rdm_b.png``."""
        out = ensure_folder(folder)
        write_json(out / "rsa.json", self.to_dict())
        for name, m in (("rdm_a", self.rdm_a), ("rdm_b", self.rdm_b)):
            if m is not None:
                (out / f"{name}.png").write_bytes(heatmap_png(m, float(np.min(m)), float(np.max(m)), cell=4))
        return out

    def _repr_html_(self) -> str:
        imgs = "".join(png_img(heatmap_png(m, float(np.min(m)), float(np.max(m)), cell=4), n)
                       for n, m in (("RDM a", self.rdm_a), ("RDM b", self.rdm_b)) if m is not None)
        return (f"<p>{self.method}: {self.value:.4f} [{self.low:.4f}, {self.high:.4f}] "
                f"({self.level:.0%} bootstrap over conditions, {len(self.samples)} samples)</p>{imgs}")


def bootstrap_compare(a: Any, b: Any, method: str = "spearman", *, n_boot: int = 1000, level: float = 0.95,
                      seed: int = 0) -> RSAComparison:
    """Compare two square RDMs, with a percentile CI from resampling conditions with replacement.

    Pairs of a condition with its own copy are left out of each resample (their dissimilarity
    is zero by construction, not a measurement).
    """
    A, B = as_f64(a, name="RDM a"), as_f64(b, name="RDM b")
    if A.shape != B.shape or A.shape[0] != A.shape[1]:
        raise ActscopeError("bootstrap over conditions needs two square RDMs of the same size")
    n = A.shape[0]
    rng = np.random.default_rng(seed)
    iu = np.triu_indices(n, k=1)
    out = np.empty(n_boot)
    for k in range(n_boot):
        idx = rng.integers(0, n, n)
        i, j = idx[iu[0]], idx[iu[1]]
        keep = i != j
        out[k] = _compare_vectors(A[i[keep], j[keep]], B[i[keep], j[keep]], method)
    lo, hi = np.nanquantile(out, [(1 - level) / 2, (1 + level) / 2])
    return RSAComparison(method, compare_rdms(A, B, method), float(lo), float(hi), level, out, A, B)


def _pool(vectors: np.ndarray, method: str) -> np.ndarray:
    """The RDM that best represents several subjects under ``method`` (rsatoolbox's pooling)."""
    if method == "cosine":
        v = vectors / np.sqrt(np.mean(vectors ** 2, axis=1, keepdims=True))
        return v.mean(0)
    if method == "corr":
        v = vectors - vectors.mean(1, keepdims=True)
        v = (v / v.std(1, keepdims=True)).mean(0)
        return v - v.min() + 0.01
    return np.array([average_ranks(v) for v in vectors]).mean(0)  # rank-based methods


def noise_ceiling(rdms: Any, method: str = "spearman") -> tuple[float, float]:
    """(lower, upper) noise ceiling of several subjects' RDMs [subjects, n, n] or [subjects, pairs].

    Upper: each subject against the pooled RDM of all subjects (it includes the subject itself);
    lower: against the pool of the others (leave one out). Averaged over subjects.
    """
    arr = as_f64(rdms, ndim=None, name="RDMs")
    vectors = np.array([upper(r) for r in arr]) if arr.ndim == 3 else arr
    if vectors.ndim != 2 or len(vectors) < 2:
        raise ActscopeError("a noise ceiling needs the RDMs of at least two subjects")
    whole = _pool(vectors, method)
    lower = [_compare_vectors(_pool(np.delete(vectors, s, 0), method), vectors[s], method) for s in range(len(vectors))]
    upper_ = [_compare_vectors(whole, vectors[s], method) for s in range(len(vectors))]
    return float(np.mean(lower)), float(np.mean(upper_))
