"""Streaming, mergeable accumulators (in the spirit of baukit's runningstats).

Each accumulator updates batch by batch with ``update`` and combines with another of the same
kind via ``merge``, so a corpus can be split across processes and the results merged in any
order. Memory is O(width) (or O(bins)), never O(tokens). Everything accumulates in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

F64 = torch.float64


class Moments:
    """Count, mean, variance, skewness and kurtosis per channel (Chan/Pebay pairwise merge).

    ``update(x)`` takes ``[tokens, *channels]``. A batch's central moments are computed in the
    input's dtype (float32 is enough within a batch and twice as fast); running totals are
    float64. Pass float64 batches for results exact to numpy's float64.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2 = self.m3 = self.m4 = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        n = x.shape[0]
        if n == 0:
            return
        mean = x.mean(0)
        d = x - mean
        d2 = d * d
        other = Moments()
        other.n, other.mean = n, mean.to(F64)
        other.m2, other.m3, other.m4 = d2.sum(0).to(F64), (d2 * d).sum(0).to(F64), (d2 * d2).sum(0).to(F64)
        self.merge(other)

    def merge(self, o: "Moments") -> "Moments":
        if o.n == 0:
            return self
        if self.n == 0:
            self.n, self.mean, self.m2, self.m3, self.m4 = o.n, o.mean.clone(), o.m2.clone(), o.m3.clone(), o.m4.clone()
            return self
        na, nb = self.n, o.n
        n = na + nb
        delta = o.mean - self.mean
        d2 = delta * delta
        m2 = self.m2 + o.m2 + d2 * na * nb / n
        m3 = self.m3 + o.m3 + d2 * delta * na * nb * (na - nb) / n**2 + 3 * delta * (na * o.m2 - nb * self.m2) / n
        m4 = (
            self.m4 + o.m4
            + d2 * d2 * na * nb * (na * na - na * nb + nb * nb) / n**3
            + 6 * d2 * (na * na * o.m2 + nb * nb * self.m2) / n**2
            + 4 * delta * (na * o.m3 - nb * self.m3) / n
        )
        self.mean = self.mean + delta * nb / n
        self.n, self.m2, self.m3, self.m4 = n, m2, m3, m4
        return self

    @property
    def var(self) -> torch.Tensor:
        """Population variance (ddof=0), as numpy's default."""
        return self.m2 / self.n

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    @property
    def kurtosis(self) -> torch.Tensor:
        """Excess kurtosis (Fisher), 0 for a Gaussian; 0 where the variance is 0."""
        m2 = self.m2 / self.n
        k = (self.m4 / self.n) / (m2 * m2) - 3.0
        return torch.where(m2 > 0, k, torch.zeros_like(k))


class MinMax:
    """Per-channel min and max with the global token index where each occurred."""

    def __init__(self) -> None:
        self.min = self.max = self.argmin = self.argmax = None

    def update(self, x: torch.Tensor, offset: int) -> None:
        """``x`` is ``[tokens, *channels]``; ``offset`` the global index of its first token."""
        x = x.detach()
        other = MinMax()
        mn, amn = x.min(0)
        mx, amx = x.max(0)
        other.min, other.argmin, other.max, other.argmax = mn.to(F64), amn + offset, mx.to(F64), amx + offset
        self.merge(other)

    def merge(self, o: "MinMax") -> "MinMax":
        if o.max is None:
            return self
        if self.max is None:
            self.min, self.max, self.argmin, self.argmax = o.min.clone(), o.max.clone(), o.argmin.clone(), o.argmax.clone()
            return self
        take = o.max > self.max
        self.max = torch.where(take, o.max, self.max)
        self.argmax = torch.where(take, o.argmax, self.argmax)
        take = o.min < self.min
        self.min = torch.where(take, o.min, self.min)
        self.argmin = torch.where(take, o.argmin, self.argmin)
        return self


