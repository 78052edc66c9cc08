"""Small array helpers shared by the compare modules: every input becomes float64 numpy.

Comparisons are computed in float64 because CKA, RDM correlations and ridge scores are
differences of large sums; float32 loses the digits the parity tests check (1e-8 to 1e-10).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def as_f64(x: Any, ndim: int | None = 2, name: str = "array") -> np.ndarray:
    """numpy or torch (any dtype, any device) -> a float64 numpy array."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().to("cpu")
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x, dtype=np.float64)
    if ndim is not None and arr.ndim != ndim:
        from ..errors import ActscopeError

        raise ActscopeError(f"{name} must be {ndim}-D, got shape {tuple(arr.shape)}")
    return arr


def average_ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties given their average rank (scipy's ``rankdata`` default)."""
    v = np.asarray(v)
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    starts = np.r_[True, sorted_v[1:] != sorted_v[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.r_[first[1:], len(v)] - 1
    mean_rank = (first + last) / 2.0 + 1.0
    out = np.empty(len(v), dtype=np.float64)
    out[order] = mean_rank[group]
    return out


def dense_ranks(v: np.ndarray) -> np.ndarray:
    """0-based dense ranks (equal values share a rank)."""
    _, inv = np.unique(v, return_inverse=True)
    return inv.astype(np.int64)


def count_inversions(x: np.ndarray) -> int:
    """Pairs i < j with x[i] > x[j] (strictly), for integer ranks: O(n log^2 n), vectorised.

    Bottom-up merge: at each level every right-hand block counts, per element, the elements of
    its left neighbour block that are larger (one ``searchsorted`` over block-offset keys), then
    each merged pair is re-sorted by the same keys.
    """
    a = np.asarray(x, dtype=np.int64).copy()
    n = len(a)
    if n < 2:
        return 0
    big = int(a.max()) + 2
    total = 0
    size = 1
    idx = np.arange(n)
    while size < n:
        pair = idx // (2 * size)
        right = (idx // size) % 2 == 1
        left_keys = np.where(right, np.iinfo(np.int64).max, pair * big + a)
        order = np.argsort(left_keys, kind="stable")
        lk = left_keys[order]
        rk = pair[right] * big + a[right]
        upto = np.searchsorted(lk, rk, side="right")  # left elements of this pair <= value
        block_end = np.searchsorted(lk, (pair[right] + 1) * big, side="left")
        total += int((block_end - upto).sum())
        a = a[np.lexsort((a, pair))]  # merged blocks, sorted within each
        size *= 2
    return total
