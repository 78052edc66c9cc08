"""Sparse kernels for TopK training: only the k chosen latents of each token cost anything.

A dense TopK step multiplies ``[batch, d_in] x [d_in, n_latents]`` three times: the encoder
forward, and the encoder's two gradients. Two of those are avoidable. The gradient reaching the
pre-activations is zero except at the k chosen latents per token, so

- the encoder weight gradient is a sparse ``[n_latents, batch] x [batch, d_in]`` product,
  ``batch * k * d_in`` multiply-adds instead of ``batch * n_latents * d_in``;
- the input gradient (needed only for transcoders chained to something, so rarely) is a
  weighted sum of k encoder rows: an ``embedding_bag``.

The decoder is an ``embedding_bag`` over decoder rows with the k activations as weights, so the
decoder never sees the zeros either; its backward scatters into only the rows that fired.

Under bf16 autocast (CUDA training) the one dense product, the encoder's forward, runs in bf16;
everything sparse runs in the weights' dtype (float32), so each gradient comes back in the dtype
of the tensor it belongs to, as autograd requires.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _TopKEncode(torch.autograd.Function):
    """``(values, indices)`` of the top-k of ``x @ W.T + b`` per row, ReLU applied to the values.

    ``W`` is ``[n_latents, d_in]`` (one row per latent), so the weight gradient is a sparse
    row-scatter and the input gradient a bag of rows.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int):  # type: ignore[override]
        pre = torch.addmm(b, x, W.t())
        top, idx = pre.topk(k, dim=-1, sorted=False)
        values = top.relu()
        ctx.save_for_backward(x, W, idx, top > 0)
        ctx.b_dtype = b.dtype
        ctx.mark_non_differentiable(idx)
        return values, idx

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor, _grad_idx: torch.Tensor | None):  # type: ignore[override]
        x, W, idx, positive = ctx.saved_tensors
        b_dtype = ctx.b_dtype
        g = (grad_values * positive).to(W.dtype)  # ReLU's derivative at the chosen latents
        n, k = idx.shape
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx, W, per_sample_weights=g, mode="sum").to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            rows = torch.arange(n, device=x.device).repeat_interleave(k)
            flat = idx.reshape(-1)
            if ctx.needs_input_grad[1]:
                sparse = torch.sparse_coo_tensor(torch.stack([flat, rows]), g.reshape(-1), (W.shape[0], n),
                                                 check_invariants=False)
                grad_W = torch.sparse.mm(sparse, x.to(W.dtype))
            if ctx.needs_input_grad[2]:
                grad_b = torch.zeros(W.shape[0], dtype=b_dtype, device=g.device).index_add_(0, flat, g.reshape(-1).to(b_dtype))
        return grad_x, grad_W, grad_b, None


def topk_encode(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k latents per row with ReLU: ``(values [n, k], indices [n, k])``, sparse backward."""
    return _TopKEncode.apply(x, W, b, k)


def sparse_decode(values: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """``sum_j values[:, j] * W_dec[idx[:, j]] + b_dec``: the decoder applied to k latents per row."""
    return F.embedding_bag(idx, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum") + b_dec


def dense_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """The dense form of the same activation (for inference and tests): zeros but the top k, ReLU'd."""
    top, idx = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, idx, top.relu())
