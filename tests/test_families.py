"""The family table is the one place that knows an architecture: sites, sparsification layout,
MoE router and residual readers all come from it, and ``register_family`` adds one in one call."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny import VOCAB, random_tokens, tiny_model
from transformers.pytorch_utils import Conv1D

import actscope
from actscope import ActscopeError, SiteMap, register_family, route_experts
from actscope.families import FAMILIES, LLAMA, MIXTRAL, Linears, linear_weight
from actscope.sparsify import SparseLinear, apply, calibrate
from actscope.sparsify.layout import layer_modules
from actscope.intervene.subspace import _readers, null_fraction

CLEAN = "the value of the list"
CORRUPT = "the value of the dict"


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, 5] - logits[:, 9]


def _relative(paths: list[str], base: str) -> list[str]:
    return [p.removeprefix(base) for p in paths]


# --- register_family ------------------------------------------------------------------------------
@pytest.fixture
def registered():
    """Model types registered by a test, removed again afterwards."""
    added: list[str] = []
    yield added
    for model_type in added:
        FAMILIES.pop(model_type, None)


def test_register_family_gives_sites_layout_and_readers(registered, tiny_tokenizer):
    reference = tiny_model("llama")
    model = tiny_model("llama")  # same weights, under a model type actscope has never heard of
    model.config.model_type = "my_llama"
    unknown = SiteMap(model)  # the class, not the cached map: this one is thrown away
    assert "blocks.0.mlp.hook_post" not in unknown.sites  # the fallback knows only layer boundaries
    with pytest.raises(actscope.ActscopeError, match="no layout for model type 'my_llama'"):
        layer_modules(model)

    register_family("my_llama", replace(LLAMA))
    registered.append("my_llama")
    assert SiteMap(model).names == SiteMap(reference).names
    assert layer_modules(model) == layer_modules(reference)
    sm = SiteMap(model)
    (site,) = sm.resolve(["blocks.0.hook_resid_pre"])
    assert torch.equal(_readers(model, site, sm), _readers(reference, site, SiteMap(reference)))
    config = calibrate(model, method="teal", sparsity=0.5, tokens=random_tokens(4, seq_len=16), progress=False)
    with torch.inference_mode(), apply(model, config) as handle:
        model(input_ids=random_tokens(2, seq_len=16, seed=1).input_ids)
        assert 0.3 < handle.achieved()["overall"] < 0.7
    res = actscope.subspace_patch(model, tiny_tokenizer, CLEAN, CORRUPT, "blocks.1.hook_resid_pre", torch.eye(64),
                                  metric=_metric)
    assert max(res["null_fraction"]) < 1e-4  # q/k/v/gate/up of a random model see every direction


def test_register_family_gives_a_router(registered):
    model = tiny_model("mixtral", num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2)
    model.config.model_type = "my_moe"
    with pytest.raises(ActscopeError, match="support mixtral"):
        with route_experts(model, disable=[0]):
            pass
    register_family("my_moe", replace(MIXTRAL))
    registered.append("my_moe")
    ids = torch.randint(3, VOCAB, (1, 5))
    seen = []
    experts = model.get_submodule("model.layers.0.mlp.experts")
    h = experts.register_forward_pre_hook(lambda m, a: seen.append(a[1].clone()))
    try:
        with torch.inference_mode(), route_experts(model, disable={0: [1]}):
            model(ids)
    finally:
        h.remove()
    assert seen and not (seen[0] == 1).any()


def test_register_family_refuses_malformed_entries():
    with pytest.raises(ActscopeError, match="needs an actscope.families.Family"):
        register_family("x", {"layers": "model.layers"})  # type: ignore[arg-type]
    bad = replace(LLAMA, linears=Linears({"attn_in": ("self_attn.q_proj",)}, "mlp.act_fn", "self_attn.q_proj"))
    with pytest.raises(ActscopeError, match="must name exactly attn_in, attn_out, mlp_in, mlp_out"):
        register_family("x", bad)
    assert "x" not in FAMILIES


# --- GPT-2: Conv1D stores [in, out] ----------------------------------------------------------------
def test_gpt2_residual_readers_are_its_conv1d_layers_read_the_right_way_round(tiny_tokenizer):
    model = tiny_model("gpt2")
    sm = SiteMap(model)
    (site,) = sm.resolve(["blocks.0.hook_resid_post"])
    blk = model.transformer.h[1]  # resid_post of layer 0 is read by layer 1
    assert isinstance(blk.attn.c_attn, Conv1D)
    want = torch.cat([blk.attn.c_attn.weight.T, blk.mlp.c_fc.weight.T])  # [out, in] = [192 + 256, 64]
    torch.testing.assert_close(_readers(model, site, sm), want)
    # the full space patches like ordinary patching; the readers see all of it
    full = actscope.subspace_patch(model, tiny_tokenizer, CLEAN, CORRUPT, "blocks.1.hook_resid_pre", torch.eye(64),
                                   positions=[4], metric=_metric)
    ordinary = actscope.patch(model, tiny_tokenizer, CLEAN, CORRUPT, sites=["blocks.1.hook_resid_pre"], positions=[4],
                              metric=_metric)
    assert full["metric_patched"] == pytest.approx(float(ordinary.patched[0, 0]), abs=1e-4)
    assert max(full["null_fraction"]) < 1e-4
    # mlp.hook_post is read by c_proj, 256 -> 64 dims: a random direction is about three quarters unseen
    post = actscope.subspace_patch(model, tiny_tokenizer, CLEAN, CORRUPT, "blocks.0.mlp.hook_post",
                                   torch.randn(256, 2, generator=torch.Generator().manual_seed(0)), metric=_metric)
    assert all(0.5 < f < 0.95 for f in post["null_fraction"])


def test_gpt2_sparse_linear_equals_conv1d_on_the_kept_inputs():
    conv = tiny_model("gpt2").transformer.h[0].mlp.c_fc  # Conv1D(nf=256, nx=64)
    assert torch.equal(linear_weight(conv), conv.weight.T)
    sparse = SparseLinear(conv, torch.tensor([0.5]))
    assert (sparse.in_features, sparse.out_features) == (64, 256) and sparse.weight is conv.weight
    for rows in (1, 3, 40):  # the sparse kernel (few rows) and the masked dense path
        x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
        with torch.inference_mode():
            got = sparse(x)
            want = conv(x * (x.abs() > 0.5))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["teal", "wina", "cats", "chess"])
def test_gpt2_sparsifies_to_the_target(method):
    model = tiny_model("gpt2")
    lm = layer_modules(model)[0]
    assert lm.groups["mlp_in"] == ("transformer.h.0.mlp.c_fc",) and lm.act == "transformer.h.0.mlp.act"
    config = calibrate(model, method=method, sparsity=0.5, tokens=random_tokens(16, seed=1), progress=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode(), apply(model, config) as handle:
        for b in random_tokens(8, seed=2).batches(4):
            model(input_ids=b, use_cache=False)
        got = handle.achieved()["overall"]
        inside = model.state_dict()
    assert abs(got - 0.5) < 0.05, got
    assert inside.keys() == state.keys() and all(torch.equal(inside[k], state[k]) for k in state)


@pytest.mark.parametrize("method", ["topk", "coreinfer"])
def test_gpt2_generates_with_mlp_activation_sparsity(method):
    model = tiny_model("gpt2")
    config = calibrate(model, method=method, sparsity=0.5, progress=False)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.inference_mode(), apply(model, config) as handle:
        out = model.generate(ids, **kw)
        got = handle.achieved()["overall"]  # the share of c_proj inputs that were zero
    assert out.shape == (2, 11) and 0.1 < got <= 0.55, got


# --- attention.dense reads z, not the residual -----------------------------------------------------
@pytest.mark.parametrize("family, z_reader, readers", [
    ("gpt_neox", "attention.dense", ["attention.query_key_value", "mlp.dense_h_to_4h"]),
    ("bert", "attention.output.dense",
     ["attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense"]),
])
def test_output_projection_is_not_a_residual_reader(family, z_reader, readers):
    model = tiny_model(family)
    sm = SiteMap(model)
    base = f"{sm.layers_path}.0."
    # the residual's first 8 dims: no reader of the residual sees them, only the z reader's weights touch them
    with torch.no_grad():
        for path in readers:
            model.get_submodule(base + path).weight[:, :8] = 0
        assert model.get_submodule(base + z_reader).weight[:, :8].abs().sum() > 0
    (site,) = sm.resolve(["blocks.0.hook_resid_pre"])
    rows = _readers(model, site, sm)
    want = torch.cat([model.get_submodule(base + p).weight for p in readers])
    torch.testing.assert_close(rows, want)  # exactly the residual readers, the z reader not among them
    unseen = torch.eye(64)[:, :8]
    torch.testing.assert_close(null_fraction(rows, unseen), torch.ones(8))


# --- smollm3: llama-like names, NoPE on some layers --------------------------------------------------
def test_smollm3_has_every_llama_site_and_a_layout(ids):
    model = tiny_model("smollm3")
    assert model.config.no_rope_layers == [1, 0]  # layer 1 skips RoPE
    sm = SiteMap(model)
    assert sm.names == SiteMap(tiny_model("llama")).names and not sm.missing
    with torch.no_grad(), actscope.trace(model, "blocks.1.attn.hook_q") as c:
        out = model(input_ids=ids, output_hidden_states=True)
    blk = model.model.layers[1]
    with torch.no_grad():
        want = blk.self_attn.q_proj(blk.input_layernorm(out.hidden_states[1])).unflatten(-1, (4, 16))
    torch.testing.assert_close(c["blocks.1.attn.hook_q"], want)
    base = "model.layers.1."
    assert _relative(list(layer_modules(model)[1].groups["attn_in"]), base) == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
