"""Linears that share an input and a threshold (q/k/v, gate/up) run as one kernel call over
weights stored side by side: the outputs and counts equal one call per linear, whatever order or
inputs the members are called with, and a hook that edits an input in place is honoured."""

from __future__ import annotations

import pytest
import torch
from tiny import VOCAB, random_tokens, tiny_model

from actscope.kvcache import output_cache, with_cache
from actscope.sparsify import apply, calibrate
from actscope.sparsify import swap as swap_mod


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # qwen2: q/k/v carry biases
def model(request):
    return tiny_model(request.param, intermediate_size=192)


def _decode(model, config, prompt, step, fuse: bool, monkeypatch, dtype=torch.float32):
    monkeypatch.setattr(swap_mod, "FUSE_GROUPS", fuse)
    model.to(dtype)
    try:
        with torch.inference_mode(), apply(model, config) as handle:
            cache = output_cache(model(prompt, use_cache=True))
            logits = model(step, **with_cache(cache), use_cache=True).logits.float()
            groups = {id(m.group) for m in handle.modules.values() if m.group is not None}
            return logits, handle.achieved()["per_module"], len(groups)
    finally:
        model.float()


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_call_per_group_equals_one_call_per_linear(model, monkeypatch, rows, dtype):
    config = calibrate(model, method="teal", sparsity=0.5, tokens=random_tokens(8), progress=False)
    prompt, step = torch.randint(3, VOCAB, (rows, 6)), torch.randint(3, VOCAB, (rows, 1))
    fused, fused_kept, n_groups = _decode(model, config, prompt, step, True, monkeypatch, dtype)
    alone, alone_kept, n_alone = _decode(model, config, prompt, step, False, monkeypatch, dtype)
    assert n_groups == 2 * model.config.num_hidden_layers and n_alone == 0  # q/k/v and gate/up per layer
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(fused, alone, atol=tol, rtol=tol), (fused - alone).abs().max()
    assert fused_kept == pytest.approx(alone_kept, abs=1e-12)  # each input counted once per member


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prompt_through_a_group_is_exactly_one_call_per_linear(model, monkeypatch, dtype):
    """Many rows (a prompt) take the masked dense product: the group makes the mask once and each
    member's product as it would alone, so the logits are bit-identical, and counted once."""
    config = calibrate(model, method="teal", sparsity=0.5, tokens=random_tokens(8), progress=False)
    prompt = torch.randint(3, VOCAB, (2, 20))  # 40 rows: above every kernel row limit
    got = {}
    for fuse in (True, False):
        monkeypatch.setattr(swap_mod, "FUSE_GROUPS", fuse)
        model.to(dtype)
        try:
            with torch.inference_mode(), apply(model, config) as handle:
                got[fuse] = (model(prompt).logits, handle.achieved()["per_module"])
        finally:
            model.float()
    assert torch.equal(got[True][0], got[False][0])
    assert got[True][1] == got[False][1]


def test_no_groups_where_thresholds_differ(model):
    """WINA scales each linear's inputs by its own column norms: q, k and v keep different inputs."""
    config = calibrate(model, method="wina", sparsity=0.5, tokens=random_tokens(4), progress=False)
    with torch.inference_mode(), apply(model, config) as handle:
        assert all(m.group is None for m in handle.modules.values())


def _members(model):
    attn = model.model.layers[0].self_attn
    return attn.q_proj, attn.k_proj, attn.v_proj


