"""``calibrate``: thresholds for a target sparsity, from streaming statistics on calibration text.

A pass over the text feeds a quantile sketch per *unit* (the inputs one threshold governs):

==========  =====================================================  ===========================
method      unit and statistic                                     threshold
==========  =====================================================  ===========================
teal        each linear input (q/k/v share one), ``|x|``           scalar per unit
wina        each linear layer, ``|x_i| * ||W[:, i]||_2``           scalar per linear layer
cats        MLP activation output ``|act(gate)|``                  scalar per layer
chess       MLP activation, ``|act_i| * E|up_i|`` (per channel);   one per channel; Q and O
            with ``attention=True`` also the Q and O inputs        inputs scalar
topk        none: keep the ``(1 - s) d`` largest per token         (no pass needed)
coreinfer   none: core neurons come from each prompt               (no pass needed)
==========  =====================================================  ===========================

Thresholds from the dense model zero a little more than asked once upstream layers are sparse
(their outputs shift), so by default a second pass re-measures every input with the first
pass's thresholds applied (``passes=2``): achieved sparsity then lands on the target.

With ``allocation="greedy"`` the per-unit sparsities differ: starting from zero, the unit whose
next 5% step adds the least relative output error per weight skipped is raised, until the
weight-weighted mean reaches the target (TEAL's greedy idea, scored on kept calibration rows).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import TokenBatches, load_tokens
from ..errors import SparsifyError
from ..families import linear_weight
from ..sites import Site
from ..stats import QuantileSketch
from ..trace import trace
from .swap import SparseAct, apply, column_norms
from .config import METHODS, SparsityConfig
from .kernel import mask
from .layout import layer_modules

STEP = 0.05
MAX_SPARSITY = 0.95
SAMPLE_ROWS = 256  # calibration rows kept per unit to score greedy allocation


@dataclass
class _Unit:
    """One threshold's worth of inputs: where they are read and which linears consume them."""

    tap: Site
    consumers: list[str]  # linear paths whose output error the greedy allocation scores
    outputs: list[str]  # config keys that receive this unit's threshold
    channels: int = 1  # > 1: the sketch keeps one distribution per channel (CHESS)
    scale: torch.Tensor | None = None  # WINA: column norms multiply |x| before thresholding
    up_tap: Site | None = None  # CHESS: the up projection whose E|up_i| weighs channel i
    up_sum: torch.Tensor | None = None
    up_n: int = 0
    sketch: QuantileSketch | None = None
    rows: list[torch.Tensor] = field(default_factory=list)
    n_rows: int = 0

    @property
    def key(self) -> str:
        return self.outputs[0]

    @property
    def importance(self) -> torch.Tensor | None:
        """CHESS's channel weights ``E|up_i|`` (``None`` for the other methods)."""
        if self.up_tap is None:
            return None
        return (self.up_sum / max(self.up_n, 1)).float() if self.up_sum is not None else torch.ones(self.channels)

    def threshold(self, p: float) -> torch.Tensor:
        """The threshold on ``|x|`` (per channel for CHESS) that zeroes a share ``p`` of the inputs."""
        assert self.sketch is not None
        if p <= 0:
            return torch.zeros(self.channels if self.up_tap is not None else 1)
        imp = self.importance
        if imp is None:
            return self.sketch.quantiles(p).float()
        return _weighted_threshold(self.sketch, imp.double(), p).float()


def _weighted_threshold(sketch: QuantileSketch, weight: torch.Tensor, p: float) -> torch.Tensor:
    """Per-channel thresholds ``t / weight_i`` with one ``t`` zeroing a share ``p`` of ``|x_i| weight_i``.

    Solved by bisection on ``log t`` over the per-channel bucket counts (no second pass).
    """
    cum = sketch.counts.cumsum(1).double()  # [channels, buckets]
    weight = weight.clamp(min=1e-12)

    def share_below(log_t: float) -> float:
        v = math.exp(log_t) / weight  # per-channel threshold on |x|
        idx = (torch.ceil(torch.log(v.clamp(min=sketch.min_value)) / sketch.log_gamma) - sketch.offset)
        idx = idx.long().clamp(0, sketch.size)
        idx = torch.where(v < sketch.min_value, torch.zeros_like(idx), idx)
        return float(cum.gather(1, idx[:, None]).sum()) / (sketch.n * sketch.channels)

    lo, hi = math.log(sketch.min_value) - 30, math.log(1e8) + 30
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if share_below(mid) < p else (lo, mid)
    return math.exp(hi) / weight


