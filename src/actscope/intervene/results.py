"""What interventions return: dataclasses with ``to_dict()``, ``save(folder)`` and a notebook view.

Every result saves the same way, so a folder of results can be read back without knowing which
function wrote it: ``<name>.json`` (strict JSON: a NaN effect, from a pair whose clean and
corrupted metrics are equal, is written as ``null``) plus, where a picture helps, images and an
HTML page. Every file goes through the store's ``write_atomic``: it appears whole or not at all,
so an interrupted save never leaves a truncated JSON that looks like a result.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from ..store.fs import Location


def write_files(folder: str | os.PathLike, files: Mapping[str, str | bytes]) -> Path:
    """Write ``{file name: text or bytes}`` into ``folder`` (created if needed), each atomically."""
    loc = Location(str(folder))
    loc.makedirs()
    for name, data in files.items():
        blob = data.encode() if isinstance(data, str) else data
        loc.write_atomic(name, lambda f, b=blob: f.write(b))
    return Path(folder)


def json_text(payload: Mapping[str, Any]) -> str:
    """Strict JSON (``allow_nan=False``): what ``to_dict`` gives must already be NaN-free."""
    return json.dumps(payload, indent=1, allow_nan=False)


def _num(x: float, digits: int | None = None) -> float | None:
    """A finite float (rounded), or None for NaN and infinities, which strict JSON cannot hold."""
    x = float(x)
    if not math.isfinite(x):
        return None
    return round(x, digits) if digits is not None else x


def _grid(t: torch.Tensor) -> list[list[float | None]]:
    return [[_num(x, 6) for x in row] for row in t.tolist()]


class _DictAccess:
    """``res["kl"]`` as well as ``res.kl``: these results were plain dicts before they were dataclasses."""

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def keys(self) -> list[str]:
        return list(self.__dataclass_fields__)  # type: ignore[attr-defined]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())


@dataclass
class PatchResult:
    """One patching (or causal-tracing) sweep: a metric per (site, position) cell."""

    sites: list[str]
    positions: list[int]
    tokens: list[str]
    effect: torch.Tensor  # [sites, positions], normalised
    patched: torch.Tensor  # raw metric per cell
    clean: float
    corrupted: float
    foil: str | None = None  # logit_diff's foil token, given or chosen (the corrupted run's top token)

    def to_dict(self) -> dict:
        return {
            "sites": self.sites, "positions": self.positions, "tokens": self.tokens,
            "effect": _grid(self.effect), "patched": _grid(self.patched),
            "metric_clean": _num(self.clean), "metric_corrupted": _num(self.corrupted), "foil": self.foil,
        }

    def _limits(self) -> tuple[torch.Tensor, float]:
        effect = self.effect.nan_to_num(0.0)
        return effect, max(float(effect.abs().max()) if effect.numel() else 0.0, 1e-6)

    def _svg(self) -> str:
        from ..report.plots import heatmap_svg

        effect, lim = self._limits()
        labels = [f"{p}: {t!r}" for p, t in zip(self.positions, self.tokens)]
        return heatmap_svg(effect, self.sites, labels, "Normalised effect", -lim, lim)

    def _repr_html_(self) -> str:
        return self._svg()

    def save(self, folder: str | os.PathLike) -> Path:
        """``effects.json``, ``effects.png`` and ``effects.svg`` (sites down, positions across), ``effects.html``."""
        from ..report.plots import heatmap_figure, heatmap_uri

        effect, lim = self._limits()
        png = base64.b64decode(heatmap_uri((effect + lim) / (2 * lim), 0.0, 1.0, (12, 24)).split(",", 1)[1])
        cols = " ".join(f"{p}:{html.escape(repr(t))}" for p, t in zip(self.positions, self.tokens))
        fig = heatmap_figure(effect, "Normalised patching effect", f"position ({cols})", "site", -lim, lim, (12, 24))
        page = (f"<!DOCTYPE html><meta charset='utf-8'><body>{fig}"
                f"<p>sites: {html.escape(', '.join(self.sites))}</p></body>")
        return write_files(folder, {"effects.json": json_text(self.to_dict()), "effects.png": png,
                                    "effects.svg": self._svg(), "effects.html": page})


@dataclass
class AttributionResult:
    """Attribution patching's estimate, and real patching on the same grid when checked."""

    estimate: PatchResult  # the first-order estimates (effect is normalised)
    actual: PatchResult | None  # real patching on the same grid, when checked
    correlation: float | None  # Pearson r between estimate.effect and actual.effect

    def to_dict(self) -> dict:
        return {"correlation": None if self.correlation is None else _num(self.correlation),
                "estimate": self.estimate.to_dict(),
                "actual": self.actual.to_dict() if self.actual is not None else None}

    def _repr_html_(self) -> str:
        r = "not checked" if self.correlation is None else f"Pearson r = {self.correlation:.3f}"
        parts = [f"<p>attribution patching, estimate vs real patching: {r}</p>",
                 "<h4>estimate</h4>", self.estimate._repr_html_()]
        if self.actual is not None:
            parts += ["<h4>real patching</h4>", self.actual._repr_html_()]
        return "".join(parts)

    def save(self, folder: str | os.PathLike) -> Path:
        """``attribution.json`` (everything), ``estimate/`` and ``actual/`` (each as ``PatchResult.save``)."""
        self.estimate.save(Path(folder) / "estimate")
        if self.actual is not None:
            self.actual.save(Path(folder) / "actual")
        return write_files(folder, {"attribution.json": json_text(self.to_dict())})


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in rows)
    return f"<table>{cells}</table>"


