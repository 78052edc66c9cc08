"""Result plumbing shared by the compare results: JSON, PNG/SVG files, notebook HTML.

Plots reuse the project's dependency-free plotting (``actscope.report.plots``): PNG heatmaps
encoded by hand and SVG line charts, so saving a result needs no matplotlib.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def jsonable(x: Any) -> Any:
    """numpy scalars/arrays and NaN -> plain JSON values (NaN becomes null)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(jsonable(data), indent=1))


def short_label(site: str) -> str:
    """``blocks.12.hook_resid_post`` -> ``12``: heatmap axes hold one short label per layer."""
    m = re.match(r"blocks\.(\d+)\.", site)
    return m.group(1) if m else site


def heatmap_png(matrix: np.ndarray, vmin: float = 0.0, vmax: float = 1.0, cell: int = 12) -> bytes:
    """A [rows, cols] matrix as PNG bytes (viridis; NaN drawn as vmin)."""
    import torch

    from ..report.plots import heatmap_uri

    m = torch.from_numpy(np.nan_to_num(np.asarray(matrix, dtype=np.float64), nan=vmin))
    uri = heatmap_uri(m, vmin, vmax, (cell, cell))
    return base64.b64decode(uri.split(",", 1)[1])


def heatmap_svg(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str,
                vmin: float = 0.0, vmax: float = 1.0) -> str:
    import torch

    from ..report.plots import heatmap_svg as _svg

    m = torch.from_numpy(np.nan_to_num(np.asarray(matrix, dtype=np.float64), nan=vmin))
    return _svg(m, [short_label(r) for r in rows], [short_label(c) for c in cols], title, vmin, vmax, cell=(14, 22))


def curve_figure(series: dict[str, Sequence[float | None]], title: str, xlabel: str, ylabel: str,
                 x: Sequence[float] | None = None) -> str:
    """An HTML ``<figure>`` with an SVG line chart (for notebooks and standalone SVG files)."""
    from ..report.plots import line_chart

    clean = {k: [None if v is None or not math.isfinite(float(v)) else float(v) for v in vals]
             for k, vals in series.items()}
    return line_chart(clean, title, xlabel, ylabel, x=list(x) if x is not None else None)


def standalone(figure: str) -> str:
    """The SVG inside a report figure as a file of its own."""
    from ..sparsify.evaluate import standalone_svg

    return standalone_svg(figure)


def png_img(png: bytes, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}"{w} src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def table_html(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def ensure_folder(folder: str | Path) -> Path:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    return out
