"""Stock edits: small functions that each return an edit ``fn(tensor, site_name) -> tensor``.

They plug into ``actscope.edit`` and are what ablation, patching, steering, direction ablation
and causal tracing are built from, so a hand-made intervention uses the same, tested parts:

    from actscope.intervene.edits import add, project_out, zero
    with actscope.edit(model, {"blocks.3.mlp.hook_post": zero(units=[12, 40]),
                               "blocks.*.hook_resid_post": project_out(r)}):
        model(ids)

An edit sees the site's tensor as ``trace`` shows it: ``[batch, pos, ...]``. ``rows`` select
along the batch axis, ``positions`` along the position axis, ``units`` along the next one
(neurons of a ``[batch, pos, d]`` site, heads of a per-head site such as ``attn.hook_z``). Each
selection is an index, a list of indices, a slice or ``None`` (all). Edits return a new tensor
and never change their argument, which an open ``trace`` may hold.
"""

from __future__ import annotations

import sys
import types
import warnings
from typing import Any, Callable, Sequence, Union

import torch

from ..errors import ActscopeError
from ..hooks import Edit, UserEdit
from ..sites import Site

Select = Union[int, slice, Sequence[int], None]
PositionMask = Callable[[torch.Tensor], Union[torch.Tensor, None]]  # tensor -> bool [pos], or None for all


def bind(site: Site, fn: UserEdit) -> tuple[Site, Edit]:
    """A stock edit as the hook core's ``(site, fn(tensor))`` pair, for ``hooks.edits``."""
    name = site.name
    return site, lambda x: fn(x, name)


def _axis(sel: Select) -> slice | list[int]:
    """One axis' selection for basic indexing: an index keeps its axis (a length-1 slice)."""
    if sel is None:
        return slice(None)
    if isinstance(sel, int):
        return slice(sel, sel + 1) if sel != -1 else slice(-1, None)
    if isinstance(sel, slice):
        return sel
    return [int(i) for i in sel]


def _write(x: torch.Tensor, value: Any, rows: Select, positions: Select, units: Select) -> torch.Tensor:
    """A copy of ``x`` with ``x[rows, positions, units]`` set to ``value`` (broadcast)."""
    if units is not None and x.dim() < 3:
        raise ActscopeError(f"units select the axis after (batch, position); this tensor has shape {tuple(x.shape)}")
    sels = [_axis(s) for s in (rows, positions)] + ([_axis(units)] if units is not None else [])
    if torch.is_tensor(value):
        value = value.to(device=x.device, dtype=x.dtype)
    out = x.clone()
    lists = [s for s in sels if isinstance(s, list)]
    if len(lists) <= 1:  # one index list (or none) selects the block it names
        out[tuple(sels)] = value
        return out
    # two or more lists would be paired up element by element; an open mesh selects their product
    index = []
    for axis, s in enumerate(sels):
        idx = torch.arange(x.shape[axis], device=x.device)[s] if isinstance(s, slice) else torch.tensor(s, device=x.device)
        index.append(idx.view(*([1] * axis), -1, *([1] * (len(sels) - axis - 1))))
    out[tuple(index)] = value
    return out


def replace_at(values: torch.Tensor | float, *, rows: Select = None, positions: Select = None,
               units: Select = None) -> UserEdit:
    """Set the selection to ``values`` (broadcast to it): patching a clean value in, resampling.

    ``values`` may also hold one entry per unit of the whole site (the shape of one token's
    activation, as ``site_mean`` gives); with ``units`` given, the selected units' entries are used.
    """
    def fn(x: torch.Tensor, name: str) -> torch.Tensor:
        v = values
        if units is not None and torch.is_tensor(v) and v.shape == x.shape[2:]:
            v = v[_axis(units)]
        return _write(x, v, rows, positions, units)

    return fn


