"""Reading an activation store: ``open_store(DIR)``.

Layout of a store folder:
    manifest.json          model, sites (per-token shape), dtype, seq_len, shard plan, data hash
    tokens.safetensors     input_ids [num_sequences, seq_len], doc_ids (document of each token)
    shards/shard-NNNNNN.safetensors   all sites for sequences [k*S, (k+1)*S), tokens sequence-major

Shard k always covers the same sequences, whichever process or run wrote it, so a store
written by several ranks, or resumed after a crash, reads as one. Tensors are memory-mapped;
each (shard, site) is checked against its checksum the first time it is read.
"""

from __future__ import annotations

import json
import math
import struct
from collections import OrderedDict
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import StoreError
from .fs import Location
from .shard import TensorEntry, checksum, parse_header

MANIFEST = "manifest.json"
TOKENS = "tokens.safetensors"
SHARDS = "shards"
FORMAT = "actscope.store"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


def shard_index(name: str) -> int | None:
    if name.startswith("shard-") and name.endswith(".safetensors"):
        try:
            return int(name[6:-12])
        except ValueError:
            return None
    return None


def read_manifest(loc: Location) -> dict | None:
    if not loc.exists(MANIFEST):
        return None
    try:
        manifest = json.loads(loc.read_bytes(MANIFEST))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise StoreError(f"{loc.path(MANIFEST)}: corrupted manifest (not JSON)") from None
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{loc.url} is not an actscope store (manifest format {manifest.get('format')!r})")
    return manifest


