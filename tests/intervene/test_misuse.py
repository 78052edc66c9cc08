"""Issue #11, the intervention API: misuse is an ``ActscopeError`` naming the problem, never a
silently wrong result (a str of prompts read as characters, a cut answer, an empty generation)."""

from __future__ import annotations

import pytest
import torch

import actscope
from actscope import ActscopeError
from actscope.intervene.prompts import token_id
from actscope.intervene.steer import SteeringVector, steering_vector
from actscope.intervene.steer_effects import generate

CLEAN, CORRUPT = "the value of the list", "the value of the dict"


def test_a_str_of_prompts_is_refused(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ActscopeError, match="positive must be a list of strings, got a single string"):
        steering_vector(model, tok, "I am happy", "I am sad")
    with pytest.raises(ActscopeError, match="a steering prompt is empty"):
        steering_vector(model, tok, ["I am happy", ""], ["I am sad", "no"])
    vec = steering_vector(model, tok, ["I am happy"], ["I am sad"], layers=[0])
    assert vec.layers == [0] and bool(torch.isfinite(vec.directions[0]).all())


def test_multi_token_targets_and_foils_are_errors_naming_the_tokens(tiny_llama):
    model, tok = tiny_llama
    assert token_id(tok, " value") == tok(" value", add_special_tokens=False)["input_ids"][0]
    with pytest.raises(ActscopeError, match=r"target ' mat' is 2 tokens \('m' \+ 'at'\)"):
        actscope.patch(model, tok, CLEAN, CORRUPT, target=" mat", sites="resid_pre")
    with pytest.raises(ActscopeError, match=r"foil ' mat' is 2 tokens"):
        actscope.patch(model, tok, CLEAN, CORRUPT, target=" value", foil=" mat", sites="resid_pre")
    with pytest.raises(ActscopeError, match="outside the vocabulary"):
        token_id(tok, 10**6)
    ids = tok(" mat", add_special_tokens=False)["input_ids"]
    res = actscope.patch(model, tok, CLEAN, CORRUPT, target=ids[0], sites="resid_pre", metric="prob")  # an id is fine
    assert res.effect.shape[1] == len(res.positions)


def test_generation_refuses_non_finite_logits_and_empty_input(tiny_llama):
    model, tok = tiny_llama
    vec = SteeringVector({0: torch.full((64,), 1e10)})
    with vec.apply(model, 1e30):  # finite numbers whose product overflows float32
        with pytest.raises(ActscopeError, match="logits are NaN or infinite"):
            generate(model, tok, "the value", 3)
    assert isinstance(generate(model, tok, "the value", 3), str)  # the model is unharmed
    with pytest.raises(ActscopeError, match="prompt is empty"):
        generate(model, tok, "", 3)
    with pytest.raises(ActscopeError, match="max_new_tokens must be a positive integer, got 0"):
        generate(model, tok, "the value", 0)
    for scale in (float("nan"), float("inf")):
        with pytest.raises(ActscopeError, match="finite"):
            with vec.apply(model, scale):
                pass


@pytest.mark.parametrize("fn", ["patch", "attribution_patch", "subspace"])
def test_empty_prompts_are_refused_in_python(tiny_llama, fn, tmp_path):
    """Not only the CLI: the Python entry points refuse an empty prompt too."""
    import actscope

    model, tok = tiny_llama
    call = {
        "patch": lambda c, k: actscope.patch(model, tok, c, k, metric=lambda lg: lg[:, 5] - lg[:, 9]),
        "attribution_patch": lambda c, k: actscope.attribution_patch(model, tok, c, k, metric=lambda lg: lg[:, 5] - lg[:, 9]),
        "subspace": lambda c, k: actscope.subspace_patch(model, tok, c, k, "blocks.0.hook_resid_post", torch.eye(64)[:, :2],
                                                         metric=lambda lg: lg[:, 5] - lg[:, 9]),
    }[fn]
    with pytest.raises(actscope.ActscopeError, match="is empty"):
        call("", "the value of the dict")
    if fn == "patch":  # identical prompts: effects are 0/0, and the result still saves (NaN shown as blank)
        res = call("the value of the list", "the value of the list")
        assert torch.isnan(res.effect).all()
        res.save(tmp_path)
        assert (tmp_path / "effects.json").exists()
