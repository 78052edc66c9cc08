"""The two optimisers SAE training offers, as plain functions over a run's tensors.

``adam`` is the published SAE recipe (SAELens, OpenAI's TopK paper): Adam with bias correction,
at ``2e-4 / sqrt(latents / 2**14)``, the last ``decay_share`` of the steps decayed linearly.

``signum`` (the default) is schedule-free sign descent, the default of EleutherAI's sparsify:
every step moves a base iterate ``z`` by ``lr * sign(gradient)``; ``x`` is the running mean of
every ``z`` so far, and gradients are taken at ``y = (1 - beta) z + beta x`` (beta 0.95). The
average replaces the learning-rate schedule, so ``signum`` ignores ``decay_share``. It runs at
``5e-3 / sqrt(latents / 2**14)``, sparsify's rate. Why it is the default: on the default model
(layer 6, TopK k 32, 16x, 4,096-token batches) it reached a held-out FVU of 0.124 after one
epoch of 98k tokens and 0.079 after four, where Adam at its published rate reached 0.478 and
0.176 (``bench/sae.py`` has the one-epoch figures).

Both keep two buffers per parameter (Adam's moments; signum's ``z`` and ``x``), stored in the
training checkpoint under the same two names, so resume and the checkpoint format are shared.
``y`` lives in the parameters themselves: the loss, the dead-latent counts and the unit-norm
decoder all see it, and a fitted SAE takes it. Schedule-free's theory would export ``x``; here
``y`` (with unit decoder rows) did better after four epochs (FVU 0.079 against 0.092) and level
after one (0.124 against 0.122), so the SAE that training measured is the one saved.
"""

from __future__ import annotations

import torch

OPTIMIZERS = ("adam", "signum")
BETAS, EPS = (0.9, 0.999), 6.25e-10
SF_MOMENTUM = 0.95


def base_rate(optimizer: str) -> float:
    """Learning rate at 2**14 latents (scaled by 1/sqrt(latents / 2**14) elsewhere)."""
    return {"adam": 2e-4, "signum": 5e-3}[optimizer]


def init_buffers(optimizer: str, p: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Adam: zero moments; signum: ``z`` and ``x`` both start at the initial weights."""
    if optimizer == "adam":
        return {k: torch.zeros_like(t) for k, t in p.items()}, {k: torch.zeros_like(t) for k, t in p.items()}
    return {k: t.clone() for k, t in p.items()}, {k: t.clone() for k, t in p.items()}


def adam_step(w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr: float, step: int) -> None:
    """One bias-corrected Adam step of ``w`` in place (``step`` counts from 0)."""
    b1, b2 = BETAS
    t = step + 1
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (v / (1 - b2**t)).sqrt_().add_(EPS)
    w.addcdiv_(m, denom, value=-lr / (1 - b1**t))


def signum_step(y: torch.Tensor, g: torch.Tensor, z: torch.Tensor, x: torch.Tensor, lr: float, step: int,
                unit_rows: bool = False) -> None:
    """One schedule-free sign step: ``z`` moves, ``x`` averages it, ``y`` is set between them.

    ``unit_rows`` (the decoder) keeps ``z`` on the unit sphere row by row, as Adam's runs keep
    the weights; the caller renormalises ``y``'s rows (an average of unit rows is shorter).
    """
    z.add_(torch.sign(g), alpha=-lr)
    if unit_rows:
        z /= z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    x.lerp_(z, 1.0 / (step + 1))
    y.copy_(z).lerp_(x, SF_MOMENTUM)
