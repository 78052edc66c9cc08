"""Layer skipping and the logit lens, against independent computations on a tiny llama."""

from __future__ import annotations

import torch

from actscope.stats.lens import logit_lens_view, skip_layer_kl
from actscope.stats.residual import kl_to_final


class _Identity(torch.nn.Module):
    """A decoder layer that returns its input: the model with that layer removed."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def test_skip_layer_kl_equals_running_the_model_without_the_layer(tiny_llama, ids):
    model, _ = tiny_llama
    layers = model.model.layers
    x = ids[:1]
    got = skip_layer_kl(model, layers, x)
    with torch.inference_mode():
        base = model(input_ids=x, use_cache=False).logits[0]
        want = []
        for l in range(len(layers)):
            kept = layers[l]
            layers[l] = _Identity()
            try:
                skipped = model(input_ids=x, use_cache=False).logits[0]
            finally:
                layers[l] = kept
            want.append(float(kl_to_final(base, skipped).mean()))
    assert len(got) == 2 and all(w > 0 for w in want)
    for g, w in zip(got, want):
        assert abs(g - w) < 1e-5 * max(1.0, w)


def test_logit_lens_last_layer_agrees_with_the_model(tiny_llama, ids):
    model, tok = tiny_llama
    view = logit_lens_view(model, model.model.norm, model.lm_head, 2, ids[:1], lambda t: tok.decode([t]), n_positions=4)
    assert view["positions"] == [0, 3, 5, 8]
    with torch.inference_mode():
        final = model(input_ids=ids[:1]).logits[0, view["positions"]].argmax(-1)
    assert view["next_token_prediction"] == [tok.decode([t]) for t in final.tolist()]
    assert view["layers"][-1]["final_token_rank"] == [0, 0, 0, 0]  # the last layer's lens *is* the output
