"""Activation patching: the fast sweep equals the naive per-cell loop; no-ops are identities."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import actscope
from conftest import require_peer
from actscope.intervene.patch import _patch_hooks, make_metric, patch
from actscope.sites import SiteMap

CLEAN = "the value of the list"
CORRUPT = "the value of the dict"


def _metric(logits):
    return logits[:, 5] - logits[:, 9]


@pytest.mark.parametrize("sites", ["resid_pre", "attn_out", ["blocks.1.mlp.hook_post", "blocks.0.hook_resid_post"]])
def test_fast_sweep_equals_naive_loop(tiny_llama, sites):
    model, tok = tiny_llama
    fast = patch(model, tok, CLEAN, CORRUPT, sites=sites, metric=_metric)
    naive = patch(model, tok, CLEAN, CORRUPT, sites=sites, metric=_metric, method="naive")
    assert fast.sites == naive.sites and fast.positions == naive.positions
    torch.testing.assert_close(fast.patched, naive.patched, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.effect, naive.effect, rtol=1e-4, atol=1e-4)


def test_patching_everything_at_the_first_layer_restores_clean(tiny_llama):
    model, tok = tiny_llama
    res = patch(model, tok, CLEAN, CORRUPT, sites="resid_pre", metric=_metric)
    # all positions differing between the prompts are patched only one at a time, but layer 0
    # positions that are equal in both prompts change nothing
    same = [p for p, (a, b) in enumerate(zip(tok(CLEAN).input_ids, tok(CORRUPT).input_ids)) if a == b]
    for p in same:
        assert abs(float(res.patched[0, res.positions.index(p)]) - res.corrupted) < 1e-5


def test_noop_patch_is_bit_identical(tiny_llama):
    model, tok = tiny_llama
    ids = tok(CORRUPT, return_tensors="pt").input_ids
    site = SiteMap(model).resolve("blocks.1.hook_resid_pre")
    with torch.inference_mode(), actscope.trace(model, site) as c:
        base = model(input_ids=ids).logits
    own = c["blocks.1.hook_resid_pre"][0, 2]
    with torch.inference_mode(), _patch_hooks(model, site, [None], 2, [own]):
        same = model(input_ids=ids).logits
    assert torch.equal(base, same)


def test_alignment_lengths_and_outputs(tiny_llama, tmp_path):
    model, tok = tiny_llama
    with pytest.raises(actscope.ActscopeError, match="differ in length"):
        patch(model, tok, CLEAN + " again", CORRUPT, metric=_metric)
    n = len(tok(CORRUPT).input_ids)
    res = patch(model, tok, "x " + CLEAN, CORRUPT, metric=_metric,
                alignment={p: p + (len(tok("x " + CLEAN).input_ids) - n) for p in range(n)})
    assert res.effect.shape == (2, n)
    res.save(tmp_path)
    data = json.loads((tmp_path / "effects.json").read_text())
    assert set(data) >= {"sites", "positions", "tokens", "effect"} and len(data["effect"]) == 2
    assert (tmp_path / "effects.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(actscope.ActscopeError, match="needs a foil"):  # the metric itself still needs one
        make_metric(tok, "logit_diff", " value", None)
    assert patch(model, tok, CLEAN, CORRUPT, target=" value").foil  # patch() picks the corrupted run's top token
    with pytest.raises(actscope.ActscopeError, match="attention patterns cannot be patched"):
        patch(model, tok, CLEAN, CORRUPT, sites=["blocks.0.attn.hook_pattern"], metric=_metric)
    with pytest.raises(actscope.ActscopeError, match="heads= needs per-head sites"):
        patch(model, tok, CLEAN, CORRUPT, sites="resid_pre", heads=[0], metric=_metric)


def test_per_head_patching_fast_equals_naive_and_heads_add_up(tiny_llama):
    model, tok = tiny_llama
    sites = "blocks.*.attn.hook_z"
    fast = patch(model, tok, CLEAN, CORRUPT, sites=sites, heads=[0, 1, 2, 3], metric=_metric)
    naive = patch(model, tok, CLEAN, CORRUPT, sites=sites, heads=[0, 1, 2, 3], metric=_metric, method="naive")
    assert fast.sites[:2] == ["blocks.0.attn.hook_z[head 0]", "blocks.0.attn.hook_z[head 1]"]
    torch.testing.assert_close(fast.patched, naive.patched, rtol=1e-4, atol=1e-5)
    whole = patch(model, tok, CLEAN, CORRUPT, sites=["blocks.1.attn.hook_z"], metric=_metric)
    # patching all heads of a layer at once equals patching its attention output
    attn = patch(model, tok, CLEAN, CORRUPT, sites=["blocks.1.hook_attn_out"], metric=_metric)
    torch.testing.assert_close(whole.patched, attn.patched, rtol=1e-4, atol=1e-5)


def test_kl_metric_is_zero_for_the_clean_run(tiny_llama):
    model, tok = tiny_llama
    res = patch(model, tok, CLEAN, CORRUPT, sites="resid_post", metric="kl")
    assert res.clean == 0.0 and res.corrupted < 0
    # the last layer's output at the last position is the final residual: patching it restores
    # the clean distribution exactly
    assert float(res.effect[-1, -1]) == pytest.approx(1.0, abs=1e-4)


def test_patching_equals_nnsight(tiny_llama):
    """The fast sweep equals a per-cell patching loop written in nnsight (the real package)."""
    nnsight = require_peer("nnsight")
    import warnings

    model, tok = tiny_llama
    warnings.simplefilter("ignore")
    lm = nnsight.LanguageModel(model, tokenizer=copy.deepcopy(tok))  # nnsight sets padding_side on its tokenizer
    clean_ids = tok(CLEAN, return_tensors="pt").input_ids
    corrupt_ids = tok(CORRUPT, return_tensors="pt").input_ids
    ours = patch(model, tok, CLEAN, CORRUPT, metric=_metric)
    clean_h = []
    with torch.inference_mode():
        with lm.trace(clean_ids):
            for layer in range(2):
                clean_h.append(lm.model.layers[layer].input.save())
        for layer in range(2):
            for j, p in enumerate(ours.positions):
                with lm.trace(corrupt_ids):
                    lm.model.layers[layer].input[:, p] = clean_h[layer][:, p]
                    logits = lm.lm_head.output[:, -1].save()
                assert abs(float(_metric(logits)[0]) - float(ours.patched[layer, j])) < 1e-4
