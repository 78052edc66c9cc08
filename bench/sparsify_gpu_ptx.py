"""What the compiler makes of the Triton sparse kernels, per tile setting, on any machine (no GPU).

    python bench/sparsify_gpu_ptx.py [--arch 90]

For one-row decoding (the GEMV: the general kernel at its default and a few tile sizes, and the
one-row kernel with and without a 2-D accumulator and prefetch), prints registers and spill
bytes from ``ptxas -v``, and per step of the main loop: global loads (16-byte vector loads of
the weight, plus ``x``), barriers, shuffles and shared-memory loads and stores. A step that
waits on barriers and shuffles to move ``x`` between layouts is time a bandwidth-bound GEMV
does not have; this is how the settings ``bench/sparsify_gpu_tune.py`` sweeps were chosen.
Counts, not speed: speed is measured on a GPU.
"""

from __future__ import annotations

import argparse
import warnings

from actscope.sparsify import triton_kernel as tk
from actscope.sparsify.triton_ptx import compile_kernel, loop_stats, registers

SETTINGS = [  # (kernel, BLOCK_N, BLOCK_K, warps, prefetch, acc2d)
    ("masked", 64, 128, 2, False, False), ("masked", 128, 64, 4, False, False),
    ("gemv", 64, 128, 2, False, False), ("gemv", 64, 128, 2, False, True), ("gemv", 128, 64, 4, False, False),
    ("gemv", 128, 64, 4, False, True), ("gemv", 128, 64, 4, True, True), ("gemv", 256, 32, 4, False, True),
    ("gemv", 256, 64, 8, False, True), ("gemv", 64, 64, 4, True, True), ("gemv", 64, 32, 2, False, True),
    ("gemv", 32, 64, 2, False, True),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    print(f"sm_{args.arch}, one row, bfloat16, one launch, scalar threshold, kept inputs counted")
    print("| kernel | BLOCK_N | BLOCK_K | warps | prefetch | 2-D acc | registers | spills | per loop step: "
          "global loads | barriers | shuffles | shared loads/stores |\n|" + "---|" * 12)
    for kind, bn, bk, warps, prefetch, acc2d in SETTINGS:
        const = dict(HAS_BIAS=False, PER_CHANNEL=False, HAS_SCALE=False, COUNT=True, ONE_LAUNCH=True,
                     BLOCK_K=bk, BLOCK_N=bn)
        if kind == "gemv":
            fn = tk._gemv_kernel
            const.update(PREFETCH=prefetch, ACC2D=acc2d)
        else:
            fn = tk._sparse_linear_kernel
            const.update(IEEE=False, UPCAST=False, ONE_ROW=True, BLOCK_R=1)
        ptx = compile_kernel(fn, const, "bf16", warps, arch=args.arch).asm["ptx"]
        loop, regs = loop_stats(ptx), registers(ptx, args.arch) or dict(registers="?", spill_bytes="?")
        print(f"| {kind} | {bn} | {bk} | {warps} | {'yes' if prefetch else 'no'} | {'yes' if acc2d else 'no'} | "
              f"{regs['registers']} | {regs['spill_bytes']} | {loop['ld.global']} | {loop['bar.sync']} | "
              f"{loop['shfl.sync']} | {loop['ld.shared']}/{loop['st.shared']} |", flush=True)


if __name__ == "__main__":
    main()
