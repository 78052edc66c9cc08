"""Writing an activation store: manifest, tokens, and shards written by a background thread.

The model never waits on the disk: the capture loop hands finished shards to one writer
thread through a small bounded queue (bounded so memory stays flat when the disk is slower than
the model). The thread runs only this module's I/O code, never user code. Each shard is
written atomically (fs.write_atomic), so after a crash, even ``kill -9``, every shard on disk is
whole and a re-run only redoes the missing ones.
"""

from __future__ import annotations

import errno
import json
import queue
import threading
from dataclasses import dataclass
from typing import Sequence

import torch
from safetensors.torch import save as save_safetensors

from ..errors import StoreError
from .fs import Location
from .manifest import MANIFEST, SHARDS, TOKENS, shard_name
from .shard import checksum, write_shard


class BufferPool:
    """Reusable capture buffers: shards hand their tensors back once written, so the capture
    loop copies into warm memory instead of faulting in fresh pages for every batch."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            free = self._free.get((tuple(shape), dtype))
            if free:
                return free.pop()
        return torch.empty(shape, dtype=dtype)

    def give(self, tensors: Sequence[torch.Tensor]) -> None:
        with self._lock:
            for t in tensors:
                self._free.setdefault((tuple(t.shape), t.dtype), []).append(t)


@dataclass
class PendingShard:
    index: int
    seq_start: int
    seq_end: int
    tensors: dict[str, list[torch.Tensor]]


def _explain(exc: BaseException, what: str) -> StoreError:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(
            f"disk full while writing {what}; shards already written are intact: free space "
            "and re-run the same command to resume"
        )
    if isinstance(exc, OSError):
        return StoreError(f"cannot write {what}: {exc.strerror or exc}")
    return StoreError(f"cannot write {what}: {type(exc).__name__}: {exc}")


def write_json(loc: Location, rel: str, payload: dict) -> None:
    data = json.dumps(payload, indent=1, sort_keys=True).encode()
    try:
        loc.write_atomic(rel, lambda f: f.write(data))
    except OSError as exc:
        raise _explain(exc, loc.path(rel)) from None


def token_file(input_ids: torch.Tensor, doc_ids: torch.Tensor) -> tuple[bytes, dict]:
    """The token file's bytes and the manifest entry that lets a reader verify them."""
    data = save_safetensors({"input_ids": input_ids.contiguous(), "doc_ids": doc_ids.contiguous()})
    return data, {"xxh3_64": checksum(data), "bytes": len(data)}


def write_tokens(loc: Location, data: bytes) -> None:
    try:
        loc.write_atomic(TOKENS, lambda f: f.write(data))
    except OSError as exc:
        raise _explain(exc, loc.path(TOKENS)) from None


def write_header_files(loc: Location, manifest: dict, tokens: bytes) -> None:
    """Create the store folder: tokens first, manifest last (the manifest marks a store)."""
    try:
        loc.makedirs(SHARDS)
    except OSError as exc:
        raise _explain(exc, loc.url) from None
    write_tokens(loc, tokens)
    write_json(loc, MANIFEST, manifest)


class ShardWriter:
    """Background writer: ``submit`` shards, ``close`` to wait; write errors surface on the
    caller's thread at the next ``submit`` or at ``close``."""

    def __init__(self, loc: Location, plan: str, depth: int = 2, pool: BufferPool | None = None):
        self.loc = loc
        self.plan = plan  # every shard carries its plan id, so a shard of another plan is never read as ours
        self.pool = pool
        self._queue: queue.Queue[PendingShard | None] = queue.Queue(maxsize=depth)
        self._error: StoreError | None = None
        self._thread = threading.Thread(target=self._run, name="actscope-shard-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain: after a failure nothing more is written
            try:
                self.write(item)
                if self.pool is not None:
                    self.pool.give([t for chunks in item.tensors.values() for t in chunks])
            except BaseException as exc:  # noqa: BLE001 - reported on the caller's thread
                self._error = exc if isinstance(exc, StoreError) else _explain(exc, f"shard {item.index}")

    def write(self, item: PendingShard) -> None:
        meta = {"seq_start": item.seq_start, "seq_end": item.seq_end, "shard": item.index, "plan": self.plan}
        rel = f"{SHARDS}/{shard_name(item.index)}"
        self.loc.write_atomic(rel, lambda f: write_shard(f, item.tensors, meta))

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, item: PendingShard) -> None:
        self._check()
        self._queue.put(item)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._check()

    def abort(self) -> None:
        """Stop after the shard in progress (used when the capture loop itself fails)."""
        self._error = self._error or StoreError("aborted")
        self._queue.put(None)
        self._thread.join()


def site_entries(shapes: dict[str, Sequence[int]], dtype: str) -> dict[str, dict]:
    return {name: {"shape": list(shape), "dtype": dtype} for name, shape in shapes.items()}
