"""Feature reading: streaming top contexts and binned samples equal a brute-force search, the bins'
memory does not grow with the store, the browser's data is safe against hostile dataset text,
Neuronpedia files, and a latent as a steering vector."""

from __future__ import annotations

import json

import pytest
import torch

import actscope
from actscope import SteeringVector
from actscope.sae import ReLUSAE, TopKSAE
from actscope.sae.features import (bin_of, bin_samples, feature_data, sample_keys, top_activations, write_browser,
                                   write_neuronpedia)

SITE = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory):
    model, tok = tiny_llama
    out = tmp_path_factory.mktemp("sae-feat") / "store"
    store = actscope.record(model, tok, str(out), [SITE], seq_len=32, max_tokens=32 * 12, batch_size=4,
                            shard_mb=0.05, dtype="float32", progress=False)
    sae = TopKSAE(k=4, expansion=2, batch_size=64, tokens=640, dead_tokens=200).fit(store, SITE, progress=False)
    return store, sae


def test_streaming_top_contexts_equal_brute_force(setup):
    store, sae = setup
    got = top_activations(sae, store, top=5, batch_size=37)
    x = store.read(SITE)
    keep = torch.arange(len(x)) % store.seq_len != 0
    z = sae.encode(x)
    z[~keep] = 0
    v, i = z.t().topk(5, dim=1)
    torch.testing.assert_close(got["values"], v.clamp_min(0))
    fired = v > 0
    assert torch.equal(got["index"][fired], i[fired]) and (got["index"][~fired] == -1).all()
    assert torch.equal(got["fires"], (z > 0).sum(0))


def _encoded_store(store, sae):
    """Every token's code, zero at the positions the outlier policy drops (position 0 here)."""
    x = store.read(SITE)
    z = sae.encode(x)
    z[torch.arange(len(x)) % store.seq_len == 0] = 0
    return z


def test_bin_samples_equal_a_brute_force_bottom_k(setup):
    store, sae = setup
    maxima = top_activations(sae, store, top=1)["values"][:, 0]
    z = _encoded_store(store, sae)
    torch.testing.assert_close(maxima, z.max(0).values.clamp_min(0))
    bins, per_bin = 3, 4
    got = bin_samples(sae, store, maxima, bins=bins, per_bin=per_bin, seed=7, batch_size=37)
    t, j = (z > 0).nonzero(as_tuple=True)
    b = bin_of(z[t, j], maxima[j], bins)
    keys = sample_keys(t, j, 7)
    assert keys.unique().numel() == keys.numel()
    sampled = 0
    for latent in range(sae.d_sae):
        for bb in range(bins):
            sel = (j == latent) & (b == bb)
            assert int(got["count"][latent, bb]) == int(sel.sum())
            want = t[sel][keys[sel].argsort()[:per_bin]]  # the smallest keys of the bin
            n = want.numel()
            assert torch.equal(got["index"][latent, bb, :n], want) and (got["index"][latent, bb, n:] == -1).all()
            torch.testing.assert_close(got["values"][latent, bb, :n], z[want, latent])
            lo, hi = maxima[latent] * bb / bins, maxima[latent] * (bb + 1) / bins
            assert ((z[want, latent] >= lo * (1 - 1e-6)) & (z[want, latent] <= hi * (1 + 1e-6))).all()
            sampled += n
    assert sampled > sae.d_sae  # the test saw real samples, several bins per latent
    same = bin_samples(sae, store, maxima, bins=bins, per_bin=per_bin, seed=7, batch_size=4096)
    assert torch.equal(same["index"], got["index"])  # independent of the batching
    other = bin_samples(sae, store, maxima, bins=bins, per_bin=per_bin, seed=8, batch_size=37)
    assert not torch.equal(other["index"], got["index"]) and torch.equal(other["count"], got["count"])


