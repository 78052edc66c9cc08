"""Sites resolve on every family, hooks leave outputs bit-identical, values are the right ones."""

from __future__ import annotations

import pytest
import torch

import actscope
from actscope import SiteError, SiteMap, SiteNotFiredError
from tiny import FAMILIES, tiny_model


def _out(model, ids, **kw):
    out = model(input_ids=ids, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_leave_outputs_bit_identical(family, ids):
    model = tiny_model(family)
    names = [n for n in SiteMap(model).names if not n.endswith("hook_pattern")]
    with torch.no_grad():
        base = _out(model, ids)
        with actscope.trace(model, names) as cache:
            traced = _out(model, ids)
    assert torch.equal(base, traced)
    assert len(cache) == len(names) and all(cache.count(n) == 1 for n in names)


@pytest.mark.parametrize("family", FAMILIES)
def test_patterns_switch_to_eager_and_back(family, ids, caplog):
    model = tiny_model(family)  # sdpa where the family supports it
    before = model.config._attn_implementation
    eager = tiny_model(family)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        ref = eager(input_ids=ids, output_attentions=True)
        with actscope.trace(model, "blocks.*.attn.hook_pattern") as cache:
            traced = _out(model, ids)
    if before != "eager":
        assert f"switching attention from {before} to eager" in caplog.text
    assert model.config._attn_implementation == before  # restored
    ref_out = ref.logits if hasattr(ref, "logits") else ref.last_hidden_state
    assert torch.equal(traced, ref_out)  # identical to an eager model: nothing else changed
    for layer, attn in enumerate(ref.attentions):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert torch.equal(pattern, attn)
        torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "bert"])
def test_residual_sites_match_hidden_states_and_add_up(family, ids):
    model = tiny_model(family)
    sm = SiteMap(model)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        with actscope.trace(model, "blocks.*.hook_*") as c:
            model(input_ids=ids)
    hs = out.hidden_states
    for layer in range(sm.n_layers):
        b = f"blocks.{layer}."
        assert torch.equal(c[b + "hook_resid_pre"], hs[layer])
        if layer < sm.n_layers - 1:  # HF's last hidden state is after the final norm
            assert torch.equal(c[b + "hook_resid_post"], hs[layer + 1])
        if b + "hook_resid_mid" in sm.sites:
            torch.testing.assert_close(c[b + "hook_resid_mid"], c[b + "hook_resid_pre"] + c[b + "hook_attn_out"])
            torch.testing.assert_close(c[b + "hook_resid_post"], c[b + "hook_resid_mid"] + c[b + "hook_mlp_out"])
        else:  # parallel residual (gpt_neox)
            torch.testing.assert_close(
                c[b + "hook_resid_post"], c[b + "hook_resid_pre"] + c[b + "hook_attn_out"] + c[b + "hook_mlp_out"]
            )


def _independent_qkvz(family, model, resid_pre, layer):
    """Recompute q, k, v from the layer's own weights, outside any hook."""
    if family == "gpt2":
        blk = model.transformer.h[layer]
        q, k, v = blk.attn.c_attn(blk.ln_1(resid_pre)).split(model.config.n_embd, dim=-1)
        return [t.unflatten(-1, (4, 16)) for t in (q, k, v)]
    if family == "gpt_neox":
        blk = model.gpt_neox.layers[layer]
        qkv = blk.attention.query_key_value(blk.input_layernorm(resid_pre)).unflatten(-1, (4, 48))
        return [qkv[..., i * 16 : (i + 1) * 16] for i in range(3)]
    if family == "phi3":
        blk = model.model.layers[layer]
        q, k, v = blk.self_attn.qkv_proj(blk.input_layernorm(resid_pre)).split([64, 64, 64], dim=-1)
        return [t.unflatten(-1, (4, 16)) for t in (q, k, v)]
    blk = model.model.layers[layer]
    x = blk.input_layernorm(resid_pre) if hasattr(blk, "input_layernorm") else resid_pre
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_key_value_heads
    return [
        blk.self_attn.q_proj(x).unflatten(-1, (cfg.num_attention_heads, hd)),
        blk.self_attn.k_proj(x).unflatten(-1, (kv, hd)),
        blk.self_attn.v_proj(x).unflatten(-1, (kv, hd)),
    ]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "olmo2", "phi3", "gpt2", "gpt_neox"])
