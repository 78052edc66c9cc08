"""The sparse decode kernels: build, load, and a reference implementation they must equal.

On CPU the kernel is C++ (``csrc/sparse_linear.cpp`` and the headers beside it), compiled once
into the cache by ``native.load_extension`` (``make install`` runs ``python -m actscope.build``,
so a fresh machine pays the compile at install, not at the first decode). If it cannot be built
(no compiler, no ninja), we warn once and fall back to the masked dense computation, which gives the same numbers without the speed. On CUDA the Triton
kernel in ``triton_kernel.py`` is used. It is tested on an H100 and, wherever Triton is
installed, in Triton's CPU interpreter (docs/sparsify.md, "The kernels"); if it fails to compile
or launch on some other GPU or Triton version, the same fallback applies.

Contract, shared by every implementation (``x [rows, in]``, ``wt [in, out]`` the transposed weight)::

    keep = |x| * scale > thresh              # thresh: one value, or one per input channel
    y    = (x * keep) @ wt + bias
    counter += [kept inputs, all inputs]     # achieved sparsity, measured where it happens
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import native

_CSRC = Path(__file__).with_name("csrc")
_state: dict[str, Any] = {}


def kernel_dir() -> Path:
    """Where the compiled CPU kernel lives (``native.extension_dir``). Creates nothing."""
    return native.extension_dir("sparse_linear", _CSRC)


def cpu_kernel(verbose: bool = False) -> Any | None:
    """The compiled CPU extension, or ``None`` (with one warning) when it cannot be built."""
    if "cpu" not in _state:
        _state["cpu"] = native.load_extension(
            "sparse_linear", _CSRC, "sparse_linear.cpp", verbose=verbose,
            without="falling back to masked dense matmuls, which give the same outputs without the speed-up")
    return _state["cpu"]


def cpu_isa() -> str | None:
    """The instruction set the CPU kernel runs (``scalar``, ``avx2`` or ``avx512``), or ``None``
    without a kernel. Picked from cpuid at load: the widest this CPU has. ``ACTSCOPE_KERNEL_ISA``
    (set before the kernel loads) or ``set_cpu_isa`` forces one."""
    kern = cpu_kernel()
    return None if kern is None else kern.isa()


def set_cpu_isa(name: str | None) -> None:
    """Force the CPU kernel's instruction set (``None``: the best this CPU has). Raises
    ``RuntimeError`` for one this CPU lacks (``cpu_kernel().supported_isas()`` lists them)."""
    kern = cpu_kernel()
    if kern is not None:
        kern.set_isa(name or "")


def gpu_kernel(retry: bool = False) -> Any | None:
    """The Triton kernel module when CUDA and Triton are present, else ``None``. After a failure
    (``sparse_linear`` warns and switches it off for the process) it stays ``None``, unless
    ``retry`` (benchmarks that run one variant after another start each with the kernel on)."""
    if retry or "gpu" not in _state:
        try:
            if not torch.cuda.is_available():
                raise ImportError("no CUDA device")
            if os.environ.get("ACTSCOPE_NO_KERNEL"):
                raise ImportError("kernels disabled by ACTSCOPE_NO_KERNEL")
            from . import triton_kernel

            _state["gpu"] = triton_kernel
        except ImportError:
            _state["gpu"] = None
    return _state["gpu"]


def reference(
    x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, thresh: torch.Tensor,
    scale: torch.Tensor | None = None, counter: torch.Tensor | None = None,
) -> torch.Tensor:
    """The masked dense computation every kernel must equal (also the fallback). Torch ops only,
    not ``masked``'s C++ pass, so the kernels' tests check them against an independent computation."""
    y = (x * mask(x, thresh, scale, counter)).to(torch.float32) @ wt.to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def masked(x: torch.Tensor, thresh: torch.Tensor, scale: torch.Tensor | None = None,
           counter: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` with the inputs ``mask`` drops set to zero: the input of every masked dense product
    (prompts, evaluation, training). On an AVX2 or AVX-512 CPU without autograd the C++ extension
    makes it in one vectorised pass over ``x`` (``masked_input``; measured once at 15-20x faster
    than the torch ops on a 256-token prompt's rows; its plain scalar loop was slower, so a CPU without
    AVX2 keeps the torch ops); otherwise ``x * keep`` (``torch.where`` and ``masked_fill`` took
    3-4x as long on CPU). A dropped NaN becomes 0 in the C++ pass, as in the sparse kernels,
    which never read a dropped input; torch's multiply keeps it NaN. On CUDA with
    ``ACTSCOPE_TRITON_MASK=1`` one Triton kernel does the same (``triton_kernel.masked_input``)."""
    if x.is_cuda and not (torch.is_grad_enabled() and x.requires_grad) and not torch.compiler.is_compiling():
        gpu = gpu_kernel()
        if gpu is not None and gpu.FUSED_MASK and thresh.dtype == torch.float32:
            try:
                return gpu.masked_input(x, thresh, scale, counter)
            except Exception as exc:  # as in sparse_linear: never break a user's run
                warnings.warn(f"actscope: the Triton mask kernel failed ({type(exc).__name__}: {str(exc)[:300]}); "
                              "using torch ops from now on", RuntimeWarning, stacklevel=2)
                gpu.FUSED_MASK = False
    # the CPU kernel is looked up last: on CUDA it is never loaded (nor built) for this
    if (not x.is_cuda and x.dtype in (torch.float32, torch.bfloat16) and thresh.dtype == torch.float32
            and not (torch.is_grad_enabled() and x.requires_grad) and not torch.compiler.is_compiling()
            and (cpu := cpu_kernel()) is not None and cpu.isa() != "scalar"):
        out = cpu.masked_input(x.reshape(-1, x.shape[-1]), thresh.reshape(-1),
                               scale if scale is not None else _EMPTY_F32,
                               counter if counter is not None else _EMPTY_I64)
        return out.view(x.shape)
    return x * mask(x, thresh, scale, counter)


