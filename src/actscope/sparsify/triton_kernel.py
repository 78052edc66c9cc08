"""The sparse decode kernel for CUDA, in Triton: same contract as the C++ kernel (see kernel.py).

Decoding multiplies 1-16 rows by a tall weight, so the work is split two ways (split-K): each
program owns a block of output columns *and* a slice of the input dimension, and adds its
partial sums into a float32 buffer with atomics. That keeps every SM busy, with enough loads in
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

Variants, each off by default until a GPU run measures it (bench/gpu_check.sh compares them side
by side), each checked against the masked dense computation in Triton's CPU interpreter and
compiled for sm_90 by the tests on any machine:

- ``ACTSCOPE_TRITON_GATHER=1`` (or ``gather=True``): gather-first. Each program first compacts the
  kept channels of its input slice into a list (a prefix sum over the keep mask, written to a
  small scratch buffer), then loops over that list only, so every weight load is a full block
  of kept rows.
- ``ACTSCOPE_TRITON_ONE_LAUNCH=1``: one launch per call instead of three. By default the output
  is a float32 buffer zeroed by a memset before the kernel and cast to the input's dtype by a
  third kernel after it; on an 8B model that is 448 extra kernels per decode step. With this
  flag the partial sums go to a persistent float32 workspace that is always left zeroed, each
  column block counts its arriving input slices on a semaphore, and the last slice to arrive
  reads the sums, adds the bias, writes the output in its dtype and zeroes the workspace again.
  One workspace per device and output width, shared by the linears that run one after another
  on a stream (calls on two streams at once would need two).
- ``"KERNEL": "gemv"`` in the GEMV tiles: one row goes to ``_gemv_kernel``, which holds ``x`` as
  a 1-D vector in the layout of the weight tile's rows. The general kernel's [1, BLOCK_K] row
  is moved between layouts through shared memory, with barriers, on every step of its loop
  (visible in the PTX: 8-12 barriers and 24-32 shuffles per step; bench/sparsify_gpu_ptx.py). Its options: ``"ACC2D": true``
  keeps a [BLOCK_K, BLOCK_N] float32 accumulator and sums it over the input once, after the
  loop, instead of on every step; ``"PREFETCH": true`` loads the next block of ``x`` while this
  block's weight rows are in flight (the weight load depends on the keep mask, which depends on
  ``x``, so otherwise each step waits for two memory latencies in a row; Triton pipelines only
  loads that feed ``tl.dot``).
- ``ACTSCOPE_TRITON_MASK=1``: the masked dense path (several rows on a big weight: the keep mask,
  then cuBLAS) makes ``x * keep`` and counts the kept inputs in one kernel, not five.
- ``ACTSCOPE_TRITON_TILES='{"GEMV": {"KERNEL": "gemv", "ACC2D": true}}'``: tile settings
  (``set_tiles`` in code; bench/sparsify_gpu_tune.py prints the best it measured).
"""

from __future__ import annotations

import json
import os
import warnings

import torch
import triton
import triton.language as tl

MAX_ROWS = 16
# Tile sizes chosen on an H100 with CUDA graphs (bench/sparsify_gpu.py prints the result):
# one row is a GEMV (multiply-and-sum, wide input blocks); 2-16 rows use tensor cores.
GEMV = dict(BLOCK_N=64, BLOCK_K=128, SPLIT_PER_SM=16, num_warps=2, num_stages=3,
            KERNEL="masked", PREFETCH=False, ACC2D=False)  # the last three: one row only, see _gemv_kernel
DOT = dict(BLOCK_N=128, BLOCK_K=64, SPLIT_PER_SM=4, num_warps=4, num_stages=3)
# multiply-adds fused into FMAs, as Triton has always done by default; said explicitly, since
# Triton 3.9 warns that its default turns to unfused in 3.10
FP_FUSION = True
MIN_BLOCK_N = 16  # the semaphores are sized for column blocks no narrower than this
_sm_count: dict[int, int] = {}
_workspaces: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _flag(name: str) -> bool:
    return os.environ.get(name, "") == "1"


GATHER = _flag("ACTSCOPE_TRITON_GATHER")  # the gather-first kernel
ONE_LAUNCH = _flag("ACTSCOPE_TRITON_ONE_LAUNCH")  # output written by the kernel itself
FUSED_MASK = _flag("ACTSCOPE_TRITON_MASK")  # kernel.masked in one Triton kernel on CUDA


