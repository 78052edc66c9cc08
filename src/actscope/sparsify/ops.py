"""The sparse linear as a PyTorch operator, so ``torch.compile`` can keep a whole step in one graph.

Eager code calls the kernels directly (``swap.SparseLinear``). Under ``torch.compile`` that
call would be a graph break at every sparsified linear -- seven per layer -- and the norms,
rotary embeddings and residual adds between them could not be fused, which is the point of
compiling a decoding step (``StaticDecoder(compile=True)``). As an operator with a declared
schema and output shape, the kernel sits inside the compiled graph instead; it updates the
layer's ``[kept, total]`` counter in place, which the schema declares (``Tensor(a!)``).

It is defined with ``torch.library.Library`` rather than the higher-level ``custom_op``
decorator, whose Python wrapping costs more per call than the sparse kernel itself on a small
model's weights. On CPU the C++ extension registers the kernel itself as the implementation, so
a compiled step calls it with no Python at all; a decoding step makes one call per sparsified
linear (or group of linears, group.py).
"""

from __future__ import annotations

import torch

from . import kernel

_LIB = torch.library.Library("actscope", "DEF")  # kept alive for the life of the process
_LIB.define("sparse_linear(Tensor x, Tensor wt, Tensor? bias, Tensor thresh, Tensor scale, "
            "Tensor(a!) counter) -> Tensor")


def _run(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, thresh: torch.Tensor,
         scale: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    return kernel.sparse_linear(x, wt, bias, thresh, scale, counter)


if (_cpu := kernel.cpu_kernel()) is not None:
    _cpu.register_op()  # the C++ kernel is the CPU implementation: no Python between graph and kernel
else:
    _LIB.impl("sparse_linear", _run, "CPU")  # no compiled kernel: the masked dense fallback
_LIB.impl("sparse_linear", _run, "CUDA")


@torch.library.register_fake("actscope::sparse_linear")
def _shape(x, wt, bias, thresh, scale, counter):
    return x.new_empty(*x.shape[:-1], wt.shape[1])  # the kernel takes x [..., in]


def sparse_linear(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, thresh: torch.Tensor,
                  scale: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """``kernel.sparse_linear`` (``x [rows, in]``, ``wt [in, out]``) as one operator call."""
    return torch.ops.actscope.sparse_linear.default(x, wt, bias, thresh, scale, counter)
