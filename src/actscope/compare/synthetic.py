"""Synthetic fMRI with a known answer, for tests, demos and docs (no brain data ships offline).

Planted model: each voxel is a random linear read-out of the features of one layer, convolved
with the canonical double-gamma HRF, plus AR(1) noise drawn independently for every repeat.
The noise level is set so that the correlation between the *noiseless* signal and the mean of
the repeats is a chosen ceiling, so an encoding model's r can be checked against the truth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._arrays import as_f64


def double_gamma_hrf(tr: float = 2.0, duration: float = 32.0) -> np.ndarray:
    """SPM's canonical HRF sampled every ``tr`` seconds: a gamma peak (shape 6) minus a
    sixth of an undershoot gamma (shape 16), scaled to unit sum."""
    t = np.arange(0, duration + 1e-9, tr)

    def gamma_pdf(x: np.ndarray, shape: float) -> np.ndarray:
        return np.where(x > 0, x ** (shape - 1) * np.exp(-x) / math.gamma(shape), 0.0)

    h = gamma_pdf(t, 6.0) - gamma_pdf(t, 16.0) / 6.0
    return h / h.sum()


@dataclass
class SyntheticFMRI:
    """``repeats [n_repeats, T, voxels]``, their mean ``responses``, the noiseless ``signal``,
    the planted ``weights [features, voxels]`` and the planted ``ceiling`` r per voxel."""

    responses: np.ndarray
    repeats: np.ndarray = field(repr=False)
    signal: np.ndarray = field(repr=False)
    weights: np.ndarray = field(repr=False)
    ceiling: np.ndarray
    hrf: np.ndarray = field(repr=False)
    tr: float = 2.0


def synthetic_fmri(features: Any, n_voxels: int = 100, *, ceiling: float | tuple[float, float] = 0.6,
                   n_repeats: int = 4, ar: float = 0.5, tr: float = 2.0, sparsity: float = 0.0,
                   seed: int = 0) -> SyntheticFMRI:
    """Responses of ``n_voxels`` voxels to ``features [T, d]`` (one row per TR).

    ``ceiling`` is the planted correlation between the mean response and the noiseless signal
    (a number, or a (low, high) range drawn per voxel). ``ar`` is the AR(1) coefficient of the
    noise; ``sparsity`` the share of zero weights.
    """
    F = as_f64(features, name="features")
    rng = np.random.default_rng(seed)
    T, d = F.shape
    W = rng.standard_normal((d, n_voxels)) * (rng.random((d, n_voxels)) >= sparsity)
    hrf = double_gamma_hrf(tr)
    Z = (F - F.mean(0)) @ W
    S = np.stack([np.convolve(Z[:, v], hrf)[:T] for v in range(n_voxels)], axis=1)
    S = (S - S.mean(0)) / np.where(S.std(0) > 0, S.std(0), 1.0)
    c = (np.full(n_voxels, float(ceiling)) if np.isscalar(ceiling)
         else rng.uniform(ceiling[0], ceiling[1], n_voxels))
    # corr(S, S + e_bar)^2 = 1 / (1 + var(e_bar)) with var(S) = 1, and var(e_bar) = var(e) / n_repeats
    noise_sd = np.sqrt(n_repeats * (1 / c ** 2 - 1))
    E = rng.standard_normal((n_repeats, T, n_voxels))
    for t in range(1, T):  # stationary AR(1): unit variance at every step
        E[:, t] = ar * E[:, t - 1] + math.sqrt(1 - ar * ar) * E[:, t]
    repeats = S[None] + noise_sd[None, None] * E
    return SyntheticFMRI(repeats.mean(0), repeats, S, W, c, hrf, tr)