def set_tiles(gemv: dict | None = None, dot: dict | None = None) -> None:
    """Change the tile settings in place (keys as in ``GEMV`` / ``DOT``; unknown keys are refused)."""
    for tiles, new in ((GEMV, gemv), (DOT, dot)):  # check both before changing either
        unknown = set(new or {}) - set(tiles)
        if unknown:
            raise ValueError(f"unknown tile settings {sorted(unknown)}; known: {sorted(tiles)}")
        if (new or {}).get("BLOCK_N", MIN_BLOCK_N) < MIN_BLOCK_N:
            raise ValueError(f"BLOCK_N must be at least {MIN_BLOCK_N}")
    GEMV.update(gemv or {})
    DOT.update(dot or {})


def _tiles_from_env() -> None:
    """``ACTSCOPE_TRITON_TILES``; a bad value is named in one warning and the defaults kept."""
    text = os.environ.get("ACTSCOPE_TRITON_TILES")
    if not text:
        return
    try:
        given = json.loads(text)
        set_tiles(given.get("GEMV"), given.get("DOT"))  # checks everything before changing anything
    except (ValueError, AttributeError, TypeError) as exc:
        warnings.warn(f"actscope: ACTSCOPE_TRITON_TILES ignored ({exc}); expected JSON such as "
                      '\'{"GEMV": {"BLOCK_N": 128}}\'', RuntimeWarning, stacklevel=2)


_tiles_from_env()