def _units(model: nn.Module, method: str, attention: bool) -> list[_Unit]:
    modules = dict(model.named_modules())
    units: list[_Unit] = []
    for lm in layer_modules(model):
        def tap(path: str, io: str = "in", layer: int = lm.layer) -> Site:
            return Site(f"{path}:{io}", path, io, layer=layer)

        down = list(lm.groups["mlp_out"])
        if method == "teal":
            for paths in lm.groups.values():
                units.append(_Unit(tap(paths[0]), list(paths), list(paths)))
        elif method == "wina":
            for p in (p for paths in lm.groups.values() for p in paths):
                units.append(_Unit(tap(p), [p], [p], scale=column_norms(modules[p])))
        elif method == "cats":
            units.append(_Unit(tap(lm.act, "out"), down, [lm.act]))
        elif method == "chess":
            width = linear_weight(modules[down[0]]).shape[1]
            up = tap(lm.up, "out") if lm.up else None
            unit = _Unit(tap(lm.act, "out"), down, [lm.act], channels=width, up_tap=up)
            units.append(unit)
            if attention:
                for p in (lm.query, *lm.groups["attn_out"]):
                    units.append(_Unit(tap(p), [p], [p]))
    return units


def calibrate(
    model: nn.Module,
    tokenizer: Any = None,
    data: Any = None,
    *,
    method: str = "teal",
    sparsity: float = 0.5,
    allocation: str = "uniform",
    attention: bool = False,
    token_fraction: float = 0.4,
    passes: int = 2,
    seq_len: int = 256,
    max_tokens: int = 16384,
    batch_size: int = 8,
    tokens: TokenBatches | None = None,
    progress: bool = True,
) -> SparsityConfig:
    """Thresholds that zero ``sparsity`` of the sparsified inputs on ``data`` (default corpus).

    ``attention`` (CHESS only) also sparsifies the Q and O projection inputs. ``token_fraction``
    (CoreInfer) is the share of each token's neurons counted as its core. ``passes=2`` measures
    again with the first thresholds applied, so upstream sparsity is accounted for.
    """
    if method not in METHODS:
        raise SparsifyError(f"unknown sparsity method {method!r}; choose one of {', '.join(METHODS)}")
    if allocation not in ("uniform", "greedy"):
        raise SparsifyError(f"allocation must be 'uniform' or 'greedy', not {allocation!r}")
    if not 0.0 <= sparsity <= MAX_SPARSITY:
        raise SparsifyError(f"sparsity must be between 0 and {MAX_SPARSITY}, got {sparsity}")
    if passes not in (1, 2):
        raise SparsifyError("passes must be 1 (dense statistics) or 2 (re-measured under sparsity)")
    model_type = getattr(model.config, "model_type", "")
    params = {"allocation": allocation, "attention": attention, "token_fraction": token_fraction, "passes": passes}
    lms = layer_modules(model)
    if method in ("topk", "coreinfer"):
        if allocation != "uniform":
            raise SparsifyError(f"{method} keeps a fixed share per layer; use allocation='uniform'")
        return SparsityConfig(method, sparsity, {}, {lm.act: sparsity for lm in lms}, params, model_type)
    if tokens is None:
        tokens = load_tokens(data, tokenizer, seq_len, max_tokens)
    units = _units(model, method, attention)
    _collect(model, units, tokens, batch_size, keep_rows=allocation == "greedy", progress=progress)
    levels = {u.key: sparsity for u in units}
    if allocation == "greedy" and sparsity > 0:
        levels = _greedy(model, units, sparsity)
    config = _config(units, levels, method, sparsity, params, model_type)
    if passes == 2 and sparsity > 0:
        units = _units(model, method, attention)
        with apply(model, config):  # taps see each input before its own threshold, after upstream ones
            _collect(model, units, tokens, batch_size, keep_rows=False, progress=progress)
        config = _config(units, levels, method, sparsity, params, model_type)
    return config


def _config(
    units: list[_Unit], levels: dict[str, float], method: str, sparsity: float, params: dict, model_type: str
) -> SparsityConfig:
    thresholds, targets = {}, {}
    for u in units:
        t = u.threshold(levels[u.key])
        for key in u.outputs:
            thresholds[key], targets[key] = t.clone(), levels[u.key]
    return SparsityConfig(method, sparsity, thresholds, targets, params, model_type)


