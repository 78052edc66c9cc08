"""Measuring what a steering vector does: KL-bounded strength, effect report, generations.

Definitions (docs/methods.md, "Intervene"): the KL-bounded strength is the largest scale with
``KL(p_steered || p) <= epsilon`` on calibration prompts (next-token distributions at every
real token, averaged); the effect report gives that KL, the entropy before and after, the
mean projection of the steered layers' residual onto the vector, and before/after generations.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import ActscopeError
from ..validate import positive_int
from .prompts import encode_batch
from .results import SteeringEffect
from .steer import SteeringVector
from ..trace import trace


def _next_token_logprobs(model: Any, enc: dict) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(**enc, use_cache=False).logits.float(), dim=-1)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.to(x.dtype)
    return float((x * m).sum() / m.sum())


def kl_steered(model: Any, tokenizer: Any, vector: SteeringVector, prompts: Sequence[str], scale: float) -> float:
    """Mean ``KL(p_steered || p)`` over every real token of ``prompts``, in nats."""
    enc = encode_batch(tokenizer, prompts, model.device)
    base = _next_token_logprobs(model, enc)
    with vector.apply(model, scale):
        steered = _next_token_logprobs(model, enc)
    kl = (steered.exp() * (steered - base)).sum(-1)
    return _masked_mean(kl, enc["attention_mask"])


BRACKET_LIMIT = 4096.0  # calibrate_scale(max_scale=None) searches scales up to this


def calibrate_scale(
    model: Any,
    tokenizer: Any,
    vector: SteeringVector,
    prompts: Sequence[str],
    epsilon: float = 0.1,
    max_scale: float | None = 64.0,
    steps: int = 12,
    sign: float = 1.0,
) -> float:
    """The largest scale (times ``sign``) with ``KL(p_steered || p) <= epsilon``, by bisection.

    ``max_scale=None`` brackets first: doubling from 1/64 until the bound is crossed (at most
    ``BRACKET_LIMIT``, returned if the KL never crosses it), then bisecting between the last two.
    The right order of magnitude differs by vector: a contrastive vector's norm already carries
    the residual's scale, while a unit SAE decoder row needs about the residual norm (hundreds on
    some models), so no one fixed range suits both.
    """
    lo, hi = 0.0, max_scale
    if hi is None:
        hi = 1.0 / 64
        while kl_steered(model, tokenizer, vector, prompts, sign * hi) <= epsilon:
            if hi >= BRACKET_LIMIT:
                return sign * hi
            lo, hi = hi, hi * 2
    elif kl_steered(model, tokenizer, vector, prompts, sign * hi) <= epsilon:
        return sign * hi
    for _ in range(steps):
        mid = (lo + hi) / 2
        if kl_steered(model, tokenizer, vector, prompts, sign * mid) <= epsilon:
            lo = mid
        else:
            hi = mid
    return sign * lo


class _RefuseNonFinite:
    """A logits processor that stops generation on NaN or infinite logits.

    Greedy decoding over NaN logits picks token 0 or end-of-text at every step, and the output,
    stripped of special tokens, is silently empty: an overflowing steering scale looked like a
    model with nothing to say.
    """

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(scores).all()):
            step = input_ids.shape[1]
            raise ActscopeError(f"the model's logits are NaN or infinite at position {step} (a steering scale or "
                                "vector too large for the model's dtype?); generation stopped")
        return scores


def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 30, **kwargs: Any) -> str:
    """Greedy continuation of ``prompt`` (a plain helper so comparisons are deterministic).

    Refuses an empty prompt and a non-positive ``max_new_tokens``, and stops with an
    ``ActscopeError`` on non-finite logits instead of returning an empty string."""
    from transformers import LogitsProcessorList

    if not isinstance(prompt, str) or not prompt:
        raise ActscopeError("the prompt is empty: generation needs at least one token to continue")
    positive_int("max_new_tokens", max_new_tokens)
    enc = tokenizer(prompt, return_tensors="pt").to(model.device)
    if enc["input_ids"].shape[1] == 0:
        raise ActscopeError(f"the prompt {prompt!r} encodes to no token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    processors = LogitsProcessorList([*kwargs.pop("logits_processor", []), _RefuseNonFinite()])
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                             logits_processor=processors, **kwargs)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def steering_effect(
    model: Any,
    tokenizer: Any,
    vector: SteeringVector,
    prompts: Sequence[str],
    scale: float,
    max_new_tokens: int = 24,
    positions: str = "all",
) -> SteeringEffect:
    """KL, entropy, projection shift and a before/after generation table for ``prompts``
    (a ``SteeringEffect``; ``res["kl"]`` still works, as when this returned a dict)."""
    enc = encode_batch(tokenizer, prompts, model.device)
    mask = enc["attention_mask"]
    sites = [f"blocks.{l}.hook_resid_post" for l in vector.layers]
    unit = {l: v.float() / v.float().norm().clamp_min(1e-12) for l, v in vector.directions.items()}

    def run() -> tuple[torch.Tensor, float]:
        with torch.inference_mode(), trace(model, sites) as cache:
            logp = torch.log_softmax(model(**enc, use_cache=False).logits.float(), dim=-1)
        proj = [_masked_mean(cache[s].float() @ unit[l], mask) for l, s in zip(vector.layers, sites)]
        return logp, sum(proj) / len(proj)

    base, proj_before = run()
    with vector.apply(model, scale, positions=positions):
        steered, proj_after = run()
    entropy = lambda lp: _masked_mean(-(lp.exp() * lp).sum(-1), mask)  # noqa: E731
    kl = (steered.exp() * (steered - base)).sum(-1)
    rows = []
    for p in prompts:
        before = generate(model, tokenizer, p, max_new_tokens)
        with vector.apply(model, scale, positions=positions):
            after = generate(model, tokenizer, p, max_new_tokens)
        rows.append({"prompt": p, "before": before, "after": after})
    return SteeringEffect(scale, _masked_mean(kl, mask), entropy(base), entropy(steered), proj_before, proj_after, rows)
