"""The one mechanism every intervention uses: replace a site's tensor inside a forward pass.

``edit_site(model, site, fn)`` registers a hook that passes the site's tensor (the module's
input or output, the right element of a tuple) through ``fn`` and puts the result back. Hooks
are prepended, so interventions run before observers and an open ``trace`` records the edited
values. ``fn`` must not modify its argument in place (observers may hold it): clone first.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch

from .sites import Site

Edit = Callable[[torch.Tensor], torch.Tensor]


def edit_site(model: Any, site: Site, fn: Edit) -> Any:
    """Register the edit; returns the hook handle (call ``.remove()`` to undo)."""
    module = model.get_submodule(site.module_path)  # a path walk, not a walk over every module
    if site.io == "in":
        def pre(mod: Any, args: tuple, kwargs: dict):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

        return module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True)

    def post(mod: Any, args: tuple, output: Any):
        if isinstance(output, tuple):
            i = site.index
            return (*output[:i], fn(output[i]), *output[i + 1 :])
        return fn(output)

    return module.register_forward_hook(post, prepend=True)


@contextmanager
def edits(model: Any, pairs: Iterable[tuple[Site, Edit]]) -> Iterator[None]:
    """Apply ``(site, fn)`` edits for the duration of the block; always removed on exit."""
    handles = []
    try:
        for site, fn in pairs:
            handles.append(edit_site(model, site, fn))
        yield
    finally:
        for h in handles:
            h.remove()
