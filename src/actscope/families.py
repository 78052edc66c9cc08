"""The declarative table: where each TransformerLens-style site lives in each HF family.

A site is a *tap*: the input or output of one module, optionally reshaped by a named view.
Paths in ``per_layer`` are relative to a decoder layer; ``layers`` and ``globals`` paths are
matched as suffixes of module names, so ``BertModel`` and ``BertForMaskedLM`` (prefix
``bert.``) share one entry. Adding a family is adding data here, not code.

Conventions, chosen to match TransformerLens:
- ``hook_attn_out`` / ``hook_mlp_out`` are what the sublayer adds to the residual stream
  (after the post-norm in sandwich-norm families such as Gemma 2 and OLMo 2);
- ``attn.hook_q/k/v`` are projection outputs before rotary embeddings and QK-norm,
  shaped ``[batch, pos, head, d_head]``;
- ``attn.hook_z`` is the input of the output projection, per head;
- ``attn.hook_pattern`` is the post-softmax attention, ``[batch, head, query, key]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Tap:
    """The input (``io="in"``) or output of ``module``; ``view`` names a reshape in views.py."""

    module: str
    io: str = "out"
    view: str = ""
    index: int = 0  # element of a tuple output (attention returns (output, weights))


@dataclass(frozen=True)
class Family:
    layers: str
    per_layer: dict[str, Tap]
    globals: dict[str, Tap] = field(default_factory=dict)
    # site -> (config attribute, required value): e.g. resid_mid exists only without parallel residual
    requires: dict[str, tuple[str, object]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # site -> why this family lacks it


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

LLAMA = Family("model.layers", _LLAMA_LAYER, _LLAMA_GLOBALS)

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
)

# Mixture-of-experts blocks route tokens to experts: there is no single MLP hidden layer.
_MOE_LAYER = {k: v for k, v in _LLAMA_LAYER.items() if not k.startswith("mlp.")}
LLAMA_MOE = Family(
    "model.layers",
    _MOE_LAYER,
    _LLAMA_GLOBALS,
    missing={
        "mlp.hook_pre": "mixture-of-experts MLP: hook an expert by its module path instead",
        "mlp.hook_post": "mixture-of-experts MLP: hook an expert by its module path instead",
    },
)

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
)

FAMILIES: dict[str, Family] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma": LLAMA,
    "olmo": LLAMA,
    "granite": LLAMA,
    "gemma2": GEMMA2,
    "gemma3_text": GEMMA2,
    "olmo2": OLMO2,
    "phi3": PHI3,
    "mixtral": LLAMA_MOE,
    "qwen2_moe": LLAMA_MOE,
    "qwen3_moe": LLAMA_MOE,
    "gpt2": GPT2,
    "gpt_neox": GPT_NEOX,
    "bert": BERT,
    "roberta": BERT,
}

# Sites every family offers per layer, in the order `actscope sites` lists them.
LAYER_SITE_ORDER = list(_LLAMA_LAYER)
