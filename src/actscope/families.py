"""The declarative table: everything actscope knows about each HF model family, in one place.

A family says where each TransformerLens-style site lives (its *taps*), which linear layers
activation sparsity rewires (``linears``), where a mixture-of-experts router sits (``router``)
and which weights read the residual stream (``readers``, for the subspace null-space check).
``sites.py``, ``sparsify/layout.py``, ``intervene/experts.py`` and ``intervene/subspace.py`` all
look a model up here, so adding an architecture is adding one entry:
``register_family(model_type, family)``.

A site is a *tap*: the input or output of one module, optionally reshaped by a named view.
Paths in ``per_layer``, ``linears``, ``router`` and ``readers`` are relative to a decoder layer;
``layers`` and ``globals`` paths are matched as suffixes of module names, so ``BertModel`` and
``BertForMaskedLM`` (prefix ``bert.``) share one entry.

Conventions, chosen to match TransformerLens:
- ``hook_attn_out`` / ``hook_mlp_out`` are what the sublayer adds to the residual stream
  (after the post-norm in sandwich-norm families such as Gemma 2 and OLMo 2);
- ``attn.hook_q/k/v`` are projection outputs before rotary embeddings and QK-norm,
  shaped ``[batch, pos, head, d_head]``;
- ``attn.hook_z`` is the input of the output projection, per head;
- ``attn.hook_pattern`` is the post-softmax attention, ``[batch, head, query, key]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import ActscopeError

GROUPS = ("attn_in", "attn_out", "mlp_in", "mlp_out")
# GPT-2 and its kin use transformers' Conv1D: a linear layer whose weight is stored [in, out].
LINEAR_TYPES = (nn.Linear, Conv1D)


@dataclass(frozen=True)
class Tap:
    """The input (``io="in"``) or output of ``module``; ``view`` names a reshape in views.py."""

    module: str
    io: str = "out"
    view: str = ""
    index: int = 0  # element of a tuple output (attention returns (output, weights))


@dataclass(frozen=True)
class Linears:
    """The linear layers of one decoder layer that activation sparsity rewires.

    ``groups`` maps each of ``GROUPS`` to the layers that share one input (q/k/v read the same
    normed hidden state, gate/up the same MLP input), because TEAL gives a shared input one
    threshold. ``act`` is the MLP activation module whose output CATS, CHESS, Top-k and
    CoreInfer sparsify; ``query`` is the projection CHESS sparsifies in attention; ``up`` is the
    up projection of a gated MLP, whose ``E|up_i|`` CHESS weighs channels by (``None`` when the
    MLP has no separate one). Modules may be ``nn.Linear`` or transformers' ``Conv1D``.
    """

    groups: dict[str, tuple[str, ...]]
    act: str
    query: str
    up: str | None = None


@dataclass(frozen=True)
class Router:
    """A mixture-of-experts router that returns ``(router_logits, top_k_weights, top_k_index)``.

    ``normalise`` says when the model renormalises the top-k weights: ``True`` always
    (Mixtral), or the name of the config flag that decides (``norm_topk_prob`` in Qwen-MoE and
    OLMoE). Expert routing edits must renormalise exactly when the model does.
    """

    module: str
    normalise: bool | str = "norm_topk_prob"


@dataclass(frozen=True)
class Family:
    """One architecture: its site taps, and optionally its sparsifiable linears, router and readers."""

    layers: str
    per_layer: dict[str, Tap]
    globals: dict[str, Tap] = field(default_factory=dict)
    # site -> (config attribute, required value): e.g. resid_mid exists only without parallel residual
    requires: dict[str, tuple[str, object]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # site -> why this family lacks it
    linears: Linears | None = None  # None: activation sparsity does not support the family
    router: Router | None = None  # None: a dense family, no expert routing edits
    # What reads the residual stream inside a layer: modules (nn.Linear, Conv1D, or any module
    # with a 2-D [out, in] weight such as a router) or 3-D expert weights [experts, out, in].
    # Only maps whose input *is* the (normalised) residual belong here: an output projection
    # reads the attention heads' z, not the residual. A layer may lack some (the dense layers
    # of a MoE model), which are then skipped.
    readers: tuple[str, ...] = ()


PATTERN = "attn.hook_pattern"

_LLAMA_LAYER = {
    "hook_resid_pre": Tap("", "in"),
    "hook_resid_mid": Tap("post_attention_layernorm", "in"),
    "hook_resid_post": Tap(""),
    "hook_attn_out": Tap("self_attn"),
    "hook_mlp_out": Tap("mlp"),
    "mlp.hook_pre": Tap("mlp.gate_proj"),
    "mlp.hook_post": Tap("mlp.down_proj", "in"),
    "attn.hook_q": Tap("self_attn.q_proj", view="heads"),
    "attn.hook_k": Tap("self_attn.k_proj", view="kv_heads"),
    "attn.hook_v": Tap("self_attn.v_proj", view="kv_heads"),
    "attn.hook_z": Tap("self_attn.o_proj", "in", view="heads"),
    PATTERN: Tap("self_attn", index=1),
}
_LLAMA_GLOBALS = {"hook_embed": Tap("embed_tokens"), "ln_final.hook_normalized": Tap("norm")}
_LLAMA_LINEARS = Linears(
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
_LLAMA_READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")

LLAMA = Family("model.layers", _LLAMA_LAYER, _LLAMA_GLOBALS, linears=_LLAMA_LINEARS, readers=_LLAMA_READERS)

# Sandwich norms: the sublayer output is normalised again before it joins the residual.
GEMMA2 = Family(
    "model.layers",
    {
        **_LLAMA_LAYER,
        "hook_resid_mid": Tap("pre_feedforward_layernorm", "in"),
        "hook_attn_out": Tap("post_attention_layernorm"),
        "hook_mlp_out": Tap("post_feedforward_layernorm"),
    },
    _LLAMA_GLOBALS,
    linears=_LLAMA_LINEARS,
    readers=_LLAMA_READERS,
)

# OLMo 2 normalises only sublayer outputs, so the MLP reads the raw mid residual.
OLMO2 = Family(
    "model.layers",
    {
        **_LLAMA_LAYER,
        "hook_resid_mid": Tap("mlp", "in"),
        "hook_attn_out": Tap("post_attention_layernorm"),
        "hook_mlp_out": Tap("post_feedforward_layernorm"),
    },
    _LLAMA_GLOBALS,
    linears=_LLAMA_LINEARS,
    readers=_LLAMA_READERS,
)

PHI3 = Family(
    "model.layers",
    {
        **_LLAMA_LAYER,
        "mlp.hook_pre": Tap("mlp.gate_up_proj", view="gate_half"),
        "attn.hook_q": Tap("self_attn.qkv_proj", view="qkv:0"),
        "attn.hook_k": Tap("self_attn.qkv_proj", view="qkv:1"),
        "attn.hook_v": Tap("self_attn.qkv_proj", view="qkv:2"),
    },
    _LLAMA_GLOBALS,
    linears=Linears(
        groups={
            "attn_in": ("self_attn.qkv_proj",),
            "attn_out": ("self_attn.o_proj",),
            "mlp_in": ("mlp.gate_up_proj",),
            "mlp_out": ("mlp.down_proj",),
        },
        act="mlp.activation_fn",
        query="self_attn.qkv_proj",
        up=None,  # fused gate_up_proj: no separate up output to weigh channels by
    ),
    readers=("self_attn.qkv_proj", "mlp.gate_up_proj"),
)

# Mixture-of-experts blocks route tokens to experts: there is no single MLP hidden layer, so
# no sparsification layout. The router and every expert read the residual; Qwen2-MoE adds a
# shared expert, and some checkpoints keep dense MLP layers (mlp.gate_proj/up_proj).
_MOE_LAYER = {k: v for k, v in _LLAMA_LAYER.items() if not k.startswith("mlp.")}
LLAMA_MOE = Family(
    "model.layers",
    _MOE_LAYER,
    _LLAMA_GLOBALS,
    missing={
        "mlp.hook_pre": "mixture-of-experts MLP: hook an expert by its module path instead",
        "mlp.hook_post": "mixture-of-experts MLP: hook an expert by its module path instead",
    },
    router=Router("mlp.gate", normalise="norm_topk_prob"),
    readers=(
        *_LLAMA_READERS, "mlp.gate", "mlp.experts.gate_up_proj",
        "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert_gate",
    ),
)
MIXTRAL = replace(LLAMA_MOE, router=Router("mlp.gate", normalise=True))  # always renormalises

GPT2 = Family(
    "transformer.h",
    {
        "hook_resid_pre": Tap("", "in"),
        "hook_resid_mid": Tap("ln_2", "in"),
        "hook_resid_post": Tap(""),
        "hook_attn_out": Tap("attn"),
        "hook_mlp_out": Tap("mlp"),
        "mlp.hook_pre": Tap("mlp.c_fc"),
        "mlp.hook_post": Tap("mlp.c_proj", "in"),
        "attn.hook_q": Tap("attn.c_attn", view="qkv:0"),
        "attn.hook_k": Tap("attn.c_attn", view="qkv:1"),
        "attn.hook_v": Tap("attn.c_attn", view="qkv:2"),
        "attn.hook_z": Tap("attn.c_proj", "in", view="heads"),
        PATTERN: Tap("attn", index=1),
    },
    {"hook_embed": Tap("wte"), "hook_pos_embed": Tap("wpe"), "ln_final.hook_normalized": Tap("ln_f")},
    linears=Linears(  # all Conv1D: weights stored [in, out]
        groups={
            "attn_in": ("attn.c_attn",),
            "attn_out": ("attn.c_proj",),
            "mlp_in": ("mlp.c_fc",),
            "mlp_out": ("mlp.c_proj",),
        },
        act="mlp.act",
        query="attn.c_attn",
    ),
    readers=("attn.c_attn", "mlp.c_fc"),
)

GPT_NEOX = Family(
    "gpt_neox.layers",
    {
        "hook_resid_pre": Tap("", "in"),
        "hook_resid_mid": Tap("post_attention_layernorm", "in"),
        "hook_resid_post": Tap(""),
        "hook_attn_out": Tap("attention"),
        "hook_mlp_out": Tap("mlp"),
        "mlp.hook_pre": Tap("mlp.dense_h_to_4h"),
        "mlp.hook_post": Tap("mlp.dense_4h_to_h", "in"),
        "attn.hook_q": Tap("attention.query_key_value", view="neox_qkv:0"),
        "attn.hook_k": Tap("attention.query_key_value", view="neox_qkv:1"),
        "attn.hook_v": Tap("attention.query_key_value", view="neox_qkv:2"),
        "attn.hook_z": Tap("attention.dense", "in", view="heads"),
        PATTERN: Tap("attention", index=1),
    },
    {"hook_embed": Tap("embed_in"), "ln_final.hook_normalized": Tap("final_layer_norm")},
    requires={"hook_resid_mid": ("use_parallel_residual", False)},
    missing={"hook_resid_mid": "parallel residual: attention and MLP both read resid_pre"},
    linears=Linears(
        groups={
            "attn_in": ("attention.query_key_value",),
            "attn_out": ("attention.dense",),
            "mlp_in": ("mlp.dense_h_to_4h",),
            "mlp_out": ("mlp.dense_4h_to_h",),
        },
        act="mlp.act",
        query="attention.query_key_value",
    ),
    readers=("attention.query_key_value", "mlp.dense_h_to_4h"),  # attention.dense reads z
)

# BERT is post-norm: each sublayer's residual sum is normalised, so resid_mid is the
# attention block's normalised output and there is no final norm.
BERT = Family(
    "encoder.layer",
    {
        "hook_resid_pre": Tap("", "in"),
        "hook_resid_mid": Tap("attention"),
        "hook_resid_post": Tap(""),
        "hook_attn_out": Tap("attention.output.dense"),
        "hook_mlp_out": Tap("output.dense"),
        "mlp.hook_pre": Tap("intermediate.dense"),
        "mlp.hook_post": Tap("output.dense", "in"),
        "attn.hook_q": Tap("attention.self.query", view="heads"),
        "attn.hook_k": Tap("attention.self.key", view="heads"),
        "attn.hook_v": Tap("attention.self.value", view="heads"),
        "attn.hook_z": Tap("attention.output.dense", "in", view="heads"),
        PATTERN: Tap("attention.self", index=1),
    },
    {"hook_embed": Tap("embeddings.word_embeddings")},
    missing={"ln_final.hook_normalized": "post-norm encoder: every layer ends in its own LayerNorm"},
    # attention.output.dense reads z and output.dense the MLP hidden layer: neither reads the residual
    readers=("attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense"),
)

FAMILIES: dict[str, Family] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma": LLAMA,
    "olmo": LLAMA,
    "granite": LLAMA,
    "smollm3": LLAMA,  # NoPE on some layers changes no module name
    "gemma2": GEMMA2,
    "gemma3_text": GEMMA2,
    "olmo2": OLMO2,
    "phi3": PHI3,
    "mixtral": MIXTRAL,
    "qwen2_moe": LLAMA_MOE,
    "qwen3_moe": LLAMA_MOE,
    "olmoe": LLAMA_MOE,
    "gpt2": GPT2,
    "gpt_neox": GPT_NEOX,
    "bert": BERT,
    "roberta": BERT,
}

# Sites every family offers per layer, in the order `actscope sites` lists them.
LAYER_SITE_ORDER = list(_LLAMA_LAYER)


def family_of(model: nn.Module) -> Family | None:
    """The table entry for ``model.config.model_type``; ``None`` for an unknown architecture."""
    return FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))


def register_family(model_type: str, family: Family) -> None:
    """Teach actscope an architecture, or correct one, in one place.

    The entry gives the model type its sites, and, where ``family`` says, activation sparsity
    (``linears``), expert routing edits (``router``) and the subspace null-space check
    (``readers``). Copy a close family and change what differs::

        from dataclasses import replace
        from actscope.families import LLAMA, Tap
        register_family("my_llama", replace(LLAMA, globals={"hook_embed": Tap("tok_embeddings")}))

    Register before building a ``SiteMap`` for a model of that type: maps already built keep
    the entry they were built from.
    """
    if not isinstance(model_type, str) or not model_type:
        raise ActscopeError(f"model_type must be a non-empty string, not {model_type!r}")
    if not isinstance(family, Family):
        raise ActscopeError(f"register_family needs an actscope.families.Family, not {type(family).__name__}")
    bad = [k for k, tap in {**family.per_layer, **family.globals}.items() if not isinstance(tap, Tap)]
    if bad:
        raise ActscopeError(f"sites {', '.join(bad)} must map to a Tap")
    if family.linears is not None and set(family.linears.groups) != set(GROUPS):
        raise ActscopeError(f"Linears.groups must name exactly {', '.join(GROUPS)}, not "
                            f"{', '.join(family.linears.groups)}")
    FAMILIES[model_type] = family


def linear_weight(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight as ``[out, in]``, however the module stores it.

    transformers' ``Conv1D`` (GPT-2) stores ``[in, out]`` and computes ``x @ W``; reading its
    weight as if it were ``nn.Linear``'s would silently use the transpose. A stand-in that keeps
    a Conv1D's weight (sparsify's ``SparseLinear``) says so with ``weight_in_out``.
    """
    in_out = isinstance(module, Conv1D) or getattr(module, "weight_in_out", False)
    return module.weight.t() if in_out else module.weight


def reader_weight(model: nn.Module, path: str) -> torch.Tensor | None:
    """The ``[outputs, in]`` matrix through which the reader at ``path`` sees its input.

    ``path`` names a module with a weight (``nn.Linear``, ``Conv1D``, a router with a 2-D
    ``[out, in]`` weight) or a 3-D expert weight ``[experts, out, in]``, whose experts stack
    into one matrix. ``None`` if the model has nothing at ``path``.
    """
    obj: Any
    try:
        obj = model.get_submodule(path)
    except AttributeError:
        try:
            obj = model.get_parameter(path)
        except AttributeError:
            return None
    if isinstance(obj, nn.Module):
        w = getattr(obj, "weight", None)
        if not torch.is_tensor(w) or w.dim() != 2:
            raise ActscopeError(f"reader {path} is a {type(obj).__name__} without a 2-D weight")
        return linear_weight(obj).detach()
    if obj.dim() == 3:
        return obj.detach().reshape(-1, obj.shape[-1])
    if obj.dim() == 2:
        return obj.detach()
    raise ActscopeError(f"reader {path} is a {obj.dim()}-D parameter; expected [out, in] or [experts, out, in]")
