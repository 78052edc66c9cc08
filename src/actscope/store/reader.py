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

import math
import os
from collections import OrderedDict
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import ActscopeError, StoreError
from .fs import Location
from .manifest import (FORMAT, MANIFEST, SHARDS, TOKENS, read_manifest, shard_index,  # noqa: F401 (re-exported)
                       shard_name)
from .shard import DTYPE_CODES, TensorEntry, checksum, parse_header

__all__ = ["ActivationStore", "open_store", "read_manifest", "shard_name", "shard_index", "check_shard",
           "read_shard_header", "FORMAT", "MANIFEST", "SHARDS", "TOKENS"]


def shard_rows(manifest: dict, index: int) -> tuple[int, int]:
    """The sequences ``[start, stop)`` that shard ``index`` holds under the manifest's plan."""
    spb = manifest["sequences_per_shard"]
    return index * spb, min((index + 1) * spb, manifest["num_sequences"])


def read_shard_header(loc: Location, rel: str) -> tuple[dict[str, TensorEntry], dict, int]:
    """Parse a shard's header (entries, metadata) and return the file size with it."""
    source = loc.path(rel)
    try:
        size = os.path.getsize(source) if loc.local else int(loc.fs.size(source))
        head = loc.read_range(rel, 0, 8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        head += loc.read_range(rel, 8, min(n, 100_000_000))
    except OSError as exc:
        raise StoreError(f"{source}: unreadable shard ({exc.strerror or exc})") from None
    entries, meta, _ = parse_header(head, source)
    return entries, meta, size


def check_shard(entries: dict[str, TensorEntry], meta: dict, size: int, manifest: dict, index: int,
                source: str) -> None:
    """Check a shard header against the manifest: plan, sequence range, sites, dtype, shapes, size.

    The header is only trusted where it agrees with the manifest: an edited dtype or shape would
    otherwise reinterpret the bytes with a matching checksum.
    """
    def bad(what: str) -> StoreError:
        return StoreError(f"{source}: {what}; delete the shard and re-run `actscope record` on this folder "
                          "to rewrite it")

    if "plan_id" in manifest and meta.get("plan") != manifest["plan_id"]:
        raise bad("written under another plan (another model, corpus or run) than this store's manifest")
    start, stop = shard_rows(manifest, index)
    if (meta.get("shard"), meta.get("seq_start"), meta.get("seq_end")) != (index, start, stop):
        raise bad(f"header says shard {meta.get('shard')!r}, sequences {meta.get('seq_start')!r}-"
                  f"{meta.get('seq_end')!r}; the manifest expects shard {index}, sequences {start}-{stop}")
    sites = manifest["sites"]
    if set(entries) != set(sites):
        raise bad(f"holds sites {sorted(entries)[:3]}..., not the manifest's")
    dtype = _torch_dtype(manifest["dtype"])
    rows = (stop - start) * manifest["seq_len"]
    for name, entry in entries.items():
        if entry.dtype != dtype or entry.shape != (rows, *sites[name]["shape"]):
            raise bad(f"tensor {name!r} is {DTYPE_CODES[entry.dtype]} {list(entry.shape)}, the manifest says "
                      f"{DTYPE_CODES[dtype]} {[rows, *sites[name]['shape']]}")
    end = max((e.end for e in entries.values()), default=0)
    if size != end:
        raise bad(f"{'truncated' if size < end else 'extra bytes'}: {size} bytes, the header needs {end}")


def _torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class _Shard:
    """One shard file: its header (checked against the manifest), lazily memory-mapped data, and
    which tensors were verified."""

    def __init__(self, loc: Location, index: int, manifest: dict):
        self.loc = loc
        self.rel = f"{SHARDS}/{shard_name(index)}"
        self.source = loc.path(self.rel)
        self.entries, self.meta, size = read_shard_header(loc, self.rel)
        check_shard(self.entries, self.meta, size, manifest, index, self.source)
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
            if checksum(raw) != entry.checksum:
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
        if verify:
            self._token_bytes()  # a flipped bit in a token id is an error here, not a wrong id later

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

    def _token_bytes(self) -> bytes:
        """The token file's bytes, checked against the manifest's checksum (version 2 stores)."""
        where = self.loc.path(TOKENS)
        try:
            data = self.loc.read_bytes(TOKENS)
        except (OSError, FileNotFoundError) as exc:
            raise StoreError(f"{where}: unreadable ({exc.strerror or exc}); re-run `actscope record` on this "
                             "folder to rewrite it") from None
        expected = self.manifest.get("tokens")
        if expected is not None and (len(data) != expected["bytes"] or checksum(data) != expected["xxh3_64"]):
            raise StoreError(f"{where}: checksum mismatch (the token file is corrupted or truncated); re-run "
                             "`actscope record` on this folder to rewrite it")
        return data

    def _tokens(self, name: str) -> torch.Tensor:
        from safetensors.torch import load

        data = self._token_bytes()
        try:
            return load(data)[name]
        except Exception as exc:
            raise StoreError(f"{self.loc.path(TOKENS)}: unreadable ({type(exc).__name__})") from None

    # --- activations --------------------------------------------------------------------
    def _shard(self, index: int) -> _Shard:
        if index in self.missing_shards:
            raise StoreError(f"{self.loc.url}: shard {index} was not recorded (incomplete store)")
        shard = self._open.pop(index, None) or _Shard(self.loc, index, self.manifest)
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
        pieces = self.read_pieces(site, start, stop)
        if not pieces:
            return torch.empty((0, *self.shape(site)))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def read_pieces(self, site: str, start: int = 0, stop: int | None = None) -> list[torch.Tensor]:
        """``read``'s range as zero-copy views, one per shard it spans (for callers that copy
        into a buffer of their own and would otherwise pay for the concatenation)."""
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
        return pieces

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
        for what, value in (("batch_size", batch_size), ("buffer_shards", buffer_shards)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ActscopeError(f"iter_batches: {what} must be a positive integer, got {value!r}")
        names = [sites] if isinstance(sites, str) else list(sites)
        if not names:
            raise ActscopeError("iter_batches: no sites given")
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
