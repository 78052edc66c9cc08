"""Steering vectors: exact extraction, no-op identity, correct positions with a KV cache, I/O."""

from __future__ import annotations

import pytest
import torch

import actscope
from conftest import require_peer
from actscope import SteeringVector, steering_vector
from actscope.intervene.steer import ablate_direction
from actscope.intervene.steer_effects import calibrate_scale, kl_steered, steering_effect

POS = ["I love this, it is wonderful", "What a great and happy day", "This is excellent work"]
NEG = ["I hate this, it is awful", "What a terrible and sad day", "This is dreadful work"]


def _last_resid(model, tok, texts, layer):
    out = []
    for t in texts:
        ids = tok(t, return_tensors="pt").input_ids
        with torch.inference_mode(), actscope.trace(model, f"blocks.{layer}.hook_resid_post") as c:
            model(input_ids=ids)
        out.append(c[f"blocks.{layer}.hook_resid_post"][0, -1].double())
    return torch.stack(out)


def test_mean_diff_equals_independent_computation(tiny_llama):
    model, tok = tiny_llama
    vec = steering_vector(model, tok, POS, NEG, layers=[0, 1], batch_size=2)
    for l in (0, 1):
        want = _last_resid(model, tok, POS, l).mean(0) - _last_resid(model, tok, NEG, l).mean(0)
        torch.testing.assert_close(vec.directions[l].double(), want, rtol=1e-4, atol=1e-5)


def test_pca_equals_first_component_of_centred_differences(tiny_llama):
    model, tok = tiny_llama
    vec = steering_vector(model, tok, POS, NEG, layers=[1], method="pca", batch_size=2)
    d = _last_resid(model, tok, POS, 1) - _last_resid(model, tok, NEG, 1)
    _, _, v = torch.linalg.svd(d - d.mean(0), full_matrices=False)
    pc = v[0] if v[0] @ d.mean(0) >= 0 else -v[0]
    assert float(torch.nn.functional.cosine_similarity(vec.directions[1].double(), pc, dim=0)) > 0.9999


def test_noop_steering_is_bit_identical(tiny_llama, ids):
    model, _ = tiny_llama
    vec = SteeringVector({0: torch.randn(64), 1: torch.zeros(64)})
    with torch.inference_mode():
        base = model(input_ids=ids).logits
        with vec.apply(model, scale=0.0):
            same = model(input_ids=ids).logits
        with SteeringVector({1: torch.zeros(64)}).apply(model, scale=3.0):
            zero = model(input_ids=ids).logits
    assert torch.equal(base, same) and torch.equal(base, zero)


def test_steering_adds_the_vector_at_the_layer(tiny_llama, ids):
    model, _ = tiny_llama
    v = torch.randn(64)
    with torch.inference_mode(), actscope.trace(model, "blocks.0.hook_resid_post") as c:
        model(input_ids=ids)
        with SteeringVector({0: v}).apply(model, scale=2.5, layer_weights={0: 0.5}):
            model(input_ids=ids)
    plain, steered = c.all("blocks.0.hook_resid_post")
    torch.testing.assert_close(steered - plain, (1.25 * v).expand_as(plain), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_generation_with_cache_equals_without_cache_left_padded(tiny_llama, positions):
    model, tok = tiny_llama
    vec = SteeringVector({0: torch.randn(64) * 3, 1: torch.randn(64) * 3})
    # padding_side per call: the tokenizer is a session fixture, and setting it would left-pad later tests
    enc = tok(["a short one", "a much longer prompt than the other one"], return_tensors="pt", padding=True,
              padding_side="left")
    assert enc["attention_mask"][0, 0] == 0 and tok.padding_side == "right"
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        plain = model.generate(**enc, **kw)
        with vec.apply(model, 4.0, positions=positions):
            cached = model.generate(**enc, **kw, use_cache=True)
        with vec.apply(model, 4.0, positions=positions):
            uncached = model.generate(**enc, **kw, use_cache=False)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain)
    if positions == "generated":  # the first new token comes from unsteered prompt positions
        n = enc["input_ids"].shape[1]
        assert torch.equal(cached[:, n], plain[:, n])


def test_direction_ablation_removes_the_component(tiny_llama, ids):
    model, _ = tiny_llama
    r = torch.randn(64)
    with torch.inference_mode(), ablate_direction(model, r), actscope.trace(model, "blocks.*.hook_resid_post") as c:
        model(input_ids=ids)
    unit = r / r.norm()
    for l in range(2):
        assert float((c[f"blocks.{l}.hook_resid_post"] @ unit).abs().max()) < 1e-4


def test_save_load_safetensors_and_gguf(tiny_llama, tmp_path):
    model, tok = tiny_llama
    vec = steering_vector(model, tok, POS, NEG, layers=[0, 1])
    vec.save_pretrained(tmp_path / "vec")
    back = SteeringVector.from_pretrained(tmp_path / "vec")
    gg = SteeringVector.from_gguf(vec.to_gguf(tmp_path / "vec.gguf"))
    for l in (0, 1):
        assert torch.equal(back.directions[l], vec.directions[l])
        assert torch.equal(gg.directions[l], vec.directions[l])
    assert gg.model_type == "llama"
    with pytest.raises(actscope.ActscopeError, match="not a saved steering vector"):
        SteeringVector.from_pretrained(tmp_path)


