"""TopK SAE (Gao et al.): ``z = TopK(W_e (x - b_d) + b_e)``, ``x_hat = W_d z + b_d``.

Sparsity is set directly by ``k``, so there is no penalty to tune. Latents that stop firing are
revived by the AuxK loss: the ``k_aux`` dead latents with the largest pre-activations try to
reconstruct what the live ones missed (the detached residual, without ``b_dec`` added again),
weighted by ``aux_coef``.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import SparseAutoencoder, register
from .kernels import dense_topk, sparse_decode, topk_encode


def batch_variance(y: torch.Tensor) -> torch.Tensor:
    """``sum ||y - mean(y)||^2`` over the batch: the FVU denominator of one batch."""
    return (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)


def auxk_loss(sae: SparseAutoencoder, p: dict[str, torch.Tensor], xin: torch.Tensor, residual: torch.Tensor,
              state: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Normalised MSE of the dead latents' top-``k_aux`` reconstruction of the residual, or None.

    Only the dead rows of the encoder are multiplied, so the cost scales with how many are dead.
    """
    dead = state["since_fired"] >= sae.dead_tokens
    n_dead = int(dead.sum())
    if n_dead == 0:
        return None
    rows = dead.nonzero().squeeze(1)
    k_aux = min(sae.k_aux or xin.shape[1] // 2, n_dead)
    values, idx = topk_encode(xin, p["W_enc"][rows], p["b_enc"][rows], k_aux)
    e_hat = sparse_decode(values, idx, p["W_dec"][rows], torch.zeros_like(p["b_dec"]))
    target = residual.detach()
    return (e_hat - target).pow(2).sum() / batch_variance(target)


def fire_counts(idx: torch.Tensor, values: torch.Tensor, n_latents: int) -> torch.Tensor:
    """How many tokens of the batch each latent fired on (int64 per latent)."""
    return torch.bincount(idx[values > 0], minlength=n_latents)


@register
class TopKSAE(SparseAutoencoder):
    """TopK sparse autoencoder; ``k`` latents per token."""

    architecture = "topk"
    saelens_architecture = "topk"

    def __init__(self, *, k: int = 32, **kwargs: Any):
        super().__init__(**kwargs)
        self.k = k

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return dense_topk(pre, self.k)

    def train_loss(self, p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                   state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        xin = x if state["transcoder"] else x - p["b_dec"]
        values, idx = topk_encode(xin, p["W_enc"], p["b_enc"], self.k)
        y_hat = sparse_decode(values, idx, p["W_dec"], p["b_dec"])
        residual = y - y_hat
        fvu = residual.pow(2).sum() / batch_variance(y)
        loss = fvu
        aux = auxk_loss(self, p, xin, residual, state)
        if aux is not None:
            loss = loss + self.aux_coef * aux
        l0 = float((values > 0).sum()) / x.shape[0]
        return loss, {"counts": fire_counts(idx, values, p["W_enc"].shape[0]), "l0": l0, "fvu": float(fvu.detach())}
