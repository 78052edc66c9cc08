"""Where the sparsifiable linear layers sit in each family: a declarative table, like families.py.

Per decoder layer, linear layers are grouped by the input they share (q/k/v read the same
normed hidden state, gate/up read the same MLP input). ``act`` is the MLP activation module,
whose output CATS, Top-k and CoreInfer sparsify; the down projection then reads only the
channels that stayed non-zero.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import SparsifyError
from ..sites import SiteMap

GROUPS = ("attn_in", "attn_out", "mlp_in", "mlp_out")


@dataclass(frozen=True)
class Layout:
    groups: dict[str, tuple[str, ...]]  # group -> linear module paths relative to a layer
    act: str  # MLP activation module, relative to a layer
    query: str  # the query projection (CHESS sparsifies Q and O inputs only)
    up: str | None  # the up projection of a gated MLP (CHESS weighs channels by E|up|)


_LLAMA = Layout(
    groups={
        "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "attn_out": ("self_attn.o_proj",),
        "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
        "mlp_out": ("mlp.down_proj",),
    },
    act="mlp.act_fn",
    query="self_attn.q_proj",
    up="mlp.up_proj",
)
_PHI3 = Layout(
    groups={
        "attn_in": ("self_attn.qkv_proj",),
        "attn_out": ("self_attn.o_proj",),
        "mlp_in": ("mlp.gate_up_proj",),
        "mlp_out": ("mlp.down_proj",),
    },
    act="mlp.activation_fn",
    query="self_attn.qkv_proj",
    up=None,  # fused gate_up_proj: no separate up output to weigh channels by
)
_NEOX = Layout(
    groups={
        "attn_in": ("attention.query_key_value",),
        "attn_out": ("attention.dense",),
        "mlp_in": ("mlp.dense_h_to_4h",),
        "mlp_out": ("mlp.dense_4h_to_h",),
    },
    act="mlp.act",
    query="attention.query_key_value",
    up=None,
)
LAYOUTS: dict[str, Layout] = {
    **{t: _LLAMA for t in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2",
        "granite", "smollm3",
    )},
    "phi3": _PHI3,
    "gpt_neox": _NEOX,
}


@dataclass(frozen=True)
class LayerModules:
    layer: int
    groups: dict[str, tuple[str, ...]]  # group -> full module paths
    act: str
    query: str
    up: str | None


def layer_modules(model: nn.Module) -> list[LayerModules]:
    """The sparsifiable modules of every layer, checked to exist and to be ``nn.Linear``."""
    model_type = getattr(model.config, "model_type", "unknown")
    layout = LAYOUTS.get(model_type)
    if layout is None:
        raise SparsifyError(
            f"activation sparsity has no layout for model type {model_type!r}; supported: "
            f"{', '.join(sorted(LAYOUTS))} (add an entry to actscope/sparsify/layout.py)"
        )
    sm = SiteMap(model)
    modules = dict(model.named_modules())
    out = []
    for layer in range(sm.n_layers):
        base = f"{sm.layers_path}.{layer}"
        groups = {g: tuple(f"{base}.{p}" for p in paths) for g, paths in layout.groups.items()}
        for path in (p for paths in groups.values() for p in paths):
            if not isinstance(modules.get(path), nn.Linear):
                raise SparsifyError(f"{path} is {type(modules.get(path)).__name__}, expected nn.Linear")
        act = f"{base}.{layout.act}"
        if act not in modules:
            raise SparsifyError(f"MLP activation module {act} not found")
        up = f"{base}.{layout.up}" if layout.up else None
        out.append(LayerModules(layer, groups, act, f"{base}.{layout.query}", up))
    acts = [modules[lm.act] for lm in out]
    if len({id(a) for a in acts}) != len(acts):
        raise SparsifyError("the MLP activation module is shared between layers; per-layer hooks cannot tell them apart")
    return out
