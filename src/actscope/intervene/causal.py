"""Causal tracing (ROME style, as used by FCCT): where does the model recall a fact?

    res = actscope.causal_trace(model, tok, "The capital of France is", subject="France",
                                target=" Paris", kind="resid")

Definition (docs/methods.md, "Intervene"): corrupt the subject's token embeddings with
Gaussian noise of ``noise`` x the standard deviation of the embedding matrix (seeded,
``samples`` draws), then restore single hidden states (``kind="resid"``: ``hook_resid_post``),
MLP outputs (``"mlp"``) or attention outputs (``"attn"``) from the clean run, optionally over a
window of layers, and measure the target's probability. Effects are normalised as in patching:
``(restored - corrupted) / (clean - corrupted)``. Runs on the patching engine (patch.sweep), so
the KV-cache reuse and batching apply here too, all noise samples in one batch.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ActscopeError
from .patch import PatchResult, make_metric, normalised, sweep
from ..sites import site_map
from ..trace import trace

KINDS = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}


def subject_positions(tokenizer: Any, prompt: str, subject: str) -> list[int]:
    """Token positions of ``subject`` in ``prompt`` (its last occurrence), from character offsets."""
    start = prompt.rfind(subject)
    if start < 0 or not subject:
        raise ActscopeError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
    end = start + len(subject)
    enc = tokenizer(prompt, return_offsets_mapping=True)
    pos = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > start and a < end and b > a]
    if not pos:
        raise ActscopeError(f"subject {subject!r} maps to no token of the prompt")
    return pos


def causal_trace(
    model: Any,
    tokenizer: Any,
    prompt: str,
    subject: str,
    target: str | int,
    *,
    kind: str = "resid",
    window: int = 1,
    samples: int = 10,
    noise: float = 3.0,
    seed: int = 0,
    method: str = "fast",
) -> PatchResult:
    """Restore every (layer, position) cell of a subject-corrupted run; see the module docstring."""
    if kind not in KINDS:
        raise ActscopeError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if window < 1 or samples < 1:
        raise ActscopeError("window and samples must be at least 1")
    sm = site_map(model)
    if "hook_embed" not in sm.sites:
        raise ActscopeError(f"model type {sm.model_type!r} has no embedding site to corrupt")
    sites = sm.resolve([f"blocks.{l}.{KINDS[kind]}" for l in range(sm.n_layers)])
    measure = make_metric(tokenizer, "prob", target, None)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    T = ids.shape[1]
    subj = subject_positions(tokenizer, prompt, subject)
    embed = dict(model.named_modules())[sm.sites["hook_embed"].module_path]
    std = float(embed.weight.detach().float().std())
    gen = torch.Generator().manual_seed(seed)
    d = embed.weight.shape[1]
    noise_t = torch.zeros(samples, T, d)
    noise_t[:, subj] = torch.randn(samples, len(subj), d, generator=gen) * (noise * std)
    with torch.inference_mode(), trace(model, sites) as cache:
        clean_logits = model(input_ids=ids, use_cache=False).logits[:, -1]
    values = {s.name: cache[s.name][0] for s in sites}
    half = window // 2
    groups = [sites[max(0, l - half) : min(len(sites), l - half + window)] for l in range(len(sites))]
    positions = list(range(T))
    restored, m_corrupt = sweep(model, ids, groups, values, {p: p for p in positions}, positions,
                                measure, noise=noise_t.to(model.device), method=method)
    m_clean = float(measure(clean_logits)[0])
    tokens = [tokenizer.decode([int(t)]) for t in ids[0].tolist()]
    names = [s.name if window == 1 else f"{s.name} (window {window})" for s in sites]
    return PatchResult(names, positions, tokens, normalised(restored, m_clean, m_corrupt), restored, m_clean, m_corrupt)
