"""Disabling and forcing routed experts: no-op is bit-identical, edits equal an independent routing."""

from __future__ import annotations

import pytest
import torch
from tiny import VOCAB, tiny_model

from actscope import ActscopeError, route_experts

MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32, norm_topk_prob=True,
                      num_key_value_heads=2),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, num_key_value_heads=2),
}


@pytest.fixture(scope="module", params=list(MOE))
def moe(request):
    return request.param, tiny_model(request.param, **MOE[request.param])


def _routing(model, layer: int, ids: torch.Tensor) -> list[torch.Tensor]:
    """The expert indices the experts module actually received in ``layer``."""
    seen = []
    experts = model.get_submodule(f"model.layers.{layer}.mlp.experts")
    h = experts.register_forward_pre_hook(lambda m, a: seen.append(a[1].clone()))
    with torch.inference_mode():
        model(ids)
    h.remove()
    return seen


def test_noop_is_bit_identical(moe):
    _, model = moe
    ids = torch.randint(3, VOCAB, (2, 7))
    with torch.inference_mode():
        plain = model(ids).logits
        with route_experts(model, disable={0: []}, force={1: []}):
            same = model(ids).logits
    assert torch.equal(plain, same)


def test_disabled_expert_is_never_used_and_output_equals_manual_routing(moe):
    name, model = moe
    ids = torch.randint(3, VOCAB, (2, 7))
    block = model.get_submodule("model.layers.1.mlp")
    captured = {}
    h = block.register_forward_hook(lambda m, a, o: captured.update(x=a[0].clone(), y=o.clone()))
    with route_experts(model, disable={1: [2]}):
        used = _routing(model, 1, ids)[0]
    h.remove()
    assert not (used == 2).any()
    # independent: softmax over experts without expert 2, top-2, renormalise, run the same experts
    x = captured["x"].reshape(-1, captured["x"].shape[-1])
    with torch.inference_mode():
        probs = torch.softmax((x @ block.gate.weight.t()).float(), -1)
        key = probs.clone()
        key[:, 2] = -1
        idx = key.topk(2, -1).indices
        w = probs.gather(-1, idx)
        if name == "mixtral" or model.config.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        want = block.experts(x, idx, w.to(block.gate.weight.dtype))
        if name == "qwen2_moe":
            want = want + torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    assert torch.allclose(captured["y"].reshape(-1, x.shape[-1]), want, atol=1e-6)


def test_forced_expert_is_always_used(moe):
    _, model = moe
    ids = torch.randint(3, VOCAB, (2, 7))
    with route_experts(model, force=[3]):  # every layer
        for layer in (0, 1):
            used = _routing(model, layer, ids)[0]
            assert (used == 3).any(-1).all()


def test_bad_requests_are_refused(moe):
    _, model = moe
    with pytest.raises(ActscopeError, match="expert 9 does not exist"):
        with route_experts(model, disable={0: [9]}):
            pass
    with pytest.raises(ActscopeError, match="cannot disable 3 of 4"):
        with route_experts(model, disable={0: [0, 1, 2]}):
            pass
    with pytest.raises(ActscopeError, match="layer 7 does not exist"):
        with route_experts(model, force={7: [0]}):
            pass
    with pytest.raises(ActscopeError, match="support mixtral"):
        with route_experts(tiny_model("llama"), disable=[0]):
            pass
