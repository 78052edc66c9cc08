"""One vocabulary of site shorthands, shared by patching, causal tracing and the CLI.

A patching heatmap has one row per layer, so a shorthand names a row of sites: ``resid_pre``
is ``blocks.{l}.hook_resid_pre`` for every layer ``l``. Any other name, glob or raw module path
is passed on to ``SiteMap.resolve`` unchanged, so shorthands and site names mix freely.
"""

from __future__ import annotations

import warnings
from typing import Sequence

from ..errors import ActscopeError
from ..sites import Site, SiteMap

SHORT_SITES: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
}
# causal_trace(kind=...) spelled these before the shared vocabulary; they still work, with a warning
OLD_KINDS: dict[str, str] = {"resid": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}


def shorthands() -> str:
    """The shorthands as a phrase, for help texts and error messages."""
    names = list(SHORT_SITES)
    return f"{', '.join(names[:-1])} or {names[-1]}"


def canonical_kind(kind: str) -> str:
    """A shorthand for causal tracing's ``kind=``; the old ``resid``/``mlp``/``attn`` are mapped."""
    if kind in OLD_KINDS:
        warnings.warn(f"kind={kind!r} is now kind={OLD_KINDS[kind]!r} (the site shorthands patching uses)",
                      DeprecationWarning, stacklevel=3)
        return OLD_KINDS[kind]
    if kind not in SHORT_SITES:
        raise ActscopeError(f"kind must be one of {shorthands()}, not {kind!r}")
    return kind


def layer_sites(sm: SiteMap, short: str) -> list[Site]:
    """The shorthand's site at every layer, in layer order."""
    return sm.resolve([f"blocks.{layer}.{SHORT_SITES[short]}" for layer in range(sm.n_layers)])


def resolve(sm: SiteMap, sites: str | Sequence[str]) -> list[Site]:
    """Shorthands, names, globs and raw paths -> sites that can be patched (not attention patterns,
    which the model recomputes, so a patch there would change nothing)."""
    names = [sites] if isinstance(sites, str) else list(sites)
    expanded: list[str] = []
    for name in names:
        if name in SHORT_SITES:
            expanded += [f"blocks.{layer}.{SHORT_SITES[name]}" for layer in range(sm.n_layers)]
        else:
            expanded.append(name)
    resolved = sm.resolve(expanded)
    patterns = [s.name for s in resolved if s.needs_eager_attention]
    if patterns:
        raise ActscopeError(f"attention patterns cannot be patched (they are recomputed): {', '.join(patterns[:3])}; "
                            "patch attn.hook_z heads")
    return resolved
