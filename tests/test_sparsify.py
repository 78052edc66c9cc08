"""Activation sparsity: kernels equal the masked dense computation, thresholds equal independent
quantiles, 0% is bit-identical, calibrated sparsity holds on held-out tokens."""

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
from actscope.sparsify.kernel import cpu_kernel, mask, masked, reference

METHODS = ["teal", "wina", "cats", "chess", "topk", "coreinfer"]


_tokens = random_tokens


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", intermediate_size=192)


# --- the kernel ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("kind", ["scalar", "channel", "scaled", "bias"])
def test_kernel_equals_masked_dense(dtype, rows, kind):
    kern = cpu_kernel()
    assert kern is not None, "the C++ kernel must build here (gcc and ninja are installed by make)"
    g = torch.Generator().manual_seed(rows)
    d_in, d_out = 200, 75  # 75: the AVX2 loops' 8-wide body and their scalar tail
    x = torch.randn(rows, d_in, generator=g).to(dtype)
    wt = torch.randn(d_in, d_out, generator=g).to(dtype)
    bias = torch.randn(d_out, generator=g).to(dtype) if kind == "bias" else None
    thresh = torch.tensor([0.7])
    scale = torch.empty(0)
    if kind == "channel":
        thresh = torch.rand(d_in, generator=g) * 1.5
    if kind == "scaled":
        scale = torch.rand(d_in, generator=g) * 2
    counter = torch.zeros(2, dtype=torch.int64)
    got = kern.sparse_linear(x, wt, bias, thresh, scale, counter)
    ref_counter = torch.zeros(2, dtype=torch.int64)
    want = reference(x, wt, bias, thresh, scale, ref_counter)
    assert got.dtype == dtype and got.shape == (rows, d_out)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * 10)
    assert counter.tolist() == ref_counter.tolist()
    assert 0 < counter[0] < counter[1]  # the masks really were partial
    # the same kernel as the registered operator that compiled decoding steps call
    from actscope.sparsify import ops

    op_counter = torch.zeros(2, dtype=torch.int64)
    assert torch.equal(ops.sparse_linear(x, wt, bias, thresh, scale, op_counter), got)
    assert op_counter.tolist() == ref_counter.tolist()


@pytest.fixture(params=["scalar", "avx2", "avx512"])
def isa(request):
    """Each instruction-set path of the CPU kernel, forced in turn (the best one is put back)."""
    kern = cpu_kernel()
    assert kern is not None
    if request.param not in kern.supported_isas():
        pytest.skip(f"this CPU has no {request.param} ({kern.supported_isas()}); "
                    "that path is tested on a CPU that has it")
    kern.set_isa(request.param)
    yield request.param
    kern.set_isa("")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("d_out", [75, 64, 300])
def test_every_isa_path_equals_masked_dense(isa, dtype, rows, d_out):
    """Forced scalar / AVX2 / AVX-512 paths against the masked dense computation: 16- and 8-wide
    bodies with their tails (75, 300), kept-row counts that are not a multiple of the 8-row group,
    every size of AVX-512's tile of 1-4 input rows (rows 2, 3, 5, 16), and prefetching further ahead."""
    kern = cpu_kernel()
    assert kern.isa() == isa
    g = torch.Generator().manual_seed(rows * 1000 + d_out)
    for d_in, thresh_value in ((203, 0.7), (1000, 1.1), (37, 0.0)):
        x = torch.randn(rows, d_in, generator=g).to(dtype)
        wt = torch.randn(d_in, d_out, generator=g).to(dtype)
        bias = torch.randn(d_out, generator=g).to(dtype)
        thresh = torch.tensor([thresh_value])
        for groups in (1, 3):
            kern.set_prefetch_groups(groups)
            counter, ref_counter = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
            got = kern.sparse_linear(x, wt, bias, thresh, torch.empty(0), counter)
            want = reference(x, wt, bias, thresh, None, ref_counter)
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * 10), (d_in, groups)
            assert counter.tolist() == ref_counter.tolist()
        kern.set_prefetch_groups(1)
        # the rows kernel (RowsLinear) on the same path
        w = wt.t().contiguous()
        idx = torch.arange(0, d_out, 3)
        got = kern.rows_linear(x, w, idx)
        want = torch.zeros(rows, d_out)
        want[:, idx] = x.float() @ w[idx].float().t()
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        assert torch.allclose(got.float(), want, rtol=tol, atol=tol * d_in ** 0.5)
    # the streaming read the bench measures against: a plain sum of the bytes
    t = torch.randn(4099)
    assert kern.stream_read(t) == pytest.approx(float(t.double().sum()), abs=1e-2)