@triton.jit
def _load_keep(x_ptr, thresh_ptr, scale_ptr, offs_r, offs_k, row_ok, k_ok, d_in,
               PER_CHANNEL: tl.constexpr, HAS_SCALE: tl.constexpr):
    """One block of ``x`` [rows, k] and its keep mask ``|x| * scale > thresh``."""
    x = tl.load(x_ptr + offs_r[:, None] * d_in + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    a = tl.abs(x.to(tl.float32))
    if HAS_SCALE:
        a = a * tl.load(scale_ptr + offs_k, mask=k_ok, other=0.0)[None, :]
    if PER_CHANNEL:
        t = tl.load(thresh_ptr + offs_k, mask=k_ok, other=float("inf"))[None, :]
    else:
        t = tl.load(thresh_ptr)
    return x, (a > t) & row_ok[:, None] & k_ok[None, :]


@triton.jit
def _accumulate(acc, x, keep, w, ONE_ROW: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``acc += (x * keep) @ w`` in float32."""
    if ONE_ROW:  # a GEMV: multiply and sum in float32, no tensor-core tile to fill
        xk = tl.where(keep, x.to(tl.float32), 0.0)  # [1, BLOCK_K]
        acc += tl.sum(w.to(tl.float32) * tl.trans(xk), axis=0)[None, :]
    else:
        xk = tl.where(keep, x, 0.0).to(w.dtype)
        if UPCAST:  # Triton's CPU interpreter multiplies bfloat16 as raw integers: do it in float32
            acc += tl.dot(xk.to(tl.float32), w.to(tl.float32), out_dtype=tl.float32, input_precision="ieee")
        elif IEEE:  # float32 in, float32 math: no TF32 rounding, so results match the CPU kernel
            acc += tl.dot(xk, w, out_dtype=tl.float32, input_precision="ieee")
        else:
            acc += tl.dot(xk, w, out_dtype=tl.float32)
    return acc


@triton.jit
def _finish(acc, kept, y_ptr, ws_ptr, sem_ptr, bias_ptr, counter_ptr, offs_r, offs_n, row_ok, col_ok, rows, d_in,
            d_out, HAS_BIAS: tl.constexpr, COUNT: tl.constexpr, ONE_LAUNCH: tl.constexpr):
    """Add this program's partial sums to the output, and its kept count to the counter."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    out = offs_r[:, None] * d_out + offs_n[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    if ONE_LAUNCH:  # sums into the zeroed workspace; the last input slice to arrive writes y
        tl.atomic_add(ws_ptr + out, acc, mask=ok, sem="relaxed")
        tl.debug_barrier()  # every thread's adds are issued before the release below
        arrived = tl.atomic_add(sem_ptr + pid_n, 1)  # acq_rel: sees the adds of the slices before it
        if arrived == tl.num_programs(1) - 1:
            total = tl.atomic_add(ws_ptr + out, tl.zeros_like(acc), mask=ok, sem="relaxed")  # read at L2
            tl.store(ws_ptr + out, tl.zeros_like(acc), mask=ok)  # zeroed again for the next call
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + out, total.to(y_ptr.dtype.element_ty), mask=ok)
            tl.atomic_xchg(sem_ptr + pid_n, 0)
    else:
        if HAS_BIAS:  # added by the first input slice only (masks, not branches, on program ids)
            acc += tl.load(bias_ptr + offs_n, mask=col_ok & ((offs_n * 0 + pid_k) == 0), other=0.0).to(tl.float32)[None, :]
        tl.atomic_add(y_ptr + out, acc, mask=ok)
    if COUNT:  # each input slice is counted once, by the first column block
        one = tl.arange(0, 1)  # one-element tensors: scalar masks trip Triton's interpreter
        first = (one * 0 + pid_n) == 0
        n_kept = tl.sum(tl.sum(kept, axis=1), axis=0).to(tl.int64)
        tl.atomic_add(counter_ptr + one, tl.zeros((1,), tl.int64) + n_kept, mask=first)
        tl.atomic_add(counter_ptr + 1 + one, tl.zeros((1,), tl.int64) + rows * d_in, mask=first & ((one * 0 + pid_k) == 0))


@triton.jit
def _sparse_linear_kernel(
    x_ptr, wt_ptr, bias_ptr, thresh_ptr, scale_ptr, y_ptr, counter_ptr, ws_ptr, sem_ptr,
    rows, d_in, d_out, k_per_program,
    HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_SCALE: tl.constexpr, IEEE: tl.constexpr,
    COUNT: tl.constexpr, UPCAST: tl.constexpr, ONE_ROW: tl.constexpr, ONE_LAUNCH: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_r < rows
    col_ok = offs_n < d_out
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    kept = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.int32)
    k_start = tl.program_id(1) * k_per_program
    for k0 in range(0, k_per_program, BLOCK_K):  # plain-int bounds (Triton's interpreter needs them)
        offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
        x, keep = _load_keep(x_ptr, thresh_ptr, scale_ptr, offs_r, offs_k, row_ok, offs_k < d_in, d_in,
                             PER_CHANNEL, HAS_SCALE)
        kept += keep.to(tl.int32)
        any_keep = tl.max(keep.to(tl.int32), axis=0) > 0  # union over rows: read each kept row once
        # masked-off lanes issue no memory traffic: a sparse input reads less of the weight
        w = tl.load(wt_ptr + offs_k[:, None] * d_out + offs_n[None, :],
                    mask=any_keep[:, None] & col_ok[None, :], other=0.0, eviction_policy="evict_first")
        acc = _accumulate(acc, x, keep, w, ONE_ROW, UPCAST, IEEE)
    _finish(acc, kept, y_ptr, ws_ptr, sem_ptr, bias_ptr, counter_ptr, offs_r, offs_n, row_ok, col_ok, rows, d_in,
            d_out, HAS_BIAS, COUNT, ONE_LAUNCH)


@triton.jit
def _keep_1d(x, thresh_ptr, scale_ptr, chan, ok, PER_CHANNEL: tl.constexpr, HAS_SCALE: tl.constexpr):
    """``|x| * scale > thresh`` for a 1-D ``x`` whose entries are input channels ``chan``."""
    a = tl.abs(x.to(tl.float32))
    if HAS_SCALE:
        a = a * tl.load(scale_ptr + chan, mask=ok, other=0.0)
    if PER_CHANNEL:
        t = tl.load(thresh_ptr + chan, mask=ok, other=float("inf"))
    else:
        t = tl.load(thresh_ptr)
    return (a > t) & ok


@triton.jit
def _load_keep_row(x_ptr, thresh_ptr, scale_ptr, offs_k, k_ok, PER_CHANNEL: tl.constexpr, HAS_SCALE: tl.constexpr):
    """``_load_keep`` for one row, as 1-D vectors (the weight tile's row layout, so no shuffles)."""
    x = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0)
    return x, _keep_1d(x, thresh_ptr, scale_ptr, offs_k, k_ok, PER_CHANNEL, HAS_SCALE)


