"""The sparse decode kernel for CUDA, in Triton: same contract as the C++ kernel (see kernel.py).

Each program owns a block of output columns and walks the input dimension in blocks. Weight
rows (of the transposed weight ``wt [in, out]``) are loaded only where some row of ``x`` keeps
that input channel: masked-off lanes issue no memory traffic, so a sparse input reads less of
the weight. Up to 16 rows (a small decoding batch) go through one ``tl.dot``; float32, float16
and bfloat16 all accumulate in float32.

Status: its results are tested against the masked dense reference in Triton's CPU interpreter
(``TRITON_INTERPRET=1``, tests/test_sparsify.py), but it has not yet run on a GPU: no GPU was
available to the session that wrote it. If compiling or launching it fails on a GPU, actscope
warns once and uses the masked dense reference (same outputs, no speed-up).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 16


@triton.jit
def _sparse_linear_kernel(
    x_ptr, wt_ptr, bias_ptr, thresh_ptr, scale_ptr, y_ptr, kept_ptr,
    rows, d_in, d_out,
    HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_SCALE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_r < rows
    col_ok = offs_n < d_out
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    kept = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.int32)
    for k0 in range(0, d_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < d_in
        x = tl.load(x_ptr + offs_r[:, None] * d_in + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.abs(x.to(tl.float32))
        if HAS_SCALE:
            a = a * tl.load(scale_ptr + offs_k, mask=k_ok, other=0.0)[None, :]
        if PER_CHANNEL:
            t = tl.load(thresh_ptr + offs_k, mask=k_ok, other=float("inf"))[None, :]
        else:
            t = tl.load(thresh_ptr)
        keep = (a > t) & row_ok[:, None] & k_ok[None, :]
        kept += keep.to(tl.int32)
        xk = tl.where(keep, x, 0.0).to(wt_ptr.dtype.element_ty)
        any_keep = tl.max(keep.to(tl.int32), axis=0) > 0  # union over rows: read each kept row once
        w = tl.load(wt_ptr + offs_k[:, None] * d_out + offs_n[None, :],
                    mask=any_keep[:, None] & col_ok[None, :], other=0.0)
        if IEEE:  # float32 in, float32 math: no TF32 rounding, so results match the CPU kernel
            acc += tl.dot(xk, w, out_dtype=tl.float32, input_precision="ieee")
        else:
            acc += tl.dot(xk, w, out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_r[:, None] * d_out + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
    if pid == 0:  # count once, not once per output block
        tl.atomic_add(kept_ptr, tl.sum(tl.sum(kept, axis=1), axis=0).to(tl.int64))


def sparse_linear(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, thresh: torch.Tensor,
                  scale: torch.Tensor, counter: torch.Tensor | None) -> torch.Tensor:
    """``(x * keep) @ wt + bias`` on CUDA for up to 16 rows (more rows: split by the caller)."""
    if x.shape[0] > MAX_ROWS:
        return torch.cat([sparse_linear(x[i:i + MAX_ROWS], wt, bias, thresh, scale, counter)
                          for i in range(0, x.shape[0], MAX_ROWS)])
    x, wt = x.contiguous(), wt.contiguous()
    rows, d_in = x.shape
    d_out = wt.shape[1]
    y = torch.empty(rows, d_out, device=x.device, dtype=x.dtype)
    kept = torch.zeros(1, device=x.device, dtype=torch.int64)
    block_n = 64
    grid = (triton.cdiv(d_out, block_n),)
    _sparse_linear_kernel[grid](
        x, wt, bias if bias is not None else x, thresh, scale if scale.numel() else thresh, y, kept,
        rows, d_in, d_out,
        HAS_BIAS=bias is not None, PER_CHANNEL=thresh.numel() == d_in, HAS_SCALE=scale.numel() > 0,
        IEEE=x.dtype == torch.float32,
        BLOCK_R=16, BLOCK_K=64, BLOCK_N=block_n,
    )
    if counter is not None and counter.numel() == 2:
        counter[0] += kept[0]
        counter[1] += rows * d_in
    return y
