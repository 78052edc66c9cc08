"""Attribution patching: the estimate is the gradient of the same metric that patch() measures."""

from __future__ import annotations

import pytest
import torch

import actscope
from actscope.intervene.patch import _patch_hooks, patch
from actscope.sites import SiteMap

CLEAN = "the value of the list"
CORRUPT = "the value of the dict"


def _metric(logits):
    return logits[:, 5] - logits[:, 9]


def test_attribution_equals_a_finite_difference_and_reports_correlation(tiny_llama):
    model, tok = tiny_llama
    res = actscope.attribution_patch(model, tok, CLEAN, CORRUPT, sites="resid_pre", metric=_metric)
    assert res.actual is not None and -1 <= res.correlation <= 1
    assert res.estimate.effect.shape == res.actual.effect.shape
    # independent check: the directional derivative by central differences at one cell
    site = SiteMap(model).resolve("blocks.1.hook_resid_pre")
    ids_c, ids_x = tok(CLEAN, return_tensors="pt").input_ids, tok(CORRUPT, return_tensors="pt").input_ids
    with torch.inference_mode(), actscope.trace(model, site) as c:
        model(input_ids=ids_c)
        model(input_ids=ids_x)
    clean_a, corrupt_a = (v[0, 4] for v in c.all("blocks.1.hook_resid_pre"))
    eps = 1e-2

    def at(e):
        value = corrupt_a + e * (clean_a - corrupt_a)
        with torch.inference_mode(), _patch_hooks(model, site, [None], 4, [value]):
            return float(_metric(model(input_ids=ids_x).logits[:, -1])[0])

    fd = (at(eps) - at(-eps)) / (2 * eps)
    assert float(res.estimate.patched[1, 4]) - res.estimate.corrupted == pytest.approx(fd, rel=2e-2, abs=1e-4)


def test_attribution_kl_metric_means_what_patch_means(tiny_llama):
    model, tok = tiny_llama
    res = actscope.attribution_patch(model, tok, CLEAN, CORRUPT, sites="resid_pre", metric="kl")
    ordinary = patch(model, tok, CLEAN, CORRUPT, sites="resid_pre", metric="kl")
    with torch.inference_mode():
        logp = [torch.log_softmax(model(input_ids=tok(t, return_tensors="pt").input_ids).logits[0, -1].float(), -1)
                for t in (CLEAN, CORRUPT)]
    want = -float(torch.nn.functional.kl_div(logp[1], logp[0], log_target=True, reduction="sum"))
    assert res.estimate.clean == pytest.approx(0.0, abs=1e-6) and want < -1e-4
    assert res.estimate.corrupted == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert res.actual is not None
    torch.testing.assert_close(res.actual.patched, ordinary.patched, rtol=1e-4, atol=1e-6)
    # the estimate is the gradient of the same -KL: central differences at one cell agree
    site = SiteMap(model).resolve("blocks.1.hook_resid_pre")
    ids_c, ids_x = tok(CLEAN, return_tensors="pt").input_ids, tok(CORRUPT, return_tensors="pt").input_ids
    with torch.inference_mode(), actscope.trace(model, site) as c:
        model(input_ids=ids_c)
        model(input_ids=ids_x)
    clean_a, corrupt_a = (v[0, 4] for v in c.all("blocks.1.hook_resid_pre"))

    def at(e: float) -> float:
        value = corrupt_a + e * (clean_a - corrupt_a)
        with torch.inference_mode(), _patch_hooks(model, site, [None], 4, [value]):
            p = torch.log_softmax(model(input_ids=ids_x).logits[0, -1].float(), -1)
        return -float(torch.nn.functional.kl_div(p, logp[0], log_target=True, reduction="sum"))

    eps = 1e-2
    fd = (at(eps) - at(-eps)) / (2 * eps)
    assert float(res.estimate.patched[1, 4]) - res.estimate.corrupted == pytest.approx(fd, rel=2e-2, abs=1e-5)
