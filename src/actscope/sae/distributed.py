"""Data-parallel SAE training: ``torchrun`` ranks split every batch, gradients are summed.

    torchrun --nproc_per_node 4 train_script.py     # calls actscope.sae.train(...) as usual

Every rank walks the same global batch order (a pure function of seed and step, see
``data.epoch_order``), cuts each batch into ``world x micro_batches`` contiguous slices and reads
only its own. Each slice gets the architecture's loss on its own tokens; the step's gradient is
the token-weighted mean of the slices' gradients, ``sum_s n_s g_s / sum_s n_s``, formed with one
``all_reduce`` of a flat buffer (gradients, fire counts, logged scalars) per SAE and step. That
is all DDP would do for us here, and the SAE's parameters are a plain dict, not a module, so the
collective is written out instead of wrapping a module to get it.

What "the same result" means: the architectures normalise their loss per batch (FVU's variance
denominator, BatchTopK's batch-wide selection, AuxK's residual variance), so a slice's loss is
not a plain share of the whole batch's loss. A 2-rank run therefore equals a 1-process run with
``micro_batches=2`` (same slices, same weighting; only the order of the float sums differs), and
differs slightly from a 1-process run with whole batches. The slice count is part of the
checkpoint's fingerprint for that reason: a 2-GPU run resumes on 1 GPU with ``micro_batches=2``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from ..store.reader import ActivationStore
from .base import SAEError
from .data import Batch, _gather, epoch_order


@dataclass
class Group:
    """This process's place among the ``torchrun`` ranks (a single process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns: bool = False  # we initialised the process group, so we tear it down

    @classmethod
    def from_env(cls, device: str | torch.device | None) -> "Group":
        """Join the ``torchrun`` group when ``WORLD_SIZE`` > 1: NCCL on CUDA, gloo on CPU.

        ``device=None`` picks CUDA when there is one (rank ``LOCAL_RANK``'s GPU under torchrun).
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SAEError(f"device {device!r} asked for, but this torch sees no CUDA device: use device='cpu'")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
        if dev.type not in ("cpu", "cuda"):
            raise SAEError(f"SAE training runs on cpu or cuda, not {dev.type!r}")
        if world <= 1:
            return cls(device=dev)
        import torch.distributed as dist

        owns = not dist.is_initialized()
        if owns:
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), dev, owns)

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place across ranks (nothing to do for one process)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN)
        return t

    def close(self) -> None:
        """Wait for every rank (so none returns before rank 0 has written the outputs), then tear
        down the group if we made it (a gloo group left to the interpreter's exit can abort it)."""
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                if self.owns:
                    dist.destroy_process_group()


def my_slices(store: ActivationStore, sites: Sequence[str], batch_size: int, parts: int, mine: range, *,
              seed: int, window_shards: int, skip: int) -> Iterator[list[Batch]]:
    """Per global batch, this rank's slices of it (``mine`` of ``parts``), read and nothing else.

    The global order is ``token_batches``'s (epochs without end, ``skip`` batches passed over
    unread), so every rank and a single process agree on which tokens make up step ``s``.
    """
    per_shard = store.sequences_per_shard * store.seq_len
    epoch, seen = 0, 0
    while True:
        for index in epoch_order(store, batch_size, seed, epoch, window_shards):
            seen += 1
            if seen <= skip:
                continue
            chunks = index.tensor_split(parts)
            yield [Batch({s: _gather(store, s, chunks[i], per_shard) for s in sites}, chunks[i])
                   for i in mine if chunks[i].numel()]
        epoch += 1


@dataclass
class Part:
    """One slice's (or the combined step's) gradients and what the step's bookkeeping needs."""

    grads: list[torch.Tensor | None]
    info: dict[str, Any]
    n: int  # tokens trained on
    loss: float


def combine(parts: Sequence[Part | None], group: Group, shapes: Sequence[torch.Size], n_latents: int,
            device: torch.device) -> Part | None:
    """The token-weighted mean of the slices' gradients over every slice of every rank.

    ``shapes``: the parameters' shapes, in the order of ``Part.grads``. A single slice in a
    single process comes back untouched, so plain training stays bit for bit what it was. ``None``
    (a slice with under 2 tokens after the outlier policy) weighs nothing; ``None`` comes back
    when no slice anywhere trained. A gradient that is ``None`` on every slice stays ``None``.
    """
    if group.world == 1 and len(parts) == 1:
        return parts[0]
    sizes = [s.numel() for s in shapes]
    total, k = sum(sizes), len(shapes)
    buf = torch.zeros(total + k + n_latents + 4, dtype=torch.float32, device=device)
    low = torch.full((1,), float("inf"), device=device)
    for p in parts:
        if p is None:
            continue
        at = 0
        for i, (g, size) in enumerate(zip(p.grads, sizes)):
            if g is not None:
                buf[at: at + size] += g.reshape(-1).float() * p.n
                buf[total + i] = 1.0  # used somewhere
            at += size
        buf[total + k: total + k + n_latents] += p.info["counts"].to(device, torch.float32)
        buf[-4:] += torch.tensor([p.n, p.n * p.info["fvu"], p.n * p.info["l0"], p.n * p.loss], device=device)
        if p.info.get("min_kept") is not None:
            low.fill_(min(float(low), p.info["min_kept"]))
    group.all_reduce(buf)
    group.all_reduce(low, "min")
    n = int(round(float(buf[-4])))
    if n == 0:
        return None
    grads: list[torch.Tensor | None] = []
    at = 0
    for i, (shape, size) in enumerate(zip(shapes, sizes)):
        grads.append((buf[at: at + size] / n).reshape(shape) if float(buf[total + i]) else None)
        at += size
    fvu, l0, loss = (float(v) / n for v in buf[-3:])
    info = {"counts": buf[total + k: total + k + n_latents].round().long(), "fvu": fvu, "l0": l0,
            "min_kept": None if float(low) == float("inf") else float(low)}
    return Part(grads, info, n, loss)