@pytest.mark.parametrize("pool", ["omp", "own"])
def test_both_thread_pools_equal_masked_dense(pool):
    """The kernel's ranges of kept rows run on torch's OpenMP team (the default) or, with
    ACTSCOPE_KERNEL_POOL=own, on the kernel's help-first pool: same outputs, on a weight large
    enough for both threads, and the same bits on every call (the ranges are fixed; threads
    claiming chunks as they came free gave dozens of different roundings)."""
    import os
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from actscope.sparsify.kernel import cpu_kernel\n"
        "torch.set_num_threads(2); g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(3, 2048, generator=g); wt = torch.randn(2048, 1024, generator=g)\n"
        "b = torch.randn(1024, generator=g); t = torch.tensor([0.7])\n"
        "c = torch.zeros(2, dtype=torch.int64)\n"
        "got = cpu_kernel().sparse_linear(x, wt, b, t, torch.empty(0), c)\n"
        "want = torch.where(x.abs() > 0.7, x, torch.zeros(())) @ wt + b\n"
        "print(float((got - want).abs().max()), int(c[0]), int(c[1]))\n"
        "print(len({cpu_kernel().sparse_linear(x[:r], wt, b, t, torch.empty(0), c).numpy().tobytes()\n"
        "           for r in (1, 3) for _ in range(100)}))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, ACTSCOPE_KERNEL_POOL=pool),
                         capture_output=True, text=True, timeout=300)
    diff, kept, total, distinct = run.stdout.split()
    assert float(diff) < 1e-3 and 0 < int(kept) < int(total), run.stderr[-2000:]
    assert int(distinct) == 2  # one result for 1 row, one for 3 rows, over 100 calls each


def test_isa_forced_by_environment_and_refused_when_unknown():
    import os
    import subprocess
    import sys

    code = "from actscope.sparsify.kernel import cpu_isa; print(cpu_isa())"
    for name in ("scalar", "avx2"):
        if name not in cpu_kernel().supported_isas():
            continue
        run = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, ACTSCOPE_KERNEL_ISA=name),
                             capture_output=True, text=True, timeout=300)
        assert run.stdout.strip().splitlines()[-1] == name, run.stderr[-2000:]
    run = subprocess.run([sys.executable, "-W", "always", "-c", code],
                         env=dict(os.environ, ACTSCOPE_KERNEL_ISA="sse9"), capture_output=True, text=True, timeout=300)
    assert run.stdout.strip().splitlines()[-1] == "None" and "unknown instruction set 'sse9'" in run.stderr
    with pytest.raises(RuntimeError, match="unknown instruction set"):
        cpu_kernel().set_isa("sse9")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_mask_equals_the_keep_rule(isa, dtype):
    """``masked_input`` (prompts' masked input, one pass) on every instruction-set path: equal to
    ``x * mask(x)`` with scalar and per-channel thresholds, a WINA-like scale, widths that are not
    a multiple of 16, and a NaN, which is dropped (0), as the kernels drop it; counts equal."""
    kern = cpu_kernel()
    g = torch.Generator().manual_seed(3)
    for shape, n_thresh, scaled in [((5, 37), 1, False), ((3, 64), 64, True), ((40, 576), 1, False),
                                    ((2, 1536), 1536, True), ((7, 19), 19, False)]:
        x = torch.randn(*shape, generator=g).to(dtype)
        x[0, 0] = float("nan")
        thresh = torch.rand(n_thresh, generator=g)
        scale = torch.rand(shape[-1], generator=g) * 2 if scaled else None
        got_count, want_count = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
        got = kern.masked_input(x, thresh, scale if scaled else torch.empty(0), got_count)
        want = x * mask(x, thresh, scale, want_count)
        want[0, 0] = 0.0
        assert torch.equal(got, want) and got_count.tolist() == want_count.tolist(), shape
    with torch.no_grad():  # kernel.masked takes it on AVX2/AVX-512, the torch ops elsewhere: same values
        x = torch.randn(2, 3, 64, generator=g).to(dtype)
        assert torch.equal(masked(x, torch.tensor([0.5])), x * (x.abs().float() > 0.5))
    with pytest.raises(RuntimeError, match="thresh must be float32, one value or one per input"):
        kern.masked_input(x[0], torch.rand(7), torch.empty(0), torch.empty(0, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_kernel_equals_selected_rows(dtype):
    kern = cpu_kernel()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 80, generator=g).to(dtype)
    w = torch.randn(120, 80, generator=g).to(dtype)
    idx = torch.tensor([0, 7, 8, 50, 119])
    got = kern.rows_linear(x, w, idx)
    want = torch.zeros(3, 120)
    want[:, idx] = x.float() @ w[idx].float().t()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(got.float(), want, rtol=tol, atol=tol * 10)
    assert torch.count_nonzero(got) == 15


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [8, 9, 12, 16, 17])
def test_rows_per_kernel_call_follow_the_dtype_limit(dtype, rows):
    """On CPU the kernel serves up to 16 rows, but bfloat16 on a CPU with AMX only up to 8, where
    torch's dense product is faster beyond (swap.KERNEL_MAX_ROWS_BF16); both paths give the same
    outputs. Checked for a lone linear and for a group (q/k/v) inside ``apply``."""
    limit = apply_mod._BF16_ROWS_ON_THIS_CPU if dtype == torch.bfloat16 else apply_mod.KERNEL_MAX_ROWS
    assert apply_mod._BF16_ROWS_ON_THIS_CPU == (8 if apply_mod._has_amx() else 16)
    lin = torch.nn.Linear(64, 48).to(dtype)
    sparse = SparseLinear(lin, torch.tensor([0.5]))
    sparse.to_kernel_layout()  # as apply() does: the kernel is bound to the module
    calls = []

    class Recorder:
        def __init__(self, kern):
            self.kern = kern

        def sparse_linear(self, *args):
            calls.append(args[0].reshape(-1, args[0].shape[-1]).shape[0])
            return self.kern.sparse_linear(*args)

        def sparse_linear_split(self, *args):  # a group's one call
            calls.append(args[0].reshape(-1, args[0].shape[-1]).shape[0])
            return self.kern.sparse_linear_split(*args)

        def same_bytes(self, *args):
            return self.kern.same_bytes(*args)

    sparse._cpu = Recorder(sparse._cpu)
    x = torch.randn(rows, 64).to(dtype)
    with torch.no_grad():
        got = sparse(x)
    assert calls == ([rows] if rows <= limit else [])
    want = reference(x, lin.weight.detach().t(), lin.bias.detach(), torch.tensor([0.5]))
    sparse.restore_layout()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol)

    model = tiny_model("llama", intermediate_size=192).to(dtype)
    config = calibrate(model.float(), method="teal", sparsity=0.5, tokens=_tokens(4), progress=False)
    model.to(dtype)
    calls.clear()
    with torch.inference_mode(), apply(model, config) as handle:
        q = handle.modules["model.layers.0.self_attn.q_proj"]
        assert q.group is not None
        q._cpu = Recorder(q._cpu)
        model(torch.randint(3, VOCAB, (1, rows)))
    assert calls == ([rows] if rows <= limit else [])  # the group's one call, made by q_proj


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
        state = llama.state_dict()
        assert all(torch.equal(state[k], before[k]) for k in before)  # same values, transposed views
        out = llama(ids, use_cache=True)  # prefill: the dense path on the views
        llama(ids[:, -1:], **with_cache(output_cache(out)), use_cache=True)  # a decode step: the kernel
    after = llama.state_dict()
    assert {k: id(v) for k, v in llama.named_parameters()} == params  # the same Parameter objects
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


