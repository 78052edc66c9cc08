"""Tune and compare the Triton sparse kernel's variants on this GPU, one Llama-8B layer at a time.

    python bench/sparsify_gpu_tune.py [--out bench/out/gpu-tiles.json] [--layers 2]

Each figure is one CUDA graph that runs the seven linears of ``--layers`` distinct layers (q, k,
v, o, gate, up, down, each with its own random bfloat16 weight) in the order a decode step runs
them, so the weights come from memory and not from L2 (an H200's L2 holds 50 MB, two 8B layers
870 MB), and launch gaps between kernels count as they do in decoding. The graph is replayed
several times; the median time per layer is printed, with its ratio to cuBLAS on the same
inputs. Inputs are random; each linear's threshold is the target quantile of its input's |x|
(a scalar threshold, as TEAL's), and kept inputs are counted, as ``apply`` does. After timing,
every sparse variant's outputs for one layer are compared with the masked dense product; a
setting that fails (or cannot run) is printed and skipped.

1. One row (batch-1 decoding) at 50%: cuBLAS (the dense model's contiguous weights); the kernel
   as ``apply`` runs it by default (a memset, the kernel, a cast); the one-launch kernel; then,
   all with one launch and each at 4-32 programs per SM: the general kernel at a few tile
   sizes, the one-row kernel (``KERNEL: "gemv"``) with a 2-D accumulator at the tile sizes whose
   loop has no barrier in the PTX, with and without prefetch, and the gather-first kernel. The
   best settings are written to ``--out`` (``bench/sparsify_gpu.py --tiles`` reads them), and
   timed again at 70%.
2. Four rows at 50% (batch-4 decoding, where the union of kept inputs is nearly everything):
   cuBLAS; the masked dense path as ``apply`` runs it (torch ops for the mask, then cuBLAS on
   the weight stored as W^T); the same with the one-kernel mask (``ACTSCOPE_TRITON_MASK``);
   and the tensor-core kernel with one launch, over a few tile settings.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LAYER_8B = [("q", 4096, 4096), ("k", 4096, 1024), ("v", 4096, 1024), ("o", 4096, 4096),
            ("gate", 4096, 14336), ("up", 4096, 14336), ("down", 14336, 4096)]
# (BLOCK_N, BLOCK_K, num_warps). The general kernel (KERNEL "masked"; its default is the first):
MASKED_TILES = [(64, 128, 2), (32, 128, 2), (128, 64, 4), (128, 128, 4)]
# the one-row kernel with a 2-D accumulator: settings whose loop has no barrier and no shuffle
# in the sm_90 PTX (tests compile it; others move x between layouts through shared memory)
GEMV_TILES = [(128, 64, 4), (256, 32, 4), (256, 64, 8), (128, 32, 4), (64, 64, 4), (64, 32, 2), (128, 32, 2),
              (512, 16, 4)]
SPLITS = (4, 8, 16, 32)
DOT_TILES = [(64, 64, 4), (128, 64, 4), (128, 32, 4), (64, 128, 4), (256, 32, 8)]
DEVICE = "cuda"  # --dry-run: "cpu", Triton's interpreter, shapes / 64, a short grid, wall-clock times


def graph_ms(fn, reps: int = 9) -> float:
    """Median ms of one replay of a CUDA graph of ``fn`` (warmed up off the capture stream first)."""
    if DEVICE != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times)


def make_layers(n_layers: int, rows: int, sparsity: float, seed: int = 0) -> list[dict]:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    shrink = 1 if DEVICE == "cuda" else 64
    items = []
    for _, (name, d_in, d_out) in itertools.product(range(n_layers), LAYER_8B):
        d_in, d_out = d_in // shrink, d_out // shrink
        w = torch.randn(d_out, d_in, device=DEVICE, dtype=torch.bfloat16, generator=g) * 0.02
        x = torch.randn(rows, d_in, device=DEVICE, dtype=torch.bfloat16, generator=g)
        t = torch.quantile(x.float().abs().flatten(), sparsity).reshape(1)
        items.append(dict(name=name, w=w, wt=w.t().contiguous(), x=x, t=t,
                          counter=torch.zeros(2, dtype=torch.int64, device=DEVICE)))
    return items


def with_threshold(items: list[dict], sparsity: float) -> None:
    for it in items:
        it["t"] = torch.quantile(it["x"].float().abs().flatten(), sparsity).reshape(1)


def time_layers(items: list[dict], call, n_layers: int, check: bool = True) -> float:
    """Ms per layer of ``call`` over ``items``; with ``check``, after timing, each of one layer's
    outputs must equal the masked dense product (relative error under 2%), or ``ValueError``."""
    ms = graph_ms(lambda: [call(it) for it in items]) / n_layers
    for it in items[:len(LAYER_8B)] if check else ():
        keep = it["x"].float().abs() > it["t"]
        want = (it["x"].float() * keep) @ it["wt"].float()
        err = float((call(it).float() - want).abs().max() / want.abs().max())
        if not err < 2e-2:
            raise ValueError(f"wrong output for {it['name']}: relative error {err:.1e}")
    return ms


def tune(items: list[dict], grid: list[dict], call, n_layers: int, record, dense: float, label: str,
         rows: int = 1, splits: tuple[int, ...] = (), key: str = "gemv") -> tuple[float, dict | None]:
    """Time ``call`` over one layer for every setting in ``grid`` x split; (best ms, its setting)."""
    from actscope.sparsify import triton_kernel as tk

    saved = dict(tk.GEMV), dict(tk.DOT)
    best: tuple[float, dict | None] = (float("inf"), None)
    for base, split in itertools.product(grid, splits or SPLITS):
        cfg = dict(base, SPLIT_PER_SM=split)
        tk.set_tiles(**{key: cfg})
        try:
            ms = time_layers(items, call, n_layers)
        except Exception as exc:  # a setting this GPU cannot run (shared memory, registers) or gets wrong
            print(f"  {cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            tk.zero_workspaces()  # what it left behind would spoil the settings after it
            continue
        finally:
            tk.set_tiles(gemv=saved[0], dot=saved[1])
        record(f"{label} {cfg}", rows, 0.5, ms, dense, tiles=cfg)
        if ms < best[0]:
            best = (ms, cfg)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", default="bench/out/gpu-tiles.json")
    ap.add_argument("--dry-run", action="store_true", help="check this script on CPU in Triton's interpreter")
    args = ap.parse_args()
    global DEVICE, MASKED_TILES, GEMV_TILES, SPLITS, DOT_TILES
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is first imported
        DEVICE, SPLITS = "cpu", SPLITS[:1]
        MASKED_TILES, GEMV_TILES, DOT_TILES = MASKED_TILES[:1], GEMV_TILES[:1], DOT_TILES[:1]
    elif not torch.cuda.is_available():
        raise SystemExit("bench/sparsify_gpu_tune.py needs a CUDA GPU")
    from actscope.sparsify import kernel
    from actscope.sparsify import triton_kernel as tk

    n = args.layers
    empty = torch.empty(0, device=DEVICE)
    base_gemv, base_dot = dict(tk.GEMV), dict(tk.DOT)
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (dry run, Triton interpreter)"
    result: dict = dict(device=device, torch=torch.__version__, layers=n, rows=[])

    def record(label: str, rows: int, sparsity: float, ms: float, dense: float, **extra) -> None:
        result["rows"].append(dict(label=label, rows=rows, sparsity=sparsity, ms_per_layer=ms, dense_ms=dense,
                                   speedup=dense / ms, **extra))
        print(f"rows {rows} {sparsity:.0%} {label:<58} {ms * 1e3:8.1f} us/layer  {dense / ms:5.2f}x cuBLAS", flush=True)

    def timed(items: list[dict], label: str, rows: int, sparsity: float, call, dense: float) -> None:
        try:
            record(label, rows, sparsity, time_layers(items, call, n), dense)
        except Exception as exc:  # printed, and the rest still runs
            print(f"rows {rows} {sparsity:.0%} {label:<58} FAILED: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            tk.zero_workspaces()

    def sparse(gather=False, one_launch=False):
        return lambda it: tk.sparse_linear(it["x"], it["wt"], None, it["t"], empty, it["counter"],
                                           gather=gather, one_launch=one_launch)

    print(f"{result['device']}  torch {torch.__version__}; {n} Llama-8B-shaped layers per graph", flush=True)
    # 1. one row
    items = make_layers(n, 1, 0.5)
    dense = time_layers(items, lambda it: F.linear(it["x"], it["w"]), n, check=False)
    record("cuBLAS", 1, 0.5, dense, dense)
    timed(items, "kernel as apply runs it (memset, kernel, cast)", 1, 0.5, sparse(), dense)
    timed(items, "one launch", 1, 0.5, sparse(one_launch=True), dense)
    grid = [dict(KERNEL="masked", BLOCK_N=bn, BLOCK_K=bk, num_warps=w, PREFETCH=False, ACC2D=False)
            for bn, bk, w in MASKED_TILES]
    grid += [dict(KERNEL="gemv", BLOCK_N=bn, BLOCK_K=bk, num_warps=w, PREFETCH=pf, ACC2D=True)
             for (bn, bk, w), pf in itertools.product(GEMV_TILES, (False, True))]
    grid.append(dict(KERNEL="gemv", BLOCK_N=128, BLOCK_K=64, num_warps=4, PREFETCH=False, ACC2D=False))
    best = tune(items, grid, sparse(one_launch=True), n, record, dense, "one launch")
    if best[1] is None:
        print("no one-row tile setting ran correctly: the defaults stay", flush=True)
    else:
        record("best tiles, one launch", 1, 0.5, best[0], dense, tiles=best[1])
    gather_grid = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w) for bn, bk, w in MASKED_TILES]
    best_gather = tune(items, gather_grid, sparse(gather=True, one_launch=True), n, record, dense,
                       "gather-first, one launch")
    with_threshold(items, 0.7)
    dense70 = time_layers(items, lambda it: F.linear(it["x"], it["w"]), n, check=False)
    for gather, tiles in ((False, best[1]), (True, best_gather[1])):
        if tiles is None:
            continue
        tk.set_tiles(gemv=tiles)
        timed(items, f"{'gather-first' if gather else 'best'}, one launch, best tiles", 1, 0.7,
              sparse(gather=gather, one_launch=True), dense70)
        tk.set_tiles(gemv=base_gemv)
    del items
    # 2. four rows
    items = make_layers(n, 4, 0.5)
    dense = time_layers(items, lambda it: F.linear(it["x"], it["w"]), n, check=False)
    record("cuBLAS", 4, 0.5, dense, dense)
    record("cuBLAS on the weight stored as W^T (a transposed view)", 4, 0.5,
           time_layers(items, lambda it: F.linear(it["x"], it["wt"].t()), n, check=False), dense)
    for fused in (False, True):
        tk.FUSED_MASK = fused
        label = f"masked dense path, mask {'in one kernel' if fused else 'by torch ops'}"
        timed(items, label, 4, 0.5,
              lambda it: F.linear(kernel.masked(it["x"], it["t"], None, it["counter"]), it["wt"].t()), dense)
        if fused and not tk.FUSED_MASK:  # kernel.masked switched to torch ops after a failure
            result["rows"] = [r for r in result["rows"] if r["label"] != label]
            print(f"rows 4 50% {label:<58} FAILED: the mask kernel failed (torch ops were timed; row dropped)")
    tk.FUSED_MASK = False
    dot_grid = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w) for bn, bk, w in DOT_TILES]
    best_dot = tune(items, dot_grid, sparse(one_launch=True), n, record, dense, "tensor-core kernel, one launch",
                    rows=4, splits=(2, 4, 8), key="dot")
    tk.set_tiles(gemv=base_gemv, dot=base_dot)
    result["best"] = dict(GEMV=best[1], DOT=best_dot[1], GATHER=best_gather[1])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"best: ACTSCOPE_TRITON_TILES='{json.dumps(dict(GEMV=best[1], DOT=best_dot[1]))}'; gather-first: "
          f"{json.dumps(best_gather[1])}  (written to {args.out})")


if __name__ == "__main__":
    main()
