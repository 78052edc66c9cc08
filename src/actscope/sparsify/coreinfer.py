"""CoreInfer's pieces: the core neurons a prompt selects, and the state that carries them into decoding.

CoreInfer runs the prompt dense, picks per MLP layer the neurons that are most often among each
token's strongest (the sentence-level "core" neurons), and then decodes with only those. A
model-level pre-hook marks each forward call as a new prompt or a decoding step, from whether
the KV cache already holds keys; ``swap.SparseAct`` reads that mark.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..kvcache import cached_length


@dataclass
class CoreState:
    """CoreInfer's per-layer core neurons, chosen on the prompt and fixed while decoding."""

    new_prompt: bool | None = None  # set by the model-level pre-hook; None: infer from the call
    cores: dict[int, torch.Tensor] = field(default_factory=dict)

    def is_prompt(self, x: torch.Tensor) -> bool:
        return self.new_prompt if self.new_prompt is not None else x.dim() >= 2 and x.shape[-2] > 1


def core_neurons(act: torch.Tensor, keep_n: int, token_fraction: float) -> torch.Tensor:
    """CoreInfer's sentence-level core neurons, per batch row: ``[batch, d]`` booleans.

    Token-level cores are each token's top ``token_fraction`` of positive activations; the
    sentence-level cores are the ``keep_n`` neurons that are token-level cores most often.
    """
    a = act.detach().float()
    if a.dim() == 2:
        a = a.unsqueeze(0)
    d = a.shape[-1]
    per_token = max(1, round(token_fraction * d))
    idx = a.topk(per_token, dim=-1).indices
    is_core = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, idx, True) & (a > 0)
    counts = is_core.sum(dim=-2).float() + a.clamp(min=0).mean(dim=-2) / (a.abs().max() + 1)  # ties: mean act
    chosen = counts.topk(keep_n, dim=-1).indices
    return torch.zeros(a.shape[0], d, dtype=torch.bool, device=a.device).scatter_(-1, chosen, True)


def prompt_detector(state: CoreState):
    """A call without cached keys starts a new prompt: CoreInfer picks new core neurons then."""

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        state.new_prompt = cached_length(kwargs) == 0

    return pre