_TRITON_CHECK = """
import sys
import torch
from actscope.sparsify import triton_kernel as tk
from actscope.sparsify.kernel import reference
dev = sys.argv[1] if len(sys.argv) > 1 else "cpu"
gather = len(sys.argv) > 2 and sys.argv[2] == "gather"
g = torch.Generator().manual_seed(1)
for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 0.15)):
    for kind in ("scalar", "channel", "scaled"):
        for rows in (1, 5, 20):
            for d_in, split in ((100, 1), (300, 3), (300, None)):
                x = torch.randn(rows, d_in, generator=g).to(dtype)
                wt = torch.randn(d_in, 70, generator=g).to(dtype)
                bias = torch.randn(70, generator=g).to(dtype)
                thresh = torch.rand(d_in, generator=g) if kind == "channel" else torch.tensor([0.6])
                scale = torch.rand(d_in, generator=g) * 2 if kind == "scaled" else torch.empty(0)
                ref_counter = torch.zeros(2, dtype=torch.int64)
                want = reference(x, wt, bias, thresh, scale, ref_counter)
                args = [t.to(dev) for t in (x, wt, bias, thresh, scale)]
                counter = torch.zeros(2, dtype=torch.int64, device=dev)
                got = tk.sparse_linear(*args, counter, split=split, gather=gather).cpu()
                assert got.dtype == dtype
                err = float((got.float() - want.float()).abs().max())
                assert err < tol, (dtype, kind, rows, d_in, split, err)
                assert counter.tolist() == ref_counter.tolist(), (kind, rows, counter, ref_counter)
print("ok")
"""


@pytest.mark.parametrize("variant", ["masked", "gather"])
def test_triton_kernel_in_interpreter_mode(variant):
    """The CUDA kernels (the default masked one, and the gather-first one behind
    ACTSCOPE_TRITON_GATHER=1), run by Triton's CPU interpreter: same contract as the C++ kernel."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.fail("Triton is missing: `make test` installs it (the test extra) so its CPU interpreter can "
                    "check the GPU kernel", pytrace=False)
    env = dict(os.environ, TRITON_INTERPRET="1")  # must be set before triton is imported
    run = subprocess.run([sys.executable, "-c", _TRITON_CHECK, "cpu", variant], env=env, capture_output=True,
                         text=True, timeout=600)
    if "__index__" in run.stderr and "only 0-dimensional arrays" in run.stderr:
        # seen with Triton 3.6 and numpy 2.5: the interpreter turns loop bounds into 1-element
        # arrays, which numpy 2.5 no longer converts to int; the compiled kernel is unaffected
        pytest.skip("this Triton's interpreter cannot run loops with runtime bounds under this numpy")
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


@pytest.mark.parametrize("variant", ["masked", "gather"])
def test_triton_kernel_on_cuda(variant):
    """The same check on a real GPU (bfloat16 through tensor cores, split-K atomics)."""
    import subprocess
    import sys

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here: the Triton kernel is checked on a GPU by bench/gpu_check.sh")
    run = subprocess.run([sys.executable, "-c", _TRITON_CHECK, "cuda", variant], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


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
