"""Context-managed hooks: capture sites while the unmodified model runs.

    with actscope.trace(model, ["blocks.*.hook_resid_post"]) as cache:
        model(input_ids)
    cache["blocks.3.hook_resid_post"]

Hooks only read: they return ``None``, so the model's outputs are bit-identical with and without
them. Every hook is removed on exit, even after an exception. A requested site that never fired
is an error at exit, not an empty result.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Callable, Iterable

import torch
from torch import nn

from .errors import SiteError, SiteNotFiredError
from .hooks import eager_attention, hooks, read_site
from .sites import Site, site_map

OnActivation = Callable[[Site, torch.Tensor], None]


class _StopForward(Exception):
    """Raised from a hook to end a forward pass early (``trace(stop=True)``); never escapes."""


class ActivationCache(Mapping):
    """Captured tensors by site name. ``cache[name]`` is the latest call's value;
    ``cache.all(name)`` lists one tensor per model call (e.g. per generation step)."""

    def __init__(self, sites: list[Site]):
        self.sites = sites
        self._values: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}

    def __getitem__(self, name: str) -> torch.Tensor:
        values = self._values.get(name)
        if values is None:
            raise SiteError(f"site {name!r} was not traced; traced: {', '.join(self._values)}")
        if not values:
            raise SiteNotFiredError(f"site {name!r} has not fired yet")
        return values[-1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def all(self, name: str) -> list[torch.Tensor]:
        return list(self._values[name])

    def count(self, name: str) -> int:
        return len(self._values[name])

    def _add(self, name: str, value: torch.Tensor) -> None:
        self._values[name].append(value)


@contextmanager
def trace(
    model: nn.Module,
    sites: str | Iterable[str] | list[Site],
    *,
    on_activation: OnActivation | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    stop: bool = False,
) -> Iterator[ActivationCache]:
    """Hook ``sites`` on ``model`` for the duration of the block.

    By default tensors are kept in the returned cache (detached; converted to ``dtype`` and
    moved to ``device`` when given). Pass ``on_activation(site, tensor)`` to stream them
    elsewhere instead, as the recorder does; then nothing is kept.

    ``stop=True`` cuts the forward pass short once every site has fired: the layers after the
    last one requested, and the unembedding, never run. The model call then returns nothing,
    so the code after it inside the block is skipped; read the cache after the block.
    """
    if isinstance(sites, list) and sites and isinstance(sites[0], Site):
        resolved: list[Site] = sites  # type: ignore[assignment]
    else:
        resolved = site_map(model).resolve(sites)  # type: ignore[arg-type]
    cache = ActivationCache(resolved)
    fired = {s.name: 0 for s in resolved}

    def keep(site: Site, value: torch.Tensor) -> None:
        value = value.detach()
        if dtype is not None or device is not None:
            value = value.to(device=device, dtype=dtype)
        cache._add(site.name, value)

    sink = on_activation or keep

    waiting = set(fired)

    def handle(site: Site, value: torch.Tensor) -> None:
        fired[site.name] += 1
        sink(site, value)
        if stop:
            waiting.discard(site.name)
            if not waiting:
                raise _StopForward

    needs_eager = any(s.needs_eager_attention for s in resolved)
    try:
        with hooks([lambda s=s: read_site(model, s, handle) for s in resolved]), eager_attention(model, needs_eager):
            yield cache
    except _StopForward:
        pass  # every site fired: the rest of the forward pass was not needed
    silent = [name for name, n in fired.items() if n == 0]
    if silent:
        hint = (
            "the model was not called inside the trace block"
            if len(silent) == len(fired)
            else "their modules did not run in this forward pass"
        )
        raise SiteNotFiredError(f"site(s) never fired: {', '.join(silent[:8])} ({hint})")
