"""The scan's one-pass C++ MLP statistics equal its torch ops exactly: counts, chunk unions,
code hashes, the per-neuron top-k with token indices, tau counts and deltas on the profiled
sequences, and the moments, over batches of several shapes, with values on the threshold and NaNs."""

from __future__ import annotations

import pytest
import torch

from actscope.stats import fast
from actscope.stats import mlp as mlp_mod


def _stats(use_fast: bool, batches, monkeypatch, **kw) -> mlp_mod.MlpLayerStats:
    monkeypatch.setattr(fast, "USE_FAST", use_fast)
    st = mlp_mod.MlpLayerStats(kw.pop("d"), (0.0, 0.01, 0.05, 0.1), 0.1, **kw)
    offset = seq = 0
    for a in batches:
        st.update(a, offset, seq)
        offset += a.shape[0] * a.shape[1]
        seq += a.shape[0]
    return st


@pytest.mark.parametrize("d,seq_len,chunk,profile_every", [(200, 37, 8, 4), (64, 16, 4, 1), (130, 9, 16, 3)])
def test_one_pass_equals_the_torch_ops(monkeypatch, d, seq_len, chunk, profile_every):
    if fast.scan_kernel() is None:
        pytest.skip("no C++ compiler here: the scan keeps its torch path")
    g = torch.Generator().manual_seed(d)
    batches = []
    for i in range(6):
        a = torch.randn(6 - i % 2, seq_len, d, generator=g) * torch.rand(d, generator=g)
        a[a.abs() < 0.3] = 0.0  # exact zeros, as ReLU models give
        a[0, 3, :10] = 0.1  # float32(0.1) > 0.1 is false in float32, true in float64
        a[1, 2, 5] = float("nan") if i == 4 else 50.0 + i  # a NaN, and new maxima for the top-k
        a[2, 1, 7], a[2, 3, 7] = (float("nan"), 60.0 + i) if i >= 3 else (1.0 + i / 10, 2.0 + i / 10)  # NaN + maximum
        batches.append(a)
    kw = dict(d=d, chunk=chunk, topk=5, profile_every=profile_every)
    got, want = _stats(True, batches, monkeypatch, **kw), _stats(False, batches, monkeypatch, **kw)
    for name in ("n_tokens", "profiled_tokens", "active_chunks", "n_chunks", "delta_small", "n_deltas"):
        assert getattr(got, name) == getattr(want, name), name
    assert torch.equal(got.neuron_active, want.neuron_active)
    assert torch.equal(got.active_at, want.active_at)
    assert torch.equal(got.top.values, want.top.values)
    assert float(got.top.values[0, 7]) == 65.0  # the maximum beside a NaN was kept
    # indices are exact wherever the value occurs once in its column over all batches (torch.topk
    # leaves the order of ties open)
    seen = torch.cat([a.reshape(-1, d) for a in batches])
    once = (seen.unsqueeze(0) == got.top.values.unsqueeze(1)).sum(1) == 1  # [k, d]
    assert once.float().mean() > 0.5 and torch.equal(got.top.index[once], want.top.index[once])
    assert torch.equal(got.codes.registers, want.codes.registers)
    for name in ("mean", "m2", "m3", "m4"):  # a profiled NaN makes its neuron's moments NaN on both paths
        torch.testing.assert_close(getattr(got.moments, name), getattr(want.moments, name), rtol=0, atol=0,
                                   equal_nan=True)
    assert got.summary(1e-4) == want.summary(1e-4)


def test_the_pass_refuses_bad_arguments_in_one_line():
    kern = fast.scan_kernel()
    if kern is None:
        pytest.skip("no C++ compiler here: the scan keeps its torch path")
    a, taus = torch.randn(10, 64), torch.tensor([0.0])
    top_v, top_i = torch.zeros(5, 64), torch.zeros(5, 64, dtype=torch.int64)
    args = [a, 0.1, 5, 4, taus, torch.ones(2, dtype=torch.uint8), torch.ones(1, dtype=torch.int64),
            torch.zeros(64, dtype=torch.int64), top_v, top_i, 0]
    with pytest.raises(RuntimeError, match="multiple of seq_len"):
        kern.mlp_pass(*[a[:9]] + args[1:])
    with pytest.raises(RuntimeError, match="neuron_active int64"):
        kern.mlp_pass(*args[:7] + [torch.zeros(63, dtype=torch.int64)] + args[8:])
    with pytest.raises(RuntimeError, match="a \\[n, d\\] float32"):
        kern.mlp_pass(*[a.double()] + args[1:])


def test_without_a_compiler_the_torch_path_serves(monkeypatch):
    import torch.utils.cpp_extension as cpp

    def broken(*args, **kwargs):
        raise OSError("no compiler")

    monkeypatch.delenv("ACTSCOPE_NO_KERNEL", raising=False)
    monkeypatch.setattr(fast, "_state", {})
    monkeypatch.setattr(cpp, "load", broken)
    with pytest.warns(RuntimeWarning, match="scan_pass could not be built.*no compiler.*torch ops"):
        assert fast.scan_kernel() is None
    a = torch.randn(2, 8, 64)
    st = _stats(True, [a, a], monkeypatch, d=64)  # falls back without a second warning
    assert st.n_tokens == 32 and int(st.neuron_active.sum()) == 2 * int((a.abs() > 0.1).sum())


@pytest.mark.parametrize("parallel,with_attn,with_mlp", [(False, True, True), (True, True, True), (False, False, True),
                                                         (False, True, False)])
def test_layer_use_and_massive_candidates_equal_the_torch_ops(monkeypatch, parallel, with_attn, with_mlp):
    """Relative update and cosines (summed in float64 by the pass, so equal to float32 rounding),
    and the massive-activation candidates with their positions (exactly)."""
    from actscope.stats.residual import LayerUse, MassiveTracker

    if fast.scan_kernel() is None:
        pytest.skip("no C++ compiler here: the scan keeps its torch path")
    g = torch.Generator().manual_seed(5)
    h_in, attn, mlp = (torch.randn(3, 7, 48, generator=g) for _ in range(3))
    h_in[0, 0] = 0.0  # a zero residual: the clamped norms
    attn[1, 1] = 0.0
    h_out = h_in + attn + mlp
    h_out[0, 0, 3], h_out[2, 6, 47], h_out[1, 2, 0] = 900.0, -1e4, 200.0  # candidates above the bound
    ids = torch.randint(0, 50, (3, 7), generator=g)
    results = {}
    for use_fast in (True, False):
        monkeypatch.setattr(fast, "USE_FAST", use_fast)
        use, massive = LayerUse(2), MassiveTracker(abs_threshold=150.0, ratio_threshold=10.0)
        for layer in range(2):
            use.update(layer, h_in, h_out, attn if with_attn else None, mlp if with_mlp else None, parallel)
            massive.update(layer, h_out, ids, offset=100)
        results[use_fast] = (use.results(), massive.groups)
    (use_fast, groups_fast), (use_torch, groups_torch) = results[True], results[False]
    assert groups_fast == groups_torch and len(groups_fast) == 6
    for a, b in zip(use_fast, use_torch, strict=True):
        for key in ("relative_update", "cos_attn_to_residual", "cos_mlp_to_residual"):
            assert (a[key] is None) == (b[key] is None), key
            if a[key] is not None:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
