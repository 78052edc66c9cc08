"""Benchmark: where the time of one decoding step of the default model goes, dense and sparse.

    python bench/sparse_breakdown.py [--new-tokens 48] [--repeats 3] [--sparsity 0.5]

HF ``generate``, float32, 2 threads, batch 1, TEAL calibrated on 512 tokens of the default
corpus. Dense and sparse runs alternate. Inside each run every one-row call of a linear is timed:
``F.linear`` for the dense model's linears and its unembedding, the C++ kernel for the sparse
model's (the unembedding stays dense). What is left of a step is everything else: norms,
attention, rotary embeddings, HF's Python, and on the sparse side the Python around the kernel
calls. The prompt's forward pass is left out of the timed pieces but not of the step, as in a
user's ``generate``: "everything else" includes the prompt's share. GB/s: weight bytes read per step (at the achieved sparsity) over their time.
It answers what the sparse / dense ratio of ``bench/sparsify.py`` is made of, which the
isolated ``bench/sparse_step.py`` cannot: a model's changing kept rows, its unembedding and the
work between calls share the caches with the weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from actscope.sparsify import apply
from actscope.sparsify.swap import SparseLinear

sys.path.insert(0, str(Path(__file__).parent))
from sparsify import PROMPT, cpu_description, default_model_with_teal  # noqa: E402


class TimedKernel:
    """The CPU kernel, with its one-row calls timed (seconds, calls)."""

    def __init__(self, kern):
        self.kern, self.seconds, self.calls = kern, 0.0, 0

    def sparse_linear(self, x, *args):
        return self._timed(x, self.kern.sparse_linear, args)

    def sparse_linear_split(self, x, *args):  # a group's one call
        return self._timed(x, self.kern.sparse_linear_split, args)

    def same_bytes(self, a, b):
        return self.kern.same_bytes(a, b)

    def _timed(self, x, fn, args):
        if x.numel() != x.shape[-1]:
            return fn(x, *args)
        t0 = time.perf_counter()
        y = fn(x, *args)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return y


class TimedLinear:
    """Patches ``nn.Linear.forward`` while in use, timing its one-row calls."""

    def __init__(self):
        self.seconds, self.calls, self._orig = 0.0, 0, torch.nn.Linear.forward

    def __enter__(self):
        timer = self

        def forward(mod, x):
            t0 = time.perf_counter()
            y = F.linear(x, mod.weight, mod.bias)
            if x.shape[-2] == 1:
                timer.seconds += time.perf_counter() - t0
                timer.calls += 1
            return y

        torch.nn.Linear.forward = forward
        return self

    def __exit__(self, *exc):
        torch.nn.Linear.forward = self._orig


def weight_bytes(model, handle=None) -> tuple[float, float]:
    """(MiB per step of the sparsified linears at their achieved sparsity, MiB of the unembedding)."""
    sparse = sum(m.weight.nbytes * (1.0 - m.achieved) for m in model.modules()
                 if isinstance(m, SparseLinear) and m.counter[1] > 0)
    return sparse / 2**20, model.lm_head.weight.nbytes / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sparsity", type=float, default=0.5)
    args = ap.parse_args()
    model, tok, config, _ = default_model_with_teal(args.sparsity)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    n = args.new_tokens
    lin_mib = sum(m.weight.nbytes for m in model.model.modules() if isinstance(m, torch.nn.Linear)) / 2**20

    def generate() -> float:
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        return (time.perf_counter() - t0) / n * 1e3

    rows = {"dense": [], "sparse": []}
    with torch.inference_mode():
        generate()  # warm-up
        for _ in range(args.repeats):
            with TimedLinear() as lin:
                step = generate()
            per = lin.seconds / lin.calls * 211 * 1e3  # a step: 210 linears and the unembedding
            rows["dense"].append(dict(step=step, linears=per, rest=step - per))
            with apply(model, config) as handle:
                kernels = {}
                for m in model.modules():
                    if isinstance(m, SparseLinear) and m._cpu is not None:
                        kernels.setdefault(id(m._cpu), TimedKernel(m._cpu))
                        m._cpu = kernels[id(m._cpu)]
                generate()  # warm-up under apply; then count afresh
                handle.reset()
                for k in kernels.values():
                    k.seconds, k.calls = 0.0, 0
                with TimedLinear() as lin:
                    step = generate()
                calls = sum(k.calls for k in kernels.values())
                steps = n - 1  # one-row steps; the first new token comes from the prompt's pass
                kern_ms = sum(k.seconds for k in kernels.values()) / steps * 1e3
                head_ms = lin.seconds / lin.calls * 1e3  # the unembedding: one one-row call a step
                sparse_mib, head_mib = weight_bytes(model, handle)
                rows["sparse"].append(dict(step=step, kernel=kern_ms, head=head_ms, rest=step - kern_ms - head_ms,
                                           calls=calls / steps, achieved=handle.achieved()["overall"],
                                           mib=sparse_mib, head_mib=head_mib))
    med = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in rows.items()}
    d, s = med["dense"], med["sparse"]
    print(f"CPU: {cpu_description()}; float32, 2 threads, {n} new tokens, median of {args.repeats} runs each; "
          f"TEAL {args.sparsity:.0%}, achieved {s['achieved']:.1%}, {s['calls']:.0f} kernel calls a step")
    print("| per step (ms) | dense | sparse |\n|---|---|---|")
    print(f"| whole step | {d['step']:.2f} | {s['step']:.2f} |")
    gbs_dense = (lin_mib + s["head_mib"]) * 2**20 / d["linears"] / 1e6
    print(f"| linears and unembedding ({lin_mib + s['head_mib']:.0f} MiB dense) | {d['linears']:.2f} "
          f"({gbs_dense:.1f} GB/s) | {s['kernel'] + s['head']:.2f} |")
    print(f"| of which the sparse kernel ({s['mib']:.0f} MiB) | | {s['kernel']:.2f} "
          f"({s['mib'] * 2**20 / s['kernel'] / 1e6:.1f} GB/s) |")
    print(f"| of which the unembedding ({s['head_mib']:.0f} MiB) | | {s['head']:.2f} |")
    print(f"| everything else | {d['rest']:.2f} | {s['rest']:.2f} |")
    print(f"| sparse / dense | | {d['step'] / s['step']:.2f}x |")


if __name__ == "__main__":
    main()
