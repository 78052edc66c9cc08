"""Metrics, the default foil and prompt pairs mean the same thing in every intervention."""

from __future__ import annotations

import math

import pytest
import torch

import actscope
from actscope.intervene.metrics import measure, normalised
from actscope.intervene.prompts import encode_batch, encode_pair
from actscope.intervene.sites import SHORT_SITES, resolve, shorthands
from actscope.sites import site_map

CLEAN = "the value of the list"
CORRUPT = "the value of the dict"


def test_default_foil_is_the_corrupted_runs_top_token_everywhere(tiny_llama):
    model, tok = tiny_llama
    with torch.inference_mode():
        top = int(model(input_ids=tok(CORRUPT, return_tensors="pt").input_ids).logits[0, -1].argmax())
    want = tok.decode([top])
    site = "blocks.1.hook_resid_pre"
    patched = actscope.patch(model, tok, CLEAN, CORRUPT, sites=[site], target=" value")
    attr = actscope.attribution_patch(model, tok, CLEAN, CORRUPT, sites=[site], target=" value", check=False)
    sub = actscope.subspace_patch(model, tok, CLEAN, CORRUPT, site, torch.eye(64), target=" value")
    assert patched.foil == attr.estimate.foil == sub.foil == want
    given = actscope.patch(model, tok, CLEAN, CORRUPT, sites=[site], target=" value", foil=top)
    torch.testing.assert_close(given.patched, patched.patched)
    # the full-space subspace patch at every position is ordinary patching of the whole site
    assert sub.metric_patched == pytest.approx(patched.clean, abs=1e-4)


def test_measure_asks_for_the_corrupted_logits_only_when_it_needs_them(tiny_tokenizer):
    calls = []

    def corrupt():
        calls.append(1)
        return torch.tensor([[0.0, 3.0, 1.0]])

    m = measure(tiny_tokenizer, "logit_diff", target=2, foil=None, clean_logits=None, corrupt_logits=corrupt)
    assert calls == [1] and float(m(torch.tensor([[0.0, 1.0, 5.0]]))[0]) == 4.0  # target 2 minus foil 1
    m = measure(tiny_tokenizer, "prob", target=2, foil=None, clean_logits=None, corrupt_logits=corrupt)
    assert calls == [1] and m.foil is None
    assert measure(tiny_tokenizer, lambda lg: lg[:, 0], target=None, foil=None, clean_logits=None).foil is None


def test_normalised_effect():
    assert torch.equal(normalised(torch.tensor([0.0, 1.0, 2.0]), 2.0, 0.0), torch.tensor([0.0, 0.5, 1.0]))
    assert math.isnan(float(normalised(torch.tensor([1.0]), 1.0, 1.0)[0]))  # clean equals corrupted: undefined


def test_prompt_pairs_of_different_lengths_are_refused_alike(tiny_llama):
    model, tok = tiny_llama
    longer = CLEAN + " again"
    for call, what in [
        (lambda: actscope.attribution_patch(model, tok, longer, CORRUPT, metric=lambda lg: lg[:, 0]), "attribution"),
        (lambda: actscope.subspace_patch(model, tok, longer, CORRUPT, "blocks.1.hook_resid_pre", torch.eye(64),
                                         metric=lambda lg: lg[:, 0]), "subspace"),
    ]:
        with pytest.raises(actscope.ActscopeError, match=rf"differ in length; {what} patching needs prompts of the same"):
            call()
    with pytest.raises(actscope.ActscopeError, match="differ in length; pass alignment="):
        actscope.patch(model, tok, longer, CORRUPT, metric=lambda lg: lg[:, 0])
    a, b = encode_pair(tok, CLEAN, CORRUPT, "cpu", what="x")
    assert a.shape == b.shape


def test_encode_batch_pads_right_and_leaves_the_tokenizer_alone(tiny_tokenizer):
    enc = encode_batch(tiny_tokenizer, ["a", "a much longer text"], "cpu")
    mask = enc["attention_mask"]
    assert mask[0, 0] == 1 and mask[0, -1] == 0  # padding after the text
    assert tiny_tokenizer.padding_side == "right"


def test_one_vocabulary_of_site_shorthands(tiny_llama):
    model, _ = tiny_llama
    sm = site_map(model)
    assert [s.name for s in resolve(sm, "mlp_out")] == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
    assert [s.name for s in resolve(sm, ["resid_post", "blocks.0.attn.hook_z"])][-1] == "blocks.1.hook_resid_post"
    assert set(SHORT_SITES) >= {"resid_pre", "resid_post", "attn_out", "mlp_out"}
    assert all(name in shorthands() for name in SHORT_SITES)
    with pytest.raises(actscope.ActscopeError, match="attention patterns cannot be patched"):
        resolve(sm, "blocks.0.attn.hook_pattern")