class _Shard:
    """One shard file: its header, lazily memory-mapped data, and which tensors were verified."""

    def __init__(self, loc: Location, index: int):
        self.loc = loc
        self.rel = f"{SHARDS}/{shard_name(index)}"
        self.source = loc.path(self.rel)
        head = loc.read_range(self.rel, 0, 8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        head += loc.read_range(self.rel, 8, min(n, 100_000_000))
        self.entries, self.meta, _ = parse_header(head, self.source)
        self._map: np.ndarray | None = None
        self.verified: set[str] = set()

    def _bytes(self, entry: TensorEntry) -> np.ndarray:
        if self.loc.local:
            if self._map is None:
                # copy-on-write: writable for torch without a warning, never written back
                self._map = np.memmap(self.source, dtype=np.uint8, mode="c")
            if entry.end > self._map.shape[0]:
                raise StoreError(f"{self.source}: truncated shard (tensor ends past end of file)")
            return self._map[entry.begin : entry.end]
        data = self.loc.read_range(self.rel, entry.begin, entry.nbytes)
        if len(data) != entry.nbytes:
            raise StoreError(f"{self.source}: truncated shard")
        return np.frombuffer(bytearray(data), dtype=np.uint8)

    def tensor(self, name: str, verify: bool) -> torch.Tensor:
        entry = self.entries[name]
        raw = self._bytes(entry)
        if verify and name not in self.verified:
            if entry.checksum is not None and checksum(raw) != entry.checksum:
                raise StoreError(
                    f"{self.source}: checksum mismatch in {name!r}: the shard is corrupted; "
                    "delete it and re-run `actscope record` on this folder to rewrite it"
                )
            self.verified.add(name)
        return torch.from_numpy(raw).view(entry.dtype).reshape(entry.shape)


class ActivationStore:
    """A recorded store. Token order is sequence-major: token ``i`` is position
    ``i % seq_len`` of sequence ``i // seq_len``."""

    def __init__(self, url: str, verify: bool = True, allow_partial: bool = False, max_open: int = 64):
        self.loc = Location(url)
        manifest = read_manifest(self.loc)
        if manifest is None:
            raise StoreError(f"{url}: no activation store here (no {MANIFEST})")
        self.manifest = manifest
        self.verify = verify
        self.seq_len: int = manifest["seq_len"]
        self.num_sequences: int = manifest["num_sequences"]
        self.sequences_per_shard: int = manifest["sequences_per_shard"]
        self.num_shards: int = manifest["num_shards"]
        present = {shard_index(n) for n in self.loc.listdir(SHARDS)} - {None}
        self.missing_shards = sorted(set(range(self.num_shards)) - present)
        if self.missing_shards and not allow_partial:
            raise StoreError(
                f"{url}: incomplete store, {len(self.missing_shards)} of {self.num_shards} shards "
                "missing; re-run the same `actscope record` command to resume it"
            )
        self._open: OrderedDict[int, _Shard] = OrderedDict()
        self._max_open = max_open

    # --- metadata -----------------------------------------------------------------------
    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    @property
    def complete(self) -> bool:
        return not self.missing_shards

    @property
    def num_tokens(self) -> int:
        return self.num_sequences * self.seq_len

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    def shape(self, site: str) -> tuple[int, ...]:
        """Per-token shape of a site."""
        return tuple(self._site(site)["shape"])

    def _site(self, site: str) -> dict:
        if site not in self.manifest["sites"]:
            import difflib

            close = difflib.get_close_matches(site, self.sites, n=5, cutoff=0.5) or self.sites[:5]
            raise StoreError(f"site {site!r} is not in this store; closest: {', '.join(close)}")
        return self.manifest["sites"][site]

    def token_ids(self) -> torch.Tensor:
        """``[num_sequences, seq_len]`` token ids."""
        return self._tokens("input_ids")

    def doc_ids(self) -> torch.Tensor:
        """``[num_sequences, seq_len]`` document index of each token (sequence boundaries)."""
        return self._tokens("doc_ids")

    def _tokens(self, name: str) -> torch.Tensor:
        from safetensors.torch import load

        try:
            return load(self.loc.read_bytes(TOKENS))[name]
        except Exception as exc:
            raise StoreError(f"{self.loc.path(TOKENS)}: unreadable ({type(exc).__name__})") from None

    # --- activations --------------------------------------------------------------------
    def _shard(self, index: int) -> _Shard:
        if index in self.missing_shards:
            raise StoreError(f"{self.loc.url}: shard {index} was not recorded (incomplete store)")
        shard = self._open.pop(index, None) or _Shard(self.loc, index)
        self._open[index] = shard
        while len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return shard

    def shard_tensor(self, site: str, index: int) -> torch.Tensor:
        """All tokens of ``site`` in shard ``index`` (memory-mapped, verified)."""
        self._site(site)
        return self._shard(index).tensor(site, self.verify)

    def read(self, site: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Tokens ``[start, stop)`` of ``site``: zero-copy within one shard, concatenated across."""
        self._site(site)
        stop = self.num_tokens if stop is None else min(stop, self.num_tokens)
        if not 0 <= start <= stop:
            raise StoreError(f"bad token range [{start}, {stop}) for a store of {self.num_tokens} tokens")
        per_shard = self.sequences_per_shard * self.seq_len
        pieces = []
        for k in range(start // per_shard, math.ceil(stop / per_shard)):
            base = k * per_shard
            t = self.shard_tensor(site, k)
            pieces.append(t[max(start - base, 0) : min(stop - base, t.shape[0])])
        if not pieces:
            return torch.empty((0, *self.shape(site)))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def iter_batches(
        self,
        sites: str | Sequence[str],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        buffer_shards: int = 4,
        drop_last: bool = False,
    ) -> Iterator[torch.Tensor | dict[str, torch.Tensor]]:
        """Batches of token activations for training (SAEs, probes).

        Shuffling is two-level so reads stay sequential: shard order is permuted, then the
        tokens of ``buffer_shards`` shards at a time are permuted together. One epoch yields
        every token exactly once. With several sites, yields ``{site: tensor}`` rows that
        belong to the same tokens.
        """
        names = [sites] if isinstance(sites, str) else list(sites)
        for name in names:
            self._site(name)
        gen = torch.Generator().manual_seed(seed)
        order = list(range(self.num_shards))
        if shuffle:
            order = [order[i] for i in torch.randperm(len(order), generator=gen)]
        carry: dict[str, torch.Tensor] | None = None
        for g in range(0, len(order), buffer_shards):
            group = order[g : g + buffer_shards]
            pool = {n: torch.cat([self.shard_tensor(n, k) for k in group]) for n in names}
            if carry is not None:
                pool = {n: torch.cat([carry[n], pool[n]]) for n in names}
            total = pool[names[0]].shape[0]
            perm = torch.randperm(total, generator=gen) if shuffle else torch.arange(total)
            full = total - total % batch_size
            for i in range(0, full, batch_size):
                idx = perm[i : i + batch_size]
                batch = {n: pool[n][idx] for n in names}
                yield batch[names[0]] if isinstance(sites, str) else batch
            carry = {n: pool[n][perm[full:]] for n in names} if full < total else None
        if carry is not None and not drop_last:
            yield carry[names[0]] if isinstance(sites, str) else carry

    def __repr__(self) -> str:
        return (
            f"ActivationStore({self.loc.url!r}, sites={len(self.sites)}, tokens={self.num_tokens}, "
            f"dtype={self.dtype}, complete={self.complete})"
        )


def open_store(url: str, verify: bool = True, allow_partial: bool = False) -> ActivationStore:
    """Open a store folder (local path or fsspec URL) for reading."""
    return ActivationStore(str(url), verify=verify, allow_partial=allow_partial)
