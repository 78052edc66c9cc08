"""An exclusive lock on a store folder while ``record`` writes it.

Two runs writing one folder would interleave their shards, and every read and checksum would
still pass. ``fcntl.flock`` is tied to the open file, so the kernel drops it when the holder dies
(even ``kill -9``): a lock file left by a killed run is simply taken over, with no pid guessing.
The holder's pid is written into the file only for the error message.

Remote (fsspec) stores have no such primitive; they are written unlocked, as before.
"""

from __future__ import annotations

import os
from types import TracebackType

from ..errors import StoreError
from .fs import Location
from .manifest import LOCK


class StoreLock:
    """``with StoreLock(loc): ...`` holds the store's lock or raises ``StoreError`` at once."""

    def __init__(self, loc: Location):
        self.loc = loc
        self._fd: int | None = None

    def acquire(self) -> None:
        if not self.loc.local:
            return
        import fcntl

        path = self.loc.path(LOCK)
        if os.path.isfile(self.loc.root):
            raise StoreError(f"--out {self.loc.url} is a file; give a folder for the store")
        try:
            self.loc.makedirs()
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot create the lock file {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(
                f"another record (pid {holder}) is writing this store ({self.loc.url}); wait for it "
                "to finish or choose another --out"
            ) from None
        # we hold it: a pid left by a dead holder is stale, replace it with ours
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "StoreLock":
        self.acquire()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
