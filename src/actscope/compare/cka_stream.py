"""Exact linear CKA between every pair of store sites, in one streaming pass, in float64.

Why these accumulators: linear CKA, biased and debiased, only needs sums over tokens. For sites
X and Y (rows x_i, y_i, squared row norms a_i = |x_i|^2 and b_i = |y_i|^2) we keep

    per site:  n, sum x, X^T X, sum a, sum a^2, X^T a
    per pair:  X^T Y, sum a*b, X^T b, Y^T a

Centring afterwards is exact algebra (X_c^T Y_c = X^T Y - n m_x m_y^T), and the row-norm terms
of the unbiased HSIC U-statistic, sum_i |x_i - m_x|^2 |y_i - m_y|^2, expand into the sums above.
So the streamed biased and debiased values equal the in-memory ones to rounding, with memory
d1 x d2 per pair instead of n x d per site. Rows are shifted by the first chunk's mean before
accumulating (all formulas are shift-invariant) so the raw moments do not cancel catastrophically
on residual streams with large means. ``standardize=True`` needs the per-dimension mean and
standard deviation first: one cheap extra pass of moments.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import ActscopeError
from .cka import _hsic_debiased_sum, _ratio


class _SiteStats:
    def __init__(self, d: int):
        self.n = 0
        self.shift: np.ndarray | None = None
        self.s = np.zeros(d)
        self.xtx = np.zeros((d, d))
        self.sa = 0.0
        self.saa = 0.0
        self.xa = np.zeros(d)

    def add(self, x: np.ndarray, a: np.ndarray) -> None:
        self.n += x.shape[0]
        self.s += x.sum(0)
        self.xtx += x.T @ x
        self.sa += float(a.sum())
        self.saa += float(a @ a)
        self.xa += x.T @ a


class _PairStats:
    def __init__(self, d1: int, d2: int):
        self.xty = np.zeros((d1, d2))
        self.sab = 0.0
        self.xb = np.zeros(d1)
        self.ya = np.zeros(d2)

    def add(self, x: np.ndarray, a: np.ndarray, y: np.ndarray, b: np.ndarray) -> None:
        self.xty += x.T @ y
        self.sab += float(a @ b)
        self.xb += x.T @ b
        self.ya += y.T @ a


def _centered_terms(n: int, sx: np.ndarray, sy: np.ndarray, C: np.ndarray, sab: float, u: np.ndarray,
                    v: np.ndarray, sa: float, sb: float) -> tuple[float, float, float, float]:
    """(||Xc^T Yc||^2, sum_i |xc_i|^2 |yc_i|^2, ||Xc||^2, ||Yc||^2) from raw sums."""
    mx, my = sx / n, sy / n
    cx, cy = float(mx @ mx), float(my @ my)
    Cc = C - n * np.outer(mx, my)
    xty = float(np.sum(Cc * Cc))
    ssr = (sab - 2 * float(my @ v) + cy * sa - 2 * float(mx @ u) + 4 * float(mx @ C @ my)
           - 2 * cy * float(mx @ sx) + cx * sb - 2 * cx * float(my @ sy) + n * cx * cy)
    return xty, ssr, sa - n * cx, sb - n * cy


def _values(terms_xy, terms_xx, terms_yy, n: int) -> tuple[float, float]:
    biased = _ratio(terms_xy[0], terms_xx[0], terms_yy[0])
    if n < 4:
        return biased, float("nan")
    deb = _ratio(_hsic_debiased_sum(terms_xy[0], terms_xy[1], terms_xy[2], terms_xy[3], n),
                 _hsic_debiased_sum(terms_xx[0], terms_xx[1], terms_xx[2], terms_xx[3], n),
                 _hsic_debiased_sum(terms_yy[0], terms_yy[1], terms_yy[2], terms_yy[3], n))
    return biased, deb


@dataclass
class StreamSettings:
    standardize: bool = False
    exclude_positions: tuple[int, ...] = ()
    chunk: int = 4096
    max_tokens: int | None = None


def expand_sites(store: Any, patterns: str | Sequence[str]) -> list[str]:
    """Site globs (``blocks.*.hook_resid_post``) -> the store's sites, in layer order."""
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    out: list[str] = []
    for p in pats:
        hits = [s for s in store.sites if fnmatch.fnmatchcase(s, p)]
        if not hits:
            import difflib

            close = difflib.get_close_matches(p, store.sites, n=3, cutoff=0.3) or store.sites[:3]
            raise ActscopeError(f"no site of the store matches {p!r}; it has e.g. {', '.join(close)}")
        out += [h for h in hits if h not in out]
    return out


