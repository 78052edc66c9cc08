"""Dependency-free plots for a self-contained report: PNG heatmaps and SVG line charts.

Heatmaps are encoded as PNG data URIs by hand (zlib + the PNG chunk format), so the report
needs neither matplotlib nor JavaScript to show them and stays one file that opens offline.
"""

from __future__ import annotations

import base64
import html
import math
import struct
import zlib
from typing import Sequence

import torch

# viridis, sampled at 9 points
_VIRIDIS = torch.tensor([
    [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
    [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37],
], dtype=torch.float32)
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#7f7f7f"]


def colormap(values: torch.Tensor) -> torch.Tensor:
    """Map values in [0, 1] to uint8 RGB with viridis."""
    v = values.clamp(0, 1) * (len(_VIRIDIS) - 1)
    lo = v.floor().long().clamp(max=len(_VIRIDIS) - 2)
    frac = (v - lo).unsqueeze(-1)
    rgb = _VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac
    return rgb.round().to(torch.uint8)


def png_bytes(rgb: torch.Tensor) -> bytes:
    """Encode an ``[H, W, 3]`` uint8 tensor as PNG."""
    h, w, _ = rgb.shape
    raw = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), rgb.reshape(h, w * 3)], dim=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.numpy().tobytes(), 9)) + chunk(b"IEND", b"")


def heatmap_uri(matrix: torch.Tensor, vmin: float | None = None, vmax: float | None = None,
                cell: tuple[int, int] = (1, 1)) -> str:
    """``matrix [rows, cols]`` -> PNG data URI, each cell ``cell = (height, width)`` pixels."""
    m = matrix.detach().double()
    lo = float(m.min()) if vmin is None else vmin
    hi = float(m.max()) if vmax is None else vmax
    norm = ((m - lo) / (hi - lo if hi > lo else 1.0)).float()
    rgb = colormap(norm).repeat_interleave(cell[0], 0).repeat_interleave(cell[1], 1)
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode()


