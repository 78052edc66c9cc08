"""MLP activation statistics for one layer: density, sparsity, dead neurons, codes, profiles.

Definitions (docs/methods.md, "Measure"); ``a`` is ``blocks.l.mlp.hook_post`` and a neuron is
*active* when ``|a| > tau``:
- density at tau: mean over tokens of the active share of ``d_ff`` (exact zeros when tau = 0);
  at the primary tau over all tokens, at the other taus over the profiled sequences;
- token-level sparsity TLS = 1 - density at the primary tau;
- chunk-level sparsity CLS_L = 1 - |union of active sets over L consecutive tokens| / d_ff;
- delta sparsity: share of ``|a_t - a_{t-1}| <= tau`` along each sequence (on every
  ``profile_every``-th sequence, like the per-neuron moments: they cost the most passes);
- dead neurons: never active on the corpus; rare: active on fewer than ``rare`` of tokens;
- CETT sparsity: per sampled token, the largest share of neurons (smallest |a| first) that can
  be dropped while ``||f(a) - f(a_kept)|| / ||f(a) - f(0)|| <= cett_bound``, f the down projection;
- neural codes: the binary active pattern of each token, hashed; uniqueness = distinct / tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import fast
from .accum import DistinctCount, Moments, TopK

CETT_GRID = torch.arange(0.05, 1.0, 0.05)


def hash_rows(active: torch.Tensor, salt: torch.Tensor) -> torch.Tensor:
    """A 64-bit hash per row of a boolean matrix, exact on the bits: rows are packed into
    64-bit words (numpy's packbits, about 7x faster than packing with torch ops), which are
    combined with random odd weights (wrapping int64 arithmetic). DistinctCount mixes the
    result further."""
    packed = np.packbits(active.contiguous().numpy(), axis=1, bitorder="little")  # [n, ceil(d / 8)] bytes
    pad = -packed.shape[1] % 8
    if pad:
        packed = np.pad(packed, ((0, 0), (0, pad)))
    words = torch.from_numpy(packed).view(torch.int64)  # [n, ceil(d / 64)]
    return (words * salt[: words.shape[1]]).sum(-1)


@dataclass
class MlpLayerStats:
    d_ff: int
    taus: tuple[float, ...]
    tau: float
    chunk: int = 8
    topk: int = 5
    profile_every: int = 4  # per-neuron moments and delta sparsity use every n-th sequence
    active_at: torch.Tensor = field(init=False)  # [len(taus)] active entries per tau
    n_tokens: int = 0
    profiled_tokens: int = 0
    active_chunks: int = 0
    n_chunks: int = 0
    delta_small: int = 0
    n_deltas: int = 0
    neuron_active: torch.Tensor = field(init=False)  # [d_ff] tokens on which each neuron is active
    moments: Moments = field(default_factory=Moments)
    top: TopK = field(init=False)  # its first row is each neuron's maximum
    codes: DistinctCount = field(default_factory=DistinctCount)
    cett_sum: float = 0.0
    cett_n: int = 0
    _taus32: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.active_at = torch.zeros(len(self.taus), dtype=torch.int64)
        self.neuron_active = torch.zeros(self.d_ff, dtype=torch.int64)
        self.top = TopK(self.topk)
        gen = torch.Generator().manual_seed(1234)
        self.salt = torch.randint(-(2**62), 2**62, ((self.d_ff + 63) // 64,), generator=gen, dtype=torch.int64) | 1

    def update(self, a: torch.Tensor, offset: int, seq_index: int = 0) -> None:
        """``a``: ``[batch, seq, d_ff]``; ``offset``: global index of its first token;
        ``seq_index``: global index of its first sequence (selects the profiled sequences)."""
        for start in range(0, a.shape[0], 4):  # 4 sequences at a time stay in cache across passes
            self._update(a[start : start + 4], offset + start * a.shape[1], seq_index + start)

    def _update(self, a: torch.Tensor, offset: int, seq_index: int) -> None:
        top = self.top
        if top.values is not None and top.values.shape[0] == top.k and (kern := fast.kernel_for(a)) is not None:
            self._update_fast(kern, a, offset, seq_index)
            return
        B, T, D = a.shape
        flat = a.reshape(B * T, D)
        mag = flat.abs()
        active = mag > self.tau
        self.neuron_active += active.view(torch.uint8).sum(0, dtype=torch.int32)  # 3x a bool sum
        self.n_tokens += B * T
        n_chunks = T // self.chunk
        if n_chunks:
            union = active.reshape(B, T, D)[:, : n_chunks * self.chunk]
            chunks = union.reshape(B, n_chunks, self.chunk, D).view(torch.uint8).amax(2)  # any(), faster
            self.active_chunks += int(torch.count_nonzero(chunks))
            self.n_chunks += B * n_chunks
        self.top.update(flat, offset)
        self.codes.update(hash_rows(active, self.salt))
        rows = [b for b in range(B) if (seq_index + b) % self.profile_every == 0]
        if not rows:
            return
        sub = a[rows[0] :: self.profile_every] if len(rows) > 1 else a[rows[0] : rows[0] + 1]
        sub_flat = sub.reshape(-1, D)
        self.moments.update(sub_flat)
        sub_mag = sub_flat.abs()
        self.active_at += torch.tensor([int(torch.count_nonzero(sub_mag > t)) for t in self.taus])
        self.profiled_tokens += sub_flat.shape[0]
        if T > 1:
            delta = (sub[:, 1:] - sub[:, :-1]).abs() <= self.tau
            self.delta_small += int(torch.count_nonzero(delta))
            self.n_deltas += delta.numel()

    def _update_fast(self, kern, a: torch.Tensor, offset: int, seq_index: int) -> None:
        """What ``_update`` computes, all but the moments in one C++ pass (stats/fast.py)."""
        B, T, D = a.shape
        profiled = [(seq_index + b) % self.profile_every == 0 for b in range(B)]
        top = self.top
        top.values, top.index = top.values.contiguous(), top.index.contiguous()
        if self._taus32 is None:
            self._taus32 = torch.tensor(self.taus, dtype=torch.float32)
        hashes, counts = kern.mlp_pass(a.reshape(B * T, D), self.tau, T, self.chunk, self._taus32,
                                       torch.tensor(profiled, dtype=torch.uint8), self.salt, self.neuron_active,
                                       top.values, top.index, offset)
        chunks, small, *at_tau = counts.tolist()
        self.n_tokens += B * T
        self.active_chunks += chunks
        self.n_chunks += B * (T // self.chunk)
        self.codes.update(hashes)
        n_prof = sum(profiled)
        if n_prof:
            self.moments.update(a[torch.tensor(profiled)].reshape(-1, D))  # the torch path's rows, in order
            self.active_at += torch.tensor(at_tau)
            self.profiled_tokens += n_prof * T
            if T > 1:
                self.delta_small += small
                self.n_deltas += n_prof * (T - 1) * D

    def update_cett(self, a: torch.Tensor, down: Callable[[torch.Tensor], torch.Tensor], bound: float) -> None:
        """CETT sparsity on sampled tokens ``a`` ``[n, d_ff]`` (one batched call to ``down``)."""
        n, D = a.shape
        if n == 0:
            return
        order = a.abs().argsort(dim=1)  # smallest magnitude first
        grid = CETT_GRID.to(a.dtype)
        drop = (grid * D).long()  # neurons dropped at each level
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(D).expand(n, D))
        keep = rank.unsqueeze(0) >= drop.view(-1, 1, 1)  # [levels, n, D]
        kept = (a.unsqueeze(0) * keep).reshape(-1, D)
        zero = down(a[:1] * 0)
        full = down(a)
        approx = down(kept).reshape(len(grid), n, -1)
        err = (approx - full).norm(dim=-1) / (full - zero).norm(dim=-1).clamp_min(1e-12)
        ok = err <= bound  # [levels, n]
        best = torch.where(ok, grid.view(-1, 1), torch.zeros_like(grid).view(-1, 1)).max(0).values
        self.cett_sum += float(best.sum())
        self.cett_n += n

    def merge(self, o: "MlpLayerStats") -> "MlpLayerStats":
        self.active_at += o.active_at
        self.n_tokens += o.n_tokens
        self.profiled_tokens += o.profiled_tokens
        self.active_chunks += o.active_chunks
        self.n_chunks += o.n_chunks
        self.delta_small += o.delta_small
        self.n_deltas += o.n_deltas
        self.neuron_active += o.neuron_active
        self.moments.merge(o.moments)
        self.top.merge(o.top)
        self.codes.merge(o.codes)
        self.cett_sum += o.cett_sum
        self.cett_n += o.cett_n
        return self

    # --- results --------------------------------------------------------------------------
    def density(self) -> dict[str, float]:
        cells = max(self.profiled_tokens * self.d_ff, 1)
        return {f"{t:g}": float(c) / cells for t, c in zip(self.taus, self.active_at)}

    @property
    def max(self) -> torch.Tensor:
        return self.top.values[0].double()

    def neuron_density(self) -> torch.Tensor:
        return self.neuron_active.double() / max(self.n_tokens, 1)

    def summary(self, rare: float) -> dict:
        share = self.neuron_density()
        density = float(self.neuron_active.sum()) / max(self.n_tokens * self.d_ff, 1)
        return {
            "density": self.density(),
            "tau": self.tau,
            "token_sparsity": 1.0 - density,
            f"chunk_sparsity_{self.chunk}": 1.0 - self.active_chunks / max(self.n_chunks * self.d_ff, 1),
            "delta_sparsity": self.delta_small / max(self.n_deltas, 1),
            "cett_sparsity": self.cett_sum / self.cett_n if self.cett_n else None,
            "dead_neurons": int((self.neuron_active == 0).sum()),
            "rare_neurons": int(((share > 0) & (share < rare)).sum()),
            "code_uniqueness": min(1.0, self.codes.estimate() / max(self.n_tokens, 1)),
        }
