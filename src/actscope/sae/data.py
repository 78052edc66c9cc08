"""Training batches from a store: a wide shuffle with bounded memory, token positions, outliers.

Why not ``ActivationStore.iter_batches``? It is right for most uses, but SAE training needs
three more things:

- the position of every token, to drop position 0 (on many models it carries a massive
  activation, ~25,000 in norm on the default model, that would dominate the loss);
- a shuffle window wider than what fits in memory: here a batch *gathers* its rows from the
  memory-mapped shards instead of concatenating a window of shards first, so memory is the batch
  plus one int64 index per token of the window, whatever the window's width in shards;
- skipping ``n`` batches without reading them, which makes a resumed run see exactly the
  batches that the uninterrupted run would have seen next.

Order: epoch ``e`` permutes the shards with seed ``(seed, e)``, cuts them into windows of
``window_shards`` shards, and permutes the tokens of each window together with the tail that
did not fill a batch in the previous window. Every token appears exactly once per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..store.reader import ActivationStore


@dataclass
class Batch:
    """Rows of several sites for the same tokens, with each token's store index."""

    rows: dict[str, torch.Tensor]
    index: torch.Tensor  # [n] global token index (sequence-major)

    def positions(self, seq_len: int) -> torch.Tensor:
        return self.index % seq_len


def _gather(store: ActivationStore, site: str, index: torch.Tensor, per_shard: int) -> torch.Tensor:
    """Rows ``index`` of ``site``, read shard by shard from the memory maps (no window copy)."""
    shard = index // per_shard
    out = torch.empty((index.shape[0], *store.shape(site)), dtype=store.shard_tensor(site, int(shard[0])).dtype)
    for k in shard.unique().tolist():
        mask = shard == k
        out[mask] = store.shard_tensor(site, k)[index[mask] - k * per_shard]
    return out


def epoch_order(store: ActivationStore, batch_size: int, seed: int, epoch: int, window_shards: int,
                shuffle: bool = True) -> Iterator[torch.Tensor]:
    """Token indices of each batch of one epoch (the last one may be short)."""
    per_shard = store.sequences_per_shard * store.seq_len
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    n_shards = store.num_shards
    order = torch.randperm(n_shards, generator=gen).tolist() if shuffle else list(range(n_shards))
    carry = torch.empty(0, dtype=torch.long)
    for g in range(0, n_shards, window_shards):
        spans = []
        for k in order[g: g + window_shards]:
            stop = min((k + 1) * per_shard, store.num_tokens)
            spans.append(torch.arange(k * per_shard, stop))
        pool = torch.cat([carry, *spans])
        if shuffle:
            pool = pool[torch.randperm(pool.shape[0], generator=gen)]
        full = pool.shape[0] - pool.shape[0] % batch_size
        for i in range(0, full, batch_size):
            yield pool[i: i + batch_size]
        carry = pool[full:]
    if carry.shape[0]:
        yield carry


def token_batches(store: ActivationStore, sites: Sequence[str], batch_size: int, *, seed: int = 0,
                  window_shards: int = 64, skip: int = 0, epochs: int | None = 1,
                  shuffle: bool = True) -> Iterator[Batch]:
    """Shuffled batches of ``sites`` (rows of the same tokens), epoch after epoch.

    ``skip`` batches are passed over without reading any activation; ``epochs=None`` never ends.
    """
    per_shard = store.sequences_per_shard * store.seq_len
    epoch, seen = 0, 0
    while epochs is None or epoch < epochs:
        for index in epoch_order(store, batch_size, seed, epoch, window_shards, shuffle):
            seen += 1
            if seen <= skip:
                continue
            yield Batch({s: _gather(store, s, index, per_shard) for s in sites}, index)
        epoch += 1


@dataclass
class OutlierPolicy:
    """Which tokens training leaves out, recorded in each SAE's config.

    ``skip_first``: position 0 (attention-sink token, massive activation). ``max_norm_ratio``:
    tokens whose norm exceeds this multiple of the median norm (measured once, on the sample
    that initialises the SAE). ``None`` keeps them all.
    """

    skip_first: bool = True
    max_norm_ratio: float | None = 10.0
    median_norm: float | None = None

    def keep(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the rows to train and evaluate on."""
        keep = torch.ones(x.shape[0], dtype=torch.bool)
        if self.skip_first:
            keep &= positions != 0
        if self.max_norm_ratio is not None and self.median_norm is not None:
            keep &= x.float().norm(dim=-1) <= self.max_norm_ratio * self.median_norm
        return keep

    def to_dict(self) -> dict:
        return {"skip_first": self.skip_first, "max_norm_ratio": self.max_norm_ratio, "median_norm": self.median_norm}

    @classmethod
    def from_dict(cls, d: dict | None) -> "OutlierPolicy":
        return cls(**(d or {}))
