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
    owns_group: bool = False  # we created the process group, so we must tear it down

    @classmethod
    def from_env(cls) -> "Ranks":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("gloo")
        return cls(dist.get_rank(), dist.get_world_size(), owns)

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

    def close(self, wait: bool = True) -> None:
        """Tear down a process group we created, after every rank got here.

        Leaving a gloo group to the interpreter's exit lets its C++ threads die mid-destruction,
        which aborts the process ("terminate called without an active exception") on slow machines.
        """
        if self.world == 1 or not self.owns_group:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            if wait:
                dist.barrier()
            dist.destroy_process_group()