def test_kl_bounded_scale_and_effect_report(tiny_llama):
    from tiny import tiny_model

    _, tok = tiny_llama
    model = tiny_model("llama", max_position_embeddings=256)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # a random model is near-uniform; make its outputs peaked
    torch.manual_seed(0)
    vec = SteeringVector({0: torch.randn(64) / 400}, model_type="llama")
    scale = calibrate_scale(model, tok, vec, POS + NEG, epsilon=0.05, max_scale=100.0, steps=10)
    assert 0 < scale < 100
    assert kl_steered(model, tok, vec, POS + NEG, scale) <= 0.05
    assert kl_steered(model, tok, vec, POS + NEG, scale * 1.2) > 0.05 * 0.9
    # without a range, doubling brackets the bound first: the same scale to the bisection's precision
    bracketed = calibrate_scale(model, tok, vec, POS + NEG, epsilon=0.05, max_scale=None, steps=10)
    assert kl_steered(model, tok, vec, POS + NEG, bracketed) <= 0.05
    assert bracketed == pytest.approx(scale, rel=0.02)
    report = steering_effect(model, tok, vec, POS[:1], scale * 4, max_new_tokens=4)
    assert report["kl"] > 0 and report["projection_after"] > report["projection_before"]
    assert set(report["generations"][0]) == {"prompt", "before", "after"}


def test_bad_steering_input(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(actscope.ActscopeError, match="layers \\[5\\] do not exist"):
        with SteeringVector({5: torch.zeros(64)}).apply(model):
            pass
    with pytest.raises(actscope.ActscopeError, match="has 10 dims"):
        with SteeringVector({0: torch.zeros(10)}).apply(model):
            pass
    with pytest.raises(actscope.ActscopeError, match="pca needs paired prompts"):
        steering_vector(model, tok, POS, NEG[:2], method="pca")
    with pytest.raises(actscope.ActscopeError, match="positions must be one of"):
        with SteeringVector({0: torch.zeros(64)}).apply(model, positions="later"):
            pass


def test_mean_diff_equals_steering_vectors_package(tiny_llama):
    """Parity with the steering-vectors package (installed by `make test`, without its transformers<5 pin)."""
    sv = require_peer("steering_vectors")
    model, tok = tiny_llama
    ours = steering_vector(model, tok, POS, NEG, layers=[0, 1], batch_size=2)
    theirs = sv.train_steering_vector(model, tok, list(zip(POS, NEG)), layers=[0, 1], read_token_index=-1,
                                      show_progress=False, batch_size=2)
    for l in (0, 1):
        cos = torch.nn.functional.cosine_similarity(ours.directions[l], theirs.layer_activations[l].float(), dim=0)
        assert float(cos) > 0.999


def test_top_axis_streams_past_d_rows_into_a_scatter():
    from actscope.intervene.steer import _TopAxis

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(30, 8, generator=g, dtype=torch.float64) * torch.linspace(3, 0.5, 8, dtype=torch.float64) + 0.3
    axis = _TopAxis()
    for chunk in rows.split(7):
        axis.add(chunk)
    assert axis.rows is None  # 30 rows > 8 dimensions: folded into the scatter matrix
    _, _, v = torch.linalg.svd(rows - rows.mean(0), full_matrices=False)
    want = v[0] if v[0] @ rows.mean(0) >= 0 else -v[0]
    torch.testing.assert_close(axis.direction(), want, rtol=1e-8, atol=1e-8)
    few = _TopAxis()
    few.add(rows[:5])
    assert few.rows is not None
    _, _, v = torch.linalg.svd(rows[:5] - rows[:5].mean(0), full_matrices=False)
    want = v[0] if v[0] @ rows[:5].mean(0) >= 0 else -v[0]
    torch.testing.assert_close(few.direction(), want, rtol=1e-8, atol=1e-8)


def test_trace_stop_skips_the_rest_of_the_forward(tiny_llama, ids):
    model, _ = tiny_llama
    ran = []
    h = model.lm_head.register_forward_hook(lambda *a: ran.append(1))
    try:
        with torch.inference_mode(), actscope.trace(model, ["blocks.0.hook_resid_post"], stop=True) as early:
            model(input_ids=ids)
            ran.append("after")  # skipped: the model call ends the block
    finally:
        h.remove()
    assert ran == [] and "blocks.0.hook_resid_post" in early
    with torch.inference_mode(), actscope.trace(model, "blocks.0.hook_resid_post") as ref:
        model(input_ids=ids)
    assert torch.equal(early["blocks.0.hook_resid_post"], ref["blocks.0.hook_resid_post"])
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())
