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

The hand-over is keyed on the input tensor itself (its identity and, where it has one, its
version counter), so a member called with any other input computes afresh. Tensors made under
``inference_mode`` have no version counter; so while any forward hook sits on a member (or a
global one is registered), which could edit the input in place between two members' calls,
each member runs the kernel alone on its own columns instead. A group counts the kept inputs once per input, into one
counter its members share, since they keep the same inputs. Training (grad enabled) and many
rows use each member's own masked dense product, exactly as an ungrouped ``SparseLinear``.
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
    """One weight block ``[in, sum of outs]`` for several ``SparseLinear``\\ s and the last input's outputs."""

    def __init__(self, members: list["SparseLinear"]):
        self.members = members
        self.spans: dict[int, tuple[int, int]] = {}
        start = 0
        for m in members:
            self.spans[id(m)] = (start, start + m.out_features)
            start += m.out_features
        self.out_features = start
        self.wt: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.counter = members[0].counter
        self.sizes = [m.out_features for m in members]
        self._x: torch.Tensor | None = None  # the last input, its outputs per member, members still to serve
        self._version = -1
        self._outs: dict[int, torch.Tensor] | None = None
        self._left = 0

    def to_kernel_layout(self) -> None:
        """Store the members' weights once, side by side, as ``W^T``; each Parameter becomes a
        view of its columns. Peak memory: one group's weights more, for the moment of the copy."""
        first = self.members[0]
        w0 = first.weight
        with torch.inference_mode(False), torch.no_grad():  # normal tensors, even inside inference_mode
            wt = torch.empty(first.in_features, self.out_features, dtype=w0.dtype, device=w0.device)
            for m in self.members:
                a, b = self.spans[id(m)]
                wt[:, a:b].copy_(m.weight.detach().t())
                m._stride = tuple(m.weight.stride())
                m.weight.data = wt[:, a:b].t()
                m._wt, m.group, m.counter = None, self, self.counter
            if any(m.bias is not None for m in self.members):
                parts = [m.bias.detach() if m.bias is not None else torch.zeros(m.out_features, dtype=w0.dtype)
                         for m in self.members]
                self.bias = torch.cat(parts).to(w0.device)
        self.wt = wt

    def restore_layout(self) -> None:
        """Give every member its own weight again, with its original strides (bit-identical values)."""
        for m in self.members:
            m.restore_layout()
            m.group = None
        self.wt = self.bias = self._x = self._outs = None

    def forward(self, member: "SparseLinear", x: torch.Tensor, max_rows: int) -> torch.Tensor:
        """``member``'s output for ``x``: its columns of the group's one call when decoding
        (up to ``max_rows`` rows, no grad)."""
        version = 0 if torch.compiler.is_compiling() or x.is_inference() else x._version
        seen = self._x is x and self._version == version
        if not seen:
            self._x, self._version, self._outs, self._left = x, version, None, len(self.members)
        self._left -= 1
        y = self._outs[id(member)] if self._outs is not None else self._compute(member, x, seen, max_rows)
        if self._left <= 0:  # every member served: hold no tensors between steps
            self._x = self._outs = None
        return y

    def _compute(self, member: "SparseLinear", x: torch.Tensor, seen: bool, max_rows: int) -> torch.Tensor:
        assert self.wt is not None
        count = _NO_COUNT if seen else self.counter  # the members keep the same inputs: count once
        x2 = x.reshape(-1, member.in_features)
        rows, lead = x2.shape[0], x.shape[:-1]
        if rows <= max_rows and not torch.is_grad_enabled() and x2.dtype == self.wt.dtype:
            if not _hooked(self.members):  # one call for the whole group; members get their columns
                y = self._run(member, x2, self.wt, self.bias, count)
                parts = y.split(self.sizes, dim=1)
                self._outs = {id(m): (p if rows == 1 else p.contiguous()).view(*lead, m.out_features)
                              for m, p in zip(self.members, parts)}
                return self._outs[id(member)]
            # a hook could edit the input in place between members: each runs alone on its columns
            a, b = self.spans[id(member)]
            y = self._run(member, x2, self.wt[:, a:b], None if self.bias is None else self.bias[a:b], count)
        else:  # prefill, evaluation, training: the member's own masked dense product
            keep = kernel.mask(x2, member.thresh, member.scale, count)
            y = F.linear(x2 * keep, member.weight, member.bias)
        return y.reshape(*lead, member.out_features)

    @staticmethod
    def _run(member: "SparseLinear", x2: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None,
             counter: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # one opaque op inside the compiled graph
            from . import ops

            return ops.sparse_linear(x2, wt, bias, member.thresh, member._scale, counter)
        return member._cpu.sparse_linear(x2, wt, bias, member.thresh, member._scale, counter)


_NO_COUNT = torch.empty(0, dtype=torch.int64)


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
