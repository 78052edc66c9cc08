"""What a patching-style intervention measures, in one place for every function.

``patch``, ``causal_trace``, ``attribution_patch`` and ``subspace_patch`` all reduce a run to one
number per row of the last position's logits ``[rows, vocab]``, and all report the normalised
effect ``(patched - corrupted) / (clean - corrupted)``. Building the metric here means each name
(``logit_diff``, ``prob``, ``kl``) and the default foil mean the same thing in every one of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import ActscopeError
from .prompts import token_id

Metric = Callable[[torch.Tensor], torch.Tensor]  # last-position logits [rows, vocab] -> [rows]
METRICS = ("logit_diff", "prob", "kl")


def kl_metric(clean_logits: torch.Tensor) -> Metric:
    """``-KL(p_clean || p)`` of the last position's next-token distribution: 0 for the clean run
    and negative elsewhere, so "higher is more clean-like" as for the other metrics. It needs the
    clean run's logits, which is why callers build it after their clean forward pass."""
    clean_logp = torch.log_softmax(clean_logits.detach().float(), -1)

    def measure(logits: torch.Tensor) -> torch.Tensor:
        return -(clean_logp.exp() * (clean_logp - torch.log_softmax(logits.float(), -1))).sum(-1)

    return measure


def make_metric(
    tokenizer: Any,
    metric: str | Metric,
    target: str | int | None,
    foil: str | int | None,
    clean_logits: torch.Tensor | None = None,
) -> Metric:
    """The one place a metric name becomes a function of the last-position logits ``[rows, vocab]``.
    ``clean_logits`` (the clean run's last-position logits) is needed by ``"kl"`` only. A missing
    foil is an error here; ``measure`` is where the default foil is chosen."""
    if callable(metric):
        return metric
    if metric == "kl":
        if clean_logits is None:
            raise ActscopeError("metric 'kl' needs the clean run's logits (clean_logits=)")
        return kl_metric(clean_logits)
    if metric in ("logit_diff", "prob") and target is None:
        raise ActscopeError(f"metric {metric!r} needs a target token")
    t = token_id(tokenizer, target) if target is not None else None
    if metric == "logit_diff":
        if foil is None:
            raise ActscopeError("metric 'logit_diff' needs a foil token (the corrupted answer)")
        f = token_id(tokenizer, foil, "foil")
        return lambda logits: logits[:, t] - logits[:, f]
    if metric == "prob":
        return lambda logits: torch.softmax(logits.float(), -1)[:, t]
    raise ActscopeError(f"unknown metric {metric!r}: use {', '.join(METRICS)} or a function of the logits")


@dataclass(frozen=True)
class Measure:
    """A metric ready to apply, and the foil it compares against (``logit_diff`` only)."""

    fn: Metric
    foil: str | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return self.fn(logits)


def measure(
    tokenizer: Any,
    metric: str | Metric,
    *,
    target: str | int | None,
    foil: str | int | None,
    clean_logits: torch.Tensor | None,
    corrupt_logits: torch.Tensor | Callable[[], torch.Tensor] | None = None,
) -> Measure:
    """``make_metric`` with the default foil: for ``logit_diff`` without one, the corrupted run's
    top next token (the answer the corruption leads to). ``corrupt_logits`` are its last-position
    logits, or a function that computes them, called only when the default is needed."""
    if metric == "logit_diff" and foil is None and target is not None:
        if corrupt_logits is None:
            raise ActscopeError("metric 'logit_diff' needs a foil token, or the corrupted run's logits to choose one")
        logits = corrupt_logits() if callable(corrupt_logits) else corrupt_logits
        foil = int(logits[0].argmax())
    fn = make_metric(tokenizer, metric, target, foil, clean_logits)
    text = None
    if metric == "logit_diff" and foil is not None:
        text = tokenizer.decode([foil]) if isinstance(foil, int) else foil
    return Measure(fn, text)


def normalised(patched: torch.Tensor, clean: float, corrupted: float) -> torch.Tensor:
    """``(patched - corrupted) / (clean - corrupted)``; NaN when clean equals corrupted."""
    denom = clean - corrupted
    return (patched - corrupted) / (denom if abs(denom) > 1e-12 else float("nan"))