@dataclass
class SubspaceResult(_DictAccess):
    """One subspace patch: the metric before and after, and what the next reader cannot see."""

    site: str
    positions: list[int]
    metric_clean: float
    metric_corrupted: float
    metric_patched: float
    effect: float  # normalised, NaN when clean equals corrupted
    null_fraction: list[float]  # per direction: share of its squared norm the next reader never reads
    foil: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("metric_clean", "metric_corrupted", "metric_patched", "effect"):
            d[key] = _num(d[key])
        d["null_fraction"] = [_num(x) for x in self.null_fraction]
        return d

    def _repr_html_(self) -> str:
        fractions = ", ".join(f"{x:.2f}" for x in self.null_fraction)
        return _table([("site", self.site), ("positions", self.positions), ("metric clean", f"{self.metric_clean:.4g}"),
                       ("metric corrupted", f"{self.metric_corrupted:.4g}"),
                       ("metric patched", f"{self.metric_patched:.4g}"), ("normalised effect", f"{self.effect:.3f}"),
                       ("null fraction per direction", fractions)])

    def save(self, folder: str | os.PathLike) -> Path:
        """``subspace.json``."""
        return write_files(folder, {"subspace.json": json_text(self.to_dict())})


@dataclass
class SteeringEffect(_DictAccess):
    """What a steering vector does at one scale: KL, entropy, projection and generations."""

    scale: float
    kl: float  # mean KL(p_steered || p) over every real token, in nats
    entropy_before: float
    entropy_after: float
    projection_before: float  # mean projection of the steered layers' residual on the unit vector
    projection_after: float
    generations: list[dict[str, str]] = field(default_factory=list)  # {"prompt", "before", "after"}

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("scale", "kl", "entropy_before", "entropy_after", "projection_before", "projection_after"):
            d[key] = _num(d[key])
        return d

    def _repr_html_(self) -> str:
        numbers = _table([("scale", f"{self.scale:g}"), ("KL(steered || plain)", f"{self.kl:.4f}"),
                          ("entropy", f"{self.entropy_before:.3f} -> {self.entropy_after:.3f}"),
                          ("projection", f"{self.projection_before:.3f} -> {self.projection_after:.3f}")])
        rows = "".join(f"<tr><td>{html.escape(g['prompt'])}</td><td>{html.escape(g['before'])}</td>"
                       f"<td>{html.escape(g['after'])}</td></tr>" for g in self.generations)
        return f"{numbers}<table><tr><th>prompt</th><th>before</th><th>after</th></tr>{rows}</table>"

    def save(self, folder: str | os.PathLike) -> Path:
        """``steering_effect.json`` and ``steering_effect.html``."""
        page = f"<!DOCTYPE html><meta charset='utf-8'><body>{self._repr_html_()}</body>"
        return write_files(folder, {"steering_effect.json": json_text(self.to_dict()), "steering_effect.html": page})
