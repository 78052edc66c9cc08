"""Streaming accumulators equal numpy on the whole data, whatever the batching and merge order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actscope.stats import DistinctCount, Histogram, MinMax, Moments, QuantileSketch, TopK


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.empty(3000, 7, dtype=torch.float64).exponential_(generator=g)
    return x * torch.tensor([1, 2, 3, 0.1, 10, 1, 5], dtype=torch.float64) - 1.5


def _chunks(x, sizes):
    out, i = [], 0
    for s in sizes:
        out.append((x[i : i + s], i))
        i += s
    out.append((x[i:], i))
    return out


def _feed(make, chunks, with_offset=False):
    parts = []
    for c, off in chunks:
        acc = make()
        acc.update(c, off) if with_offset else acc.update(c)
        parts.append(acc)
    return parts


@pytest.mark.parametrize("order", ["sequential", "tree", "reversed"])
def test_moments_match_numpy_in_any_merge_order(data, order):
    chunks = _chunks(data, [1, 17, 400, 999, 3])
    parts = _feed(Moments, chunks)
    if order == "sequential":
        acc = parts[0]
        for p in parts[1:]:
            acc.merge(p)
    elif order == "reversed":
        acc = parts[-1]
        for p in reversed(parts[:-1]):
            acc.merge(p)
    else:
        while len(parts) > 1:
            parts = [parts[i].merge(parts[i + 1]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
        acc = parts[0]
    x = data.double().numpy()
    mean, var = x.mean(0), x.var(0)
    kurt = ((x - mean) ** 4).mean(0) / var**2 - 3
    assert acc.n == 3000
    np.testing.assert_allclose(acc.mean.numpy(), mean, rtol=1e-10)
    np.testing.assert_allclose(acc.var.numpy(), var, rtol=1e-10)
    np.testing.assert_allclose(acc.kurtosis.numpy(), kurt, rtol=1e-9)


def test_moments_of_float32_batches_are_close(data):
    acc = Moments()
    for c, _ in _chunks(data.float(), [1000, 1000]):
        acc.update(c)
    x = data.float().double().numpy()
    np.testing.assert_allclose(acc.var.numpy(), x.var(0), rtol=1e-5)
    np.testing.assert_allclose(acc.kurtosis.numpy(), ((x - x.mean(0)) ** 4).mean(0) / x.var(0) ** 2 - 3, rtol=1e-4)


def test_minmax_and_topk_keep_global_positions(data):
    chunks = _chunks(data, [100, 1234])
    mm = _feed(MinMax, chunks, True)
    tk = _feed(lambda: TopK(5), chunks, True)
    for p in mm[1:]:
        mm[0].merge(p)
    for p in reversed(tk[1:]):
        tk[0].merge(p)
    x = data.double().numpy()
    np.testing.assert_array_equal(mm[0].max.numpy(), x.max(0))
    np.testing.assert_array_equal(mm[0].argmax.numpy(), x.argmax(0))
    np.testing.assert_array_equal(mm[0].argmin.numpy(), x.argmin(0))
    top = np.sort(x, axis=0)[::-1][:5]
    np.testing.assert_allclose(tk[0].values.numpy(), top, rtol=1e-6)
    np.testing.assert_allclose(x[tk[0].index.numpy(), np.arange(7)], tk[0].values.numpy(), rtol=1e-6)


def test_histogram_matches_numpy(data):
    h = Histogram(-2.0, 6.0, 16)
    for c, _ in _chunks(data, [500, 500]):
        part = Histogram(-2.0, 6.0, 16)
        part.update(c)
        h.merge(part)
    clipped = np.clip(data.double().numpy().ravel(), -2.0, 6.0 - 1e-9)
    want, _ = np.histogram(clipped, bins=16, range=(-2.0, 6.0))
    np.testing.assert_array_equal(h.counts.numpy(), want)


def test_quantile_sketch_is_within_its_relative_accuracy(data):
    sk = QuantileSketch(alpha=0.01)
    for c, _ in _chunks(data, [700, 11]):
        part = QuantileSketch(alpha=0.01)
        part.update(c)
        sk.merge(part)
    a = np.sort(np.abs(data.double().numpy().ravel()))
    for q in (0.01, 0.1, 0.5, 0.9, 0.99):
        exact = a[int(q * (len(a) - 1))]
        assert abs(sk.quantile(q) - exact) <= 0.0101 * exact, q


def test_distinct_count_estimates_and_merges():
    g = torch.Generator().manual_seed(1)
    hashes = torch.randint(-(2**62), 2**62, (20_000,), generator=g, dtype=torch.int64)
    data = torch.cat([hashes, hashes[:5000]])  # 20k distinct among 25k
    a, b = DistinctCount(), DistinctCount()
    a.update(data[:12_000])
    b.update(data[12_000:])
    assert abs(a.merge(b).estimate() / 20_000 - 1) < 0.04
    small = DistinctCount()
    small.update(hashes[:100])
    assert abs(small.estimate() - 100) < 5


@pytest.mark.parametrize("d", [64, 100, 1536])
def test_hash_rows_packs_bits_exactly(d):
    """hash_rows = sum over 64-bit words of word x odd salt (wrapping), each word the row's bits
    in order: checked against packing written out in Python integers."""
    from actscope.stats.mlp import hash_rows

    gen = torch.Generator().manual_seed(d)
    active = torch.rand(40, d, generator=gen) > 0.6
    active[1] = active[0]
    active[2] = active[0]
    active[2, d - 1] = ~active[0, d - 1]  # one bit apart
    salt = torch.randint(-(2**62), 2**62, ((d + 63) // 64,), generator=gen, dtype=torch.int64) | 1
    got = hash_rows(active, salt)
    for r in range(active.shape[0]):
        total = 0
        for w in range(salt.numel()):
            word = sum(1 << b for b in range(64) if w * 64 + b < d and bool(active[r, w * 64 + b]))
            total += (word - (1 << 64) if word >= 1 << 63 else word) * int(salt[w])
        want = (total + (1 << 63)) % (1 << 64) - (1 << 63)  # wrap to int64
        assert int(got[r]) == want
    assert got[0] == got[1] and got[0] != got[2]
