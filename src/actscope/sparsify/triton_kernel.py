"""The sparse decode kernel for CUDA, in Triton: same contract as the C++ kernel (see kernel.py).

Decoding multiplies 1-16 rows by a tall weight, so the work is split two ways (split-K): each
program owns a block of output columns *and* a slice of the input dimension, and adds its
partial sums into a float32 output with atomics. That keeps every SM busy, with enough loads in
flight to approach peak bandwidth, even when the output is narrow (a 4096-wide down projection
is only 64 column blocks; an H100 has 132 SMs). One row (batch-1 decoding) is a GEMV done with
multiply-and-sum; 2-16 rows go through one ``tl.dot`` on tensor cores.

Inside its slice a program walks the input channels in blocks. Rows of the transposed weight
``wt [in, out]`` are loaded only where some row of ``x`` keeps that channel: masked-off lanes
issue no memory traffic, so a sparse input reads less of the weight -- the whole point, since
decoding is bound by weight reads. float32, float16 and bfloat16 inputs all accumulate in
float32. Kept-input counts go straight into the caller's counter from inside the kernel, so
measuring sparsity costs no extra launch (and the call stays capturable in a CUDA graph: no
host synchronisation anywhere).

``ACTSCOPE_TRITON_GATHER=1`` (or ``gather=True``) switches to a gather-first variant, still one
launch: each program first compacts the kept channels of its input slice into a list (a prefix
sum over the keep mask, written to a small scratch buffer), then loops over that list only, so
its loop runs ``kept / BLOCK_K`` times instead of ``in / BLOCK_K`` and every weight load is a full
block of kept rows. It is off by default until it is measured on a GPU (bench/gpu_check.sh);
it is checked against the masked dense computation in Triton's CPU interpreter.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_ROWS = 16
# Tile sizes chosen on an H100 with CUDA graphs (bench/sparsify_gpu.py prints the result):
# one row is a GEMV (multiply-and-sum, wide input blocks); 2-16 rows use tensor cores.
GEMV = dict(BLOCK_N=64, BLOCK_K=128, SPLIT_PER_SM=16, num_warps=2, num_stages=3)
DOT = dict(BLOCK_N=128, BLOCK_K=64, SPLIT_PER_SM=4, num_warps=4, num_stages=3)
_sm_count: dict[int, int] = {}
GATHER = os.environ.get("ACTSCOPE_TRITON_GATHER", "") == "1"  # the gather-first kernel (off by default)


@triton.jit
def _sparse_linear_kernel(
    x_ptr, wt_ptr, bias_ptr, thresh_ptr, scale_ptr, y_ptr, counter_ptr,
    rows, d_in, d_out, k_per_program,
    HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_SCALE: tl.constexpr, IEEE: tl.constexpr,
    COUNT: tl.constexpr, UPCAST: tl.constexpr, ONE_ROW: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_r < rows
    col_ok = offs_n < d_out
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    kept = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.int32)
    k_start = pid_k * k_per_program
    for k0 in range(0, k_per_program, BLOCK_K):  # plain-int bounds (Triton's interpreter needs them)
        offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
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
        any_keep = tl.max(keep.to(tl.int32), axis=0) > 0  # union over rows: read each kept row once
        # masked-off lanes issue no memory traffic: a sparse input reads less of the weight
        w = tl.load(wt_ptr + offs_k[:, None] * d_out + offs_n[None, :],
                    mask=any_keep[:, None] & col_ok[None, :], other=0.0, eviction_policy="evict_first")
        if ONE_ROW:  # a GEMV: multiply and sum in float32, no tensor-core tile to fill
            xk = tl.where(keep, x.to(tl.float32), 0.0)  # [1, BLOCK_K]
            acc += tl.sum(w.to(tl.float32) * tl.trans(xk), axis=0)[None, :]
        else:
            xk = tl.where(keep, x, 0.0).to(wt_ptr.dtype.element_ty)
            if UPCAST:  # Triton's CPU interpreter multiplies bfloat16 as raw integers: do it in float32
                acc += tl.dot(xk.to(tl.float32), w.to(tl.float32), out_dtype=tl.float32, input_precision="ieee")
            elif IEEE:  # float32 in, float32 math: no TF32 rounding, so results match the CPU kernel
                acc += tl.dot(xk, w, out_dtype=tl.float32, input_precision="ieee")
            else:
                acc += tl.dot(xk, w, out_dtype=tl.float32)
    if HAS_BIAS:  # added by the first input slice only (masks, not branches, on program ids)
        acc += tl.load(bias_ptr + offs_n, mask=col_ok & ((offs_n * 0 + pid_k) == 0), other=0.0).to(tl.float32)[None, :]
    tl.atomic_add(y_ptr + offs_r[:, None] * d_out + offs_n[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])
    if COUNT:  # each input slice is counted once, by the first column block
        one = tl.arange(0, 1)  # one-element tensors: scalar masks trip Triton's interpreter
        first = (one * 0 + pid_n) == 0
        n_kept = tl.sum(tl.sum(kept, axis=1), axis=0).to(tl.int64)
        tl.atomic_add(counter_ptr + one, tl.zeros((1,), tl.int64) + n_kept, mask=first)
        tl.atomic_add(counter_ptr + 1 + one, tl.zeros((1,), tl.int64) + rows * d_in, mask=first & ((one * 0 + pid_k) == 0))


@triton.jit
def _gather_kernel(
    x_ptr, wt_ptr, bias_ptr, thresh_ptr, scale_ptr, y_ptr, counter_ptr, idx_ptr,
    rows, d_in, d_out, k_per_program,
    HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_SCALE: tl.constexpr, IEEE: tl.constexpr,
    COUNT: tl.constexpr, UPCAST: tl.constexpr, ONE_ROW: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Gather-first: compact the kept channels of this program's input slice, then read only them."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_r < rows
    col_ok = offs_n < d_out
    k_start = pid_k * k_per_program
    scratch = idx_ptr + (pid_k * tl.num_programs(0) + pid_n) * k_per_program  # this program's list
    # 1. the keep mask, its union over rows, compacted by a prefix sum into the scratch list
    kept = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.int32)
    n_kept = tl.sum(tl.zeros((BLOCK_K,), dtype=tl.int32), axis=0)
    for k0 in range(0, k_per_program, BLOCK_K):
        offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
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
        any_keep = tl.max(keep.to(tl.int32), axis=0)
        pos = n_kept + tl.cumsum(any_keep, axis=0) - 1
        tl.store(scratch + pos, offs_k, mask=any_keep > 0)
        n_kept += tl.sum(any_keep, axis=0)
    tl.debug_barrier()  # the list is written by all threads of the program, read by all below
    # 2. only the kept rows of wt: full blocks of them, each row read once
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, n_kept, BLOCK_K):
        offs_c = c0 + tl.arange(0, BLOCK_K)
        c_ok = offs_c < n_kept
        k = tl.load(scratch + offs_c, mask=c_ok, other=0)
        x = tl.load(x_ptr + offs_r[:, None] * d_in + k[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        a = tl.abs(x.to(tl.float32))
        if HAS_SCALE:
            a = a * tl.load(scale_ptr + k, mask=c_ok, other=0.0)[None, :]
        if PER_CHANNEL:
            t = tl.load(thresh_ptr + k, mask=c_ok, other=float("inf"))[None, :]
        else:
            t = tl.load(thresh_ptr)
        keep = (a > t) & row_ok[:, None] & c_ok[None, :]  # per row: the union brought it in
        w = tl.load(wt_ptr + k[:, None] * d_out + offs_n[None, :], mask=c_ok[:, None] & col_ok[None, :], other=0.0,
                    eviction_policy="evict_first")
        if ONE_ROW:
            xk = tl.where(keep, x.to(tl.float32), 0.0)
            acc += tl.sum(w.to(tl.float32) * tl.trans(xk), axis=0)[None, :]
        else:
            xk = tl.where(keep, x, 0.0).to(wt_ptr.dtype.element_ty)
            if UPCAST:
                acc += tl.dot(xk.to(tl.float32), w.to(tl.float32), out_dtype=tl.float32, input_precision="ieee")
            elif IEEE:
                acc += tl.dot(xk, w, out_dtype=tl.float32, input_precision="ieee")
            else:
                acc += tl.dot(xk, w, out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=col_ok & ((offs_n * 0 + pid_k) == 0), other=0.0).to(tl.float32)[None, :]
    tl.atomic_add(y_ptr + offs_r[:, None] * d_out + offs_n[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])
    if COUNT:
        one = tl.arange(0, 1)
        first = (one * 0 + pid_n) == 0
        n_all = tl.sum(tl.sum(kept, axis=1), axis=0).to(tl.int64)
        tl.atomic_add(counter_ptr + one, tl.zeros((1,), tl.int64) + n_all, mask=first)
        tl.atomic_add(counter_ptr + 1 + one, tl.zeros((1,), tl.int64) + rows * d_in, mask=first & ((one * 0 + pid_k) == 0))


def _split(d_in: int, d_out: int, device: torch.device, tiles: dict, split: int | None = None) -> tuple[int, int]:
    """(programs along the input, channels per program): several programs per SM."""
    if split is None and device.type != "cuda":  # Triton's CPU interpreter: no SMs to fill
        split = 1
    if split is None:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in _sm_count:
            _sm_count[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        split = triton.cdiv(tiles["SPLIT_PER_SM"] * _sm_count[idx], triton.cdiv(d_out, tiles["BLOCK_N"]))
    block_k = tiles["BLOCK_K"]
    split = max(1, min(triton.cdiv(d_in, block_k), split))
    k_per = triton.cdiv(triton.cdiv(d_in, split), block_k) * block_k
    return triton.cdiv(d_in, k_per), k_per


def sparse_linear(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, thresh: torch.Tensor,
                  scale: torch.Tensor, counter: torch.Tensor | None, split: int | None = None,
                  gather: bool | None = None) -> torch.Tensor:
    """``(x * keep) @ wt + bias`` on CUDA for up to 16 rows (more rows: split by the caller).

    ``split`` forces the number of input slices (tests use it; by default the GPU is filled).
    ``gather`` picks the gather-first kernel (default: ``ACTSCOPE_TRITON_GATHER=1``).
    """
    if x.shape[0] > MAX_ROWS:
        return torch.cat([sparse_linear(x[i:i + MAX_ROWS], wt, bias, thresh, scale, counter, split, gather)
                          for i in range(0, x.shape[0], MAX_ROWS)])
    gather = GATHER if gather is None else gather
    x, wt = x.contiguous(), wt.contiguous()
    rows, d_in = x.shape
    d_out = wt.shape[1]
    y = torch.zeros(rows, d_out, device=x.device, dtype=torch.float32)  # split-K partial sums add here
    tiles = GEMV if rows == 1 else DOT
    split, k_per = _split(d_in, d_out, x.device, tiles, split)
    count = counter is not None and counter.numel() == 2
    grid = (triton.cdiv(d_out, tiles["BLOCK_N"]), split)
    extra = ()
    kern = _sparse_linear_kernel
    if gather:  # one list of kept channels per program
        kern = _gather_kernel
        extra = (torch.empty(grid[0] * grid[1] * k_per, device=x.device, dtype=torch.int32),)
    kern[grid](
        x, wt, bias if bias is not None else x, thresh, scale if scale.numel() else thresh, y,
        counter if count else y, *extra, rows, d_in, d_out, k_per,
        HAS_BIAS=bias is not None, PER_CHANNEL=thresh.numel() == d_in, HAS_SCALE=scale.numel() > 0,
        IEEE=x.dtype == torch.float32, COUNT=count, UPCAST=x.device.type != "cuda", ONE_ROW=rows == 1,
        BLOCK_R=1 if rows == 1 else 16, BLOCK_K=tiles["BLOCK_K"], BLOCK_N=tiles["BLOCK_N"],
        num_warps=tiles["num_warps"], num_stages=tiles["num_stages"],
    )
    return y if x.dtype == torch.float32 else y.to(x.dtype)