@triton.jit
def _gemv_kernel(
    x_ptr, wt_ptr, bias_ptr, thresh_ptr, scale_ptr, y_ptr, counter_ptr, ws_ptr, sem_ptr,
    rows, d_in, d_out, k_per_program,
    HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_SCALE: tl.constexpr, COUNT: tl.constexpr,
    ONE_LAUNCH: tl.constexpr, PREFETCH: tl.constexpr, ACC2D: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One row (``KERNEL: "gemv"``): ``x`` as a 1-D vector, so the keep mask is already in the
    layout of the weight tile's rows (the general kernel's [1, BLOCK_K] row goes through shared
    memory, with barriers, on every step). ``ACC2D`` sums over the input after the loop instead
    of on every step; ``PREFETCH`` loads the next block of ``x`` while this block's weight rows
    are in flight."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < d_out
    k_start = tl.program_id(1) * k_per_program
    k_end = tl.minimum(k_start + k_per_program, d_in)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if ACC2D:
        acc2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    kept = tl.zeros((BLOCK_K,), dtype=tl.int32)
    if PREFETCH:
        offs_k = k_start + tl.arange(0, BLOCK_K)
        x, keep = _load_keep_row(x_ptr, thresh_ptr, scale_ptr, offs_k, offs_k < k_end, PER_CHANNEL, HAS_SCALE)
    for k0 in range(0, k_per_program, BLOCK_K):
        offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
        if not PREFETCH:
            x, keep = _load_keep_row(x_ptr, thresh_ptr, scale_ptr, offs_k, offs_k < k_end, PER_CHANNEL, HAS_SCALE)
        kept += keep.to(tl.int32)
        w = tl.load(wt_ptr + offs_k[:, None] * d_out + offs_n[None, :],
                    mask=keep[:, None] & col_ok[None, :], other=0.0, eviction_policy="evict_first")
        if PREFETCH:
            nxt = offs_k + BLOCK_K
            x_next, keep_next = _load_keep_row(x_ptr, thresh_ptr, scale_ptr, nxt, nxt < k_end, PER_CHANNEL, HAS_SCALE)
        xk = tl.where(keep, x.to(tl.float32), 0.0)
        if ACC2D:
            acc2 += w.to(tl.float32) * xk[:, None]
        else:
            acc += tl.sum(w.to(tl.float32) * xk[:, None], axis=0)
        if PREFETCH:
            x, keep = x_next, keep_next
    if ACC2D:
        acc = tl.sum(acc2, axis=0)
    offs_r = tl.arange(0, 1)
    _finish(acc[None, :], kept[None, :], y_ptr, ws_ptr, sem_ptr, bias_ptr, counter_ptr, offs_r, offs_n,
            offs_r < rows, col_ok, rows, d_in, d_out, HAS_BIAS, COUNT, ONE_LAUNCH)