def zero(*, units: Select = None, positions: Select = None, rows: Select = None) -> UserEdit:
    """Set the selection to 0 (zero ablation)."""
    def fn(x: torch.Tensor, name: str) -> torch.Tensor:
        if rows is None and positions is None and isinstance(units, (list, tuple)) and x.dim() >= 3:
            # the common case (some units everywhere): one fused copy-and-fill, no index_put
            return x.index_fill(2, torch.as_tensor(units, device=x.device), 0)
        return _write(x, 0, rows, positions, units)

    return fn


def mean(values: torch.Tensor, *, units: Select = None, positions: Select = None) -> UserEdit:
    """Set the selection to a mean (mean ablation): ``replace_at`` under the name of its use.
    ``values`` is typically ``site_mean(...)``, one entry per unit of the site."""
    return replace_at(values, units=units, positions=positions)


def add(vector: torch.Tensor, *, scale: float = 1.0, positions: Select | PositionMask = None) -> UserEdit:
    """Add ``scale * vector`` to every token's activation (steering), or to ``positions`` only.

    ``vector`` holds one value per element of a token's activation (``[head, d_head]`` values
    for a per-head site). ``positions`` may also be a function of the tensor returning a boolean
    mask over its positions, which is how steering follows positions through the KV cache.
    """
    def fn(x: torch.Tensor, name: str) -> torch.Tensor:
        trailing = x.shape[2:]
        if vector.numel() != trailing.numel():
            raise ActscopeError(f"the vector for {name} has {vector.numel()} values; the site's tensor has "
                                f"{tuple(trailing)} per token")
        delta = (scale * vector).to(x.dtype).to(x.device).reshape(trailing)
        if positions is None:
            return x + delta
        if callable(positions):
            mask = positions(x)
            if mask is None:
                return x + delta
        else:
            mask = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
            mask[_axis(positions)] = True
        if not bool(mask.any()):
            return x
        return x + mask.view(1, x.shape[1], *([1] * len(trailing))).to(x.dtype) * delta

    return fn


def project_out(direction: torch.Tensor) -> UserEdit:
    """Remove the component along ``direction``: ``x <- x - (x . r) r`` with ``r`` its unit vector."""
    r = direction.float() / direction.float().norm().clamp_min(1e-12)

    def fn(x: torch.Tensor, name: str) -> torch.Tensor:
        rr = r.to(x.dtype).to(x.device)
        return x - (x @ rr).unsqueeze(-1) * rr

    return fn


def add_noise(noise: float | torch.Tensor, *, positions: Select = None, seed: int = 0, start: int = 0,
              repeat: int = 1) -> UserEdit:
    """Add noise: Gaussian with standard deviation ``noise``, or a fixed draw ``[samples, pos, ...]``.

    A standard deviation draws from ``seed`` for the tensor's shape, so every call with the same
    shape adds the same noise (a corrupted run that can be repeated), at ``positions`` or all.
    A fixed draw is what causal tracing uses: row ``r`` gets sample ``r // repeat``, position
    ``t`` gets the draw's position ``start + t`` (``start`` counts tokens already in a KV cache).
    """
    def fn(x: torch.Tensor, name: str) -> torch.Tensor:
        if torch.is_tensor(noise):
            part = noise[:, start: start + x.shape[1]]
            return x + part.repeat_interleave(repeat, dim=0).to(x.dtype)
        draw = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * noise
        if positions is not None:
            keep = torch.zeros(x.shape[1], dtype=torch.bool)
            keep[_axis(positions)] = True
            draw = draw * keep.view(1, -1, *([1] * (x.dim() - 2)))
        return x + draw.to(device=x.device, dtype=x.dtype)

    return fn


class _StockEdits(types.ModuleType):
    """``actscope.intervene.edits`` was the hook core's ``edits(model, pairs)`` before this module
    took the name; calling the module still does that, with a DeprecationWarning."""

    def __call__(self, model: Any, pairs: Any) -> Any:
        from .. import hooks

        warnings.warn("actscope.intervene.edits(model, pairs) moved to actscope.hooks.edits; "
                      "actscope.intervene.edits is now the stock edits module", DeprecationWarning, stacklevel=2)
        return hooks.edits(model, pairs)


sys.modules[__name__].__class__ = _StockEdits
