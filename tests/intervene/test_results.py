"""Every intervention result: to_dict() is strict JSON, save(folder) writes it whole, dict access stays."""

from __future__ import annotations

import json

import pytest
import torch

import actscope
from actscope.intervene.results import AttributionResult, PatchResult, SteeringEffect, SubspaceResult
from actscope.intervene.steer_effects import steering_effect

CLEAN = "the value of the list"
CORRUPT = "the value of the dict"


def _metric(logits):
    return logits[:, 5] - logits[:, 9]


def _read_json(path):
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path.name} holds {c}"))


def _no_temporaries(folder):
    assert not [p.name for p in folder.rglob("*") if ".tmp-" in p.name]  # every file was moved in whole


def test_patch_result_round_trip_and_nan_is_null(tmp_path):
    effect = torch.tensor([[0.5, float("nan")], [1.0, -0.25]])
    res = PatchResult(["a", "b"], [0, 1], ["x", "y"], effect, effect * 2, 1.0, 0.0, foil=" Rome")
    folder = res.save(tmp_path / "p")
    data = _read_json(folder / "effects.json")
    assert data == res.to_dict() == json.loads(json.dumps(res.to_dict()))
    assert data["effect"] == [[0.5, None], [1.0, -0.25]] and data["foil"] == " Rome"
    assert (folder / "effects.png").read_bytes()[:4] == b"\x89PNG"
    assert (folder / "effects.svg").read_text().startswith("<svg") and "<img" in (folder / "effects.html").read_text()
    assert res._repr_html_().startswith("<svg")
    _no_temporaries(tmp_path)


def test_real_results_save_and_load(tiny_llama, tmp_path):
    model, tok = tiny_llama
    patched = actscope.patch(model, tok, CLEAN, CORRUPT, sites=["blocks.1.hook_resid_pre"], metric=_metric)
    assert _read_json(patched.save(tmp_path / "patch") / "effects.json") == patched.to_dict()

    attr = actscope.attribution_patch(model, tok, CLEAN, CORRUPT, sites=["blocks.1.hook_resid_pre"], metric=_metric)
    assert isinstance(attr, AttributionResult)
    folder = attr.save(tmp_path / "attr")
    data = _read_json(folder / "attribution.json")
    assert data == attr.to_dict() and data["correlation"] == pytest.approx(attr.correlation)
    assert (folder / "estimate" / "effects.json").exists() and (folder / "actual" / "effects.png").exists()
    assert "Pearson r" in attr._repr_html_()
    unchecked = actscope.attribution_patch(model, tok, CLEAN, CORRUPT, sites=["blocks.1.hook_resid_pre"],
                                           metric=_metric, check=False)
    assert unchecked.to_dict()["actual"] is None
    assert not (unchecked.save(tmp_path / "unchecked") / "actual").exists()

    sub = actscope.subspace_patch(model, tok, CLEAN, CORRUPT, "blocks.1.hook_resid_pre", torch.eye(64)[:, :3],
                                  metric=_metric)
    assert isinstance(sub, SubspaceResult)
    assert sub["metric_patched"] == sub.metric_patched and "null_fraction" in sub and dict(sub)["site"] == sub.site
    assert _read_json(sub.save(tmp_path / "sub") / "subspace.json") == sub.to_dict()
    assert "null fraction" in sub._repr_html_()

    vec = actscope.SteeringVector({0: torch.randn(64)}, model_type="llama")
    eff = steering_effect(model, tok, vec, ["the value"], 2.0, max_new_tokens=2)
    assert isinstance(eff, SteeringEffect) and eff["kl"] == eff.kl
    folder = eff.save(tmp_path / "steer")
    assert _read_json(folder / "steering_effect.json") == eff.to_dict()
    assert "the value" in (folder / "steering_effect.html").read_text()
    with pytest.raises(KeyError):
        eff["nope"]

    saved = vec.save(tmp_path / "vec")
    assert sorted(p.name for p in saved.iterdir()) == ["steering_config.json", "vectors.safetensors"]
    back = actscope.SteeringVector.from_pretrained(saved)
    assert torch.equal(back.directions[0], vec.directions[0]) and back.to_dict() == vec.to_dict()
    assert json.loads(json.dumps(vec.to_dict()))["norms"]["0"] == pytest.approx(float(vec.directions[0].norm()))
    _no_temporaries(tmp_path)
