"""The capture engine: stream a corpus through a model and write sites into a store.

    store = actscope.record(model, tokenizer, "runs/acts", ["blocks.*.hook_resid_post"])

The corpus is packed into a fixed plan of shards (``sequences_per_shard`` sequences each) before
anything runs. Shard k always holds the same tokens, so:
- a re-run on the same folder skips the shards already on disk (resume after any crash);
- under ``torchrun`` each rank takes a contiguous block of shards and the store reads as one.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from . import __version__
from .data import TokenBatches, load_tokens
from .distributed import Ranks
from .errors import ActscopeError, StoreError
from .fingerprint import data_fingerprint, model_fingerprint, model_spec  # noqa: F401 (model_fingerprint re-exported)
from .models import context_length, parse_dtype
from .sites import Site, site_map
from .store.fs import TMP_MARK, Location
from .store.lock import StoreLock
from .store.manifest import FORMAT, SHARDS, VERSION, plan_id, read_manifest, shard_name
from .store.prepare import clear_own_files, decide, existing_manifest, tokens_ok, verify_for_resume
from .store.reader import ActivationStore, open_store
from .store.writer import BufferPool, PendingShard, ShardWriter, site_entries, token_file, write_header_files, write_tokens
from .validate import finite, positive_int, site_patterns

log = logging.getLogger(__name__)


def token_major(site: Site, x: torch.Tensor, batch: int) -> torch.Tensor:
    """Reshape a captured tensor to ``[batch * seq, ...]`` in sequence-major token order."""
    if site.needs_eager_attention:  # [batch, head, query, key] -> one row per query token
        x = x.permute(0, 2, 1, 3)
    if x.shape[0] != batch:  # e.g. position embeddings computed once for the whole batch
        x = x.expand(batch, *x.shape[1:])
    return x.flatten(0, 1)


def probe_shapes(model: Any, sites: list[Site], first: torch.Tensor, seq_len: int) -> dict[str, tuple[int, ...]]:
    """Per-token shape of each site, from one forward pass on a few tokens.

    Only the key axis of attention patterns depends on the length; it is set to ``seq_len``.
    This also fails early, before anything is written, if a site never fires or fires more
    than once (recording cuts each pass short after the last site, so it could not tell).
    """
    from .trace import trace

    shapes: dict[str, tuple[int, ...]] = {}
    fired = {s.name: 0 for s in sites}

    def keep(site: Site, x: torch.Tensor) -> None:
        shape = tuple(token_major(site, x, first.shape[0]).shape[1:])
        shapes[site.name] = (*shape[:-1], seq_len) if site.needs_eager_attention else shape
        fired[site.name] += 1

    with torch.inference_mode(), trace(model, sites, on_activation=keep):
        model(input_ids=first.to(model.device), use_cache=False)
    _check_fired_once(fired, 1)
    return shapes


def _plan(shapes: dict[str, tuple[int, ...]], itemsize: int, seq_len: int, batch_size: int, shard_mb: float) -> int:
    """Sequences per shard: a whole number of batches (at least one), about ``shard_mb`` MiB.

    Whole batches keep the batch composition, and so the exact values, independent of the
    shard size.
    """
    per_seq = seq_len * itemsize * sum(math.prod(s) for s in shapes.values())
    spb = int(shard_mb * 2**20 // max(per_seq, 1))
    return max(batch_size, spb - spb % batch_size)


def _check_fired_once(fired: dict[str, int], n_batches: int) -> None:
    for name, count in fired.items():
        if count != n_batches:
            raise StoreError(
                f"site {name} fired {count} times in {n_batches} forward passes; "
                "recording needs exactly one activation per token"
            )


def record(
    model: Any,
    tokenizer: Any,
    out: str,
    sites: str | Iterable[str],
    data: Any = None,
    *,
    seq_len: int = 128,
    max_tokens: int | None = None,
    dtype: str = "bfloat16",
    batch_size: int = 8,
    shard_mb: float = 64,
    overwrite: bool = False,
    verify: bool = False,
    progress: bool = True,
    text_field: str = "text",
    fsync: bool = True,
    tokens: TokenBatches | None = None,
) -> ActivationStore | None:
    """Record ``sites`` of ``model`` over ``data`` into the store at ``out`` and return it.

    Re-running with the same arguments resumes an interrupted run; the result equals an
    uninterrupted run exactly (at the same thread count). A resume checks every existing shard's
    header and size, and with ``verify`` its checksums too, and rewrites what fails.
    ``overwrite`` always starts afresh, removing only the store's own files. Returns the opened
    store (``None`` on non-zero ranks).
    """
    check_record_args(out, sites, seq_len=seq_len, max_tokens=max_tokens, dtype=dtype, batch_size=batch_size,
                      shard_mb=shard_mb)
    ranks = Ranks.from_env()
    ok = False
    try:
        store = _record(model, tokenizer, sites, data, out, ranks, seq_len=seq_len, batch_size=batch_size,
                        max_tokens=max_tokens, dtype=dtype, shard_mb=shard_mb, overwrite=overwrite, verify=verify,
                        progress=progress, text_field=text_field, fsync=fsync, tokens=tokens)
        ok = True
        return store
    finally:
        ranks.close(wait=ok)  # a failed rank must not wait for peers that may never arrive


def check_record_args(out: Any, sites: Any, *, seq_len: Any, max_tokens: Any, dtype: Any, batch_size: Any,
                      shard_mb: Any) -> None:
    """Refuse bad arguments before anything is loaded or written (a bad value must never reach a manifest)."""
    import os

    if not isinstance(out, (str, os.PathLike)) or not str(out).strip():
        raise ActscopeError(f"out must be a folder path or URL, got {out!r}")
    site_patterns(sites)
    positive_int("--seq-len", seq_len)
    positive_int("--max-tokens", max_tokens, allow_none=True)
    positive_int("--batch-size", batch_size)
    finite("--shard-mb", shard_mb, positive=True)
    parse_dtype(dtype)


def _manifest(model: Any, tokens: TokenBatches, shapes: dict, dtype: str, spb: int, batch_size: int,
              token_entry: dict) -> dict:
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "actscope_version": __version__,
        "model": model_spec(model),
        "sites": site_entries(shapes, dtype),
        "dtype": dtype,
        "seq_len": tokens.seq_len,
        "num_sequences": tokens.num_sequences,
        "sequences_per_shard": spb,
        "batch_size": batch_size,  # a resumed run keeps the original batches, so the values match
        "num_shards": math.ceil(tokens.num_sequences / spb),
        "data": {"source": tokens.source, "fingerprint": data_fingerprint(tokens)},
        "tokens": token_entry,
        # float reductions on CPU split work by thread: another count may change the last bits
        "threads": torch.get_num_threads(),
    }
    manifest["plan_id"] = plan_id(manifest)
    return manifest


def _prepare(loc: Location, manifest: dict, token_bytes: bytes, overwrite: bool) -> dict:
    """Rank 0, lock held: make the folder a fresh store or check it for a resume; the manifest to use."""
    existing = existing_manifest(loc, overwrite)
    if decide(loc, manifest, existing, overwrite):
        clear_own_files(loc)
        write_header_files(loc, manifest, token_bytes)
        return manifest
    assert existing is not None
    if existing.get("threads") not in (None, manifest["threads"]):
        log.warning("resuming a store recorded with %s threads on %s threads: values may differ in the last bits "
                    "between the old and the new shards", existing["threads"], manifest["threads"])
    if not tokens_ok(loc, existing):
        log.warning("%s: the token file is damaged; rewriting it", loc.url)
        write_tokens(loc, token_bytes)
    return existing  # resume: keep the shard plan the store was started with


def _record(
    model: Any, tokenizer: Any, sites: str | Iterable[str], data: Any, out: str, ranks: Ranks, *,
    seq_len: int, batch_size: int, max_tokens: int | None, dtype: str, shard_mb: float, overwrite: bool,
    verify: bool, progress: bool, text_field: str, fsync: bool, tokens: TokenBatches | None,
) -> ActivationStore | None:
    store_dtype = parse_dtype(dtype)
    assert store_dtype is not None
    limit = context_length(model)
    if limit is not None and seq_len > limit:
        raise StoreError(f"--seq-len {seq_len} exceeds the model's context length of {limit} tokens")
    resolved = site_map(model).resolve(sites)
    if tokens is None:
        tokens = load_tokens(data, tokenizer, seq_len, max_tokens, text_field)
    shapes = probe_shapes(model, resolved, tokens.input_ids[:1, :8], tokens.seq_len)
    itemsize = torch.empty((), dtype=store_dtype).element_size()
    spb = _plan(shapes, itemsize, seq_len, batch_size, shard_mb)
    token_bytes, token_entry = token_file(tokens.input_ids, tokens.doc_ids)
    manifest = _manifest(model, tokens, shapes, dtype, spb, batch_size, token_entry)
    loc = Location(out, fsync=fsync)
    lock = StoreLock(loc)
    try:
        if ranks.rank == 0:
            ok = False
            try:
                lock.acquire()
                manifest = _prepare(loc, manifest, token_bytes, overwrite)
                ok = True
            finally:
                ranks.share_status(ok)
        else:
            ranks.share_status(True)
            manifest = read_manifest(loc) or manifest
        _record_shards(model, resolved, tokens, loc, manifest, store_dtype, manifest["batch_size"], ranks, progress,
                       verify)
    finally:
        lock.release()
    return open_store(out) if ranks.rank == 0 else None


def _record_shards(
    model: Any,
    sites: list[Site],
    tokens: TokenBatches,
    loc: Location,
    manifest: dict,
    store_dtype: torch.dtype,
    batch_size: int,
    ranks: Ranks,
    progress: bool,
    verify: bool,
) -> None:
    from .trace import eager_attention, trace

    spb, n_shards, seq_len = manifest["sequences_per_shard"], manifest["num_shards"], manifest["seq_len"]
    mine = ranks.block(n_shards)
    owned = {shard_name(k) for k in mine}
    loc.remove_stale_tmp(SHARDS, owned=lambda name: name.split(TMP_MARK)[0] in owned)
    done = verify_for_resume(loc, manifest, mine, verify)
    todo = [k for k in mine if k not in done]
    n_tok = lambda k: (min((k + 1) * spb, tokens.num_sequences) - k * spb) * seq_len  # noqa: E731
    bar = tqdm(
        total=sum(n_tok(k) for k in mine),
        initial=sum(n_tok(k) for k in mine if k in done),
        unit="tok",
        unit_scale=True,
        desc=f"record rank {ranks.rank}" if ranks.world > 1 else "record",
        disable=not progress or ranks.rank != 0,
        dynamic_ncols=True,
    )
    buffers: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    rows = [0]

    pool = BufferPool()

    def collect(site: Site, x: torch.Tensor) -> None:
        y = token_major(site, x, rows[0])
        buf = pool.take(y.shape, store_dtype)
        buf.copy_(y)  # converts dtype and device in one pass
        buffers[site.name].append(buf)

    writer = ShardWriter(loc, manifest.get("plan_id", ""), pool=pool)
    ok = False
    try:
        # attention patterns need eager attention: switch once here, not in every batch's trace
        with eager_attention(model, bool(todo) and any(s.needs_eager_attention for s in sites)):
            for k in todo:
                start, stop = k * spb, min((k + 1) * spb, tokens.num_sequences)
                n_batches = 0
                for batch in tokens.batches(batch_size, start, stop):
                    rows[0] = batch.shape[0]
                    # stop=True: the layers after the last recorded site, and the unembedding, never run
                    with torch.inference_mode(), trace(model, sites, on_activation=collect, stop=True):
                        model(input_ids=batch.to(model.device), use_cache=False)
                    n_batches += 1
                    bar.update(batch.numel())
                _check_fired_once({name: len(chunks) for name, chunks in buffers.items()}, n_batches)
                writer.submit(PendingShard(k, start, stop, buffers))
                buffers = {name: [] for name in buffers}
        writer.close()
        ok = True
    finally:
        if not ok:
            writer.abort()
        bar.close()
        ranks.share_status(ok)
    log.info("recorded %d shards in %s", len(todo), loc.url)