def _rows(store: Any, site: str, start: int, stop: int, settings: StreamSettings) -> np.ndarray:
    x = store.read(site, start, stop)
    x = (x.float() if str(x.dtype) in ("torch.bfloat16", "torch.float16") else x).numpy()
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    if settings.exclude_positions:
        pos = np.arange(start, stop) % store.seq_len
        x = x[~np.isin(pos, settings.exclude_positions)]
    return x


def stream_cka_stats(stores: Sequence[Any], keys: Sequence[tuple[int, str]], pairs: Sequence[tuple[int, int]],
                     settings: StreamSettings) -> tuple[dict[int, _SiteStats], dict[tuple[int, int], _PairStats]]:
    """One pass over the tokens, accumulating the sufficient statistics of ``keys`` and ``pairs``."""
    n_tok = min(s.num_tokens for s in stores)
    if settings.max_tokens:
        n_tok = min(n_tok, settings.max_tokens)
    scale: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if settings.standardize:  # moments pass: exact mean and sd, so z-scored rows are exact too
        for k, (si, site) in enumerate(keys):
            s1 = s2 = 0.0
            m = 0
            for start in range(0, n_tok, settings.chunk):
                x = _rows(stores[si], site, start, min(start + settings.chunk, n_tok), settings)
                if m == 0:
                    ref = x.mean(0) if len(x) else 0.0
                x = x - ref
                s1, s2, m = s1 + x.sum(0), s2 + (x * x).sum(0), m + len(x)
            mean = s1 / m
            sd = np.sqrt(np.clip(s2 / m - mean * mean, 0, None))
            scale[k] = (mean + ref, np.where(sd > 0, sd, 1.0))
    sites: dict[int, _SiteStats] = {}
    acc: dict[tuple[int, int], _PairStats] = {}
    for start in range(0, n_tok, settings.chunk):
        stop = min(start + settings.chunk, n_tok)
        rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for k, (si, site) in enumerate(keys):
            x = _rows(stores[si], site, start, stop, settings)
            if k not in sites:
                sites[k] = _SiteStats(x.shape[1])
            st = sites[k]
            if settings.standardize:
                x = (x - scale[k][0]) / scale[k][1]
            elif st.shift is None:
                st.shift = x.mean(0) if len(x) else np.zeros(x.shape[1])
            if st.shift is not None:
                x = x - st.shift
            a = np.einsum("ij,ij->i", x, x)
            st.add(x, a)
            rows[k] = (x, a)
        for i, j in pairs:
            if (i, j) not in acc:
                acc[(i, j)] = _PairStats(rows[i][0].shape[1], rows[j][0].shape[1])
            acc[(i, j)].add(rows[i][0], rows[i][1], rows[j][0], rows[j][1])
    if not sites or next(iter(sites.values())).n < 2:
        raise ActscopeError("CKA needs at least 2 tokens after exclusions")
    return sites, acc


def finish(sites: dict[int, _SiteStats], acc: dict[tuple[int, int], _PairStats], i: int, j: int) -> tuple[float, float]:
    """Biased and debiased CKA of keys i and j from the accumulators."""
    X, Y = sites[i], sites[j]
    n = X.n

    def self_terms(S: _SiteStats):
        return _centered_terms(n, S.s, S.s, S.xtx, S.saa, S.xa, S.xa, S.sa, S.sa)

    if i == j:
        t = self_terms(X)
        return _values(t, t, t, n)
    if (i, j) in acc:
        P = acc[(i, j)]
        txy = _centered_terms(n, X.s, Y.s, P.xty, P.sab, P.xb, P.ya, X.sa, Y.sa)
    else:
        P = acc[(j, i)]
        txy = _centered_terms(n, Y.s, X.s, P.xty, P.sab, P.xb, P.ya, Y.sa, X.sa)
    return _values(txy, self_terms(X), self_terms(Y), n)


def site_variances(S: _SiteStats) -> np.ndarray:
    m = S.s / S.n
    return np.diag(S.xtx) / S.n - m * m