def _collect(
    model: nn.Module, units: list[_Unit], tokens: TokenBatches, batch_size: int, keep_rows: bool, progress: bool
) -> None:
    by_tap = {u.tap.name: u for u in units}
    by_up = {u.up_tap.name: u for u in units if u.up_tap is not None}
    for u in units:  # per-channel sketches are coarser (2%), so 30 layers x 1536 channels stay small
        u.sketch = (QuantileSketch(channels=u.channels) if u.channels == 1
                    else QuantileSketch(alpha=0.02, min_value=1e-6, max_value=1e5, channels=u.channels))

    def on(site: Site, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        if site.name in by_up:
            u = by_up[site.name]
            s = rows.abs().sum(0).double().cpu()
            u.up_sum = s if u.up_sum is None else u.up_sum + s
            u.up_n += rows.shape[0]
            return
        u = by_tap[site.name]
        u.sketch.update((rows * u.scale.to(rows.device) if u.scale is not None else rows).cpu())
        if keep_rows and u.n_rows < SAMPLE_ROWS:  # spread over the text: every 7th row of each batch
            take = rows[::7][: SAMPLE_ROWS - u.n_rows].cpu()
            u.rows.append(take)
            u.n_rows += take.shape[0]

    # Inside ``apply`` an activation is wrapped by SparseAct: observe its raw ``inner`` output.
    for u in units:
        if isinstance(model.get_submodule(u.tap.module_path), SparseAct):
            by_tap.pop(u.tap.name)
            u.tap = Site(u.tap.name, f"{u.tap.module_path}.inner", u.tap.io, layer=u.tap.layer)
            by_tap[u.tap.name] = u
    taps = [u.tap for u in units] + [u.up_tap for u in units if u.up_tap is not None]
    bar = tqdm(total=tokens.num_tokens, unit="tok", unit_scale=True, desc="calibrate", disable=not progress)
    device = next(model.parameters()).device
    with torch.inference_mode(), trace(model, taps, on_activation=on):
        for batch in tokens.batches(batch_size):
            model(input_ids=batch.to(device), use_cache=False)
            bar.update(batch.numel())
    bar.close()


def _greedy(model: nn.Module, units: list[_Unit], target: float) -> dict[str, float]:
    """Per-unit sparsity levels whose weight-weighted mean reaches ``target`` at least error."""
    modules = dict(model.named_modules())
    grid = [round(i * STEP, 4) for i in range(int(MAX_SPARSITY / STEP) + 1)]
    weight = {u.key: sum(modules[c].weight.numel() for c in u.consumers) for u in units}
    curves = {u.key: _error_curve(modules, u, grid) for u in units}
    level = {u.key: 0 for u in units}  # index into grid
    total = sum(weight.values())
    reached = 0.0
    heap = [(_cost(curves[k], 0, weight[k]), k) for k in level]
    heapq.heapify(heap)
    while reached < target * total - 1e-9 and heap:
        _, k = heapq.heappop(heap)
        level[k] += 1
        reached += STEP * weight[k]
        if level[k] + 1 < len(grid):
            heapq.heappush(heap, (_cost(curves[k], level[k], weight[k]), k))
    return {k: grid[i] for k, i in level.items()}


def _cost(curve: list[float], i: int, weight: int) -> float:
    return (curve[i + 1] - curve[i]) / (STEP * weight)


def _error_curve(modules: dict[str, nn.Module], u: _Unit, grid: list[float]) -> list[float]:
    """Relative output error of the unit's consumers at each sparsity level, on the kept rows.

    For MLP-activation units the activation stands in for the down projection's input
    (``act * up``): the error ranks layers, it does not need to be exact.
    """
    raw = torch.cat(u.rows)
    errs = []
    with torch.no_grad():
        weights = [linear_weight(modules[c]).float() for c in u.consumers]  # [out, in], Conv1D too
        den = sum(float((raw @ w.t()).square().sum()) for w in weights)
        for p in grid:
            t = u.threshold(p) if p > 0 else torch.full((1,), -1.0)
            dropped = raw * ~mask(raw, t, u.scale)
            num = sum(float((dropped @ w.t()).square().sum()) for w in weights)
            errs.append(num / max(den, 1e-30))
    return errs
