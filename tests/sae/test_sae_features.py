"""Feature reading: streaming top contexts equal a brute-force search, the browser is safe against
hostile dataset text, Neuronpedia files, and a latent as a steering vector."""

from __future__ import annotations

import json

import pytest
import torch

import actscope
from actscope import SteeringVector
from actscope.sae import ReLUSAE, TopKSAE
from actscope.sae.features import feature_data, top_activations, write_browser, write_neuronpedia

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


def test_browser_and_neuronpedia_files(setup, tiny_llama, tmp_path):
    store, sae = setup
    model, tok = tiny_llama
    records = feature_data(sae, store, tokenizer=tok, model=model, top=3)
    assert len(records) == sae.d_sae and {"density", "contexts", "nearest", "logits_top"} <= set(records[0])
    evil = '</script><script>alert(1)</script><!--'
    records[0]["contexts"].append({"value": 9.0, "tokens": ["a", evil], "at": 1})
    page = write_browser(records, tmp_path / "f.html").read_text()
    assert evil not in page and page.count("<script") == 2 and page.count("</script>") == 2
    data = page.split('type="application/json">')[1].split("</script>")[0]
    assert json.loads(data)["latents"][0]["contexts"][-1]["tokens"][1] == evil  # the text survives, inert
    paths = write_neuronpedia(records, tmp_path / "np", "tiny", SITE, per_file=50)
    batch = json.loads(paths[0].read_text())
    assert [p.name for p in paths][:2] == ["batch-0.json", "batch-1.json"] and batch[0]["index"] == "0"


def test_steering_vector_from_a_latent(setup):
    store, sae = setup
    vec = SteeringVector.from_sae(sae, 3)
    assert vec.layers == [1]
    torch.testing.assert_close(vec.directions[1], sae.W_dec_[3] / sae.W_dec_[3].norm())
    bad = ReLUSAE().set_fitted(torch.zeros(64, 4), torch.zeros(4), torch.zeros(4, 64), torch.zeros(64),
                               site="blocks.1.mlp.hook_post")
    with pytest.raises(actscope.ActscopeError, match="hook_resid_post"):
        SteeringVector.from_sae(bad, 0)
