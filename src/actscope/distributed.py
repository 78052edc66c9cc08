"""Rank bookkeeping for ``torchrun``: which shards are mine, and did every rank succeed.

Control messages use the gloo backend on CPU tensors, whatever device the model runs on.
A single process (no ``WORLD_SIZE`` > 1) needs no process group at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import StoreError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> "Ranks":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def block(self, n: int) -> range:
        """This rank's contiguous share of ``n`` items."""
        return range(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def share_status(self, ok: bool) -> None:
        """Collective: every rank reports ``ok``; a rank that succeeded raises if another failed."""
        if self.world == 1:
            return
        import torch.distributed as dist

        flag = torch.tensor([1 if ok else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if ok and int(flag.item()) == 0:
            raise StoreError("another rank failed (see its error); re-run the same command to resume")