def _fused_and_alone(model, monkeypatch, calls, mode=torch.inference_mode) -> list[torch.Tensor]:
    """``calls(q, k, v)``'s outputs with grouping, checked equal to one call per linear."""
    config = calibrate(model, method="teal", sparsity=0.5, tokens=random_tokens(4), progress=False)
    got = {}
    for fuse in (True, False):
        monkeypatch.setattr(swap_mod, "FUSE_GROUPS", fuse)
        torch.manual_seed(1)
        with mode(), apply(model, config):
            got[fuse] = calls(*_members(model))
    for a, b in zip(got[True], got[False], strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    return got[True]


def test_members_called_alone_or_with_other_inputs(model, monkeypatch):
    h = model.config.hidden_size
    x1, x2 = torch.randn(1, 1, h), torch.randn(1, 1, h)
    _fused_and_alone(model, monkeypatch,  # any order, interleaved inputs
                     lambda q, k, v: [v(x1), q(x2), k(x2), k(x1), q(x1), v(x2)])


def test_a_hook_editing_the_input_in_place_is_honoured(model, monkeypatch):
    """A pre-hook on k_proj doubles its input in place (an inference tensor: no version counter)."""
    x = torch.randn(1, 1, model.config.hidden_size)

    def calls(q, k, v):
        handle = k.register_forward_pre_hook(lambda m, args: args[0].mul_(2.0))
        xi = x.clone()
        out = [q(xi), k(xi), v(xi)]
        handle.remove()
        return out

    _fused_and_alone(model, monkeypatch, calls)


def test_an_input_edited_in_place_without_a_hook_is_seen(model, monkeypatch):
    """Under inference_mode there is no version counter: the held outputs are checked against the values."""
    x = torch.randn(1, 1, model.config.hidden_size)

    def calls(q, k, v):
        xi = x.clone()
        out = [q(xi), q(xi)]  # a member called twice
        xi.mul_(3.0)
        return out + [k(xi), v(xi), q(xi)]

    out = _fused_and_alone(model, monkeypatch, calls)
    assert not torch.allclose(out[0], out[4])  # the edit changed q's output


def test_outside_inference_mode_the_version_counter_tells_an_edit(model, monkeypatch):
    """Under no_grad (HF generate's default) a tensor has a version counter: an in-place edit
    shows there, so no copy of the input's values is kept or compared."""
    x = torch.randn(1, 1, model.config.hidden_size)
    held = []

    def calls(q, k, v):
        xi = x.clone()
        out = [q(xi)]
        held.append(q.group is None or q.group._values is None)
        xi.mul_(3.0)
        return out + [k(xi), v(xi), q(xi)]

    out = _fused_and_alone(model, monkeypatch, calls, mode=torch.no_grad)
    assert all(held) and not torch.allclose(out[0], out[3])


def test_training_through_grouped_weights_reaches_each_parameter(model):
    config = calibrate(model, method="teal", sparsity=0.5, tokens=random_tokens(4), progress=False)
    ids = torch.randint(3, VOCAB, (1, 5))
    with apply(model, config):
        model(ids).logits.sum().backward()
    q, k, v = _members(model)
    assert all(p.weight.grad is not None and p.weight.grad.abs().sum() > 0 for p in (q, k, v))
    model.zero_grad(set_to_none=True)


def test_bias_edits_inside_apply_reach_the_kernel_and_survive_exit(monkeypatch):
    qwen = tiny_model("qwen2", intermediate_size=192)
    config = calibrate(qwen, method="teal", sparsity=0.5, tokens=random_tokens(4), progress=False)
    x = torch.randn(1, 1, qwen.config.hidden_size)
    attn = qwen.model.layers[0].self_attn
    got = {}
    for fuse in (True, False):
        monkeypatch.setattr(swap_mod, "FUSE_GROUPS", fuse)
        with torch.no_grad(), apply(qwen, config):
            q = attn.q_proj
            before = q(x).clone()
            q.bias.add_(1.0)
            got[fuse] = q(x)
            assert torch.allclose(got[fuse], before + 1.0, atol=1e-5)
            q.bias.sub_(1.0)
    assert torch.allclose(got[True], got[False], atol=1e-6)
    b = attn.q_proj.bias
    assert b.is_contiguous() and not b.is_inference() and b.untyped_storage().nbytes() == b.numel() * 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_the_compiled_operator_takes_other_dtypes_through_the_masked_dense_path(dtype):
    from actscope.sparsify import ops
    from actscope.sparsify.kernel import reference

    x, wt, bias = torch.randn(2, 16).to(dtype), torch.randn(16, 5).to(dtype), torch.randn(5).to(dtype)
    thresh, counter = torch.tensor([0.5]), torch.zeros(2, dtype=torch.int64)
    got = ops.sparse_linear(x, wt, bias, thresh, torch.empty(0), counter)
    assert got.dtype == dtype and torch.allclose(got, reference(x, wt, bias, thresh), atol=1e-3)
    assert counter.tolist() == [int((x.abs().float() > 0.5).sum()), 32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_split_call_gives_each_member_its_columns_of_one_call(dtype):
    """``sparse_linear_split``: x of any leading shape; one contiguous output per size, equal to
    the columns of the one-output call; a copy of x where asked; counted once; bad sizes refused."""
    from actscope.sparsify.kernel import cpu_kernel, reference

    kern = cpu_kernel()
    if kern is None:
        pytest.skip("no C++ compiler here: the kernel could not be built")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 40, generator=g).to(dtype)
    wt, bias = torch.randn(40, 30, generator=g).to(dtype), torch.randn(30, generator=g).to(dtype)
    thresh, empty = torch.tensor([0.6]), torch.empty(0)
    whole = kern.sparse_linear(x, wt, bias, thresh, empty, torch.empty(0, dtype=torch.int64))
    assert whole.shape == (2, 3, 30)
    want = reference(x.reshape(6, 40), wt, bias, thresh).reshape(2, 3, 30)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(whole.float(), want.float(), rtol=tol, atol=tol)
    values, counter = torch.empty(x.numel(), dtype=dtype), torch.zeros(2, dtype=torch.int64)
    parts = kern.sparse_linear_split(x, wt, bias, thresh, empty, counter, [12, 8, 10], values)
    assert [p.shape for p in parts] == [(2, 3, 12), (2, 3, 8), (2, 3, 10)] and all(p.is_contiguous() for p in parts)
    assert torch.equal(torch.cat(parts, -1), whole)  # bit-identical to the one-output call
    assert torch.equal(values, x.reshape(-1)) and kern.same_bytes(x, values)
    assert counter.tolist() == [int((x.abs().float() > 0.6).sum()), x.numel()]
    first = x[0, 0, 0].clone()
    x[0, 0, 0] += 1
    assert not kern.same_bytes(x, values)
    x[0, 0, 0] = first
    assert not kern.same_bytes(x.transpose(0, 1), values)  # other values in memory order
    strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # x's values, not contiguous
    assert not strided.is_contiguous() and torch.equal(strided, x)
    assert kern.same_bytes(strided, values)  # compared in x's order: the same
    with pytest.raises(RuntimeError, match="sum to 29"):
        kern.sparse_linear_split(x, wt, bias, thresh, empty, counter, [12, 8, 9], empty)
    with pytest.raises(RuntimeError, match=r"x \[\.\.\., in\]"):
        kern.sparse_linear(x[..., :39], wt, bias, thresh, empty, counter)
    none = kern.sparse_linear(x[:0], wt, bias, thresh, empty, counter)  # no rows: an empty output
    assert none.shape == (0, 3, 30)


def test_a_non_contiguous_input_makes_one_call_for_the_group(model):
    """An inference tensor that is a strided view (not contiguous) is still recognised as the
    input the group answered: q, k and v share one kernel call, and equal a contiguous input's."""
    config = calibrate(model, method="teal", sparsity=0.5, tokens=random_tokens(4), progress=False)
    h = model.config.hidden_size
    wide = torch.randn(1, 1, 2 * h)
    calls = []

    class Counting:
        def __init__(self, kern):
            self.kern = kern

        def sparse_linear_split(self, *args):
            calls.append(args[0].shape)
            return self.kern.sparse_linear_split(*args)

        def __getattr__(self, name):
            return getattr(self.kern, name)

    with torch.inference_mode(), apply(model, config):
        members = _members(model)
        if members[0]._cpu is None:
            pytest.skip("no C++ compiler here: the kernel could not be built")
        for m in members:
            m._cpu = Counting(m._cpu)
        x = wide[..., ::2]
        assert not x.is_contiguous()
        got = [m(x) for m in members]
        assert len(calls) == 1
        want = [m(x.contiguous()) for m in members]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
