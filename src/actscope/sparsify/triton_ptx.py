"""Compile the Triton kernels for a GPU that is not here, and read what the compiler made of them.

Device time is scarce, so whatever can be known about a kernel without running it is checked
here, on any machine: Triton ships ``ptxas``, and compiling for ``sm_90`` needs no driver. The
tests use this to make sure every kernel and variant compiles; ``bench/sparsify_gpu_ptx.py``
prints, per tile setting, the registers, spills and what the main loop does per step (global
loads, barriers, shuffles, shared-memory traffic), which is how the one-row kernel's settings
without a barrier in the loop were found.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_POINTERS = dict(x_ptr="*bf16", wt_ptr="*bf16", bias_ptr="*bf16", thresh_ptr="*fp32", scale_ptr="*fp32",
                 y_ptr="*bf16", counter_ptr="*i64", ws_ptr="*fp32", sem_ptr="*i32", idx_ptr="*i32", out_ptr="*bf16")
# arguments that are multiples of 16 in practice: Triton specialises on it, and vector loads need it
_ALIGNED = {"x_ptr", "wt_ptr", "bias_ptr", "thresh_ptr", "scale_ptr", "y_ptr", "counter_ptr", "ws_ptr", "sem_ptr",
            "idx_ptr", "out_ptr", "d_in", "d_out", "k_per_program"}
LOOP_KEYS = ("ld.global", "bar.sync", "shfl.sync", "ld.shared", "st.shared")


def compile_kernel(fn: Any, const: dict, dtype: str = "bf16", num_warps: int = 4, num_stages: int = 3,
                   arch: int = 90) -> Any:
    """``fn`` compiled for ``sm_<arch>``; ``const`` gives every ``tl.constexpr`` argument."""
    sig = {name: "constexpr" if name in const else _POINTERS.get(name, "i32").replace("bf16", dtype)
           for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in _ALIGNED}
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True))


def loop_stats(ptx: str) -> dict[str, int]:
    """Counts per step of the main loop: the basic block with the most global loads."""
    per: collections.Counter = collections.Counter()
    label = "entry"
    for line in ptx.splitlines():
        if m := re.match(r"^(\$L__BB\d+_\d+):", line):
            label = m.group(1)
        for key in LOOP_KEYS:
            if key in line:
                per[(label, key)] += 1
    loops = {lbl for lbl, _ in per if lbl != "entry"} or {"entry"}
    loop = max(sorted(loops), key=lambda lbl: per[(lbl, "ld.global")])
    return {key: per[(loop, key)] for key in LOOP_KEYS}


def registers(ptx: str, arch: int = 90) -> dict[str, int] | None:
    """``ptxas -v``'s registers and spill bytes, or None when no ptxas here can read this PTX."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        for name in ("ptxas", "ptxas-blackwell"):  # the newer one reads newer PTX versions
            path = os.path.join(bin_dir, name)
            if not os.path.exists(path):
                continue
            out = subprocess.run([path, f"--gpu-name=sm_{arch}a", "-v", f.name, "-o", os.devnull],
                                 capture_output=True, text=True).stderr
            regs, spill = re.search(r"Used (\d+) registers", out), re.search(r"(\d+) bytes spill stores", out)
            if regs and spill:
                return dict(registers=int(regs.group(1)), spill_bytes=int(spill.group(1)))
        return None
    finally:
        os.unlink(f.name)