class Histogram:
    """Fixed-bin histogram; values outside ``[lo, hi)`` land in the edge bins."""

    def __init__(self, lo: float, hi: float, bins: int = 64) -> None:
        self.lo, self.hi, self.bins = lo, hi, bins
        self.counts = torch.zeros(bins, dtype=torch.int64)

    @property
    def edges(self) -> torch.Tensor:
        return torch.linspace(self.lo, self.hi, self.bins + 1, dtype=F64)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1).to(F64)
        idx = ((x - self.lo) / (self.hi - self.lo) * self.bins).floor().clamp(0, self.bins - 1).long()
        self.counts += torch.bincount(idx, minlength=self.bins)

    def merge(self, o: "Histogram") -> "Histogram":
        assert (o.lo, o.hi, o.bins) == (self.lo, self.hi, self.bins), "histograms need equal bins"
        self.counts += o.counts
        return self


class QuantileSketch:
    """Relative-accuracy quantiles of ``|x|`` from log-spaced buckets (the DDSketch idea).

    Any quantile is within a factor ``(1 +/- alpha)`` of the exact value; memory is a fixed
    number of buckets covering ``[min_value, max_value]``; merging adds counts. With
    ``channels > 1`` the last axis of ``x`` is the channel and each channel gets its own sketch
    (per-channel thresholds, as CHESS uses), at ``channels x buckets`` memory.
    """

    def __init__(
        self, alpha: float = 0.01, min_value: float = 1e-8, max_value: float = 1e8, channels: int = 1
    ) -> None:
        self.gamma = (1 + alpha) / (1 - alpha)
        self.log_gamma = math.log(self.gamma)
        self.min_value = min_value
        self.channels = channels
        self.offset = math.floor(math.log(min_value) / self.log_gamma)
        self.size = math.ceil(math.log(max_value) / self.log_gamma) - self.offset + 1
        # slot 0 of each channel: values below min_value
        self.counts = torch.zeros(channels, self.size + 1, dtype=torch.int64)
        self.n = 0  # values per channel

    def update(self, x: torch.Tensor) -> None:
        # float32 and in-place ops: this runs on every activation during calibration
        a = x.detach().reshape(-1, self.channels).abs().float()
        idx = torch.log(a.clamp(min=self.min_value)).div_(self.log_gamma).ceil_().sub_(self.offset)
        idx = idx.clamp_(1, self.size).long().masked_fill_(a < self.min_value, 0)
        if self.channels > 1:
            idx += torch.arange(self.channels).mul_(self.size + 1)
        self.counts += torch.bincount(idx.reshape(-1), minlength=self.counts.numel()).view_as(self.counts)
        self.n += a.shape[0]

    def merge(self, o: "QuantileSketch") -> "QuantileSketch":
        assert o.counts.shape == self.counts.shape, "sketches need equal channels and buckets"
        self.counts += o.counts
        self.n += o.n
        return self

    def quantiles(self, q: float) -> torch.Tensor:
        """The ``q``-quantile of each channel (float64, ``[channels]``; 0 where below min_value)."""
        if self.n == 0:
            return torch.full((self.channels,), float("nan"), dtype=F64)
        rank = torch.full((self.channels, 1), q * (self.n - 1), dtype=F64)
        i = torch.searchsorted(self.counts.cumsum(1).to(F64), rank, right=True)[:, 0]
        k = (i + self.offset).to(F64)  # bucket covers (gamma^(k-1), gamma^k]: its midpoint estimate
        return torch.where(i == 0, 0.0, 2 * self.gamma**k / (self.gamma + 1))

    def quantile(self, q: float) -> float:
        """The ``q``-quantile of a one-channel sketch."""
        return float(self.quantiles(q)[0])


