"""Subspace patching: the full space equals ordinary patching, the empty patch is a no-op, and
the null-space check measures what the next reader cannot see."""

from __future__ import annotations

import pytest
import torch

import actscope
from actscope.intervene.subspace import null_fraction

CLEAN = "the value of the list"
CORRUPT = "the value of the dict"


def _metric(logits):
    return logits[:, 5] - logits[:, 9]


def test_full_subspace_equals_ordinary_patching(tiny_llama):
    model, tok = tiny_llama
    full = actscope.subspace_patch(model, tok, CLEAN, CORRUPT, "blocks.1.hook_resid_pre", torch.eye(64),
                                   positions=[4], metric=_metric)
    ordinary = actscope.patch(model, tok, CLEAN, CORRUPT, sites=["blocks.1.hook_resid_pre"], positions=[4], metric=_metric)
    assert full["metric_patched"] == pytest.approx(float(ordinary.patched[0, 0]), abs=1e-4)


def test_subspace_without_difference_changes_nothing(tiny_llama):
    model, tok = tiny_llama
    res = actscope.subspace_patch(model, tok, CORRUPT, CORRUPT, "blocks.0.mlp.hook_post", torch.randn(96, 3),
                                  metric=_metric)
    assert res["metric_patched"] == res["metric_corrupted"]


def test_null_fraction_detects_unread_directions(tiny_llama):
    readers = torch.zeros(3, 5)
    readers[0, 0] = readers[1, 1] = readers[2, 2] = 1.0  # dims 3 and 4 are never read
    dirs = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 0, 1.0, 0], [1.0, 0, 0, 1.0, 0]]).T
    torch.testing.assert_close(null_fraction(readers, dirs), torch.tensor([0.0, 1.0, 0.5]))
    model, tok = tiny_llama
    res = actscope.subspace_patch(model, tok, CLEAN, CORRUPT, "blocks.0.mlp.hook_post", torch.randn(96, 2),
                                  metric=_metric)
    # the down projection maps 96 -> 64 dims: a random direction is about a third unseen
    assert all(0.1 < f < 0.6 for f in res["null_fraction"])
    with pytest.raises(actscope.ActscopeError, match="directions have 10 dims"):
        actscope.subspace_patch(model, tok, CLEAN, CORRUPT, "blocks.0.mlp.hook_post", torch.randn(10, 1), metric=_metric)


def _minus_kl_to_clean(model, tok, text):
    """-KL(p_clean || p_text) at the last position, computed here with torch's own kl_div."""
    with torch.inference_mode():
        logp = [torch.log_softmax(model(input_ids=tok(t, return_tensors="pt").input_ids).logits[0, -1].float(), -1)
                for t in (CLEAN, text)]
    return -float(torch.nn.functional.kl_div(logp[1], logp[0], log_target=True, reduction="sum"))


def test_kl_metric_matches_patch_and_an_independent_kl(tiny_llama):
    model, tok = tiny_llama
    res = actscope.subspace_patch(model, tok, CLEAN, CORRUPT, "blocks.1.hook_resid_pre", torch.eye(64),
                                  positions=[4], metric="kl")
    assert res["metric_clean"] == pytest.approx(0.0, abs=1e-6)
    want = _minus_kl_to_clean(model, tok, CORRUPT)
    assert want < -1e-4 and res["metric_corrupted"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    ordinary = actscope.patch(model, tok, CLEAN, CORRUPT, sites=["blocks.1.hook_resid_pre"], positions=[4], metric="kl")
    assert res["metric_patched"] == pytest.approx(float(ordinary.patched[0, 0]), abs=1e-5)
