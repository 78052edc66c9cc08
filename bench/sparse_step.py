"""Benchmark: the linears of one decoding step, alone: dense, one sparse call per linear, one per
group (q/k/v, gate/up), and a plain streaming read of the same bytes in as many pieces.

    python bench/sparse_step.py [--dtype float32|bfloat16] [--rounds 15] [--min-gib 1.5]

All layers of the default model's shape (30 layers; hidden 576, MLP 1,536, 3 KV heads of 64)
with random weights, one input row per layer (a different one per layer, as in a model), inputs
kept at 50% (a median threshold), in the order a step calls them. Each timed step uses the next
of several copies of the weights, at least ``--min-gib`` of them in all, so a step finds none of
its weights in the cache: one step's weights (405 MiB in float32) would otherwise largely stay in
a big last-level cache between steps, which a real model's changing kept rows and its
unembedding do not allow. What it isolates: how much of a sparse step's kernel time is the bytes
and how much is the way they are read (kept rows lie apart; the streaming read takes the same
bytes contiguous), and what grouping q/k/v and gate/up into one call (``sparsify/group.py``)
saves. Median of ``--rounds`` alternating rounds, first one dropped.
``bench/sparse_breakdown.py`` measures the same pieces inside the real model.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
import torch.nn.functional as F

from actscope.sparsify.kernel import cpu_kernel

LAYERS, HIDDEN, MLP, KV = 30, 576, 1536, 192
LINEARS = [("q", HIDDEN, HIDDEN), ("k", HIDDEN, KV), ("v", HIDDEN, KV), ("o", HIDDEN, HIDDEN),
           ("gate", HIDDEN, MLP), ("up", HIDDEN, MLP), ("down", MLP, HIDDEN)]
GROUPS = [("qkv", ("q", "k", "v")), ("o", ("o",)), ("gate_up", ("gate", "up")), ("down", ("down",))]
SIZES = {n: i for n, i, _ in LINEARS}


def make_copy(dtype: torch.dtype) -> dict:
    """One step's weights in every layout the benchmark reads, and each layer's input."""
    dense_w = [{n: torch.randn(o, i).to(dtype) for n, i, o in LINEARS} for _ in range(LAYERS)]  # [out, in]
    alone = [{n: w[n].t().contiguous() for n in w} for w in dense_w]  # W^T [in, out], as apply stores it
    grouped = [{g: torch.cat([a[n] for n in names], 1) for g, names in GROUPS} for a in alone]
    xs = [{i: torch.randn(1, i).to(dtype) for i in (HIDDEN, MLP)} for _ in range(LAYERS)]
    kept = [{i: x[i].float().abs()[0] > x[i].float().abs().median() for i in x} for x in xs]
    # the kept rows of each weight, contiguous: what a perfect sparse read would stream
    stream_alone = [[a[n][k[SIZES[n]]].contiguous() for n, _, _ in LINEARS] for a, k in zip(alone, kept)]
    stream_grouped = [[g[name][k[SIZES[names[0]]]].contiguous() for name, names in GROUPS]
                      for g, k in zip(grouped, kept)]
    thresh = [{i: x[i].float().abs().median().reshape(1) for i in x} for x in xs]
    return dict(dense=dense_w, alone=alone, grouped=grouped, xs=xs, thresh=thresh,
                stream_alone=stream_alone, stream_grouped=stream_grouped)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--min-gib", type=float, default=1.5, help="distinct weights cycled through, at least")
    args = ap.parse_args()
    torch.set_num_threads(2)
    kern = cpu_kernel()
    if kern is None:
        raise SystemExit("the CPU kernel is not built (make install)")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    step_bytes = sum(o * i for _, i, o in LINEARS) * LAYERS * dtype.itemsize
    n_copies = max(2, -(-int(args.min_gib * 2**30) // step_bytes))
    copies = [make_copy(dtype) for _ in range(n_copies)]
    empty, counter = torch.empty(0), torch.zeros(2, dtype=torch.int64)

    def dense(c):
        for w, x in zip(c["dense"], c["xs"]):
            for n, i, _ in LINEARS:
                F.linear(x[i], w[n])

    def per_linear(c):
        for a, x, t in zip(c["alone"], c["xs"], c["thresh"]):
            for n, i, _ in LINEARS:
                kern.sparse_linear(x[i], a[n], None, t[i], empty, counter)

    def per_group(c):
        for g, x, t in zip(c["grouped"], c["xs"], c["thresh"]):
            for name, names in GROUPS:
                i = SIZES[names[0]]
                kern.sparse_linear(x[i], g[name], None, t[i], empty, counter)

    def stream(key):
        def run(c):
            for layer in c[key]:
                for t in layer:
                    kern.stream_read(t)
        return run

    fns = {"dense F.linear (210 calls)": dense, "sparse, one call per linear (210)": per_linear,
           "sparse, one call per group (120)": per_group,
           "streaming read of the kept rows, 210 pieces": stream("stream_alone"),
           "streaming read of the kept rows, 120 pieces": stream("stream_grouped")}
    times: dict[str, list[float]] = {n: [] for n in fns}
    turn = itertools.cycle(copies)  # every timed step reads the copy least recently read
    for _ in range(args.rounds):
        for name, fn in fns.items():
            c = next(turn)
            t0 = time.perf_counter()
            fn(c)
            times[name].append((time.perf_counter() - t0) * 1e3)
    kept_mib = sum(t.nbytes for layer in copies[0]["stream_alone"] for t in layer) / 2**20
    print(f"{args.dtype}, 2 threads, {kern.isa()}; kept rows: {kept_mib:.0f} MiB of {step_bytes / 2**20:.0f} MiB "
          f"per step; {n_copies} copies ({n_copies * step_bytes / 2**30:.1f} GiB) cycled")
    base = statistics.median(times["dense F.linear (210 calls)"][1:])
    print("| linears of one step | ms | GB/s | dense / this |\n|---|---|---|---|")
    for name, ts in times.items():
        ms = statistics.median(ts[1:])
        nbytes = step_bytes if name.startswith("dense") else kept_mib * 2**20
        print(f"| {name} | {ms:.2f} | {nbytes / ms / 1e6:.1f} | {base / ms:.2f}x |")


if __name__ == "__main__":
    main()
