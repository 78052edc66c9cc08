"""Per-layer probing from a store: labels from JSONL/CSV, accuracy with CI, control task, MDL.

Label files have one row per labelled item and a ``label`` column, plus one of
  ``token``                   the token's index in the store (sequence-major, as ``store.read``),
  ``sequence`` + ``position`` the same, as (row, column) of ``store.token_ids()``,
  ``doc``                     a document of the store: its tokens' activations are mean-pooled.
An optional ``type`` column names the word type for the control task; for token rows it
defaults to the token id.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DataError
from .features import doc_units, pool_features
from .probe import LinearProbe, control_labels, kfold_score, online_codelength
from .report import curve_figure, ensure_folder, short_label, standalone, table_html, write_json


@dataclass
class Labels:
    """Labelled items aligned to a store: ``rows`` (token indices) or ``docs``; ``types`` for control."""

    labels: np.ndarray
    rows: np.ndarray | None = None
    docs: np.ndarray | None = None
    types: np.ndarray | None = None


def read_label_file(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"label file not found: {p}")
    text = p.read_text(encoding="utf-8", errors="strict")
    if p.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise DataError(f"{p}:{i}: not a JSON object (JSONL: one object per line)") from None
    if not rows:
        raise DataError(f"{p}: no labelled rows")
    return rows


def load_labels(path: str | os.PathLike, store: Any) -> Labels:
    """Read a JSONL/CSV label file and align it to ``store``'s tokens or documents."""
    rows = read_label_file(path)
    first = rows[0]
    if "label" not in first:
        raise DataError(f"{path}: every row needs a 'label' field (got {', '.join(first)})")

    def num(v: Any, what: str) -> int:
        try:
            return int(v)
        except (TypeError, ValueError):
            raise DataError(f"{path}: {what} must be an integer, got {v!r}") from None

    labels = np.array([str(r["label"]) if not isinstance(r["label"], (int, float)) else r["label"] for r in rows])
    types = np.array([str(r["type"]) for r in rows]) if "type" in first else None
    if "doc" in first:
        docs = np.array([num(r["doc"], "doc") for r in rows])
        n_docs = int(doc_units(store).max()) + 1
        if docs.min() < 0 or docs.max() >= n_docs:
            raise DataError(f"{path}: doc indices must be in [0, {n_docs}) for this store")
        return Labels(labels, docs=docs, types=types)
    if "token" in first:
        idx = np.array([num(r["token"], "token") for r in rows])
    elif "sequence" in first and "position" in first:
        idx = np.array([num(r["sequence"], "sequence") * store.seq_len + num(r["position"], "position") for r in rows])
    else:
        raise DataError(f"{path}: rows need 'token', 'sequence'+'position' or 'doc' to align to the store")
    if idx.min() < 0 or idx.max() >= store.num_tokens:
        raise DataError(f"{path}: token indices must be in [0, {store.num_tokens}) for this store")
    if types is None:
        types = store.token_ids().reshape(-1).numpy()[idx]
    return Labels(labels, rows=idx, types=types)


def site_features(store: Any, site: str, lab: Labels, chunk: int = 8192) -> np.ndarray:
    """The rows of ``site`` that the labels point at (or document means), float64."""
    if lab.docs is not None:
        return pool_features(store, site, doc_units(store))[lab.docs]
    order = np.argsort(lab.rows, kind="stable")
    out = np.empty((len(lab.rows), int(np.prod(store.shape(site)))))
    sorted_rows = lab.rows[order]
    for start in range(0, int(sorted_rows[-1]) + 1, chunk):
        sel = (sorted_rows >= start) & (sorted_rows < start + chunk)
        if sel.any():
            x = store.read(site, start, min(start + chunk, store.num_tokens))
            x = (x.float() if str(x.dtype) in ("torch.bfloat16", "torch.float16") else x).numpy()
            out[order[sel]] = x.reshape(x.shape[0], -1)[sorted_rows[sel] - start]
    return out


@dataclass
class ProbeResult:
    """Per-site held-out accuracy with a 95% CI, control accuracy, selectivity, MDL compression."""

    sites: list[str]
    accuracy: list[float]
    low: list[float]
    high: list[float]
    control: list[float | None]
    mdl: list[dict | None] = field(default_factory=list)
    chance: float = float("nan")
    meta: dict = field(default_factory=dict)

    @property
    def selectivity(self) -> list[float | None]:
        return [None if c is None else a - c for a, c in zip(self.accuracy, self.control)]

    def to_dict(self) -> dict:
        return {"sites": self.sites, "accuracy": self.accuracy, "ci_low": self.low, "ci_high": self.high,
                "control_accuracy": self.control, "selectivity": self.selectivity, "mdl": self.mdl,
                "majority_baseline": self.chance, "meta": self.meta}

    def figure(self) -> str:
        series: dict[str, list] = {"accuracy": self.accuracy, "95% CI low": self.low, "95% CI high": self.high}
        if any(c is not None for c in self.control):
            series["control task"] = self.control
            series["selectivity"] = self.selectivity
        series["majority class"] = [self.chance] * len(self.sites)
        xs = [float(short_label(s)) if short_label(s).isdigit() else i for i, s in enumerate(self.sites)]
        return curve_figure(series, "Linear probe per layer (held out)", "layer", "accuracy", x=xs)

    def save(self, folder: str | os.PathLike) -> Path:
        """``probe.json`` and ``probe.svg`` (accuracy, control and selectivity per layer)."""
        out = ensure_folder(folder)
        write_json(out / "probe.json", self.to_dict())
        (out / "probe.svg").write_text(standalone(self.figure()))
        return out

    def _repr_html_(self) -> str:
        rows = [(s, a, lo, hi, "" if c is None else c) for s, a, lo, hi, c in
                zip(self.sites, self.accuracy, self.low, self.high, self.control)]
        return self.figure() + table_html(["site", "accuracy", "CI low", "CI high", "control"], rows)


def probe_layers(store: Any, sites: Sequence[str], labels: Labels | str | os.PathLike, *, C: float = 1.0,
                 folds: int = 5, control: bool = True, mdl: bool = False, standardize: bool = True,
                 seed: int = 0) -> ProbeResult:
    """A logistic probe per site: k-fold accuracy (Wilson 95% CI), Hewitt & Liang control task
    and selectivity, and optionally the online codelength. Features are z-scored per dimension
    by default (massive activations otherwise dominate the penalty)."""
    lab = labels if isinstance(labels, Labels) else load_labels(labels, store)
    y = lab.labels
    values, counts = np.unique(y, return_counts=True)
    if len(values) < 2:
        raise DataError("the labels have a single class: nothing to probe")
    ctrl = control_labels(lab.types, y, seed) if control and lab.types is not None else None
    acc, lo, hi, ctl, codes = [], [], [], [], []
    t0 = time.perf_counter()
    for site in sites:
        X = site_features(store, site, lab)
        if standardize:
            sd = X.std(0)
            X = (X - X.mean(0)) / np.where(sd > 0, sd, 1.0)
        res = kfold_score(LinearProbe(C=C), X, y, folds, seed)
        acc.append(res["score"])
        lo.append(res["low"])
        hi.append(res["high"])
        ctl.append(None if ctrl is None else kfold_score(LinearProbe(C=C), X, ctrl, folds, seed)["score"])
        codes.append(online_codelength(X, y, C=C, seed=seed) if mdl else None)
    return ProbeResult(list(sites), acc, lo, hi, ctl, codes, float(counts.max() / counts.sum()),
                       {"n": int(len(y)), "classes": len(values), "folds": folds, "C": C,
                        "seconds": time.perf_counter() - t0})
