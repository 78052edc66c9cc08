"""Layer x layer (or model A x model B) CKA matrices from activation stores, as a result object."""

from __future__ import annotations

import html
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ActscopeError
from .cka_stream import StreamSettings, expand_sites, finish, site_variances, stream_cka_stats
from .cka import outlier_report_from_variances
from .report import ensure_folder, heatmap_png, heatmap_svg, png_img, write_json


@dataclass
class CKAResult:
    """Linear CKA between ``sites_a`` (rows) and ``sites_b`` (columns), biased and debiased.

    ``outliers`` maps each site to its massive-dimension report (computed from the same
    accumulators); ``guarded`` holds the same matrices with the outlier guard on, when asked.
    """

    sites_a: list[str]
    sites_b: list[str]
    matrix: np.ndarray
    debiased: np.ndarray
    n_tokens: int
    settings: dict
    outliers: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    guarded: "CKAResult | None" = None

    def to_dict(self) -> dict:
        out = {"sites_a": self.sites_a, "sites_b": self.sites_b, "matrix": self.matrix,
               "matrix_debiased": self.debiased, "n_tokens": self.n_tokens, "settings": self.settings,
               "outliers": self.outliers, "seconds": self.seconds,
               "convention": "CKA similarity in [0, 1]; 1 - CKA is anatome's distance, arccos(CKA) netrep's angle"}
        if self.guarded is not None:
            out["guarded"] = self.guarded.to_dict()
        return out

    @property
    def flagged(self) -> list[str]:
        return [s for s, r in self.outliers.items() if r.get("flagged")]

    def save(self, folder: str | os.PathLike) -> Path:
        """``cka.json``, ``cka.png`` / ``cka.svg`` (and ``cka_guarded.*`` when guarded)."""
        out = ensure_folder(folder)
        write_json(out / "cka.json", self.to_dict())
        for name, res in (("cka", self), ("cka_guarded", self.guarded)):
            if res is None:
                continue
            (out / f"{name}.png").write_bytes(heatmap_png(res.matrix))
            title = "linear CKA" + (" (guarded: " + _guard_words(res.settings) + ")" if res is self.guarded else "")
            (out / f"{name}.svg").write_text(heatmap_svg(res.matrix, res.sites_a, res.sites_b, title))
        return out

    def _repr_html_(self) -> str:
        parts = [f"<p>linear CKA, {len(self.sites_a)} x {len(self.sites_b)} sites, {self.n_tokens} tokens</p>",
                 png_img(heatmap_png(self.matrix, cell=8), "CKA heatmap")]
        if self.guarded is not None:
            parts += [f"<p>guarded ({html.escape(_guard_words(self.guarded.settings))})</p>",
                      png_img(heatmap_png(self.guarded.matrix, cell=8), "guarded CKA heatmap")]
        if self.flagged:
            parts.append(f"<p>massive dimensions in: {html.escape(', '.join(self.flagged))}</p>")
        return "".join(parts)


def _guard_words(settings: dict) -> str:
    words = []
    if settings.get("standardize"):
        words.append("per-dimension z-scoring")
    if settings.get("exclude_positions"):
        words.append(f"positions {list(settings['exclude_positions'])} excluded")
    return ", ".join(words) or "none"


def stream_cka(store: Any, sites: str | Sequence[str] = "blocks.*.hook_resid_post", *, store_b: Any = None,
               sites_b: str | Sequence[str] | None = None, standardize: bool = False,
               exclude_positions: Sequence[int] = (), chunk: int = 4096, max_tokens: int | None = None,
               guard: bool = False) -> CKAResult:
    """Exact linear CKA (biased and debiased) for every pair of sites, in one pass over the tokens.

    ``store_b`` compares two models recorded on the same tokens (their token ids must match).
    ``guard=True`` also computes the guarded matrices (``standardize=True``,
    ``exclude_positions=[0]``) and attaches them as ``result.guarded``.
    """
    from .. import open_store

    store = open_store(store) if isinstance(store, (str, os.PathLike)) else store
    if isinstance(store_b, (str, os.PathLike)):
        store_b = open_store(store_b)
    names_a = expand_sites(store, sites)
    stores = [store] if store_b is None else [store, store_b]
    if store_b is not None:
        ta, tb = store.token_ids(), store_b.token_ids()
        if ta.shape != tb.shape or not bool((ta == tb).all()):
            raise ActscopeError("the two stores were not recorded on the same tokens (token ids differ)")
    names_b = expand_sites(stores[-1], sites_b if sites_b is not None else sites)
    keys_a = [(0, s) for s in names_a]
    keys_b = [(len(stores) - 1, s) for s in names_b]
    keys = list(dict.fromkeys(keys_a + keys_b))
    ia = [keys.index(k) for k in keys_a]
    ib = [keys.index(k) for k in keys_b]
    pairs = sorted({(min(i, j), max(i, j)) for i in ia for j in ib if i != j})
    settings = StreamSettings(standardize, tuple(int(p) for p in exclude_positions), chunk, max_tokens)
    t0 = time.perf_counter()
    site_stats, acc = stream_cka_stats(stores, keys, pairs, settings)
    lin = np.empty((len(ia), len(ib)))
    deb = np.empty_like(lin)
    for r, i in enumerate(ia):
        for c, j in enumerate(ib):
            lin[r, c], deb[r, c] = finish(site_stats, acc, i, j)
    label = (lambda k: keys[k][1] if store_b is None else f"{'AB'[keys[k][0]]}:{keys[k][1]}")
    outliers = {label(k): outlier_report_from_variances(site_variances(site_stats[k])).to_dict() for k in range(len(keys))}
    res = CKAResult(names_a, names_b, lin, deb, next(iter(site_stats.values())).n,
                    {"standardize": standardize, "exclude_positions": list(settings.exclude_positions),
                     "kernel": "linear", "float": "float64", "one_pass": not standardize},
                    outliers, time.perf_counter() - t0)
    if guard:
        res.guarded = stream_cka(store, sites, store_b=store_b, sites_b=sites_b, standardize=True,
                                 exclude_positions=[0], chunk=chunk, max_tokens=max_tokens)
    return res