class TopK:
    """The k largest values per channel with their global token indices."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.values: torch.Tensor | None = None  # [k, *channels]
        self.index: torch.Tensor | None = None

    def update(self, x: torch.Tensor, offset: int) -> None:
        x = x.detach().float()
        k = min(self.k, x.shape[0])
        if self.values is not None and self.values.shape[0] == self.k and x.dim() == 2:
            # fast path: only channels whose batch maximum beats their current k-th value. A NaN
            # counts as -inf here, so it cannot hide a channel's other values (nor enter a full
            # top-k): the same rule as the scan's C++ pass
            x = torch.where(x.isnan(), float("-inf"), x)
            cols = (x.amax(0) > self.values[-1]).nonzero().reshape(-1)
            if cols.numel() == 0:
                return
            v, i = x[:, cols].topk(k, dim=0)
            merged_v = torch.cat([self.values[:, cols], v])
            merged_i = torch.cat([self.index[:, cols], i + offset])
            top, pos = merged_v.topk(self.k, dim=0)
            self.values[:, cols] = top
            self.index[:, cols] = merged_i.gather(0, pos)
            return
        v, i = x.topk(k, dim=0)
        other = TopK(self.k)
        other.values, other.index = v, i + offset
        self.merge(other)

    def merge(self, o: "TopK") -> "TopK":
        if o.values is None:
            return self
        if self.values is None:
            self.values, self.index = o.values.clone(), o.index.clone()
            return self
        v = torch.cat([self.values, o.values])
        i = torch.cat([self.index, o.index])
        k = min(self.k, v.shape[0])
        top, pos = v.topk(k, dim=0)
        self.values, self.index = top, i.gather(0, pos)
        return self


@dataclass
class Sum:
    """A running sum of tensors (or floats) plus a count: the simplest mergeable statistic."""

    total: torch.Tensor | float = 0.0
    n: int = 0

    def update(self, x: torch.Tensor | float, n: int = 1) -> None:
        x = x.detach().to(F64) if torch.is_tensor(x) else float(x)
        self.total = self.total + x
        self.n += n

    def merge(self, o: "Sum") -> "Sum":
        self.total = self.total + o.total
        self.n += o.n
        return self

    @property
    def mean(self) -> torch.Tensor | float:
        return self.total / max(self.n, 1)


def mix64(h: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors (wrapping arithmetic, logical shifts)."""
    for shift, mult in ((30, -4658895280553007687), (27, -7723592293110705685)):
        h = (h ^ ((h >> shift) & ((1 << (64 - shift)) - 1))) * mult
    return h ^ ((h >> 31) & ((1 << 33) - 1))


@dataclass
class DistinctCount:
    """Approximate number of distinct int64 values (HyperLogLog, 2^p registers, ~1.6% error)."""

    p: int = 12
    registers: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.registers is None:
            self.registers = torch.zeros(1 << self.p, dtype=torch.int64)

    def update(self, hashes: torch.Tensor) -> None:
        """``hashes``: int64 values (mixed here, so any distinct ints count as distinct)."""
        h = mix64(hashes.reshape(-1))
        bucket = (h >> (64 - self.p)) & ((1 << self.p) - 1)
        rest = (h << self.p) | (1 << (self.p - 1))  # guard bit bounds the run length
        # rank = leading zeros + 1; the exponent of the float value gives the highest set bit
        _, exponent = torch.frexp(rest.double())
        rank = torch.where(rest < 0, torch.ones_like(rest), 65 - exponent.long())
        self.registers.scatter_reduce_(0, bucket, rank, reduce="amax")

    def merge(self, o: "DistinctCount") -> "DistinctCount":
        self.registers = torch.maximum(self.registers, o.registers)
        return self

    def estimate(self) -> float:
        m = 1 << self.p
        alpha = 0.7213 / (1 + 1.079 / m)
        raw = alpha * m * m / float(torch.pow(2.0, -self.registers.double()).sum())
        zeros = int((self.registers == 0).sum())
        if raw <= 2.5 * m and zeros:  # small-range correction (linear counting)
            return m * math.log(m / zeros)
        return raw
