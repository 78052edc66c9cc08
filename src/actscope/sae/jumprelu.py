"""JumpReLU SAE (Rajamanoharan et al.): ``z = pre * (pre > theta)`` with a learned theta per latent.

The step function has no useful gradient, so theta learns through a straight-through estimator:
in the backward pass the step is replaced by a rectangle of width ``bandwidth`` around theta. The
sparsity penalty is the L0 itself (through the same estimator), not a proxy like L1, so large
activations are not shrunk. Theta is kept as its log, which keeps it positive.

Units: training sees activations scaled to a mean squared norm of ``d_in`` (pre-activations of
order 1), so ``bandwidth`` and ``init_threshold`` are in those units; a saved threshold is in
pre-activation units, which the folding of the scale leaves unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import SparseAutoencoder, register
from .topk import batch_variance


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float):  # type: ignore[override]
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_pre = g * (pre > theta)
        grad_theta = (-(theta / bw) * _rectangle((pre - theta) / bw) * g).sum(0)
        return grad_pre, grad_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float):  # type: ignore[override]
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_theta = (-(1.0 / bw) * _rectangle((pre - theta) / bw) * g).sum(0)
        return None, grad_theta, None


@register
class JumpReLUSAE(SparseAutoencoder):
    """JumpReLU sparse autoencoder with an L0 penalty of weight ``l0_coef``."""

    architecture = "jumprelu"
    saelens_architecture = "jumprelu"

    def __init__(self, *, l0_coef: float = 2e-3, bandwidth: float = 0.05, init_threshold: float = 0.1, **kwargs: Any):
        super().__init__(**kwargs)
        self.l0_coef = l0_coef
        self.bandwidth = bandwidth
        self.init_threshold = init_threshold

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold_)

    def init_extra(self, p: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
        p["log_threshold"] = torch.full((p["W_enc"].shape[0],), math.log(self.init_threshold))

    def train_loss(self, p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                   state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        xin = x if state["transcoder"] else x - p["b_dec"]
        pre = torch.addmm(p["b_enc"], xin, p["W_enc"].t())
        theta = p["log_threshold"].exp()
        z = _JumpReLU.apply(pre, theta, self.bandwidth)
        l0 = _Step.apply(pre, theta, self.bandwidth).sum(-1).mean()
        residual = y - (z @ p["W_dec"] + p["b_dec"])
        fvu = residual.pow(2).sum() / batch_variance(y)
        active = z.detach() > 0
        return fvu + self.l0_coef * l0, {"counts": active.sum(0), "l0": float(l0.detach()), "fvu": float(fvu.detach())}

    def export_extra(self, p: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"threshold": p["log_threshold"].exp()}
