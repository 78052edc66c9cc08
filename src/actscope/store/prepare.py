"""Before ``record`` writes a shard: start fresh, resume, or refuse; and verify what a resume keeps.

The rules, in order:
- ``--out`` holds a manifest of another kind of file, or is a file: refused, always.
- ``--overwrite``: our own files (manifest, token file, lock, ``shards/shard-*``) are removed and
  the store starts fresh. Nothing else in the folder is touched, ever.
- no manifest, and the folder holds anything that is not ours: refused (it is a user's folder).
- a manifest recorded with other settings: refused, naming what differs.
- the same settings: a resume. Each existing shard's header is checked against the manifest
  (and its checksums with ``verify``), and the token file against its checksum; what fails is
  rewritten, so "store: ..." after a resume means the store is whole.
"""

from __future__ import annotations

import json
import logging

from ..errors import StoreError
from .fs import TMP_MARK, Location
from .manifest import (FORMAT, LOCK, MANIFEST, SHARDS, TOKENS, is_own_file, is_own_shard, read_manifest,
                       shard_index, shard_name)
from .reader import check_shard, read_shard_header
from .shard import checksum

log = logging.getLogger(__name__)

#: manifest fields that must agree for a resume, with the words used when they do not
_SAME = [("model", ("model", "fingerprint")), ("sites", ("sites",)), ("dtype", ("dtype",)),
         ("seq_len", ("seq_len",)), ("data", ("data", "fingerprint"))]


def _get(manifest: dict, path: tuple[str, ...]) -> object:
    value: object = manifest
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def existing_manifest(loc: Location, overwrite: bool) -> dict | None:
    """The folder's manifest; a damaged one is an error, or ignored under ``--overwrite``."""
    if loc.local and loc.fs.isfile(loc.root):
        raise StoreError(f"--out {loc.url} is a file; give a folder for the store")
    try:
        return read_manifest(loc)
    except StoreError as exc:
        try:
            raw = json.loads(loc.read_bytes(MANIFEST))
            foreign = not (isinstance(raw, dict) and raw.get("format") == FORMAT)
        except (ValueError, OSError):
            foreign = False  # unreadable JSON: a damaged manifest of ours
        if foreign:
            raise StoreError(f"{loc.path(MANIFEST)} is not an actscope manifest; choose another --out") from None
        if not overwrite:
            raise exc from None  # its message already points to --overwrite
        log.warning("%s: replacing a damaged manifest (--overwrite)", loc.path(MANIFEST))
        return None


def foreign_entries(loc: Location) -> list[str]:
    """Names in the folder (and in ``shards/``) that ``record`` did not write."""
    names = []
    for name in loc.listdir():
        if name == SHARDS and loc.fs.isdir(loc.path(SHARDS)):
            names += [f"{SHARDS}/{n}" for n in loc.listdir(SHARDS) if not is_own_shard(n)]
        elif not is_own_file(name):
            names.append(name)
    return names


def clear_own_files(loc: Location) -> None:
    """Remove a store's own files (manifest first, so a half-cleared folder is not a store)."""
    for name in (MANIFEST, TOKENS):
        loc.remove(name)
    for name in loc.listdir():
        if TMP_MARK in name and is_own_file(name) and name.split(TMP_MARK)[0] != LOCK:
            loc.remove(name)
    if loc.fs.isdir(loc.path(SHARDS)):
        for name in loc.listdir(SHARDS):
            if is_own_shard(name):
                loc.remove(SHARDS, name)
        if not loc.listdir(SHARDS):
            loc.remove(SHARDS)


def decide(loc: Location, manifest: dict, existing: dict | None, overwrite: bool) -> bool:
    """True to start fresh, False to resume ``existing``; raises when the folder must be left alone."""
    if overwrite:
        return True
    if existing is None:
        foreign = foreign_entries(loc)
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise StoreError(f"--out {loc.url} is not empty and holds no actscope store ({shown}); choose an "
                             "empty or new folder, or pass --overwrite (it removes only a store's own files)")
        return True
    differs = [what for what, path in _SAME if _get(existing, path) != _get(manifest, path)]
    if existing.get("version") != manifest.get("version") and not differs:
        differs = ["format version"]
    if differs:
        raise StoreError(f"{loc.url} already holds a store recorded with other {', '.join(differs)}; "
                         "choose another --out or pass --overwrite to replace it")
    return False


def verify_for_resume(loc: Location, manifest: dict, indices: range, verify: bool) -> set[int]:
    """Shards in ``indices`` that are on disk and sound; a damaged one is removed (to be rewritten)."""
    present = {shard_index(n) for n in loc.listdir(SHARDS)} & set(indices)
    good = set()
    for k in sorted(present):
        rel = f"{SHARDS}/{shard_name(k)}"
        try:
            entries, meta, size = read_shard_header(loc, rel)
            check_shard(entries, meta, size, manifest, k, loc.path(rel))
            if verify:
                data = loc.read_bytes(rel)
                for name, e in entries.items():
                    if checksum(memoryview(data)[e.begin:e.end]) != e.checksum:
                        raise StoreError(f"{loc.path(rel)}: checksum mismatch in {name!r}")
        except StoreError as exc:
            log.warning("rewriting a damaged shard: %s", str(exc).split(";")[0])
            loc.remove(rel)
            continue
        good.add(k)
    return good


def tokens_ok(loc: Location, manifest: dict) -> bool:
    """Whether the token file matches the manifest's checksum (a resume rewrites it if not)."""
    expected = manifest.get("tokens")
    if expected is None:
        return loc.exists(TOKENS)
    try:
        data = loc.read_bytes(TOKENS)
    except OSError:
        return False
    return len(data) == expected["bytes"] and checksum(data) == expected["xxh3_64"]

