"""Named reshapes applied to a tapped tensor, referenced by name from the family table.

They split fused projections and expose heads as a separate axis. Each returns a view of the
captured tensor where possible, so capturing costs no copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Dims:
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Any) -> "Dims":
        n_heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 1)
        n_kv = int(getattr(config, "num_key_value_heads", 0) or n_heads)
        hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0)
        head_dim = int(getattr(config, "head_dim", 0) or (hidden // n_heads if hidden else 0))
        return cls(n_heads, n_kv, head_dim)


def _heads(x: torch.Tensor, n: int, d: int) -> torch.Tensor:
    return x.unflatten(-1, (n, d))


def make_view(name: str, dims: Dims) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Return the function for view ``name`` ("" means no reshape)."""
    h, kv, d = dims.n_heads, dims.n_kv_heads, dims.head_dim
    if name == "":
        return None
    if name == "heads":
        return lambda x: _heads(x, h, d)
    if name == "kv_heads":
        return lambda x: _heads(x, kv, d)
    if name == "gate_half":  # fused [gate | up] projection: the gate is the first half
        return lambda x: x[..., : x.shape[-1] // 2]
    kind, _, part_s = name.partition(":")
    part = int(part_s)
    if kind == "qkv":  # fused [q | k | v] along the last axis
        sizes = (h * d, kv * d, kv * d)
        start = sum(sizes[:part])
        n = h if part == 0 else kv
        return lambda x: _heads(x[..., start : start + sizes[part]], n, d)
    if kind == "neox_qkv":  # GPT-NeoX interleaves per head: [head, (q k v), d_head]
        return lambda x: _heads(x, h, 3 * d)[..., part * d : (part + 1) * d]
    raise ValueError(f"unknown view {name!r}")