def test_bin_memory_does_not_grow_with_the_store(setup):
    store, sae = setup
    maxima = top_activations(sae, store, top=1)["values"][:, 0]
    small = bin_samples(sae, store, maxima, bins=5, per_bin=2, max_tokens=40, batch_size=32)
    full = bin_samples(sae, store, maxima, bins=5, per_bin=2, batch_size=32)
    assert int(small["count"].sum()) < int(full["count"].sum())
    for key in ("values", "index", "count"):
        assert small[key].shape == full[key].shape == (sae.d_sae, 5, 2)[: full[key].dim()]
    with pytest.raises(actscope.ActscopeError, match="bins and per_bin must be positive"):
        bin_samples(sae, store, maxima, bins=0)


def test_browser_and_neuronpedia_files(setup, tiny_llama, tmp_path):
    store, sae = setup
    model, tok = tiny_llama
    records = feature_data(sae, store, tokenizer=tok, model=model, top=3, bins=4, per_bin=2)
    assert len(records) == sae.d_sae and {"max", "density", "contexts", "bins", "nearest", "logits_top"} <= set(records[0])
    busy = max(records, key=lambda r: r["density"])
    assert [b["hi"] for b in busy["bins"]][0] == busy["max"] and sum(b["count"] for b in busy["bins"]) > 0
    assert all(c["value"] <= b["hi"] + 1e-3 for b in busy["bins"] for c in b["contexts"])
    evil = '</script><script>alert(1)</script><!--'
    records[0]["contexts"].append({"value": 9.0, "tokens": ["a", evil], "at": 1})
    records[0]["bins"][0]["contexts"].append({"value": 9.0, "tokens": [evil, "&amp;"], "at": 0})
    page = write_browser(records, tmp_path / "f.html").read_text()
    assert evil not in page and page.count("<script") == 2 and page.count("</script>") == 2
    data = json.loads(page.split('type="application/json">')[1].split("</script>")[0])
    strings, first = data["strings"], data["latents"][0]
    assert [strings[i] for i in first["top"][-1][2]] == ["a", evil]  # the text survives, inert
    assert [strings[i] for i in first["bins"][0]["contexts"][-1][2]] == [evil, "&amp;"]
    paths = write_neuronpedia(records, tmp_path / "np", "tiny", SITE, per_file=50)
    batch = json.loads(paths[0].read_text())
    assert [p.name for p in paths][:2] == ["batch-0.json", "batch-1.json"] and batch[0]["index"] == "0"
    j = busy["latent"]
    exported = json.loads(paths[j // 50].read_text())[j % 50]["activations"]
    top = [a for a in exported if a["binContains"] == -1]
    assert [a["maxValue"] for a in top] == [c["value"] for c in busy["contexts"]]
    assert all(a["binMin"] == -1 and a["binMax"] == busy["max"] for a in top)
    sampled = [a for a in exported if a["binContains"] != -1]
    want = [(b["lo"], b["hi"], c["value"]) for b in busy["bins"] for c in b["contexts"]]
    assert [(a["binMin"], a["binMax"], a["maxValue"]) for a in sampled] == want
    fired = sum(b["count"] for b in busy["bins"])
    shares = {(a["binMin"], a["binContains"]) for a in sampled}
    assert shares == {(b["lo"], b["count"] / fired) for b in busy["bins"] if b["contexts"]}
    assert all(a["binMin"] <= a["maxValue"] <= a["binMax"] + 1e-3 for a in sampled)
    assert all(len(a["values"]) == len(a["tokens"]) and a["values"][a["maxValueTokenIndex"]] == a["maxValue"]
               for a in exported)


def test_steering_vector_from_a_latent(setup):
    store, sae = setup
    vec = SteeringVector.from_sae(sae, 3)
    assert vec.layers == [1]
    torch.testing.assert_close(vec.directions[1], sae.W_dec_[3] / sae.W_dec_[3].norm())
    bad = ReLUSAE().set_fitted(torch.zeros(64, 4), torch.zeros(4), torch.zeros(4, 64), torch.zeros(64),
                               site="blocks.1.mlp.hook_post")
    with pytest.raises(actscope.ActscopeError, match="hook_resid_post"):
        SteeringVector.from_sae(bad, 0)