def test_qkv_and_mlp_sites_equal_independent_computation(family, ids):
    model = tiny_model(family)
    with torch.no_grad(), actscope.trace(model, "blocks.1.**") as c:
        model(input_ids=ids)
    with torch.no_grad():
        q, k, v = _independent_qkvz(family, model, c["blocks.1.hook_resid_pre"], 1)
    torch.testing.assert_close(c["blocks.1.attn.hook_q"], q)
    torch.testing.assert_close(c["blocks.1.attn.hook_k"], k)
    torch.testing.assert_close(c["blocks.1.attn.hook_v"], v)
    z = c["blocks.1.attn.hook_z"]
    assert z.shape[-2:] == q.shape[-2:] or family in {"llama", "qwen3", "gemma2", "olmo2"}
    # hook_post is what the down projection reads: act(gate) * up for gated MLPs
    sm = SiteMap(model)
    down = dict(model.named_modules())[sm.sites["blocks.1.mlp.hook_post"].module_path]
    with torch.no_grad():
        mlp_out = down(c["blocks.1.mlp.hook_post"])
    if family not in {"gemma2", "olmo2", "gpt2", "gpt_neox"}:  # others add a norm/dropout after
        torch.testing.assert_close(mlp_out, c["blocks.1.hook_mlp_out"])


def test_globs_raw_paths_and_order():
    model = tiny_model("llama")
    sm = SiteMap(model)
    sites = sm.resolve(["blocks.*.hook_resid_post", "model.layers.1.mlp.down_proj:input", "hook_embed"])
    assert [s.name for s in sites] == [
        "hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "model.layers.1.mlp.down_proj:input",
    ]
    ids = torch.randint(3, 200, (1, 5))
    mlp = model.model.layers[1].mlp
    mlp_in: list[torch.Tensor] = []  # the MLP's input, caught by a plain torch hook, not by actscope
    handle = mlp.register_forward_pre_hook(lambda module, args: mlp_in.append(args[0].detach().clone()))
    try:
        with torch.no_grad(), actscope.trace(model, sites) as c:
            model(input_ids=ids)
    finally:
        handle.remove()
    with torch.no_grad():  # what the down projection reads, recomputed from the weights
        want = mlp.act_fn(mlp.gate_proj(mlp_in[0])) * mlp.up_proj(mlp_in[0])
    torch.testing.assert_close(c["model.layers.1.mlp.down_proj:input"], want)
    with torch.no_grad(), actscope.trace(model, ["blocks.1.mlp.hook_post"]) as c2:
        model(input_ids=ids)
    assert torch.equal(c["model.layers.1.mlp.down_proj:input"], c2["blocks.1.mlp.hook_post"])


def test_glob_star_stays_within_one_part():
    sm = SiteMap(tiny_model("llama"))
    top = [s.name for s in sm.resolve("blocks.0.hook_*")]
    assert "blocks.0.hook_resid_post" in top and not any("attn." in n for n in top)
    assert len(sm.resolve("**")) == len(sm.names)
    assert [s.name for s in sm.resolve("blocks.?.attn.hook_pattern")] == [
        "blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern",
    ]


def test_unknown_site_lists_closest_names():
    sm = SiteMap(tiny_model("llama"))
    with pytest.raises(SiteError, match=r"closest valid sites: .*blocks\.1\.hook_resid_post"):
        sm.resolve("blocks.1.hook_resid_pots")
    with pytest.raises(SiteError, match="layers 0..1"):
        sm.resolve("blocks.7.hook_resid_post")
    with pytest.raises(SiteError, match="matches no site"):
        sm.resolve("blocks.*.hook_nothing")


def test_family_specific_missing_sites_explain_why():
    with pytest.raises(SiteError, match="parallel residual"):
        SiteMap(tiny_model("gpt_neox")).resolve("blocks.0.hook_resid_mid")
    sm = SiteMap(tiny_model("gpt_neox", use_parallel_residual=False))
    assert "blocks.0.hook_resid_mid" in sm.sites


def test_site_that_never_fires_is_an_error():
    model = tiny_model("llama")
    with pytest.raises(SiteNotFiredError, match="not called"):
        with actscope.trace(model, "blocks.0.hook_resid_post"):
            pass
    # hooks are removed even after the error
    assert not any(m._forward_hooks for m in model.modules())


def test_unknown_family_falls_back_to_layer_discovery(ids):
    model = tiny_model("opt", ffn_dim=96, word_embed_proj_dim=64)
    sm = SiteMap(model)
    assert sm.layers_path == "model.decoder.layers" and sm.n_layers == 2
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with actscope.trace(model, "blocks.*.hook_resid_*") as c:
            traced = model(input_ids=ids).logits
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.equal(base, traced)
    assert torch.equal(c["blocks.1.hook_resid_pre"], hs[1])


def test_cache_keeps_every_call_for_generation():
    model = tiny_model("llama")
    ids = torch.randint(3, 200, (1, 4))
    with torch.no_grad(), actscope.trace(model, "blocks.0.hook_resid_post") as c:
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    steps = c.all("blocks.0.hook_resid_post")
    assert [s.shape[1] for s in steps] == [4, 1, 1]
