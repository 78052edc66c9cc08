"""Tiny randomly initialised models, built from configs, one per supported family."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

VOCAB = 256
FAMILIES = [
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3",
    "gpt2", "gpt_neox", "olmo", "olmo2", "bert", "smollm3",
]


def tiny_config(family: str, **overrides):
    common = dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    if family in {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo2", "smollm3"}:
        common["num_key_value_heads"] = 2  # exercise grouped-query attention
    if family == "smollm3":
        common["no_rope_layer_interval"] = 2  # layer 1 skips RoPE (NoPE), as every 4th layer does in SmolLM3
    if family in {"gemma", "gemma2", "qwen3"}:
        common["head_dim"] = 16
    if family == "gpt2":
        common = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                      bos_token_id=1, eos_token_id=2)
    common.update(overrides)
    return AutoConfig.for_model(family, **common)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    auto = AutoModel if family == "bert" else AutoModelForCausalLM
    model = auto.from_config(cfg)
    model.eval()
    return model


def random_tokens(n: int, seq_len: int = 32, seed: int = 0):
    """``n`` rows of random token ids as ``TokenBatches`` (one document each)."""
    from actscope.data import TokenBatches

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, seq_len), generator=g)
    return TokenBatches(ids, torch.zeros_like(ids, dtype=torch.int32), f"random-{seed}")
