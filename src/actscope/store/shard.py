"""The shard format: a valid safetensors file, written in streamed chunks, with a checksum per tensor.

Any safetensors reader opens our shards. We write the format ourselves (8-byte header length,
JSON header, raw data) so that a tensor can be streamed from many batch-sized chunks without
first concatenating them, and so that each tensor's checksum sits in the header metadata: a
reader can verify exactly the tensors it touches. The checksum is XXH3-64, much faster than
CRC32, which matters because the writer shares the CPU with the model.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import BinaryIO, Sequence

import numpy as np
import torch
import xxhash

DTYPE_CODES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.uint8: "U8",
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
META_KEY = "actscope"


def as_bytes(t: torch.Tensor) -> np.ndarray:
    """A zero-copy uint8 view of a contiguous CPU tensor (works for bfloat16 too)."""
    return t.reshape(-1).view(torch.uint8).numpy()


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int
    checksum: str | None  # XXH3-64 hex digest of the tensor's bytes

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def checksum(buf: np.ndarray) -> str:
    return xxhash.xxh3_64_hexdigest(buf)


def write_shard(
    f: BinaryIO,
    tensors: dict[str, Sequence[torch.Tensor]],
    metadata: dict | None = None,
) -> int:
    """Write ``{name: [chunk, ...]}``; chunks of a name are concatenated along dim 0.

    Returns the number of bytes written. Chunks must be contiguous CPU tensors.
    """
    header: dict = {}
    sums: dict[str, str] = {}
    offset = 0
    for name, chunks in tensors.items():
        first = chunks[0]
        rows = sum(int(c.shape[0]) for c in chunks)
        digest = xxhash.xxh3_64()
        nbytes = 0
        for c in chunks:
            buf = as_bytes(c)
            digest.update(buf)
            nbytes += buf.nbytes
        sums[name] = digest.hexdigest()
        header[name] = {
            "dtype": DTYPE_CODES[first.dtype],
            "shape": [rows, *first.shape[1:]],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    meta = dict(metadata or {})
    meta["xxh3_64"] = sums
    header["__metadata__"] = {META_KEY: json.dumps(meta, sort_keys=True)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for chunks in tensors.values():
        for c in chunks:
            f.write(as_bytes(c))
    return 8 + len(raw) + offset


def parse_header(head: bytes, source: str) -> tuple[dict[str, TensorEntry], dict, int]:
    """Parse a shard header from its first bytes; returns (entries, metadata, header_end).

    ``head`` must hold at least the 8-byte length and the JSON header. Any damage (bad JSON,
    bad UTF-8, a missing field, an unknown dtype, offsets that do not tile the data section) is
    a ``StoreError``: a header is data read from disk, not something to trust.
    """
    from ..errors import StoreError

    if len(head) < 8:
        raise StoreError(f"{source}: truncated shard (no header)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > 100_000_000 or len(head) < 8 + n:
        raise StoreError(f"{source}: corrupted shard header (length {n})")
    try:
        header = json.loads(head[8 : 8 + n])
        meta = json.loads(header.pop("__metadata__")[META_KEY])
        sums = meta["xxh3_64"]
        entries = {}
        for name, info in header.items():
            b, e = info["data_offsets"]
            shape = tuple(info["shape"])
            dtype = CODE_DTYPES[info["dtype"]]
            if not all(type(d) is int and d >= 0 for d in (*shape, b, e)) or not isinstance(sums[name], str):
                raise ValueError(name)
            if e - b != math.prod(shape) * dtype.itemsize:
                raise ValueError(name)
            entries[name] = TensorEntry(dtype, shape, 8 + n + b, 8 + n + e, sums[name])
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):  # ValueError covers bad JSON and UTF-8
        raise StoreError(f"{source}: corrupted shard header; delete the shard and re-run `actscope record` "
                         "on this folder to rewrite it") from None
    end = 8 + n
    for entry in sorted(entries.values(), key=lambda t: t.begin):  # tensors tile the data section
        if entry.begin != end:
            raise StoreError(f"{source}: corrupted shard header (tensor offsets overlap or leave gaps)")
        end = entry.end
    return entries, meta, 8 + n