def heatmap_figure(matrix: torch.Tensor, title: str, xlabel: str, ylabel: str, vmin: float | None = None,
                   vmax: float | None = None, cell: tuple[int, int] = (12, 24), width: int | None = None) -> str:
    """A heatmap image with a title, axis labels and a colour bar, as an HTML figure."""
    rows, cols = matrix.shape
    lo = float(matrix.min()) if vmin is None else vmin
    hi = float(matrix.max()) if vmax is None else vmax
    img_w = width or cols * cell[1]
    img_h = rows * cell[0]
    bar = heatmap_uri(torch.linspace(0, 1, 100).unsqueeze(0), 0, 1, (10, 2))
    return (
        f'<figure class="plot heatmap"><figcaption>{html.escape(title)}</figcaption>'
        f'<div class="hm"><span class="ylabel">{html.escape(ylabel)} (0 at top, {rows - 1} at bottom)</span>'
        f'<img alt="{html.escape(title)}" src="{heatmap_uri(matrix, lo, hi, cell)}" width="{img_w}" height="{img_h}"></div>'
        f'<div class="xlabel">{html.escape(xlabel)} (0 to {cols - 1})</div>'
        f'<div class="cbar"><span>{lo:.3g}</span><img alt="colour scale" src="{bar}" width="200" height="10"><span>{hi:.3g}</span></div>'
        "</figure>"
    )


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= n:
            step *= mult
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def line_chart(series: dict[str, Sequence[float | None]], title: str, xlabel: str, ylabel: str,
               width: int = 520, height: int = 260, log: bool = False, x: Sequence[float] | None = None) -> str:
    """An SVG line chart of one or more series over a shared x axis: integers (layers) or ``x``."""
    pad_l, pad_r, pad_t, pad_b = 56, 12, 10, 36
    xv = list(x) if x is not None else None
    points = {k: [(xv[i] if xv else i, float(v)) for i, v in enumerate(vals)
                  if v is not None and math.isfinite(float(v)) and (not log or float(v) > 0)]
              for k, vals in series.items()}
    ys = [y for pts in points.values() for _, y in pts]
    xs = [xp for pts in points.values() for xp, _ in pts]
    if not ys:
        return f'<figure class="plot"><figcaption>{html.escape(title)}: no data</figcaption></figure>'
    f = (lambda y: math.log10(y)) if log else (lambda y: y)
    y_lo, y_hi = min(map(f, ys)), max(map(f, ys))
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 1, y_hi + 1
    x_lo, x_hi = min(xs), (max(xs) if xv and max(xs) > min(xs) else max(max(xs), min(xs) + 1))
    W, H = width - pad_l - pad_r, height - pad_t - pad_b

    def px(x: float) -> float:
        return pad_l + (x - x_lo) / (x_hi - x_lo) * W

    def py(y: float) -> float:
        return pad_t + (1 - (f(y) - y_lo) / (y_hi - y_lo)) * H

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">']
    parts.append(f'<rect x="{pad_l}" y="{pad_t}" width="{W}" height="{H}" class="frame"/>')
    for t in _ticks(y_lo, y_hi):
        y = pad_t + (1 - (t - y_lo) / (y_hi - y_lo)) * H
        label = f"{10 ** t:.3g}" if log else f"{t:.3g}"
        parts.append(f'<line x1="{pad_l}" x2="{pad_l + W}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{pad_l - 4}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    for t in (xv if xv else _ticks(x_lo, x_hi, 10)):
        if xv or float(t).is_integer():
            label = f"{t:.3g}" if xv else str(int(t))
            parts.append(f'<text x="{px(t):.1f}" y="{pad_t + H + 14}" text-anchor="middle">{label}</text>')
    parts.append(f'<text x="{pad_l + W / 2}" y="{height - 4}" text-anchor="middle">{html.escape(xlabel)}</text>')
    parts.append(f'<text x="12" y="{pad_t + H / 2}" text-anchor="middle" transform="rotate(-90 12 {pad_t + H / 2})">{html.escape(ylabel)}</text>')
    legend = []
    for k, (name, pts) in enumerate(points.items()):
        color = PALETTE[k % len(PALETTE)]
        path = " ".join(f"{px(xp):.1f},{py(y):.1f}" for xp, y in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.8"/>')
        for xp, y in pts:
            parts.append(f'<circle cx="{px(xp):.1f}" cy="{py(y):.1f}" r="2" fill="{color}"><title>{html.escape(name)} @ {xp}: {y:.4g}</title></circle>')
        legend.append(f'<span style="color:{color}">&#9632; {html.escape(name)}</span>')
    parts.append("</svg>")
    return (f'<figure class="plot"><figcaption>{html.escape(title)}</figcaption>{"".join(parts)}'
            f'<div class="legend">{" ".join(legend)}</div></figure>')


def heatmap_svg(matrix: torch.Tensor, row_labels: Sequence[str], col_labels: Sequence[str], title: str,
                vmin: float, vmax: float, cell: tuple[int, int] = (14, 64)) -> str:
    """A labelled heatmap as a standalone SVG (small matrices: one rect per cell, with tooltips)."""
    rows, cols = matrix.shape
    left, top = 12 + 7 * max((len(r) for r in row_labels), default=4), 40
    width, height = left + cols * cell[1] + 10, top + rows * cell[0] + 60
    norm = ((matrix.double() - vmin) / (vmax - vmin if vmax > vmin else 1.0)).float()
    rgb = colormap(norm)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
             f'<text x="{left}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    for i in range(rows):
        y = top + i * cell[0]
        parts.append(f'<text x="{left - 6}" y="{y + cell[0] - 3}" text-anchor="end">{html.escape(row_labels[i])}</text>')
        for j in range(cols):
            r, g, b = rgb[i, j].tolist()
            parts.append(f'<rect x="{left + j * cell[1]}" y="{y}" width="{cell[1]}" height="{cell[0]}" fill="rgb({r},{g},{b})">'
                         f'<title>{html.escape(row_labels[i])}, {html.escape(col_labels[j])}: {float(matrix[i, j]):.3g}</title></rect>')
    for j, label in enumerate(col_labels):
        x = left + j * cell[1] + cell[1] / 2
        parts.append(f'<text x="{x}" y="{top + rows * cell[0] + 14}" text-anchor="middle">{html.escape(label)}</text>')
    parts.append(f'<text x="{left}" y="{height - 14}">colour: {vmin:.3g} (dark) to {vmax:.3g} (yellow)</text></svg>')
    return "".join(parts)
