"""The KV cache helper: every keyword transformers 5.x has used for the cache, and the one it wants now."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from actscope.kvcache import CACHE_KWARG, cached_length, output_cache, passed_cache, with_cache


def _cache_of(model, n: int):
    return output_cache(model(torch.arange(1, n + 1)[None], use_cache=True))


def test_cached_length_reads_every_keyword(tiny_llama):
    model, _ = tiny_llama
    cache = _cache_of(model, 5)
    assert isinstance(cache, DynamicCache)
    for name in ("cache", "past_key_values", "cache_params"):
        assert cached_length({name: cache}) == 5
        assert passed_cache({name: cache}) is cache
    assert cached_length({}) == 0 and cached_length({"cache": None, "past_key_values": None}) == 0
    legacy = ((torch.zeros(1, 2, 7, 4), torch.zeros(1, 2, 7, 4)),)
    assert cached_length({"past_key_values": legacy}) == 7


def test_with_cache_uses_the_name_the_model_reads(tiny_llama):
    """A continuation through ``with_cache`` equals the whole sequence run at once, with no warning."""
    model, _ = tiny_llama
    ids = torch.arange(1, 9)[None]
    import warnings

    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        full = model(ids).logits[:, -1]
        cache = _cache_of(model, 7)
        step = model(ids[:, 7:], **with_cache(cache), use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
    assert list(with_cache(cache)) == [CACHE_KWARG]


def test_a_hook_sees_the_cache_length_during_generate(tiny_llama):
    """What the steering and CoreInfer detectors rely on: 0 on the prompt pass, then the tokens so far."""
    model, _ = tiny_llama
    seen: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(cached_length(kw)), with_kwargs=True)
    try:
        with torch.inference_mode():
            model.generate(torch.arange(1, 6)[None], max_new_tokens=4, do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    assert seen == [0, 5, 6, 7]
