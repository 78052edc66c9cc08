"""Causal tracing (ROME style, as used by FCCT): where does the model recall a fact?

    res = actscope.causal_trace(model, tok, "The capital of France is", subject="France",
                                target=" Paris", kind="resid_post")

Definition (docs/methods.md, "Intervene"): corrupt the subject's token embeddings with
Gaussian noise of ``noise`` x the standard deviation of the embedding matrix (seeded,
``samples`` draws), then restore single hidden states (``kind="resid_post"``), MLP outputs
(``"mlp_out"``) or attention outputs (``"attn_out"``) from the clean run, optionally over a
window of layers, and measure the target's probability. ``kind`` takes the site shorthands
that patching and the CLI use (intervene/sites.py). Effects are normalised as in patching:
``(restored - corrupted) / (clean - corrupted)``. Runs on the patching engine (patch.sweep), so
the KV-cache reuse and batching apply here too, all noise samples in one batch.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ActscopeError
from ..sites import site_map
from ..trace import trace
from .metrics import make_metric, normalised
from .patch import PatchResult, sweep
from .prompts import encode, subject_positions, token_texts
from .sites import canonical_kind, layer_sites


def causal_trace(
    model: Any,
    tokenizer: Any,
    prompt: str,
    subject: str,
    target: str | int,
    *,
    kind: str = "resid_post",
    window: int = 1,
    samples: int = 10,
    noise: float = 3.0,
    seed: int = 0,
    method: str = "fast",
) -> PatchResult:
    """Restore every (layer, position) cell of a subject-corrupted run; see the module docstring."""
    kind = canonical_kind(kind)
    if window < 1 or samples < 1:
        raise ActscopeError("window and samples must be at least 1")
    sm = site_map(model)
    if "hook_embed" not in sm.sites:
        raise ActscopeError(f"model type {sm.model_type!r} has no embedding site to corrupt")
    sites = layer_sites(sm, kind)
    measure = make_metric(tokenizer, "prob", target, None)
    ids = encode(tokenizer, prompt, model.device)
    T = ids.shape[1]
    subj = subject_positions(tokenizer, prompt, subject)
    embed = model.get_submodule(sm.sites["hook_embed"].module_path)
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
    tokens = token_texts(tokenizer, ids[0])
    names = [s.name if window == 1 else f"{s.name} (window {window})" for s in sites]
    return PatchResult(names, positions, tokens, normalised(restored, m_clean, m_corrupt), restored, m_clean, m_corrupt)