_EMPTY_F32 = torch.empty(0, dtype=torch.float32)
_EMPTY_I64 = torch.empty(0, dtype=torch.int64)


def mask(x: torch.Tensor, thresh: torch.Tensor, scale: torch.Tensor | None = None,
         counter: torch.Tensor | None = None) -> torch.Tensor:
    """``|x| * scale > thresh``: the one keep rule shared by kernels, dense paths and calibration.

    With ``counter`` (``[kept, total]``, int64) the kept and total inputs are added to it.
    """
    a = x.abs().to(torch.float32)
    if scale is not None and scale.numel():
        a = a * scale
    keep = a > thresh
    if counter is not None and counter.numel() == 2:
        counter[0] += keep.sum()
        counter[1] += keep.numel()
    return keep


def sparse_linear(
    x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, thresh: torch.Tensor,
    scale: torch.Tensor | None = None, counter: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatch to the CUDA, CPU or reference implementation of the contract above."""
    empty = torch.empty(0, dtype=torch.float32, device=x.device)
    if x.is_cuda and (gpu := gpu_kernel()) is not None:
        try:
            return gpu.sparse_linear(x, wt, bias, thresh, scale if scale is not None else empty, counter)
        except Exception as exc:  # an untested GPU or Triton version must never break a user's run
            warnings.warn(f"actscope: the Triton kernel failed ({type(exc).__name__}: {str(exc)[:300]}); "
                          "using masked dense matmuls from now on", RuntimeWarning, stacklevel=2)
            _state["gpu"] = None
    if not x.is_cuda and x.dtype in (torch.float32, torch.bfloat16) and (cpu := cpu_kernel()) is not None:
        if counter is None:
            counter = torch.empty(0, dtype=torch.int64)
        return cpu.sparse_linear(x, wt, bias, thresh, scale if scale is not None else empty, counter)
    return reference(x, wt, bias, thresh, scale, counter)


def kernel_status() -> dict[str, Any]:
    """Which kernels are usable here: ``{"cpu": ..., "gpu": ..., "cpu_isa": ...}``."""
    return {"cpu": cpu_kernel() is not None, "gpu": gpu_kernel() is not None, "cpu_isa": cpu_isa()}
