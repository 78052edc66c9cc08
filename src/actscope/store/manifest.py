"""The store's manifest: file names, the schema check, and the plan id that ties shards to it.

Everything the reader and a resumed ``record`` believe about a store comes from the manifest,
so it is validated field by field when read: a hand-edited or damaged manifest (``num_shards:
-1``, a JSON list, a missing site shape) is a ``StoreError`` naming the field, never a store
that opens as complete or a ``KeyError`` deep in the reader.

The plan id is a hash of the manifest's content. Every shard carries it, so a shard written
under another plan (another model, corpus or shard layout, or a concurrent run) is rejected on
read and rewritten on resume. It is deterministic, so an interrupted and an uninterrupted run
still produce byte-identical stores.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from ..errors import StoreError
from .fs import TMP_MARK, Location

MANIFEST = "manifest.json"
TOKENS = "tokens.safetensors"
SHARDS = "shards"
LOCK = ".actscope.lock"
FORMAT = "actscope.store"
VERSION = 2
#: the files a store consists of; ``record --overwrite`` removes these and nothing else
OWN_FILES = (MANIFEST, TOKENS, LOCK)
STORE_DTYPES = ("float32", "bfloat16", "float16")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


def shard_index(name: str) -> int | None:
    if name.startswith("shard-") and name.endswith(".safetensors"):
        digits = name[6:-12]
        if digits.isdigit() and len(digits) == 6:
            return int(digits)
    return None


def is_own_file(name: str) -> bool:
    """True for a top-level file name that a store (or a killed run of ``record``) writes."""
    return name in OWN_FILES or name.split(TMP_MARK)[0] in OWN_FILES


def is_own_shard(name: str) -> bool:
    """True for a file name in ``shards/`` that ``record`` writes (shards and their temporaries)."""
    return shard_index(name.split(TMP_MARK)[0]) is not None


def plan_id(manifest: dict) -> str:
    """A content hash of the manifest (without volatile fields): the id every shard carries."""
    stable = {k: v for k, v in manifest.items() if k not in {"plan_id", "threads", "actscope_version"}}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise StoreError(f"{where}: invalid manifest: {what}; re-record the store with `record --overwrite`")


def _pos_int(m: dict, key: str, where: str) -> int:
    value = m.get(key)
    _need(type(value) is int and value > 0, where, f"{key!r} must be a positive integer, got {value!r}")
    return value


def validate_manifest(m: Any, where: str) -> dict:
    """Check ``m`` against the manifest schema (versions 1 and 2); returns it or raises StoreError."""
    _need(isinstance(m, dict), where, f"a JSON object is expected, got {type(m).__name__}")
    if m.get("format") != FORMAT:
        raise StoreError(f"{where} is not an actscope store manifest (format {m.get('format')!r})")
    version = m.get("version")
    _need(version in (1, VERSION), where, f"unknown version {version!r}")
    for key in ("seq_len", "num_sequences", "sequences_per_shard", "num_shards", "batch_size"):
        _pos_int(m, key, where)
    expected = math.ceil(m["num_sequences"] / m["sequences_per_shard"])
    _need(m["num_shards"] == expected, where,
          f"num_shards {m['num_shards']} does not match {m['num_sequences']} sequences / {m['sequences_per_shard']}")
    _need(m.get("dtype") in STORE_DTYPES, where, f"dtype {m.get('dtype')!r} is not one of {', '.join(STORE_DTYPES)}")
    sites = m.get("sites")
    _need(isinstance(sites, dict) and bool(sites), where, "'sites' must be a non-empty object")
    for name, site in sites.items():
        shape = site.get("shape") if isinstance(site, dict) else None
        _need(isinstance(shape, list) and all(type(d) is int and d > 0 for d in shape), where,
              f"site {name!r} needs a shape of positive integers")
    for section in ("model", "data"):
        part = m.get(section)
        _need(isinstance(part, dict) and isinstance(part.get("fingerprint"), str), where,
              f"{section!r} needs a fingerprint")
    if version >= 2:
        _need(isinstance(m.get("plan_id"), str) and m["plan_id"] == plan_id(m), where,
              "plan_id does not match the manifest's content (edited by hand?)")
        tokens = m.get("tokens")
        _need(isinstance(tokens, dict) and isinstance(tokens.get("xxh3_64"), str)
              and type(tokens.get("bytes")) is int, where, "'tokens' needs xxh3_64 and bytes")
        threads = m.get("threads")
        _need(threads is None or (type(threads) is int and threads > 0), where, "'threads' must be positive")
    return m


def read_manifest(loc: Location) -> dict | None:
    """The validated manifest of the store at ``loc``, or None when there is none."""
    if not loc.exists(MANIFEST):
        return None
    where = loc.path(MANIFEST)
    try:
        manifest = json.loads(loc.read_bytes(MANIFEST))
    except (ValueError, UnicodeDecodeError):
        raise StoreError(f"{where}: corrupted manifest (not JSON); re-record the store with `record --overwrite`") from None
    except IsADirectoryError:
        raise StoreError(f"{where} is a directory, not a manifest") from None
    return validate_manifest(manifest, where)
