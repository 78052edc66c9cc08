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
from ..hooks import edits
from ..sites import Site, site_map
from ..trace import trace

MODES = ("zero", "mean", "resample")


def _edit(site: Site, x: torch.Tensor, units: Sequence[int] | None, positions: Sequence[int] | None,
          mode: str, values: torch.Tensor | None) -> torch.Tensor:
    # x is the site's tensor as traced: [batch, pos, d], or [batch, pos, head, d_head] for a
    # per-head site, so axis 2 is the unit axis either way
    if mode == "zero" and positions is None and units is not None and x.dim() >= 3:
        # the common case (zero some units everywhere): one fused copy-and-fill, no index_put
        return x.index_fill(2, torch.as_tensor(units, device=x.device), 0)
    out = view = x.clone()  # observers may hold the original
    if values is not None and units is not None and values.shape == view.shape[2:]:
        values = values[list(units)]  # a whole-site mean (as site_mean gives): take the ablated units
    sel_pos = slice(None) if positions is None else list(positions)
    idx: tuple = (slice(None), sel_pos)
    if units is not None:
        idx = idx + (list(units),)
    if positions is not None and units is not None:  # two index lists would pair up: index in two steps
        target = view[:, sel_pos]
        target[:, :, list(units)] = 0 if mode == "zero" else values.to(x.dtype)
        view[:, sel_pos] = target
        return out
    view[idx] = 0 if mode == "zero" else values.to(x.dtype)
    return out


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

    pairs = [(s, lambda x, s=s, v=value_for(s): _edit(s, x, units, positions, mode, v)) for s in resolved]
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
