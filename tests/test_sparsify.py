"""Activation sparsity in a model: decoding through the kernels equals the dense path, thresholds
equal independent quantiles, 0% is bit-identical, calibrated sparsity holds on held-out tokens,
weights are stored once. The kernels themselves: test_sparse_kernel.py."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import VOCAB, random_tokens, tiny_model

from actscope.data import TokenBatches
from actscope.errors import SparsifyError
from actscope.kvcache import output_cache, with_cache
from actscope.sparsify import (
    SparseAct,
    SparseLinear,
    SparsityConfig,
    apply,
    calibrate,
    perplexity,
)
from actscope.sparsify import swap as apply_mod
from actscope.sparsify.evaluate import SparsityEval

METHODS = ["teal", "wina", "cats", "chess", "topk", "coreinfer"]


_tokens = random_tokens


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", intermediate_size=192)


@pytest.mark.parametrize("method", METHODS)
def test_decode_kernels_equal_dense_path_in_a_model(llama, monkeypatch, method):
    """One decoding step after a prompt: sparse kernels (few rows) == masked dense matmuls."""
    config = calibrate(llama, method=method, sparsity=0.5, tokens=_tokens(8), progress=False)
    prompt = torch.randint(3, VOCAB, (3, 6))
    step = torch.randint(3, VOCAB, (3, 1))

    def decode() -> torch.Tensor:
        with torch.inference_mode(), apply(llama, config):
            cache = output_cache(llama(prompt, use_cache=True))
            return llama(step, **with_cache(cache), use_cache=True).logits

    fast = decode()  # 3 rows per call: the kernels, and gate/up computing only kept rows
    monkeypatch.setattr(apply_mod, "KERNEL_MAX_ROWS", 0)
    slow = decode()  # masked dense matmuls everywhere
    assert torch.allclose(fast, slow, atol=1e-4), (fast - slow).abs().max()
    assert not torch.allclose(fast, llama(step, **with_cache(output_cache(llama(prompt, use_cache=True)))).logits,
                              atol=1e-3)  # and the sparsity really changed the output


# --- exactness at 0% and restoration ----------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_zero_sparsity_is_bit_identical(llama, method):
    config = calibrate(llama, method=method, sparsity=0.0, tokens=_tokens(4), progress=False)
    ids = torch.randint(3, VOCAB, (2, 7))
    with torch.inference_mode():
        dense = llama(ids).logits
        with apply(llama, config) as handle:
            assert not handle.modules
            sparse = llama(ids).logits
    assert torch.equal(dense, sparse)


def test_modules_restored_even_after_an_error(llama):
    config = calibrate(llama, method="cats", sparsity=0.5, tokens=_tokens(4), progress=False)
    before = {n: type(m) for n, m in llama.named_modules()}
    with pytest.raises(RuntimeError, match="boom"), apply(llama, config):
        assert any(isinstance(m, (SparseLinear, SparseAct)) for m in llama.modules())
        raise RuntimeError("boom")
    assert {n: type(m) for n, m in llama.named_modules()} == before


def test_state_dict_unchanged_inside_apply(llama):
    config = calibrate(llama, method="teal", sparsity=0.5, tokens=_tokens(4), progress=False)
    keys = list(llama.state_dict())
    with apply(llama, config):
        assert list(llama.state_dict()) == keys


def _storage_bytes(model) -> int:
    """Bytes of the distinct storages behind the model's parameters and its SparseLinears' kernel weights."""
    seen = {}
    tensors = [p for p in model.parameters()]
    tensors += [m._wt for m in model.modules() if isinstance(m, SparseLinear) and m._wt is not None]
    tensors += [m.group.wt for m in model.modules() if isinstance(m, SparseLinear) and m.group is not None]
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("method", ["teal", "cats"])
@pytest.mark.parametrize("inference", [True, False])
def test_weights_stored_once_inside_apply_and_restored_exactly(llama, method, inference):
    """No second copy of any weight inside ``apply``; on exit the same values, strides, and no
    inference tensors (even when ``apply`` ran inside ``inference_mode``)."""
    config = calibrate(llama, method=method, sparsity=0.5, tokens=_tokens(4), progress=False)
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    strides = {k: v.stride() for k, v in llama.state_dict().items()}
    params = {k: id(v) for k, v in llama.named_parameters()}
    addresses = {k: v.data_ptr() for k, v in llama.named_parameters()}
    dense_bytes = _storage_bytes(llama)
    ids = torch.randint(3, VOCAB, (1, 5))
    ctx = torch.inference_mode() if inference else torch.no_grad()
    with ctx, apply(llama, config) as handle:
        assert _storage_bytes(llama) == dense_bytes  # the kernel reads the Parameter's own storage
        for m in handle.modules.values():
            if m.group is not None:  # q/k/v, gate/up: columns of one block the kernel reads whole
                assert m.weight.untyped_storage().data_ptr() == m.group.wt.untyped_storage().data_ptr()
                assert m.group.wt.is_contiguous()
            else:
                assert m._wt.is_contiguous() and m._wt.data_ptr() == m.weight.data_ptr()
        if method == "teal":
            assert sum(m.group is not None for m in handle.modules.values()) == 5 * len(llama.model.layers)
        alone = [f"{path}.weight" for path, m in handle.modules.items() if m.group is None]
        assert alone and all(llama.get_parameter(k).data_ptr() == addresses[k] for k in alone)  # W^T in place
        state = llama.state_dict()
        assert all(torch.equal(state[k], before[k]) for k in before)  # same values, transposed views
        out = llama(ids, use_cache=True)  # prefill: the dense path on the views
        llama(ids[:, -1:], **with_cache(output_cache(out)), use_cache=True)  # a decode step: the kernel
    after = llama.state_dict()
    assert {k: id(v) for k, v in llama.named_parameters()} == params  # the same Parameter objects
    # a weight not grouped kept its storage throughout (a CUDA graph captured before apply stays valid)
    assert all(llama.get_parameter(k).data_ptr() == addresses[k] for k in alone)
    for k, v in after.items():
        assert torch.equal(v, before[k]) and v.stride() == strides[k] and v.is_contiguous(), k
        assert not v.is_inference(), k
    assert _storage_bytes(llama) == dense_bytes
    llama(ids).logits.sum().backward()  # still trainable: the weights are normal tensors
    llama.zero_grad(set_to_none=True)


# --- calibration against independent computations ---------------------------------------------------
def _captured(model, path: str, tokens: TokenBatches, io: str = "in") -> torch.Tensor:
    module = model.get_submodule(path)
    rows = []
    if io == "in":
        h = module.register_forward_pre_hook(lambda m, a: rows.append(a[0].reshape(-1, a[0].shape[-1])))
    else:
        h = module.register_forward_hook(lambda m, a, o: rows.append(o.reshape(-1, o.shape[-1])))
    with torch.inference_mode():
        for b in tokens.batches(4):
            model(input_ids=b, use_cache=False)
    h.remove()
    return torch.cat(rows).float()


def _share_below(values: torch.Tensor, t: torch.Tensor) -> float:
    return float((values <= t).float().mean())


@pytest.mark.parametrize("method", ["teal", "wina", "cats"])
def test_scalar_thresholds_equal_exact_quantiles(llama, method):
    tokens = _tokens(16)
    config = calibrate(llama, method=method, sparsity=0.4, tokens=tokens, passes=1, progress=False)
    layer = "model.layers.1"
    if method == "cats":
        path, io, key = f"{layer}.mlp.act_fn", "out", f"{layer}.mlp.act_fn"
    else:
        path, io, key = f"{layer}.mlp.down_proj", "in", f"{layer}.mlp.down_proj"
    values = _captured(llama, path, tokens, io).abs()
    if method == "wina":
        values = values * llama.get_submodule(key).weight.detach().float().norm(dim=0)
    exact = torch.quantile(values.flatten().double(), 0.4).float()
    t = config.thresholds[key]
    assert abs(float(t) - float(exact)) <= 0.011 * float(exact)  # the sketch's 1% relative accuracy
    assert abs(_share_below(values, t) - 0.4) < 0.01


def test_chess_channel_thresholds_equal_independent_computation(llama):
    tokens = _tokens(16)
    config = calibrate(llama, method="chess", sparsity=0.5, tokens=tokens, passes=1, progress=False)
    layer = "model.layers.0"
    act = _captured(llama, f"{layer}.mlp.act_fn", tokens, "out").abs()
    importance = _captured(llama, f"{layer}.mlp.up_proj", tokens, "out").abs().mean(0)
    t_global = torch.quantile((act * importance).flatten().double(), 0.5).float()
    got = config.thresholds[f"{layer}.mlp.act_fn"]
    assert got.shape == (act.shape[1],)
    assert torch.allclose(got * importance, t_global.expand_as(got), rtol=0.03)
    assert abs(_share_below(act * importance, got * importance) - 0.5) < 0.02


@pytest.mark.parametrize("method", ["teal", "wina", "cats", "chess"])
def test_achieved_sparsity_matches_target_on_held_out_tokens(llama, method):
    config = calibrate(llama, method=method, sparsity=0.5, tokens=_tokens(24, seed=1), progress=False)
    held = _tokens(12, seed=2)
    with torch.inference_mode(), apply(llama, config) as handle:
        for b in held.batches(4):
            llama(input_ids=b, use_cache=False)
        got = handle.achieved()
    assert abs(got["overall"] - 0.5) < 0.02, got["overall"]


def test_greedy_allocation_reaches_target_with_unequal_levels(llama):
    config = calibrate(llama, method="teal", sparsity=0.5, allocation="greedy", tokens=_tokens(16), progress=False)
    sizes = {p: llama.get_submodule(p).weight.numel() for p in config.targets}
    mean = sum(config.targets[p] * sizes[p] for p in sizes) / sum(sizes.values())
    assert 0.5 <= mean < 0.5 + 0.05
    assert len(set(config.targets.values())) > 1


def test_topk_keeps_exactly_k_per_token(llama):
    config = calibrate(llama, method="topk", sparsity=0.75, progress=False)
    seen = []
    with torch.inference_mode(), apply(llama, config):
        h = llama.get_submodule("model.layers.0.mlp.down_proj").register_forward_pre_hook(
            lambda m, a: seen.append(a[0]))
        llama(torch.randint(3, VOCAB, (1, 6)))
        h.remove()
    nonzero = (seen[0] != 0).sum(-1)
    assert torch.all(nonzero == 48)  # 25% of 192 channels, in every token


def test_coreinfer_fixes_core_neurons_after_the_prompt(llama):
    config = calibrate(llama, method="coreinfer", sparsity=0.5, progress=False)
    prompt = torch.randint(3, VOCAB, (1, 12))
    act_path = "model.layers.1.mlp.act_fn"
    prompt_act = _captured(llama, act_path, TokenBatches(prompt, torch.zeros_like(prompt, dtype=torch.int32), "p"), "out")
    # independent: per token, its top 40% positive neurons; then the 96 most frequent ones
    per_token = prompt_act.topk(round(0.4 * 192), dim=-1).indices
    counts = torch.zeros(192)
    for row, idx in zip(prompt_act, per_token):
        counts[idx[row[idx] > 0]] += 1
    seen = []
    with torch.inference_mode(), apply(llama, config):
        h = llama.get_submodule("model.layers.1.mlp.down_proj").register_forward_pre_hook(
            lambda m, a: seen.append(a[0]))
        out = llama(prompt, use_cache=True)
        llama(torch.tensor([[5]]), **with_cache(output_cache(out)), use_cache=True)
        h.remove()
    prompt_in, decode_in = seen
    assert (prompt_in != 0).float().mean() > 0.99  # the prompt runs dense
    active = (decode_in[0, 0] != 0)
    assert int(active.sum()) == 96
    # every chosen neuron is at least as frequent as every dropped one
    assert counts[active].min() >= counts[~active].max()


# --- generation, saving, errors --------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["wina", "coreinfer"])
def test_generation_with_batches_and_left_padding(llama, method):
    config = calibrate(llama, method=method, sparsity=0.5, tokens=_tokens(8), progress=False)
    ids = torch.randint(3, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding
    with torch.inference_mode(), apply(llama, config) as handle:
        out = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        got = handle.achieved()
    assert out.shape == (2, 11)
    assert 0.2 < got["overall"] < 0.8


def test_save_and_load_roundtrip(llama, tmp_path):
    config = calibrate(llama, method="chess", sparsity=0.4, attention=True, tokens=_tokens(8), progress=False)
    config.save_pretrained(tmp_path / "cfg")
    back = SparsityConfig.from_pretrained(tmp_path / "cfg")
    assert back.method == "chess" and back.targets == config.targets and back.params == config.params
    assert all(torch.equal(back.thresholds[k], config.thresholds[k].float()) for k in config.thresholds)
    ids = torch.randint(3, VOCAB, (1, 8))
    with torch.inference_mode():
        with apply(llama, config):
            a = llama(ids).logits
        with apply(llama, str(tmp_path / "cfg")):
            b = llama(ids).logits
    assert torch.equal(a, b)


def test_clear_errors(llama, tmp_path):
    with pytest.raises(SparsifyError, match="no layout for model type 'bert'"):  # gpt2 has one now
        calibrate(tiny_model("bert"), method="teal", tokens=_tokens(2))
    with pytest.raises(SparsifyError, match="unknown sparsity method"):
        calibrate(llama, method="magic")
    with pytest.raises(SparsifyError, match="no sparsity_config.json"):
        SparsityConfig.from_pretrained(tmp_path)
    (tmp_path / "sparsity_config.json").write_text("{not json")
    with pytest.raises(SparsifyError, match="not valid JSON"):
        SparsityConfig.from_pretrained(tmp_path)
    qwen = SparsityConfig("teal", 0.5, {}, {"x": 0.5}, {}, "qwen2")
    with pytest.raises(SparsifyError, match="calibrated on a qwen2 model"):
        with apply(llama, qwen):
            pass


def test_perplexity_and_ppl_p_sparsity(llama):
    held = _tokens(4, seq_len=16, seed=3)
    dense, zero = perplexity(llama, held)
    config = calibrate(llama, method="teal", sparsity=0.5, tokens=_tokens(8), progress=False)
    sparse, achieved = perplexity(llama, held, config)
    assert zero == 0.0 and abs(achieved - 0.5) < 0.05
    assert dense > 1 and sparse != dense
    ev = SparsityEval(10.0, {"m": [{"target": 0.2, "achieved": 0.2, "ppl": 10.05},
                                   {"target": 0.4, "achieved": 0.4, "ppl": 10.6}]})
    assert ev.ppl_p_sparsity("m", 5) == pytest.approx(0.2 + 0.2 * (0.04879 - 0.00499) / (0.05827 - 0.00499), abs=1e-3)
    assert ev.ppl_p_sparsity("m", 10) == 0.4
    # independent: score whole rows at once, keep the continuation half's predictions
    with torch.no_grad():
        logits = llama(held.input_ids).logits[:, 7:-1].float()
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), held.input_ids[:, 8:].flatten())
    assert dense == pytest.approx(float(want.exp()), rel=1e-4)


def test_paired_comparison_of_two_methods():
    """``compare``: the perplexity ratio on shared rows, with a bootstrap interval that covers it."""
    g = torch.Generator().manual_seed(0)
    base = (torch.rand(40, generator=g, dtype=torch.float64) * 50 + 100)
    noise = torch.randn(40, generator=g, dtype=torch.float64)
    curves = {"a": [{"target": 0.5, "achieved": 0.5, "ppl": 1.0, "row_nll": base.tolist()}],
              "b": [{"target": 0.5, "achieved": 0.5, "ppl": 1.0, "row_nll": (base + 2 + noise).tolist()}],
              "c": [{"target": 0.5, "achieved": 0.5, "ppl": 1.0, "row_nll": (base + noise * 3).tolist()}]}
    ev = SparsityEval(1.0, curves, meta={"continuation_tokens": 8}, dense_rows=base.tolist())
    r = ev.compare("b", "a", 0.5)
    assert r["ratio"] == pytest.approx(math.exp(float((2 + noise).mean()) / 8))
    assert 1.0 < r["low"] < r["ratio"] < r["high"]  # a steady 2-nat gap per row is no accident
    c = ev.compare("c", "a", 0.5)
    assert c["low"] < 1.0 < c["high"]  # pure noise: the interval straddles 1
    assert ev.compare("a", "dense", 0.5) == {"ratio": 1.0, "low": 1.0, "high": 1.0, "rows": 40, "run": 6}
    # rows drawn in runs of 6 consecutive ones: a gap that drifts along the text widens the interval
    drift = torch.linspace(-3, 5, 40, dtype=torch.float64)
    ev.curves["d"] = [{"target": 0.5, "achieved": 0.5, "ppl": 1.0, "row_nll": (base + 1 + drift).tolist()}]
    d = ev.compare("d", "a", 0.5)
    shuffled = SparsityEval(1.0, {"a": curves["a"], "d": [{**ev.curves["d"][0], "row_nll":
                            (base + 1 + drift[torch.randperm(40, generator=g)]).tolist()}]}, meta=ev.meta)
    s = shuffled.compare("d", "a", 0.5)
    assert d["ratio"] == pytest.approx(s["ratio"]) and d["high"] - d["low"] > s["high"] - s["low"]
    assert ev.compare("a", "b", 0.7) is None
    assert set(ev.comparisons()) == {"b vs a", "c vs a", "d vs a"}


@pytest.mark.filterwarnings("error:.*the Triton.*failed:RuntimeWarning")  # no silent fall-back to dense
def test_sparse_decoding_on_cuda_matches_the_masked_dense_path(llama, monkeypatch):
    """End to end on a GPU: the Triton kernel path equals the masked dense computation."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    from actscope.data import TokenBatches
    from actscope.sparsify import apply, calibrate, swap

    model = llama.to("cuda")
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    config = calibrate(model, method="wina", sparsity=0.5, progress=False,
                       tokens=TokenBatches(ids, torch.zeros_like(ids, dtype=torch.int32), "t"))
    try:
        for rows in (1, 8):
            x = ids[:1, :rows].cuda()
            monkeypatch.setattr(swap, "GPU_KERNEL_MIN_BYTES", 1 << 40)  # tiny weights: the kernel for 1-16 rows
            with torch.inference_mode(), apply(model, config):
                kern = model(x).logits
            monkeypatch.setattr(swap, "KERNEL_MAX_ROWS", 0)  # the masked dense path, same keep rule
            with torch.inference_mode(), apply(model, config):
                dense = model(x).logits
            monkeypatch.undo()
            assert torch.allclose(kern, dense, atol=1e-3, rtol=1e-3), (rows, float((kern - dense).abs().max()))
    finally:
        model.to("cpu")


