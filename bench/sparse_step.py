"""Benchmark: the linears of one decoding step, alone: dense, one sparse call per linear, one per
group (q/k/v, gate/up), and a plain streaming read of the same bytes in as many pieces.

    python bench/sparse_step.py [--dtype float32|bfloat16] [--rounds 9]

All layers of the default model's shape (30 layers; hidden 576, MLP 1,536, 3 KV heads of 64)
with random weights, one input row, inputs kept at 50% (a median threshold), in the order a
step calls them, so the weights stream from memory as they do in a model (424 MiB in float32,
more than the share of the cache one process gets). What it isolates: how much of a sparse
step's kernel time is the bytes and how much is per call, which is what grouping q/k/v and
gate/up into one call (``sparsify/group.py``) saves. Median of ``--rounds`` alternating rounds,
first one dropped.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from actscope.sparsify.kernel import cpu_kernel

LAYERS, HIDDEN, MLP, KV = 30, 576, 1536, 192
LINEARS = [("q", HIDDEN, HIDDEN), ("k", HIDDEN, KV), ("v", HIDDEN, KV), ("o", HIDDEN, HIDDEN),
           ("gate", HIDDEN, MLP), ("up", HIDDEN, MLP), ("down", MLP, HIDDEN)]
GROUPS = [("qkv", ("q", "k", "v")), ("o", ("o",)), ("gate_up", ("gate", "up")), ("down", ("down",))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(2)
    kern = cpu_kernel()
    if kern is None:
        raise SystemExit("the CPU kernel is not built (make install)")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    dense_w = [{n: torch.randn(o, i).to(dtype) for n, i, o in LINEARS} for _ in range(LAYERS)]  # [out, in]
    sizes = {n: i for n, i, _ in LINEARS}
    alone = [{n: w[n].t().contiguous() for n in w} for w in dense_w]  # W^T [in, out], as apply stores it
    grouped = [{g: torch.cat([a[n] for n in names], 1) for g, names in GROUPS} for a in alone]
    xs = {i: torch.randn(1, i).to(dtype) for i in (HIDDEN, MLP)}
    thresh = {i: xs[i].float().abs().median().reshape(1) for i in xs}
    empty, counter = torch.empty(0), torch.zeros(2, dtype=torch.int64)
    kept = {i: xs[i].float().abs() > thresh[i] for i in xs}
    # the kept rows of each weight, contiguous: what a perfect sparse read would stream
    stream_alone = [[a[n][kept[sizes[n]][0]].contiguous() for n, _, _ in LINEARS] for a in alone]
    stream_grouped = [[g[name][kept[sizes[names[0]]][0]].contiguous() for name, names in GROUPS] for g in grouped]

    def dense():
        for w in dense_w:
            for n, i, _ in LINEARS:
                F.linear(xs[i], w[n])

    def per_linear():
        for a in alone:
            for n, i, _ in LINEARS:
                kern.sparse_linear(xs[i], a[n], None, thresh[i], empty, counter)

    def per_group():
        for g in grouped:
            for name, names in GROUPS:
                i = sizes[names[0]]
                kern.sparse_linear(xs[i], g[name], None, thresh[i], empty, counter)

    def stream(pieces):
        def run():
            for layer in pieces:
                for t in layer:
                    kern.stream_read(t)
        return run

    fns = {"dense F.linear (210 calls)": dense, "sparse, one call per linear (210)": per_linear,
           "sparse, one call per group (120)": per_group,
           "streaming read of the kept rows, 210 pieces": stream(stream_alone),
           "streaming read of the kept rows, 120 pieces": stream(stream_grouped)}
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    kept_mib = sum(t.nbytes for layer in stream_alone for t in layer) / 2**20
    print(f"{args.dtype}, 2 threads, {kern.isa()}; kept rows: {kept_mib:.0f} MiB of "
          f"{sum(t.nbytes for w in dense_w for t in w.values()) / 2**20:.0f} MiB")
    base = statistics.median(times["dense F.linear (210 calls)"][1:])
    print("| linears of one step | ms | dense / this |\n|---|---|---|")
    for name, ts in times.items():
        ms = statistics.median(ts[1:])
        print(f"| {name} | {ms:.2f} | {base / ms:.2f}x |")


if __name__ == "__main__":
    main()
