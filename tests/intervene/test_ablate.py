"""Ablation: no-op identity, exact zeroing of neurons and heads, mean and resample values."""

from __future__ import annotations

import pytest
import torch

import actscope
from actscope import ablate, site_mean


def test_noop_resample_ablation_is_bit_identical(tiny_llama, ids):
    model, _ = tiny_llama
    with torch.inference_mode(), actscope.trace(model, "blocks.1.mlp.hook_post") as c:
        base = model(input_ids=ids).logits
    own = c["blocks.1.mlp.hook_post"][:, :, [3, 7]]
    with torch.inference_mode(), ablate(model, "blocks.1.mlp.hook_post", units=[3, 7], mode="resample", values=own):
        same = model(input_ids=ids).logits
    assert torch.equal(base, same)


def test_zero_ablation_of_neurons_and_heads(tiny_llama, ids):
    model, _ = tiny_llama
    with torch.inference_mode():
        base = model(input_ids=ids).logits
        with ablate(model, "blocks.0.mlp.hook_post", units=[5, 9]), actscope.trace(model, "blocks.0.mlp.hook_post") as c:
            out = model(input_ids=ids).logits
        a = c["blocks.0.mlp.hook_post"]
        assert torch.equal(a[..., [5, 9]], torch.zeros_like(a[..., [5, 9]])) and a[..., 4].abs().sum() > 0
        assert not torch.equal(base, out)
        with ablate(model, "blocks.1.attn.hook_z", units=[2], positions=[3, 4]), actscope.trace(model, "blocks.1.attn.hook_z") as c:
            model(input_ids=ids)
        z = c["blocks.1.attn.hook_z"]  # [batch, pos, head, d_head]
        assert torch.equal(z[:, [3, 4], 2], torch.zeros_like(z[:, [3, 4], 2]))
        assert z[:, 5, 2].abs().sum() > 0 and z[:, [3, 4], 1].abs().sum() > 0


def test_mean_ablation_uses_the_corpus_mean(tiny_llama, ids):
    model, tok = tiny_llama
    mean = site_mean(model, tok, "blocks.0.hook_mlp_out", seq_len=32, max_tokens=256)
    assert mean.shape == (64,)
    with torch.inference_mode(), ablate(model, "blocks.0.hook_mlp_out", mode="mean", values=mean), \
            actscope.trace(model, "blocks.0.hook_mlp_out") as c:
        model(input_ids=ids)
    assert torch.allclose(c["blocks.0.hook_mlp_out"], mean.expand_as(c["blocks.0.hook_mlp_out"]))


def test_mean_ablation_of_some_heads_takes_a_whole_site_mean(tiny_llama, ids):
    model, tok = tiny_llama
    mean = site_mean(model, tok, "blocks.1.attn.hook_z", seq_len=32, max_tokens=256)
    assert mean.shape == (4, 16)
    with torch.inference_mode(), ablate(model, "blocks.1.attn.hook_z", units=[1, 3], mode="mean", values=mean), \
            actscope.trace(model, "blocks.1.attn.hook_z") as c:
        model(input_ids=ids)
    z = c["blocks.1.attn.hook_z"]
    assert torch.allclose(z[:, :, [1, 3]], mean[[1, 3]].expand_as(z[:, :, [1, 3]]))
    assert not torch.allclose(z[:, :, 0], mean[0].expand_as(z[:, :, 0]))


def test_bad_ablation_input(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(actscope.ActscopeError, match="needs values"):
        with ablate(model, "blocks.0.mlp.hook_post", mode="mean"):
            pass
    with pytest.raises(actscope.SiteError, match="closest valid sites"):
        with ablate(model, "blocks.0.mlp.hook_psot"):
            pass


def test_glob_ablates_every_matching_site(tiny_llama, ids):
    model, _ = tiny_llama
    with torch.inference_mode(), ablate(model, "blocks.*.mlp.hook_post", units=[0, 5]), \
            actscope.trace(model, "blocks.*.mlp.hook_post") as c:
        model(input_ids=ids)
    for layer in (0, 1):
        assert torch.count_nonzero(c[f"blocks.{layer}.mlp.hook_post"][..., [0, 5]]) == 0


def test_zero_ablation_equals_an_independent_hook(tiny_llama, ids):
    """The fused fast path (zero units everywhere) against a hand-written pre-hook."""
    model, _ = tiny_llama
    down = model.get_submodule("model.layers.1.mlp.down_proj")

    def manual(mod, args):
        x = args[0].clone()
        x[..., [3, 7, 11]] = 0
        return (x,)

    with torch.inference_mode():
        h = down.register_forward_pre_hook(manual)
        try:
            want = model(input_ids=ids).logits
        finally:
            h.remove()
        with ablate(model, "blocks.1.mlp.hook_post", units=[3, 7, 11]):
            got = model(input_ids=ids).logits
    assert torch.equal(got, want)


def test_site_mean_equals_an_independent_mean(tiny_llama):
    from actscope.data import load_tokens

    model, tok = tiny_llama
    got = site_mean(model, tok, "blocks.0.hook_mlp_out", seq_len=32, max_tokens=256, batch_size=3)
    tokens = load_tokens(None, tok, 32, 256)
    rows = []
    with torch.inference_mode(), actscope.trace(model, "blocks.0.hook_mlp_out") as c:
        for batch in tokens.batches(5):
            model(input_ids=batch, use_cache=False)
            rows.append(c["blocks.0.hook_mlp_out"].double().flatten(0, 1))
    torch.testing.assert_close(got, torch.cat(rows).mean(0).float(), rtol=1e-5, atol=1e-6)
