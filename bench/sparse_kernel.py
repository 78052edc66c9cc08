"""Micro-benchmark: the C++ sparse kernel against ``F.linear`` on the default model's shapes.

    python bench/sparse_kernel.py

Batch 1, 2 threads. Each timing cycles through 30 distinct weight matrices, so that weights
stream from memory as they do while decoding (one matrix alone would sit in cache). Prints
dense time / sparse time for 0% and 50% input sparsity, float32 and bfloat16.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from actscope.sparsify.kernel import cpu_kernel

LAYERS = 30


def main() -> None:
    torch.set_num_threads(2)
    kern = cpu_kernel()
    if kern is None:
        raise SystemExit("the C++ kernel is not built (python -m actscope.sparsify.build)")
    print("| dtype | shape (in -> out) | sparsity | dense us | sparse us | dense / sparse |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for d_in, d_out in ((576, 1536), (1536, 576), (576, 576)):
            weights = [torch.randn(d_out, d_in).to(dtype) for _ in range(LAYERS)]
            transposed = [w.t().contiguous() for w in weights]
            x = torch.randn(1, d_in).to(dtype)
            empty, counter = torch.empty(0), torch.zeros(2, dtype=torch.int64)
            for sparsity in (0.0, 0.5):
                t = torch.tensor([float(x.abs().float().quantile(sparsity))]) if sparsity else torch.tensor([-1.0])

                def dense():
                    for w in weights:
                        F.linear(x, w)

                def sparse():
                    for wt in transposed:
                        kern.sparse_linear(x, wt, None, t, empty, counter)

                times = []
                for fn in (dense, sparse):
                    fn()
                    start = time.perf_counter()
                    for _ in range(20):
                        fn()
                    times.append((time.perf_counter() - start) / 20 / LAYERS * 1e6)
                print(f"| {str(dtype).split('.')[1]} | {d_in} -> {d_out} | {sparsity:.0%} | {times[0]:.1f} | "
                      f"{times[1]:.1f} | {times[0] / times[1]:.2f}x |")


if __name__ == "__main__":
    main()
