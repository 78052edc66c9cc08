"""``apply(model, config)``: run a model with calibrated activation sparsity, without editing it.

Inside the block, each sparsified ``nn.Linear`` is swapped for a ``SparseLinear`` that holds the
*same* parameters (so ``state_dict`` keys and values do not change) and thresholds its input
before multiplying. Each such weight is stored once, in the layout the sparse kernel reads
(``W^T`` [in, out] contiguous); the Parameter becomes a transposed view of that storage, so the
model's memory does not grow, and on exit the original layout is copied back bit for bit. Few rows at a time (decoding) go to the sparse kernel, which reads only the
weight rows of kept inputs; many rows (prefill, evaluation) use a masked dense matmul with the
same keep rule. For the MLP-activation methods (CATS, CHESS, Top-k, CoreInfer) the activation
module is swapped for a ``SparseAct``; the down projection then skips the channels that became
zero, and a ``RowsLinear`` up (and, for CoreInfer, gate) projection computes only the kept
neurons. On exit the original modules are put back, whatever happened inside.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import SparsifyError
from ..families import LINEAR_TYPES, linear_weight
from ..hooks import hook_module
from . import kernel
from .config import SparsityConfig
from .coreinfer import CoreState, core_neurons, prompt_detector
from .group import FusedGroup, group_members
from .layout import layer_modules

KERNEL_MAX_ROWS = 16  # on CPU, up to this many tokens per call the sparse kernel beats a dense matmul
# ... except bfloat16 on a CPU with AMX, where torch's dense product (oneDNN on AMX tiles)
# overtakes the kernel sooner: at 16 rows the kernel was slower than the masked product on
# every shape, at 8 rows faster on most (docs/benchmarks.md, "Several rows: where the kernel
# stops"). Without AMX that product is slow, so the float32 limit stands (unmeasured there).
KERNEL_MAX_ROWS_BF16 = 8


def _has_amx() -> bool:
    try:
        return bool(torch.cpu.get_capabilities().get("amx_tile", False))
    except Exception:  # an older or newer torch without this query: assume none
        return False


_BF16_ROWS_ON_THIS_CPU = KERNEL_MAX_ROWS_BF16 if _has_amx() else KERNEL_MAX_ROWS
# On a GPU, one row always takes the Triton kernel: on small weights its one launch beats the
# masked dense path (five small kernels around cuBLAS), and on large MLP weights at useful
# sparsity it beats cuBLAS itself. For 2-16 rows the union of kept inputs is nearly everything
# and the kernel's tensor-core path loses to cuBLAS on big weights, so those use the masked
# dense path; small weights, where launches dominate, keep the kernel. The rule:
# docs/sparsify.md, "The kernels"; the measurements behind it: docs/benchmarks.md, "On a GPU".
GPU_KERNEL_MIN_BYTES = 4 << 20
# Linears that share one input and one threshold (q/k/v, gate/up under TEAL) run as one CPU kernel
# call over weights stored side by side (group.py); False keeps one call per linear.
FUSE_GROUPS = True


def column_norms(linear: nn.Module) -> torch.Tensor:
    """``||W[:, i]||_2`` per input channel (``W`` as ``[out, in]``, also for Conv1D): WINA's weight factor."""
    return linear_weight(linear).detach().float().norm(dim=0)


