"""Ablation of units (neurons, heads) at any site: zero, mean or resample.

    with actscope.ablate(model, "blocks.3.mlp.hook_post", units=[12, 40]):          # zero
    with actscope.ablate(model, "blocks.5.attn.hook_z", units=[2], mode="mean", values=means):
    with actscope.ablate(model, "blocks.5.hook_resid_post", positions=[4], mode="resample", values=other):

``units`` index the first axis after (batch, position): neurons for ``[batch, pos, d]`` sites,
heads for per-head sites such as ``attn.hook_z``. ``values`` (for "mean" and "resample") is
anything broadcastable to the selected slice, e.g. ``site_mean(...)[units]`` or another input's
activations. Per-head sites are edited through their view of the underlying tensor, so the
model's own layout is respected. Hooks are registered ahead of observers.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch

from ..data import load_tokens
from ..errors import ActscopeError
from ..hooks import UserEdit, edits
from ..sites import Site, site_map
from ..trace import trace
from .edits import bind, mean, replace_at, zero

MODES = ("zero", "mean", "resample")


def _stock(mode: str, units: Sequence[int] | None, positions: Sequence[int] | None,
           values: torch.Tensor | None) -> UserEdit:
    """The stock edit (intervene/edits.py) for one ablation mode."""
    units = list(units) if units is not None else None
    positions = list(positions) if positions is not None else None
    if mode == "zero":
        return zero(units=units, positions=positions)
    if mode == "mean":
        return mean(values, units=units, positions=positions)
    return replace_at(values, units=units, positions=positions)


@contextmanager
def ablate(
    model: Any,
    site: str | Sequence[str],
    *,
    units: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    mode: str = "zero",
    values: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
) -> Iterator[None]:
    """Ablate ``units`` (or the whole site) at ``positions`` (or all) for the block's duration.

    ``site`` may be a glob or a list (``"blocks.*.mlp.hook_post"``): every matching site is
    ablated alike; ``values`` is then one tensor for all, or a dict ``{site name: tensor}``.
    """
    if mode not in MODES:
        raise ActscopeError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode != "zero" and values is None:
        raise ActscopeError(f"mode {mode!r} needs values (e.g. actscope.site_mean(...) or another run's activations)")
    resolved = site_map(model).resolve([site] if isinstance(site, str) else list(site))
    if any(s.needs_eager_attention for s in resolved):
        raise ActscopeError("attention patterns cannot be ablated; ablate attn.hook_z heads instead")

    def value_for(s: Site) -> torch.Tensor | None:
        if isinstance(values, Mapping):
            if s.name not in values:
                raise ActscopeError(f"values has no entry for {s.name}")
            return values[s.name]
        return values

    pairs = [bind(s, _stock(mode, units, positions, value_for(s))) for s in resolved]
    with edits(model, pairs):
        yield


def site_mean(model: Any, tokenizer: Any, site: str, data: Any = None, seq_len: int = 128,
              max_tokens: int = 4096, batch_size: int = 8) -> torch.Tensor:
    """Mean activation of ``site`` over a corpus (default: Python's manual), for mean ablation."""
    tokens = load_tokens(data, tokenizer, seq_len, max_tokens)
    total, count = None, 0
    for batch in tokens.batches(batch_size):
        with torch.inference_mode(), trace(model, [site], stop=True) as cache:  # layers after the site never run
            model(input_ids=batch.to(model.device), use_cache=False)
        x = cache[site].double()
        total = x.sum((0, 1)) if total is None else total + x.sum((0, 1))
        count += x.shape[0] * x.shape[1]
    return (total / count).float()
