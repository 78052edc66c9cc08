"""Benchmark: a prompt's forward pass inside ``sparsify.apply`` against the dense model.

    python bench/sparse_prompt.py [--lengths 32,256] [--dtypes float32,bfloat16] [--rounds 7]

The default model, TEAL at 50% calibrated on 512 tokens of the default corpus, one prompt row
from the same corpus, 2 threads. A prompt has more rows than the sparse kernel takes
(``swap.KERNEL_MAX_ROWS``), so every sparsified linear computes a masked dense product: this
measures what masking costs on top of the dense matmuls. "grouped" is the default (q/k/v and
gate/up make their mask once); "one per linear" is ``FUSE_GROUPS = False``. Dense and sparse
runs alternate; medians of ``--rounds``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from actscope.sparsify import apply, swap

sys.path.insert(0, str(Path(__file__).parent))
from sparsify import cpu_description, default_model_with_teal  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="32,256")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    model, _, config, prompts = default_model_with_teal(0.5, more_tokens=256)
    print(f"CPU: {cpu_description()}; 2 threads; TEAL 50%")
    print("| dtype | prompt tokens | dense ms | inside apply, grouped: ms (/ dense) | one per linear: ms (/ dense) |")
    print("|---|---|---|---|---|")
    for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
        model.to(dtype)
        for length in [int(v) for v in args.lengths.split(",")]:
            x = prompts[:1, :length]
            times: dict[str, list[float]] = {"dense": [], "grouped": [], "alone": []}
            with torch.inference_mode():
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    model(x)
                    times["dense"].append(time.perf_counter() - t0)
                    for name, fuse in (("grouped", True), ("alone", False)):
                        swap.FUSE_GROUPS = fuse
                        with apply(model, config):
                            model(x)  # untimed: the first pass after apply
                            t0 = time.perf_counter()
                            model(x)
                            times[name].append(time.perf_counter() - t0)
                        swap.FUSE_GROUPS = True
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            d = med["dense"]
            print(f"| {str(dtype).split('.')[1]} | {length} | {d:.1f} | {med['grouped']:.1f} ({med['grouped'] / d:.2f}) | "
                  f"{med['alone']:.1f} ({med['alone'] / d:.2f}) |", flush=True)
    model.float()


if __name__ == "__main__":
    main()
