"""Where a store lives: a local folder (fast path, memory-mapped) or any fsspec URL.

All writes go through ``write_atomic``: data is written to a temporary name, flushed (and
fsynced locally), then renamed, so a reader or a resumed run never sees half a file.
"""

from __future__ import annotations

import os
import uuid
from typing import BinaryIO, Callable

import fsspec
from fsspec.implementations.local import LocalFileSystem

TMP_MARK = ".tmp-"


class Location:
    """A store root: ``Location("runs/x")``, ``Location("file:///abs/x")``, ``Location("memory://x")``."""

    def __init__(self, url: str | os.PathLike, fsync: bool = True):
        self.url = str(url)
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        self.fsync = fsync

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def makedirs(self, *parts: str) -> None:
        self.fs.makedirs(self.path(*parts), exist_ok=True)

    def listdir(self, *parts: str) -> list[str]:
        """File names (not paths) in a folder; empty if it does not exist."""
        folder = self.path(*parts)
        if not self.fs.exists(folder):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False))

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open(self.path(*parts), "rb") as f:
            return f.read()

    def read_range(self, rel: str, start: int, length: int) -> bytes:
        with self.fs.open(self.path(rel), "rb") as f:
            f.seek(start)
            return f.read(length)

    def remove(self, *parts: str) -> None:
        path = self.path(*parts)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def write_atomic(self, rel: str, write: Callable[[BinaryIO], None]) -> None:
        """Write ``rel`` via ``write(fileobj)`` so that it appears whole or not at all."""
        final = self.path(rel)
        tmp = f"{final}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            if self.local:
                with open(tmp, "wb") as f:
                    write(f)
                    f.flush()
                    if self.fsync:
                        os.fsync(f.fileno())
                os.replace(tmp, final)
            else:
                with self.fs.open(tmp, "wb") as f:
                    write(f)
                self.fs.mv(tmp, final)
        except BaseException:
            try:
                if self.fs.exists(tmp):
                    self.fs.rm(tmp)
            except OSError:
                pass
            raise

    def remove_stale_tmp(self, folder: str, owned: Callable[[str], bool] = lambda name: True) -> int:
        """Delete temporary files a killed run left behind (those ``owned`` selects)."""
        stale = [n for n in self.listdir(folder) if TMP_MARK in n and owned(n)]
        for name in stale:
            self.remove(folder, name)
        return len(stale)
