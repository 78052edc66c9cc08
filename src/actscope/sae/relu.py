"""ReLU SAE with an L1 penalty (Bricken et al., "standard" in SAELens).

``z = ReLU(W_e (x - b_d) + b_e)``; the penalty is ``sum_i z_i ||W_d,i||``. Weighting each latent
by its decoder row's norm makes the penalty independent of how the scale is split between a
latent and its row, so the decoder needs no unit-norm constraint (Anthropic's April 2024 recipe).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import SparseAutoencoder, register
from .topk import batch_variance


@register
class ReLUSAE(SparseAutoencoder):
    """ReLU sparse autoencoder with a decoder-norm-weighted L1 penalty of weight ``l1_coef``."""

    architecture = "relu"
    saelens_architecture = "standard"
    unit_norm_decoder = False

    def __init__(self, *, l1_coef: float = 1e-3, **kwargs: Any):
        super().__init__(**kwargs)
        self.l1_coef = l1_coef

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return pre.relu()

    def train_loss(self, p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                   state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        xin = x if state["transcoder"] else x - p["b_dec"]
        z = torch.addmm(p["b_enc"], xin, p["W_enc"].t()).relu()
        residual = y - (z @ p["W_dec"] + p["b_dec"])
        fvu = residual.pow(2).sum() / batch_variance(y)
        l1 = (z * p["W_dec"].norm(dim=1)).sum(-1).mean()
        active = z.detach() > 0
        return fvu + self.l1_coef * l1, {"counts": active.sum(0), "l0": float(active.sum()) / x.shape[0],
                                         "fvu": float(fvu.detach())}
