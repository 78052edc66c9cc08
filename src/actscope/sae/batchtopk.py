"""BatchTopK SAE (Bussmann et al.): the top ``k x batch`` pre-activations of the whole batch.

Tokens share a budget of ``k`` latents on average instead of exactly ``k`` each, so hard tokens
may use more. At inference a token must not depend on its batch, so the SAE keeps a threshold
(a running average of the smallest activation the batch selection kept) and is used, and saved,
as a JumpReLU with that threshold on every latent.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import register
from .topk import TopKSAE, auxk_loss, batch_variance


@register
class BatchTopKSAE(TopKSAE):
    """BatchTopK sparse autoencoder: ``k`` latents per token on average over a batch."""

    architecture = "batchtopk"
    saelens_architecture = "jumprelu"

    def __init__(self, *, threshold_momentum: float = 0.01, **kwargs: Any):
        """``threshold_momentum``: weight of each batch in the running inference threshold."""
        super().__init__(**kwargs)
        self.threshold_momentum = threshold_momentum

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold_)

    def init_extra(self, p: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
        state["threshold"] = torch.tensor(-1.0)  # negative: not yet measured

    def train_loss(self, p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                   state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        xin = x if state["transcoder"] else x - p["b_dec"]
        pre = torch.addmm(p["b_enc"], xin, p["W_enc"].t()).relu()
        flat = pre.reshape(-1)
        top, idx = flat.topk(min(self.k * x.shape[0], flat.numel()), sorted=False)
        z = torch.zeros_like(flat).scatter(0, idx, top).reshape(pre.shape)
        y_hat = z @ p["W_dec"] + p["b_dec"]
        residual = y - y_hat
        fvu = residual.pow(2).sum() / batch_variance(y)
        loss = fvu
        aux = auxk_loss(self, p, xin, residual, state)
        if aux is not None:
            loss = loss + self.aux_coef * aux
        active = z.detach() > 0
        kept = top.detach()[top.detach() > 0]
        return loss, {"counts": active.sum(0), "l0": float(active.sum()) / x.shape[0], "fvu": float(fvu.detach()),
                      "min_kept": float(kept.min()) if kept.numel() else None}

    def after_step(self, p: dict[str, torch.Tensor], state: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        low = info.get("min_kept")
        if low is None:
            return
        thr = state["threshold"]
        state["threshold"] = torch.tensor(low) if float(thr) < 0 else (1 - self.threshold_momentum) * thr + self.threshold_momentum * low

    def export_extra(self, p: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        thr = float(state["threshold"].clamp_min(0))
        return {"threshold": torch.full((p["W_enc"].shape[0],), thr)}
