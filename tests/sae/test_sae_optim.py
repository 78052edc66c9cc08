"""The SAE optimisers against the peers' own: torch's Adam, and sparsify's schedule-free signum."""

from __future__ import annotations

import pytest
import torch

from actscope.sae import TopKSAE
from actscope.sae.base import SAEError
from actscope.sae.optim import adam_step, init_buffers, signum_step


def _grads(steps: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(steps)]


def test_adam_step_equals_torch_adam():
    w0 = torch.randn(5, 7, dtype=torch.float64)
    ours, ref = w0.clone(), torch.nn.Parameter(w0.clone())
    m, v = init_buffers("adam", {"w": ours})
    opt = torch.optim.Adam([ref], lr=3e-3, betas=(0.9, 0.999), eps=6.25e-10)
    for step, g in enumerate(_grads(20, w0.shape)):
        adam_step(ours, g, m["w"], v["w"], 3e-3, step)
        ref.grad = g.clone()
        opt.step()
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-12, atol=1e-12)


def test_signum_step_equals_sparsify_schedule_free_signsgd():
    """sparsify's default optimiser: ScheduleFreeWrapper(SignSGD, momentum 0.95). Training
    parameters are its y; ``eval()`` swaps in x, the average that a fitted SAE takes."""
    from schedulefree import ScheduleFreeWrapper
    from sparsify.sign_sgd import SignSGD

    w0 = torch.randn(6, 4, dtype=torch.float64)
    y, ref = w0.clone(), torch.nn.Parameter(w0.clone())
    z, x = init_buffers("signum", {"w": y})
    opt = ScheduleFreeWrapper(SignSGD([ref], lr=2e-2), momentum=0.95)
    opt.train()
    for step, g in enumerate(_grads(30, w0.shape)):
        signum_step(y, g, z["w"], x["w"], 2e-2, step)
        ref.grad = g.clone()
        opt.step()
        torch.testing.assert_close(y, ref.detach(), rtol=0, atol=1e-12)
    opt.eval()
    torch.testing.assert_close(x["w"], ref.detach(), rtol=0, atol=1e-12)


def test_signum_keeps_decoder_base_rows_on_the_unit_sphere():
    W = torch.nn.functional.normalize(torch.randn(8, 5, dtype=torch.float64), dim=1)
    z, x = init_buffers("signum", {"W_dec": W})
    for step, g in enumerate(_grads(5, W.shape)):
        signum_step(W, g, z["W_dec"], x["W_dec"], 0.1, step, unit_rows=True)
    torch.testing.assert_close(z["W_dec"].norm(dim=1), torch.ones(8, dtype=torch.float64))


def test_learning_rate_defaults_and_bad_optimizer():
    assert TopKSAE(optimizer="adam").learning_rate(2**14) == pytest.approx(2e-4)
    assert TopKSAE(optimizer="signum").learning_rate(2**16) == pytest.approx(2.5e-3)
    assert TopKSAE(optimizer="adam", lr=1e-3).learning_rate(2**16) == 1e-3
    with pytest.raises(SAEError, match="optimizer must be one of adam, signum"):
        TopKSAE(optimizer="sgd")