def test_without_the_cpu_kernel_the_fallback_gives_the_same_outputs(llama, monkeypatch):
    import torch.utils.cpp_extension as cpp

    from actscope.sparsify import kernel

    def broken(*args, **kwargs):
        raise OSError("no compiler")

    monkeypatch.setattr(kernel, "_state", {})
    monkeypatch.setattr(cpp, "load", broken)
    with pytest.warns(RuntimeWarning, match="could not be built.*no compiler"):
        assert kernel.cpu_kernel() is None
    config = calibrate(llama, method="teal", sparsity=0.5, tokens=_tokens(8), progress=False)
    ids = torch.randint(3, VOCAB, (2, 4))
    with torch.inference_mode(), apply(llama, config):
        fallback = llama(ids).logits  # 8 rows: the kernel path, served by the reference
    monkeypatch.undo()  # the compiled kernel is back
    with torch.inference_mode(), apply(llama, config):
        compiled = llama(ids).logits
    assert torch.allclose(fallback, compiled, atol=1e-4)


def test_a_strided_weight_moves_out_and_back_bit_identical():
    """A weight that is a strided view (not contiguous) cannot take W^T in its own storage: it gets
    new storage inside the layout change and its original strides back after, values bit-identical."""
    lin = torch.nn.Linear(8, 6)
    with torch.no_grad():
        lin.weight.data = torch.randn(6, 16)[:, ::2]
    before, stride = lin.weight.detach().clone(), lin.weight.stride()
    sparse = SparseLinear(lin, torch.tensor([0.5]))
    assert sparse.to_kernel_layout() and not sparse._in_place and sparse._wt.is_contiguous()
    assert torch.equal(sparse.weight, before)
    sparse.restore_layout()
    assert torch.equal(lin.weight, before) and lin.weight.stride() == stride