class SparseLinear(nn.Module):
    """Stands in for an ``nn.Linear``: ``F.linear(x * keep, W, b)`` with ``keep = |x| * scale > thresh``.

    Also for transformers' ``Conv1D`` (GPT-2), whose weight is stored ``[in, out]``: it is kept
    as it is (the same Parameter), and is already the layout the sparse kernel reads.
    """

    def __init__(self, linear: nn.Module, thresh: torch.Tensor, scale: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = linear_weight(linear).shape
        self.weight_in_out = isinstance(linear, Conv1D)  # stored [in, out]; linear_weight() reads this
        self.weight = linear.weight  # the same Parameter objects: nothing is copied or renamed
        self.bias = linear.bias
        dev = linear.weight.device
        self.register_buffer("thresh", thresh.to(dev, torch.float32).reshape(-1), persistent=False)
        self.register_buffer("scale", None if scale is None else scale.to(dev, torch.float32), persistent=False)
        self.counter = torch.zeros(2, dtype=torch.int64, device=dev)  # kept inputs, all inputs
        self._wt: torch.Tensor | None = None
        self._stride: tuple[int, ...] | None = None  # the weight's strides before to_kernel_layout()
        self._in_place = False  # whether to_kernel_layout() wrote W^T into the weight's own storage
        self.original = [linear]  # a list, so the original is not registered as a child module
        self._cpu = None  # the compiled kernel, bound once on CPU so decoding skips the dispatch
        self._wt_dtype: torch.dtype | None = None
        self._scale = self.scale if self.scale is not None else torch.empty(0, device=dev)
        w = linear.weight
        self._max_rows = KERNEL_MAX_ROWS
        self.group: Any = None  # a group.FusedGroup once apply() stores this weight beside its group's
        self.group_index = 0
        if dev.type == "cuda" and w.numel() * w.element_size() >= GPU_KERNEL_MIN_BYTES:
            self._max_rows = 1
        if dev.type == "cpu" and linear.weight.dtype == torch.bfloat16:  # fixed here, as the kernel's layout is
            self._max_rows = _BF16_ROWS_ON_THIS_CPU
        if dev.type == "cpu" and linear.weight.dtype in (torch.float32, torch.bfloat16):
            self._cpu = kernel.cpu_kernel()
            if self._cpu is not None:
                self._wt_dtype = linear.weight.dtype
        self._rows = min(self._max_rows, KERNEL_MAX_ROWS)  # most rows per kernel call (read once: decoding is hot)

    def to_kernel_layout(self) -> bool:
        """Store the weight once, as the kernel reads it: ``W^T`` [in, out] contiguous, with the
        Parameter's data a transposed *view* ``[out, in]`` of that same storage.

        ``F.linear`` (prefill, the dense path), ``state_dict`` and the module's users see the same
        values and shape as before; only the strides change, and no second copy of the weight
        exists. Returns whether the weight was moved (``restore_layout`` undoes exactly that).
        """
        w = self.weight
        if self.weight_in_out or w.t().is_contiguous() or self._stride is not None:
            self._wt = self.transposed()  # already [in, out] in memory: a view, nothing copied
            return False
        self._stride = tuple(w.stride())
        with torch.inference_mode(False), torch.no_grad():  # normal tensors, even inside inference_mode
            wt = w.detach().t().contiguous()
            self._in_place = w.is_contiguous()
            if self._in_place:  # write W^T into the weight's own storage: its address never changes
                own = w.detach().as_strided((w.shape[1], w.shape[0]), (w.shape[0], 1))
                own.copy_(wt)
                wt = own
            w.data = wt.t()
        self._wt = wt
        return True

    def restore_layout(self) -> None:
        """Give the weight back its original strides (values bit-identical), one copy at a time.

        A weight that ``to_kernel_layout`` moved within its own storage goes back into that
        storage, so its address is the one it had before ``apply``: a CUDA graph captured before
        ``apply`` stays valid after it. (A group's members, stored side by side on CPU, get new
        storage.)"""
        if self._stride is None:
            return
        w = self.weight
        with torch.inference_mode(False), torch.no_grad():
            if self._in_place:  # the weight's own storage, as W^T: copy it back into that storage
                values = w.detach().contiguous()
                back = w.detach().as_strided(w.shape, self._stride)
                back.copy_(values)
            else:
                back = torch.empty_strided(w.shape, self._stride, dtype=w.dtype, device=w.device)
                back.copy_(w.detach())
            w.data = back
        self._wt, self._stride = None, None

    def transposed(self) -> torch.Tensor:
        """``W^T`` [in, out]: a view when the weight is stored that way (always inside ``apply``),
        else a copy made on first use (a ``SparseLinear`` built outside ``apply``)."""
        w = self.weight.detach()
        if self.weight_in_out:
            return w if w.is_contiguous() else w.contiguous()
        if w.t().is_contiguous() or self.group is not None:  # grouped: its columns of the group's block
            return w.t()
        if self._wt is None or self._wt.dtype != w.dtype or self._wt.shape != w.t().shape:
            self._wt = w.t().contiguous()
        return self._wt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            return self.group.forward(self, x, self._rows)
        if (x.dtype == self._wt_dtype and self._wt is not None and x.numel() <= self._rows * self.in_features
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling()):
            # CPU decoding: one C++ call takes x [..., in] and returns [..., out]; a reshape on each
            # side from Python cost as much as the kernel's own overhead on the default model
            return self._cpu.sparse_linear(x, self._wt, self.bias, self.thresh, self._scale, self.counter)
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= self._rows and not torch.is_grad_enabled():
            if torch.compiler.is_compiling():  # one opaque op, so the compiled step has no graph break
                from . import ops

                y = ops.sparse_linear(x2, self.transposed(), self.bias, self.thresh, self._scale, self.counter)
            else:
                y = kernel.sparse_linear(x2, self.transposed(), self.bias, self.thresh, self.scale, self.counter)
        else:
            xm = kernel.masked(x2, self.thresh, self.scale, self.counter)
            if self.weight_in_out:  # as Conv1D computes it (it always has a bias)
                y = torch.addmm(self.bias, xm, self.weight)
            else:
                y = F.linear(xm, self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    @property
    def achieved(self) -> float:
        kept, total = self.counter.tolist()
        return 1.0 - kept / total if total else float("nan")

    def extra_repr(self) -> str:
        kind = "per-channel" if self.thresh.numel() > 1 else "scalar"
        return f"in={self.in_features}, out={self.out_features}, {kind} threshold"


class RowsLinear(nn.Module):
    """A gate or up projection that computes only the MLP neurons its activation will keep.

    While decoding, the paired ``SparseAct`` knows which neurons survive: CoreInfer's cores
    (known before the gate runs), or, for CATS/CHESS/Top-k, the neurons kept by the activation
    that has just run (``down(act(gate(x)) * up(x))`` calls ``up`` after ``act``). Only those rows
    of ``W [out, in]`` -- contiguous in PyTorch's layout -- are read; other outputs are zero,
    which the product with the activation and the down projection ignore.
    """

    def __init__(self, linear: nn.Linear, act: "SparseAct"):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.original = [linear]  # not child modules
        self.act = [act]
        self._cpu = kernel.cpu_kernel() if linear.weight.device.type == "cpu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        idx = self.act[0].kept_rows(x2) if x2.shape[0] <= KERNEL_MAX_ROWS else None
        if idx is None or self._cpu is None or torch.is_grad_enabled() or x2.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        y = self._cpu.rows_linear(x2, self.weight, idx)
        if self.bias is not None:
            y[:, idx] += self.bias[idx]
        return y.reshape(*x.shape[:-1], self.out_features)


class SparseAct(nn.Module):
    """Stands in for an MLP activation module: its output with small entries zeroed.

    ``cats``/``chess``: ``|a| > thresh`` (scalar or per channel); ``topk``: the largest
    ``(1 - s) d`` per token; ``coreinfer``: the prompt's core neurons, once decoding starts.
    The original module is kept as ``inner``, so calibration can still observe raw values.
    """

    def __init__(self, act: nn.Module, method: str, target: float, thresh: torch.Tensor | None,
                 token_fraction: float, state: "CoreState"):
        super().__init__()
        self.inner, self.method, self.target = act, method, target
        self.thresh = thresh
        self.token_fraction, self.state = token_fraction, state
        self._last: torch.Tensor | None = None
        self._core: torch.Tensor | None = None
        self._core_idx: torch.Tensor | None = None

    def kept_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """Indices of the neurons that can be non-zero in this decoding step (``None``: all)."""
        if self.method == "coreinfer":
            core = self.state.cores.get(id(self))
            if core is None or self.state.is_prompt(x.unsqueeze(0)):
                return None
            if core is not self._core:
                self._core, self._core_idx = core, core.any(0).nonzero().squeeze(-1)
            return self._core_idx
        idx, self._last = self._last, None  # made by the activation call just before, used once
        return idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        d = out.shape[-1]
        keep_n = max(1, round((1.0 - self.target) * d))
        if self.method in ("cats", "chess", "topk"):
            if self.method == "topk":
                idx = out.abs().topk(keep_n, dim=-1).indices
                keep = torch.zeros_like(out, dtype=torch.bool).scatter_(-1, idx, True)
            else:
                assert self.thresh is not None
                keep = out.abs() > self.thresh.to(out.device)
            flat = keep.reshape(-1, d)
            # only RowsLinear's CPU kernel reads these indices; on a GPU, nonzero() would be a host
            # sync on every decoding step (and break CUDA-graph capture) for nothing
            few = flat.shape[0] <= KERNEL_MAX_ROWS and not flat.is_cuda
            self._last = flat.any(0).nonzero().squeeze(-1) if few else None
            return out * keep
        if self.state.is_prompt(out):  # the prompt itself runs dense and chooses the core neurons
            self.state.cores[id(self)] = core_neurons(out, keep_n, self.token_fraction)
            return out
        core = self.state.cores.get(id(self))
        if core is None:
            raise SparsifyError("coreinfer: decoding started without a prompt; core neurons come from the prefill")
        return out * (core.unsqueeze(-2) if out.dim() == 3 else core).to(out.dtype)


class SparsityHandle:
    """What ``apply`` yields: the swapped modules and the sparsity they actually achieved."""

    def __init__(self, modules: dict[str, SparseLinear], config: SparsityConfig):
        self.modules, self.config = modules, config

    def achieved(self) -> dict[str, Any]:
        """Measured share of zeroed inputs: overall (weighted by weight size) and per module."""
        per = {p: m.achieved for p, m in self.modules.items() if m.counter[1] > 0}
        sizes = {p: self.modules[p].weight.numel() for p in per}
        total = sum(sizes.values())
        overall = sum(per[p] * sizes[p] for p in per) / total if total else float("nan")
        return {"overall": overall, "targeted": self.config.sparsity, "per_module": per}

    def reset(self) -> None:
        for m in self.modules.values():
            m.counter.zero_()


def _plan(model: nn.Module, config: SparsityConfig, state: CoreState) -> dict[str, nn.Module]:
    """The stand-in module for each sparsified path: linear layers and MLP activations."""
    modules = dict(model.named_modules())
    acts = {lm.act: lm for lm in layer_modules(model)}
    plan: dict[str, nn.Module] = {}
    for path, target in config.targets.items():
        if target <= 0:
            continue
        module = modules.get(path)
        if path in acts:
            thresh = config.thresholds.get(path)
            token_fraction = float(config.params.get("token_fraction", 0.4))
            act = plan[path] = SparseAct(module, config.method, target, thresh, token_fraction, state)
            for down in acts[path].groups["mlp_out"]:  # reads only the channels left non-zero
                plan.setdefault(down, SparseLinear(modules[down], torch.zeros(1)))
            gate_up = acts[path].groups["mlp_in"]
            # separate gate and up (nn.Linear: rows contiguous): compute only the rows that will be kept
            if len(gate_up) == 2 and all(isinstance(modules[p], nn.Linear) for p in gate_up):
                for proj in gate_up if config.method == "coreinfer" else gate_up[1:]:
                    plan[proj] = RowsLinear(modules[proj], act)
        elif isinstance(module, LINEAR_TYPES):
            scale = column_norms(module) if config.method == "wina" else None
            plan[path] = SparseLinear(module, config.thresholds[path], scale)
        else:
            raise SparsifyError(f"the config names {path}, which this model lacks or which is not a linear layer "
                                f"(calibrated for model type {config.model_type!r})")
    return plan


def _swap(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, new)


@contextmanager
def apply(model: nn.Module, config: SparsityConfig | str) -> Iterator[SparsityHandle]:
    """Run ``model`` with the sparsity in ``config`` (or a saved config folder) inside the block.

    A config with nothing to zero installs nothing, so outputs stay bit-identical to the dense model.
    """
    if not isinstance(config, SparsityConfig):
        config = SparsityConfig.from_pretrained(config)
    model_type = getattr(model.config, "model_type", "")
    if config.model_type and model_type != config.model_type:
        raise SparsifyError(f"this sparsity config was calibrated on a {config.model_type} model, not {model_type}")
    if config.is_dense:
        yield SparsityHandle({}, config)
        return
    state = CoreState()
    plan = _plan(model, config, state)
    shared_inputs = [paths for lm in layer_modules(model) for paths in lm.groups.values()]
    originals = {path: model.get_submodule(path) for path in plan}
    handle = None
    moved: list[SparseLinear] = []
    fused: list[FusedGroup] = []
    try:
        if config.method == "coreinfer":
            handle = hook_module(model, prompt_detector(state), when="before")
        for path, new in plan.items():
            _swap(model, path, new)
        if FUSE_GROUPS:
            fused = group_members(plan, shared_inputs)
        for g in fused:  # one group at a time: the peak is one group's weights more, then none
            g.to_kernel_layout()
        for new in plan.values():  # one weight at a time: the peak is one extra matrix, then none
            if isinstance(new, SparseLinear) and new.group is None and new.to_kernel_layout():
                moved.append(new)
        _release_freed_memory()
        yield SparsityHandle({p: m for p, m in plan.items() if isinstance(m, SparseLinear)}, config)
    finally:
        if handle is not None:
            handle.remove()
        for g in fused:
            g.restore_layout()
        for new in moved:
            new.restore_layout()
        for path, original in originals.items():
            _swap(model, path, original)
        if moved or fused:
            _release_freed_memory()


def _release_freed_memory() -> None:
    """Hand the freed weight copies back to the OS (glibc keeps some freed blocks otherwise)."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
            pass