@triton.jit
def _gather_kernel(
    x_ptr, wt_ptr, bias_ptr, thresh_ptr, scale_ptr, y_ptr, counter_ptr, ws_ptr, sem_ptr, idx_ptr,
    rows, d_in, d_out, k_per_program,
    HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_SCALE: tl.constexpr, IEEE: tl.constexpr,
    COUNT: tl.constexpr, UPCAST: tl.constexpr, ONE_ROW: tl.constexpr, ONE_LAUNCH: tl.constexpr,
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
        x, keep = _load_keep(x_ptr, thresh_ptr, scale_ptr, offs_r, offs_k, row_ok, offs_k < d_in, d_in,
                             PER_CHANNEL, HAS_SCALE)
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
        x, keep = _load_keep(x_ptr, thresh_ptr, scale_ptr, offs_r, k, row_ok, c_ok, d_in, PER_CHANNEL, HAS_SCALE)
        w = tl.load(wt_ptr + k[:, None] * d_out + offs_n[None, :], mask=c_ok[:, None] & col_ok[None, :], other=0.0,
                    eviction_policy="evict_first")
        acc = _accumulate(acc, x, keep, w, ONE_ROW, UPCAST, IEEE)  # per row: the union brought it in
    _finish(acc, kept, y_ptr, ws_ptr, sem_ptr, bias_ptr, counter_ptr, offs_r, offs_n, row_ok, col_ok, rows, d_in,
            d_out, HAS_BIAS, COUNT, ONE_LAUNCH)


@triton.jit
def _mask_kernel(x_ptr, out_ptr, thresh_ptr, scale_ptr, counter_ptr, n, d_in,
                 PER_CHANNEL: tl.constexpr, HAS_SCALE: tl.constexpr, COUNT: tl.constexpr, BLOCK: tl.constexpr):
    """``out = x * keep`` (a dropped input becomes 0) over ``x`` flattened, counting what is kept."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    keep = _keep_1d(x, thresh_ptr, scale_ptr, offs % d_in, ok, PER_CHANNEL, HAS_SCALE)
    tl.store(out_ptr + offs, tl.where(keep, x, tl.zeros_like(x)), mask=ok)
    if COUNT:
        one = tl.arange(0, 1)
        tl.atomic_add(counter_ptr + one, tl.zeros((1,), tl.int64) + tl.sum(keep.to(tl.int64), axis=0))
        tl.atomic_add(counter_ptr + 1 + one, tl.zeros((1,), tl.int64) + n, mask=(one * 0 + tl.program_id(0)) == 0)


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


def workspace(device: torch.device, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The zeroed float32 sums [MAX_ROWS * d_out] and int32 semaphores of the one-launch kernel.

    Made once per device and output width and never freed, so a CUDA graph that captured its
    address stays valid (``StaticDecoder`` warms up before capturing, which makes it)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one buffer
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), d_out)
    if key not in _workspaces:
        _workspaces[key] = (torch.zeros(MAX_ROWS * d_out, device=device, dtype=torch.float32),
                            torch.zeros(triton.cdiv(d_out, MIN_BLOCK_N), device=device, dtype=torch.int32))
    return _workspaces[key]


def zero_workspaces() -> None:
    """Zero every one-launch workspace again: a kernel that stopped midway (an error, or a wrong
    tile setting under test) can leave sums or semaphores behind, and the next call would add to them."""
    for sums, semaphores in _workspaces.values():
        sums.zero_()
        semaphores.zero_()


def sparse_linear(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, thresh: torch.Tensor,
                  scale: torch.Tensor, counter: torch.Tensor | None, split: int | None = None,
                  gather: bool | None = None, one_launch: bool | None = None) -> torch.Tensor:
    """``(x * keep) @ wt + bias`` on CUDA for up to 16 rows (more rows: split by the caller).

    ``split`` forces the number of input slices (tests use it; by default the GPU is filled).
    ``gather`` and ``one_launch`` pick those variants (defaults: the module's flags).
    """
    if x.shape[0] > MAX_ROWS:
        return torch.cat([sparse_linear(x[i:i + MAX_ROWS], wt, bias, thresh, scale, counter, split, gather, one_launch)
                          for i in range(0, x.shape[0], MAX_ROWS)])
    gather = GATHER if gather is None else gather
    one_launch = ONE_LAUNCH if one_launch is None else one_launch
    x, wt = x.contiguous(), wt.contiguous()
    rows, d_in = x.shape
    d_out = wt.shape[1]
    if one_launch:  # written whole by the kernel, in x's dtype
        y = torch.empty(rows, d_out, device=x.device, dtype=x.dtype)
        ws, sem = workspace(x.device, d_out)
    else:  # split-K partial sums add here
        y = ws = sem = torch.zeros(rows, d_out, device=x.device, dtype=torch.float32)
    tiles = GEMV if rows == 1 else DOT
    split, k_per = _split(d_in, d_out, x.device, tiles, split)
    count = counter is not None and counter.numel() == 2
    grid = (triton.cdiv(d_out, tiles["BLOCK_N"]), split)
    args = [x, wt, bias if bias is not None else x, thresh, scale if scale.numel() else thresh, y,
            counter if count else y, ws, sem]
    flags = dict(HAS_BIAS=bias is not None, PER_CHANNEL=thresh.numel() == d_in, HAS_SCALE=scale.numel() > 0,
                 COUNT=count, ONE_LAUNCH=one_launch, BLOCK_K=tiles["BLOCK_K"], BLOCK_N=tiles["BLOCK_N"],
                 num_warps=tiles["num_warps"], num_stages=tiles["num_stages"], enable_fp_fusion=FP_FUSION)
    if rows == 1 and not gather and tiles.get("KERNEL") == "gemv":
        kern = _gemv_kernel
        flags.update(PREFETCH=tiles["PREFETCH"], ACC2D=tiles["ACC2D"])
    else:
        kern = _gather_kernel if gather else _sparse_linear_kernel
        flags.update(IEEE=x.dtype == torch.float32, UPCAST=x.device.type != "cuda", ONE_ROW=rows == 1,
                     BLOCK_R=1 if rows == 1 else 16)
        if gather:  # one list of kept channels per program
            args.append(torch.empty(grid[0] * grid[1] * k_per, device=x.device, dtype=torch.int32))
    kern[grid](*args, rows, d_in, d_out, k_per, **flags)
    return y if one_launch or x.dtype == torch.float32 else y.to(x.dtype)


def masked_input(x: torch.Tensor, thresh: torch.Tensor, scale: torch.Tensor | None,
                 counter: torch.Tensor | None, block: int = 1024) -> torch.Tensor:
    """``x * keep`` in one launch (``kernel.masked``'s contract; a dropped NaN becomes 0)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    n, d_in = x.numel(), x.shape[-1]
    if n == 0:
        return out
    count = counter is not None and counter.numel() == 2
    has_scale = scale is not None and scale.numel() > 0
    _mask_kernel[(triton.cdiv(n, block),)](
        x, out, thresh, scale if has_scale else thresh, counter if count else thresh, n, d_in,
        PER_CHANNEL=thresh.numel() == d_in, HAS_SCALE=has_scale, COUNT=count, BLOCK=block, enable_fp_fusion=FP_FUSION)
    return out
