"""The KV cache argument, under whichever name the installed transformers uses.

transformers 5.x passes the KV cache to a model's ``forward`` as ``past_key_values`` up to 5.23
and as ``cache`` from 5.24 on (the old name is a deprecated alias, due for removal in 5.40);
state-space models have used ``cache_params``. Code that reads the cache out of a hook's kwargs,
passes one in, or takes one from a model output goes through this module, so the next rename is
one edit here instead of a silent bug in every detector that looks for the wrong key.
"""

from __future__ import annotations

from typing import Any

#: every keyword under which some transformers 5.x release hands a forward pass its cache
CACHE_KWARGS = ("cache", "past_key_values", "cache_params")


def _cache_keyword() -> str:
    """``"cache"`` where model outputs carry a ``cache`` field (transformers >= 5.24), else the old name."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})
    return "cache" if "cache" in fields else "past_key_values"


#: the keyword this transformers wants for passing a cache into ``model(...)``
CACHE_KWARG = _cache_keyword()


def passed_cache(kwargs: dict[str, Any]) -> Any:
    """The cache object a forward (pre-)hook's kwargs carry, or None, whatever its keyword."""
    for name in CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def cached_length(kwargs: dict[str, Any]) -> int:
    """How many tokens are already in the KV cache handed to this forward pass (0 without one).

    Legacy tuple caches (``((k, v), ...)`` with keys ``[batch, heads, seq, d]``) are read too.
    """
    cache = passed_cache(kwargs)
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)) and cache[0]:
        return int(cache[0][0].shape[-2])
    return 0


def with_cache(cache: Any) -> dict[str, Any]:
    """Keyword arguments that hand ``cache`` to ``model(...)`` under the current name."""
    return {CACHE_KWARG: cache}


def output_cache(output: Any) -> Any:
    """The cache a model output returns (``output.cache``, or ``past_key_values`` before 5.24)."""
    return getattr(output, CACHE_KWARG, None)
