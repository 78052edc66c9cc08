"""Which layer predicts the brain best: one ridge encoding model per store site."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ActscopeError
from .encoding import DEFAULT_ALPHAS, RidgeEncoder
from .features import delay_features, normalize_by_ceiling, pool_features, tr_units, zscore_runs
from .report import curve_figure, ensure_folder, short_label, standalone, table_html, write_json


@dataclass
class EncodingResult:
    """Held-out Pearson r per site: ``mean_r[i]`` over targets, ``r[i]`` per target."""

    sites: list[str]
    mean_r: list[float]
    r: list[np.ndarray] = field(repr=False)
    best_alphas: list[np.ndarray] = field(repr=False)
    ceiling: np.ndarray | None = field(default=None, repr=False)
    meta: dict = field(default_factory=dict)

    @property
    def normalized(self) -> list[float] | None:
        if self.ceiling is None:
            return None
        return [float(np.nanmean(normalize_by_ceiling(r, self.ceiling))) for r in self.r]

    @property
    def best_site(self) -> str:
        return self.sites[int(np.nanargmax(self.mean_r))]

    def to_dict(self) -> dict:
        return {"sites": self.sites, "mean_r": self.mean_r, "normalized_r": self.normalized,
                "best_site": self.best_site, "r": self.r,
                "median_best_alpha": [float(np.median(a)) for a in self.best_alphas], "meta": self.meta}

    def figure(self) -> str:
        series = {"mean r (held out)": self.mean_r}
        if self.ceiling is not None:
            series["noise ceiling"] = [float(np.mean(self.ceiling))] * len(self.sites)
        return curve_figure(series, "Encoding performance per layer", "layer", "Pearson r",
                            x=[float(short_label(s)) if short_label(s).isdigit() else i for i, s in enumerate(self.sites)])

    def save(self, folder: str | os.PathLike) -> Path:
        """``encoding.json`` and ``encoding.svg`` (r per layer)."""
        out = ensure_folder(folder)
        write_json(out / "encoding.json", self.to_dict())
        (out / "encoding.svg").write_text(standalone(self.figure()))
        return out

    def _repr_html_(self) -> str:
        return self.figure() + table_html(["site", "mean r"], list(zip(self.sites, self.mean_r)))


def encode_layers(store: Any, sites: Sequence[str], responses: Any, *, tokens_per_tr: int | None = None,
                  units: Any = None, runs: Sequence[Any] | None = None, delays: Sequence[int] = (1, 2, 3, 4),
                  alphas: Sequence[float] = DEFAULT_ALPHAS, cv: int = 5, test_fraction: float = 0.2,
                  ceiling: Any = None, pooled: dict[str, np.ndarray] | None = None) -> EncodingResult:
    """Fit one ``RidgeEncoder`` per site on pooled, delayed features; score r on held-out TRs.

    Responses ``[T, targets]`` are aligned to units of tokens: ``units`` (token -> TR index) or
    ``tokens_per_tr`` (default: as many tokens per TR as fit). Held out: the last run when
    ``runs`` is given (inner CV leaves one run out), else the last ``test_fraction`` of TRs.
    Features and responses are z-scored per run on each side of the split.
    """
    Y = np.asarray(responses, dtype=np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    T = Y.shape[0]
    if units is None:
        tpt = tokens_per_tr or store.num_tokens // T
        if tpt < 1:
            raise ActscopeError(f"{T} TRs but only {store.num_tokens} tokens in the store")
        units = tr_units(store.num_tokens, tpt)
    units = np.where(np.asarray(units) < T, np.asarray(units), -1)
    run = np.zeros(T, dtype=np.int64) if runs is None else np.asarray(list(runs))
    if len(run) != T:
        raise ActscopeError(f"{len(run)} run labels for {T} TRs")
    if runs is not None:
        last = list(dict.fromkeys(run.tolist()))[-1]
        test = run == last
        if test.all():
            raise ActscopeError("--runs: need at least two runs to hold one out")
    else:
        test = np.arange(T) >= int(round(T * (1 - test_fraction)))
    t0 = time.perf_counter()
    mean_r, rs, best = [], [], []
    Ytr, Yte = zscore_runs(Y[~test], run[~test]), zscore_runs(Y[test], run[test])
    for site in sites:
        F = pooled[site] if pooled and site in pooled else pool_features(store, site, units)
        if F.shape[0] < T:
            raise ActscopeError(f"the store covers {F.shape[0]} TRs, the responses {T}")
        X = delay_features(zscore_runs(F[:T], run), delays, run)
        enc = RidgeEncoder(alphas, cv=cv).fit(X[~test], Ytr, groups=run[~test] if runs is not None else None)
        r = enc.score(X[test], Yte)
        rs.append(r)
        best.append(enc.best_alphas_)
        mean_r.append(float(np.nanmean(r)))
    meta = {"n_trs": T, "n_test": int(test.sum()), "delays": list(delays), "seconds": time.perf_counter() - t0,
            "held_out": "last run" if runs is not None else f"last {test_fraction:.0%} of TRs"}
    ceil = None if ceiling is None else np.asarray(ceiling, dtype=np.float64)
    return EncodingResult(list(sites), mean_r, rs, best, ceil, meta)
