"""The usual encoding pipeline around ``RidgeEncoder``: pooled store features, HRF delays,
per-run z-scoring, and the explainable-variance (noise-ceiling) normalisation.

Pooling is streamed: tokens are read from the store in chunks and summed per unit (word,
sentence or TR) in float64, so a layer never has to fit in memory at token resolution.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import ActscopeError
from ._arrays import as_f64


def tr_units(n_tokens: int, tokens_per_tr: int) -> np.ndarray:
    """Unit of each token when every ``tokens_per_tr`` consecutive tokens make one TR."""
    if tokens_per_tr < 1:
        raise ActscopeError("tokens_per_tr must be at least 1")
    return np.arange(n_tokens) // tokens_per_tr


def doc_units(store: Any) -> np.ndarray:
    """Unit of each token = its document (sentence-level pooling when documents are sentences)."""
    return store.doc_ids().reshape(-1).numpy().astype(np.int64)


def word_units(store: Any, tokenizer: Any) -> np.ndarray:
    """Unit of each token = its word: a token that starts with a space (or a BPE/SentencePiece word
    marker) opens a new word; so does the start of every sequence."""
    ids = store.token_ids()
    pieces = tokenizer.convert_ids_to_tokens(ids.reshape(-1).tolist())
    starts = np.array([p.startswith((" ", "\u0120", "\u2581")) or not p[:1].isalnum() for p in pieces])
    starts[:: ids.shape[1]] = True
    return np.cumsum(starts) - 1


def pool_features(store: Any, site: str, units: Sequence[int] | np.ndarray, *, how: str = "mean",
                  chunk: int = 8192) -> np.ndarray:
    """Features per unit [n_units, d] from a store site: ``units[i]`` is token i's unit (-1 skips it).

    ``how`` is "mean", "sum" or "last" (the unit's last token, e.g. the end of a word).
    """
    units = np.asarray(units, dtype=np.int64)
    n = min(len(units), store.num_tokens)
    k = int(units[:n].max()) + 1 if n else 0
    d = int(np.prod(store.shape(site)))
    out = np.zeros((k, d))
    counts = np.zeros(k)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        x = store.read(site, start, stop)
        x = (x.float() if str(x.dtype) in ("torch.bfloat16", "torch.float16") else x).numpy()
        x = x.reshape(stop - start, d).astype(np.float64)
        u = units[start:stop]
        keep = u >= 0
        if how == "last":
            out[u[keep]] = x[keep]  # later rows overwrite: the last token of each unit wins
            counts[u[keep]] = 1
        else:
            np.add.at(out, u[keep], x[keep])
            np.add.at(counts, u[keep], 1)
    if how == "mean":
        out /= np.where(counts > 0, counts, 1)[:, None]
    elif how not in ("sum", "last"):
        raise ActscopeError(f"unknown pooling {how!r}: use mean, sum or last")
    return out


def delay_features(X: Any, delays: Sequence[int] = (1, 2, 3, 4), runs: Sequence[Any] | None = None) -> np.ndarray:
    """Stacked copies of ``X [T, d]`` shifted by each delay (in samples), zero-filled: the FIR
    model of the haemodynamic response. With ``runs``, no shift crosses a run boundary."""
    X = as_f64(X, name="X")
    T = X.shape[0]
    run = np.zeros(T, dtype=np.int64) if runs is None else np.unique(np.asarray(list(runs)), return_inverse=True)[1]
    blocks = []
    for dl in delays:
        S = np.zeros_like(X)
        if dl >= 0:
            src, dst = np.arange(0, T - dl), np.arange(dl, T)
        else:
            src, dst = np.arange(-dl, T), np.arange(0, T + dl)
        ok = run[src] == run[dst]
        S[dst[ok]] = X[src[ok]]
        blocks.append(S)
    return np.concatenate(blocks, axis=1)


def zscore_runs(Y: Any, runs: Sequence[Any] | None = None) -> np.ndarray:
    """z-score each column within each run (constant columns become 0)."""
    Y = as_f64(Y, ndim=None, name="Y")
    out = np.empty_like(Y)
    labels = np.zeros(len(Y), dtype=np.int64) if runs is None else np.asarray(list(runs))
    for r in dict.fromkeys(labels.tolist()):
        m = labels == r
        sd = Y[m].std(0)
        out[m] = (Y[m] - Y[m].mean(0)) / np.where(sd > 0, sd, 1.0)
    return out


def explainable_variance(repeats: Any, bias_correction: bool = True) -> np.ndarray:
    """Share of a single trial's variance that repeats of the same stimulus share, per target.

    ``repeats [n_repeats, T, targets]``. With ``bias_correction`` the finite-repeat bias of the
    ratio is removed (Sahani & Linden 2003), as in himalaya's ``explainable_variance``.
    """
    R = as_f64(repeats, ndim=3, name="repeats")
    n = R.shape[0]
    ev = R.mean(0).var(0) / R.var(1).mean(0)
    if bias_correction:
        ev = ev - (1 - ev) / (n - 1)
    return ev


def ceiling_r(repeats: Any) -> np.ndarray:
    """The highest Pearson r a model can reach against the *mean* of the repeats, per target:
    sqrt of the signal share of the averaged response, from the single-trial explainable variance."""
    ev = np.clip(explainable_variance(repeats), 1e-12, 1)
    n = np.shape(repeats)[0]
    return np.sqrt(ev / (ev + (1 - ev) / n))


def normalize_by_ceiling(r: Any, ceiling: Any) -> np.ndarray:
    """Encoding r as a share of the noise ceiling (NaN where the ceiling is not positive)."""
    r, c = as_f64(r, ndim=None), as_f64(ceiling, ndim=None)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c > 0, r / c, np.nan)
