"""Inspect a model's sites: names and shapes from one small forward pass."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .sites import site_map
from .trace import trace


def site_shapes(model: Any, patterns: Iterable[str] = ("**",), seq_len: int = 4) -> dict[str, tuple]:
    """``{site: shape}`` for sites matching ``patterns`` on a ``[1, seq_len]`` dummy input.

    Shapes are as captured, e.g. ``[1, seq, d_model]`` or ``[1, head, query, key]``.
    """
    sites = site_map(model).resolve(list(patterns))
    vocab = int(getattr(model.config, "vocab_size", 0) or 2)
    ids = (torch.arange(seq_len) % max(vocab - 1, 1) + 1).unsqueeze(0).to(model.device)
    with torch.inference_mode(), trace(model, sites) as cache:
        model(input_ids=ids, use_cache=False)
    return {name: tuple(cache[name].shape) for name in cache}
