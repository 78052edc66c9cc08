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
