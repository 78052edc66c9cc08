"""The one hook core: every read and every write of a module's input or output goes through here.

Three layers, smallest first:

- ``hook_module(module, fn, when=...)`` is the only place in actscope that registers a torch
  hook. Everything else (site reads, site edits, the steering position tracker, the CoreInfer
  prompt detector, layer skipping, expert routing, attribution's gradient capture) calls it.
- ``read_site`` / ``edit_site`` hook one ``Site``: a read sees exactly ``site.extract(...)``;
  an edit passes that tensor through a function and puts the result back with
  ``site.inject(...)``, so an edit function sees exactly what ``trace`` shows, for every site,
  including ``model:output``, per-head views and input sites.
- ``edit(model, {site_or_glob: fn})``, the public context manager for writing your own
  intervention, as baukit's ``edit_output``, TransformerLens's ``fwd_hooks`` or nnsight's
  ``.output = ...``:

      with actscope.edit(model, {"blocks.5.mlp.hook_post": lambda x, name: x.clamp(max=3)}):
          model(ids)

Edits are prepended, reads appended, so interventions run before observers and an open
``trace`` records the edited values. An edit function must not modify its argument in place
(observers may hold it): return a new tensor.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import SiteError
from .kvcache import cached_length  # noqa: F401  (re-exported: the hook core answers "how much is cached")
from .sites import Site, site_map

log = logging.getLogger("actscope.trace")  # the name users already filter on

Edit = Callable[[torch.Tensor], torch.Tensor]
UserEdit = Callable[[torch.Tensor, str], torch.Tensor]
Observer = Callable[[Site, torch.Tensor], None]


def hook_module(module: nn.Module, fn: Callable[..., Any], *, when: Literal["before", "after"],
                prepend: bool = False) -> RemovableHandle:
    """Register ``fn`` on ``module``; the only torch hook registration in actscope.

    ``when="before"``: ``fn(module, args, kwargs)`` runs before ``forward`` and may return
    ``(args, kwargs)`` to replace them. ``when="after"``: ``fn(module, args, kwargs, output)``
    runs after it and may return a new output. Returning ``None`` changes nothing, which is what
    keeps a read-only hook bit-identical.
    """
    if when == "before":
        return module.register_forward_pre_hook(fn, with_kwargs=True, prepend=prepend)
    if when == "after":
        return module.register_forward_hook(fn, with_kwargs=True, prepend=prepend)
    raise ValueError(f"when must be 'before' or 'after', not {when!r}")


def read_site(model: nn.Module, site: Site, observer: Observer) -> RemovableHandle:
    """Call ``observer(site, tensor)`` each time the site fires; the model's values are untouched."""
    module = model.get_submodule(site.module_path)
    if site.io == "in":
        return hook_module(module, lambda m, args, kwargs: observer(site, site.extract(args, kwargs)), when="before")
    return hook_module(module, lambda m, args, kwargs, out: observer(site, site.extract(args, kwargs, out)),
                       when="after")


def edit_site(model: nn.Module, site: Site, fn: Edit) -> RemovableHandle:
    """Replace the site's tensor by ``fn(tensor)`` each time it fires; returns the hook handle."""
    module = model.get_submodule(site.module_path)  # a path walk, not a walk over every module
    if site.io == "in":
        def before(m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return site.inject(fn(site.extract(args, kwargs)), args, kwargs)

        return hook_module(module, before, when="before", prepend=True)

    def after(m: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return site.inject(fn(site.extract(args, kwargs, output)), args, kwargs, output)

    return hook_module(module, after, when="after", prepend=True)


@contextmanager
def hooks(handles: Iterable[Callable[[], RemovableHandle]]) -> Iterator[None]:
    """Register each ``make()`` in order for the block's duration; all are removed on exit, even
    when a later registration fails."""
    registered: list[RemovableHandle] = []
    try:
        for make in handles:
            registered.append(make())
        yield
    finally:
        for h in reversed(registered):
            h.remove()


@contextmanager
def eager_attention(model: nn.Module, needed: bool) -> Iterator[None]:
    """Switch to eager attention for the block when ``needed``, and say so; restore after.

    Fused kernels (sdpa, flash) never materialise attention weights, so patterns need eager.
    """
    current = getattr(model.config, "_attn_implementation", "eager")
    if not needed or current == "eager":
        yield
        return
    log.warning("attention patterns requested: switching attention from %s to eager", current)
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(current)


@contextmanager
def edits(model: nn.Module, pairs: Iterable[tuple[Site, Edit]]) -> Iterator[None]:
    """Apply ``(site, fn)`` edits for the duration of the block; always removed on exit.

    Attention patterns are read-only: the attention module returns its pattern beside an output
    it has already computed from it, so an edit there would silently change nothing.

    Several edits of one site run in the order given: each is prepended (ahead of observers), so
    they are registered last first.
    """
    pairs = list(pairs)
    patterns = [site.name for site, _ in pairs if site.needs_eager_attention]
    if patterns:
        raise SiteError(f"{patterns[0]} cannot be edited: the attention output is computed before the pattern "
                        "is returned, so the edit would change nothing; edit attn.hook_z (per head) instead")
    with hooks([lambda s=site, f=fn: edit_site(model, s, f) for site, fn in reversed(pairs)]):
        yield


def _bind(fn: UserEdit, site: Site) -> Edit:
    def edit_one(x: torch.Tensor) -> torch.Tensor:
        out = fn(x, site.name)
        if not torch.is_tensor(out):
            raise SiteError(f"the edit for {site.name} returned {type(out).__name__}, not a tensor")
        if out.shape != x.shape:
            raise SiteError(f"the edit for {site.name} returned shape {tuple(out.shape)}; "
                            f"the site's tensor has shape {tuple(x.shape)}")
        return out

    return edit_one


@contextmanager
def edit(model: nn.Module, edits_by_site: Mapping[str | Site, UserEdit]) -> Iterator[None]:
    """Edit sites for the block's duration: ``{site name, glob or Site: fn(tensor, site_name)}``.

    ``fn`` gets exactly the tensor ``trace`` would show for that site and returns its
    replacement, of the same shape. A glob applies ``fn`` to every matching site (the site's
    name tells them apart). Examples:

        clamp = lambda x, name: x.clamp(max=3.0)                        # clamp every neuron
        add = lambda x, name: x + 4.0 * direction                        # add a vector
        splice = lambda x, name: sae.decode(sae.encode(x))               # a reconstruction
        with actscope.edit(model, {"blocks.6.hook_resid_post": splice}):
            model(ids)
    """
    if not isinstance(edits_by_site, Mapping):
        raise SiteError("edit() takes a dict {site or glob: fn(tensor, site_name)}")
    sm = site_map(model)
    pairs: list[tuple[Site, Edit]] = []
    for spec, fn in edits_by_site.items():
        if not callable(fn):
            raise SiteError(f"the edit for {spec!r} is {type(fn).__name__}, not a function of (tensor, site_name)")
        for site in ([spec] if isinstance(spec, Site) else sm.resolve(spec)):
            pairs.append((site, _bind(fn, site)))
    with edits(model, pairs):
        yield
