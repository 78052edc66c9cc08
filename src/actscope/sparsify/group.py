"""Linears that read one input under one threshold, stored side by side and run as one kernel call.

q/k/v read the same normed hidden state, and gate/up the same MLP input; TEAL gives each such
group one threshold, so the inputs they keep are the same. Decoding a small model is dominated
by per-call costs: each sparse call starts cold in memory and ends waiting for its slowest
thread, and a 576 x 192 projection is too small to hide that. So inside ``apply`` a group's
weights are stored once, side by side, as one ``W^T`` block ``[in, sum of outs]`` -- each
member's Parameter a transposed view of its columns, so nothing is copied twice -- and the
first member called computes every member's output in one kernel call over that block; the
others are handed their columns. On the default model this cuts a step's sparse calls from 210
to 120 (docs/benchmarks.md, "Activation sparsity").

The hand-over is keyed on the input tensor (its identity and, where it has one, its version
counter) and, outside a compiled graph, on its values too: tensors made under ``inference_mode``
have no version counter, so an in-place edit between two members' calls (a hook's, say) shows
only in the values, and then the member computes afresh. A compiled graph is traced once, so
there, while a forward hook sits on a member (or a global one is registered), each member runs
the kernel alone on its own columns. A group counts the kept inputs once per input tensor,
into one counter its members share, since they keep the same inputs. Many rows (a prompt, an
evaluation) make the mask once, and every member's masked product at once, handed over the same
way: each product is the one the member computes alone, so outputs are bit-identical to one
call per linear. Training (grad enabled) runs each member alone, so gradients reach its Parameter.
The held outputs are the group's, not a thread's: one model inside ``apply`` must not run
forward passes from several threads at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from . import kernel

if TYPE_CHECKING:
    from .swap import SparseLinear


def can_group(members: list["SparseLinear"]) -> bool:
    """Whether these linears can share one kernel call: two or more ``nn.Linear`` on the CPU
    kernel, one dtype and input width, and the same threshold and scale (so the same kept inputs)."""
    if len(members) < 2:
        return False
    first = members[0]
    for m in members:
        w = m.weight
        if m.weight_in_out or m._cpu is None or w.device.type != "cpu" or w.dtype != first.weight.dtype:
            return False
        if m.in_features != first.in_features or not torch.equal(m.thresh, first.thresh):
            return False
        if (m.scale is None) != (first.scale is None) or (m.scale is not None and not torch.equal(m.scale, first.scale)):
            return False
    return True


class FusedGroup:
    """One weight block ``[in, sum of outs]`` (and bias block) for several ``SparseLinear``\\ s,
    and the outputs of the last input, until every member has taken its own."""

    def __init__(self, members: list["SparseLinear"]):
        self.members = members
        self.spans: list[tuple[int, int]] = []
        start = 0
        for i, m in enumerate(members):
            m.group_index = i  # an int, not id(m): a compiled step guards on its value, not on objects
            self.spans.append((start, start + m.out_features))
            start += m.out_features
        self.out_features = start
        self.sizes = [m.out_features for m in members]
        self.wt: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.counter = members[0].counter
        self._x: torch.Tensor | None = None  # the last input, a copy of its values, and its outputs
        self._version = -1
        self._values: torch.Tensor | None = None
        self._outs: list[torch.Tensor] | None = None
        self._pending = 0  # bit i: member i has not taken its output yet
        self._scratch = _EMPTY  # where the kernel copies an inference tensor's values (ours, reused)

    def to_kernel_layout(self) -> None:
        """Store the members' weights (and biases) once, side by side; each Parameter becomes a
        view of its part. Peak memory: one group's weights more, for the moment of the copy."""
        first = self.members[0]
        w0 = first.weight
        with torch.inference_mode(False), torch.no_grad():  # normal tensors, even inside inference_mode
            wt = torch.empty(first.in_features, self.out_features, dtype=w0.dtype, device=w0.device)
            has_bias = any(m.bias is not None for m in self.members)
            bias = torch.zeros(self.out_features, dtype=w0.dtype, device=w0.device) if has_bias else None
            for m, (a, b) in zip(self.members, self.spans):
                wt[:, a:b].copy_(m.weight.detach().t())
                m._stride = tuple(m.weight.stride())
                m.weight.data = wt[:, a:b].t()
                if m.bias is not None:  # a view too: an edit to the bias reaches the kernel
                    bias[a:b].copy_(m.bias.detach())
                    m.bias.data = bias[a:b]
                m._wt, m.group, m.counter = None, self, self.counter
        self.wt, self.bias = wt, bias

    def restore_layout(self) -> None:
        """Give every member its own weight and bias again, with the original strides (bit-identical)."""
        for m in self.members:
            m.restore_layout()
            if m.bias is not None:
                with torch.inference_mode(False), torch.no_grad():
                    m.bias.data = m.bias.detach().clone()
            m.group = None
        self.wt = self.bias = self._x = self._values = self._outs = None

    def forward(self, member: "SparseLinear", x: torch.Tensor, max_rows: int) -> torch.Tensor:
        """``member``'s output for ``x``: its columns of the group's one call when decoding
        (up to ``max_rows`` rows, no grad)."""
        compiling = torch.compiler.is_compiling()
        version = 0 if compiling or x.is_inference() else x._version
        seen = self._x is x and self._version == version
        if not seen:
            self._x, self._version, self._values, self._outs = x, version, None, None
            self._pending = (1 << len(self.members)) - 1
        i = member.group_index
        outs = self._outs
        # The held outputs are handed over only if the input is unchanged: a normal tensor's
        # version counter says so; tensors made under inference_mode have none, so for them
        # (outside a compiled graph) the values are compared with a copy kept at the call.
        # A member that already took its output for this input starts a new round: it may be
        # called again after an edit to the weights, which the held outputs would not show.
        fresh = outs is not None and (self._pending >> i) & 1 and not torch.is_grad_enabled()
        if fresh and (compiling or self._values is None or member._cpu.same_bytes(x, self._values)):
            y = outs[i]
        else:
            y = self._compute(member, x, seen, max_rows, compiling)
        self._pending &= ~(1 << i)
        if not self._pending:  # every member served: hold no tensors between steps
            self._x = self._values = self._outs = None
        return y

    def _compute(self, member: "SparseLinear", x: torch.Tensor, seen: bool, max_rows: int,
                 compiling: bool) -> torch.Tensor:
        assert self.wt is not None
        count = _NO_COUNT if seen else self.counter  # the members keep the same inputs: count once
        rows = x.numel() // member.in_features
        shared = not torch.is_grad_enabled() and x.dtype == self.wt.dtype
        if shared and rows <= max_rows and not compiling:  # decoding: one C++ call gives every member's output
            values = self._scratch_for(x) if x.is_inference() else _EMPTY  # no version counter: keep the values
            self._outs = member._cpu.sparse_linear_split(x, self.wt, self.bias, member.thresh, member._scale,
                                                         count, self.sizes, values)
            self._values = values if values.numel() else None
            self._pending = (1 << len(self.members)) - 1
            return self._outs[member.group_index]
        x2, lead = x.reshape(-1, member.in_features), x.shape[:-1]
        if shared and not (compiling and _hooked(self.members)):  # one call for the whole group
            if rows <= max_rows:  # compiled: the traced operator, then each member's columns
                y = _traced(member, x2, self.wt, self.bias, count)
                self._outs = [p.contiguous() for p in y.view(*lead, self.out_features).split_with_sizes(self.sizes, -1)]
            else:  # prefill, evaluation: one mask; each member's own product (as alone), no copies
                xm = kernel.masked(x2, member.thresh, member.scale, count)
                self._outs = [F.linear(xm, m.weight, m.bias).view(*lead, m.out_features) for m in self.members]
            if not compiling and x.is_inference():  # no version counter: keep the values to compare
                self._values = x.clone(memory_format=torch.contiguous_format)  # not kept: a prompt can be large
            self._pending = (1 << len(self.members)) - 1
            return self._outs[member.group_index]
        if shared and rows <= max_rows:  # traced with a hook that could edit the input in place: each alone
            a, b = self.spans[member.group_index]
            bias = None if self.bias is None else self.bias[a:b]
            y = _traced(member, x2, self.wt[:, a:b], bias, count)
        else:  # training, another dtype, or many rows traced with a hook: the member's own masked product
            y = F.linear(kernel.masked(x2, member.thresh, member.scale, count), member.weight, member.bias)
        return y.reshape(*lead, member.out_features)

    def _scratch_for(self, x: torch.Tensor) -> torch.Tensor:
        """A flat buffer of ``x``'s size and dtype, ours and reused, for the copy of ``x``'s values."""
        if self._scratch.numel() != x.numel() or self._scratch.dtype != x.dtype:
            self._scratch = torch.empty(x.numel(), dtype=x.dtype)
        return self._scratch


def _traced(member: "SparseLinear", x2: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None,
            counter: torch.Tensor) -> torch.Tensor:
    """The kernel as one opaque operator inside a compiled graph."""
    from . import ops

    return ops.sparse_linear(x2, wt, bias, member.thresh, member._scale, counter)


_NO_COUNT = torch.empty(0, dtype=torch.int64)
_EMPTY = torch.empty(0)


def _hooked(members: list[nn.Module]) -> bool:
    """Whether a forward hook could run between the members' calls (on a member, or global)."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in members)


def group_members(plan: dict[str, nn.Module], groups: list[tuple[str, ...]]) -> list[FusedGroup]:
    """A ``FusedGroup`` for each of ``groups`` (paths sharing one input) whose planned modules can share a call."""
    from .swap import SparseLinear

    out = []
    for paths in groups:
        members = [plan.get(p) for p in paths]
        if all(isinstance(m, SparseLinear) for m in members) and can_group(members):  # type: ignore[arg-type]
            out.append(FusedGroup(members))  # type: ignore[arg-type]
    return out
