"""SAE training step: actscope's sparse TopK kernels against a plain dense TopK step.

    python bench/sae.py [--d 576] [--expansion 16] [--k 32] [--batch 4096] [--steps 5]

Same shapes as the issue's benchmark (the default model's residual width 576, 16x, k=32), on
random activations, with 2 CPU threads. Only this comparison is here so far; the end-to-end
comparisons against SAELens and sparsify, the many-SAE pass and semi-NMF are not written yet.
"""

from __future__ import annotations

import argparse
import time

import torch

from actscope.sae.kernels import dense_topk, sparse_decode, topk_encode


def dense_step(x, W_enc, b_enc, W_dec, b_dec, k):
    pre = (x - b_dec) @ W_enc.t() + b_enc
    z = dense_topk(pre, k)
    return (z @ W_dec + b_dec - x).pow(2).sum()


def sparse_step(x, W_enc, b_enc, W_dec, b_dec, k):
    values, idx = topk_encode(x - b_dec, W_enc, b_enc, k)
    return (sparse_decode(values, idx, W_dec, b_dec) - x).pow(2).sum()


def tokens_per_second(step, args, params, x) -> float:
    for _ in range(2):  # warm-up
        torch.autograd.grad(step(x, *params, args.k), params)
    t = time.perf_counter()
    for _ in range(args.steps):
        torch.autograd.grad(step(x, *params, args.k), params)
    return args.steps * x.shape[0] / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.d * args.expansion
    W_dec = torch.randn(n, args.d)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    params = [W_dec.clone().requires_grad_(), torch.zeros(n, requires_grad=True), W_dec.requires_grad_(),
              torch.zeros(args.d, requires_grad=True)]
    x = torch.randn(args.batch, args.d)
    dense = tokens_per_second(dense_step, args, params, x)
    sparse = tokens_per_second(sparse_step, args, params, x)
    print(f"TopK step (forward + backward), d={args.d}, latents={n}, k={args.k}, batch={args.batch}, "
          f"{args.threads} threads")
    print(f"dense:  {dense:,.0f} tokens/s")
    print(f"sparse: {sparse:,.0f} tokens/s  ({sparse / dense:.2f}x)")


if __name__ == "__main__":
    main()
