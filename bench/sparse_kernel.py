"""Micro-benchmark: the C++ sparse kernel against ``F.linear`` and against a plain streaming read.

    python bench/sparse_kernel.py [--shapes 135m,1b] [--isas avx512,avx2] [--rows 1,4] [--quick]

2 threads. Each timing cycles through enough distinct weight matrices (``--pool-mib`` of them,
default 1536 MiB, far above the L3 cache) that weights stream from memory as they do while
decoding a model larger than the caches. For each shape, dtype, batch rows and input sparsity:

- dense us: ``F.linear(x, W)`` (PyTorch's own GEMV/GEMM, oneDNN or MKL), and its GB/s;
- masked us: ``(x * keep) @ W^T``, what a sparsified model computes above the kernel's row limit
  (``swap.KERNEL_MAX_ROWS``): inside ``apply`` the weight is stored once, as ``W^T``;
- sparse us per instruction-set path of the kernel (forced with ``set_isa``), and its GB/s: the
  bytes of the weight rows it must read (the union of kept inputs over the batch rows) / time;
- stream GB/s: ``stream_read`` of the same number of bytes, contiguous, by the same 2 threads and
  instruction set -- what the memory system gives a plain sequential read here. ``kernel / stream``
  is the share of that bandwidth the sparse kernel achieves.

Dense and sparse runs alternate, 5 rounds each, and the median is reported. Writes
bench/out/sparse_kernel.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from actscope.sparsify.kernel import cpu_kernel

SHAPES = {
    "135m": [("gate/up", 576, 1536), ("down", 1536, 576), ("q/o", 576, 576)],
    "1b": [("gate/up", 2048, 8192), ("down", 8192, 2048), ("q/o", 2048, 2048), ("k/v", 2048, 512)],
}


def cpu_name() -> str:
    """The CPU model and its widest vector ISA, from /proc/cpuinfo (``platform`` elsewhere)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")))
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
        return f"{model} ({', '.join(isa) or 'no AVX2'})"
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def timed(fn, rounds: int = 5) -> list[float]:
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="135m,1b")
    ap.add_argument("--isas", default="", help="kernel paths to time (default: every one this CPU has but scalar)")
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--sparsities", default="0,0.5,0.7")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--pool-mib", type=int, default=1536)
    ap.add_argument("--quick", action="store_true", help="1b shapes, batch 1, 50%% only, a smaller pool")
    args = ap.parse_args()
    if args.quick:
        args.shapes, args.rows, args.sparsities, args.pool_mib = "1b", "1", "0.5", 768
    torch.set_num_threads(2)
    kern = cpu_kernel()
    if kern is None:
        raise SystemExit("the C++ kernel is not built (python -m actscope.build)")
    isas = args.isas.split(",") if args.isas else [i for i in kern.supported_isas() if i != "scalar"]
    print(f"CPU: {cpu_name()}; kernel paths {kern.supported_isas()}, default {kern.isa()}; "
          f"threads {torch.get_num_threads()}; torch {torch.__version__}")
    results = []
    head = "| dtype | shape (in -> out) | rows | sparsity | union kept | dense us (GB/s) | masked us | " + " | ".join(
        f"{i} us (GB/s, / stream)" for i in isas) + " | dense / sparse | masked / sparse |"
    print(head + "\n|" + "---|" * (head.count("|") - 1))
    g = torch.Generator().manual_seed(0)
    for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
        size = torch.tensor([], dtype=dtype).element_size()
        for shape in args.shapes.split(","):
            for label, d_in, d_out in SHAPES[shape]:
                n = max(4, (args.pool_mib << 20) // (d_in * d_out * size))
                pool = torch.randn(n, d_out, d_in, generator=g).to(dtype)  # dense layout [out, in]
                pool_t = pool.transpose(1, 2).contiguous()  # the kernel's layout [in, out]
                for rows in [int(r) for r in args.rows.split(",")]:
                    x = torch.randn(rows, d_in, generator=g).to(dtype)
                    for s in [float(v) for v in args.sparsities.split(",")]:
                        t = torch.tensor([float(x.abs().float().quantile(s)) if s else -1.0])
                        union = float((x.abs().float() > t).any(0).float().mean())
                        kept_bytes = int(union * d_in) * d_out * size
                        stream_buf = torch.empty(n, max(16, kept_bytes // 4), dtype=torch.float32)
                        stream_buf.fill_(1.0)
                        empty, counter = torch.empty(0), torch.zeros(2, dtype=torch.int64)

                        def dense():
                            for i in range(n):
                                F.linear(x, pool[i])

                        def sparse():
                            for i in range(n):
                                kern.sparse_linear(x, pool_t[i], None, t, empty, counter)

                        def masked():
                            for i in range(n):
                                (x * (x.abs() > t)) @ pool_t[i]

                        def stream():
                            for i in range(n):
                                kern.stream_read(stream_buf[i])

                        dense()
                        times = {"dense": [], "masked": [], **{i: [] for i in isas},
                                 **{f"stream-{i}": [] for i in isas}}
                        for _ in range(5):  # rounds alternate, so load changes hit every column alike
                            times["dense"] += timed(dense, 1)
                            times["masked"] += timed(masked, 1)
                            for i in isas:
                                kern.set_isa(i)
                                sparse()
                                times[i] += timed(sparse, 1)
                                times[f"stream-{i}"] += timed(stream, 1)
                        kern.set_isa("")
                        med = {k: statistics.median(v) / n for k, v in times.items()}
                        dense_gbs = d_in * d_out * size / med["dense"] / 1e9
                        row = dict(dtype=str(dtype).split(".")[1], shape=shape, layer=label, d_in=d_in, d_out=d_out,
                                   rows=rows, sparsity=s, union_kept=union, dense_us=med["dense"] * 1e6,
                                   masked_us=med["masked"] * 1e6, dense_gbs=dense_gbs, paths={})
                        cells = []
                        for i in isas:
                            gbs = kept_bytes / med[i] / 1e9
                            stream_gbs = kept_bytes / med[f"stream-{i}"] / 1e9
                            row["paths"][i] = dict(us=med[i] * 1e6, gbs=gbs, stream_gbs=stream_gbs,
                                                   ratio=med["dense"] / med[i], masked_ratio=med["masked"] / med[i])
                            cells.append(f"{med[i] * 1e6:.0f} ({gbs:.1f}, {gbs / stream_gbs:.0%})")
                        results.append(row)
                        ratios = ", ".join(f"{row['paths'][i]['ratio']:.2f}x" for i in isas)
                        masked_ratios = ", ".join(f"{row['paths'][i]['masked_ratio']:.2f}x" for i in isas)
                        print(f"| {row['dtype']} | {shape} {label} {d_in} -> {d_out} | {rows} | {s:.0%} | {union:.0%} | "
                              f"{med['dense'] * 1e6:.0f} ({dense_gbs:.1f}) | {med['masked'] * 1e6:.0f} | "
                              + " | ".join(cells) + f" | {ratios} | {masked_ratios} |", flush=True)
                pool = pool_t = None  # free before the next shape
    out = Path("bench/out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "sparse_kernel.json").write_text(json.dumps(dict(cpu=cpu_name(), isas=isas, rows=results), indent=1))


if __name__ == "__main__":
    main()
