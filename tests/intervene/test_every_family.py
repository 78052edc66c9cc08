"""Every intervention on every supported family, through the one hook core.

For each (family, intervention): the no-op version leaves the model's output bit-identical, a
real one changes it, and every torch hook it registers is registered by actscope/hooks.py.
bert is a base model without an LM head, so the interventions that measure a metric of the
next-token logits (patch, subspace_patch, attribution_patch, causal_trace) do not apply to it.
"""

from __future__ import annotations

import functools
import os
import sys

import pytest
import torch
from torch import nn

import actscope
from tiny import FAMILIES, tiny_model

CLEAN = "the value of the list"
CORRUPT = "the value of the dict"
NEEDS_LOGITS = {"patch", "subspace_patch", "attribution_patch", "causal_trace"}
INTERVENTIONS = ["edit", "ablate", "steer", "ablate_direction", *sorted(NEEDS_LOGITS)]


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, 5] - logits[:, 9]


@functools.lru_cache(maxsize=None)
def _model(family: str) -> nn.Module:
    return tiny_model(family)


def _out(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture
def hook_callers(monkeypatch):
    """The files that register torch forward hooks while the test runs."""
    callers: list[str] = []
    for name in ("register_forward_hook", "register_forward_pre_hook"):
        original = getattr(nn.Module, name)

        def spy(self, *args, _original=original, **kwargs):
            callers.append(sys._getframe(1).f_code.co_filename)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(nn.Module, name, spy)
    return callers


def _through_the_core(callers: list[str]) -> None:
    ours = {os.path.relpath(c, os.path.dirname(actscope.__file__)) for c in callers
            if f"{os.sep}actscope{os.sep}" in c}
    assert ours == {"hooks.py"}, ours


def _pair(what: str, model, tok, ids):
    """(no-op output, base output, real output) of one intervention, as comparable tensors."""
    base = _out(model, ids)
    if what == "edit":
        with actscope.edit(model, {"blocks.0.hook_resid_post": lambda x, n: x}):
            same = _out(model, ids)
        with actscope.edit(model, {"blocks.0.hook_resid_post": lambda x, n: x + 1}):
            changed = _out(model, ids)
    elif what == "ablate":
        site = "blocks.0.mlp.hook_post"
        with torch.inference_mode(), actscope.trace(model, site) as c:
            model(input_ids=ids)
        with actscope.ablate(model, site, units=[0, 3], mode="resample", values=c[site][:, :, [0, 3]]):
            same = _out(model, ids)
        with actscope.ablate(model, site, units=[0, 3]):
            changed = _out(model, ids)
    elif what == "steer":
        d_model = model.config.hidden_size
        with actscope.steer(model, {0: torch.zeros(d_model)}, scale=4.0):  # by layer number
            same = _out(model, ids)
        with actscope.steer(model, {"blocks.0.hook_resid_post": torch.randn(d_model)}, scale=4.0):  # by site name
            changed = _out(model, ids)
    elif what == "ablate_direction":
        with actscope.ablate_direction(model, torch.zeros(model.config.hidden_size)):
            same = _out(model, ids)
        with actscope.ablate_direction(model, torch.randn(model.config.hidden_size)):
            changed = _out(model, ids)
    elif what == "patch":  # patching the corrupted run's own values changes nothing, bit for bit
        noop = actscope.patch(model, tok, CORRUPT, CORRUPT, sites="resid_pre", metric=_metric, method="naive")
        real = actscope.patch(model, tok, CLEAN, CORRUPT, sites="resid_pre", metric=_metric)
        return noop.patched, torch.full_like(noop.patched, noop.corrupted), real.patched - real.corrupted
    elif what == "subspace_patch":
        d_model = model.config.hidden_size
        noop = actscope.subspace_patch(model, tok, CORRUPT, CORRUPT, "blocks.1.hook_resid_pre", torch.eye(d_model),
                                       metric=_metric)
        real = actscope.subspace_patch(model, tok, CLEAN, CORRUPT, "blocks.1.hook_resid_pre", torch.eye(d_model),
                                       metric=_metric)
        assert len(real.null_fraction) == d_model
        return (torch.tensor(noop.metric_patched), torch.tensor(noop.metric_corrupted),
                torch.tensor(real.metric_patched - real.metric_corrupted))
    elif what == "attribution_patch":  # no difference between the runs: every estimate is exactly 0
        noop = actscope.attribution_patch(model, tok, CORRUPT, CORRUPT, metric=_metric, check=False)
        real = actscope.attribution_patch(model, tok, CLEAN, CORRUPT, metric=_metric, check=False)
        e = noop.estimate
        return e.patched, torch.full_like(e.patched, e.corrupted), real.estimate.patched - real.estimate.corrupted
    elif what == "causal_trace":  # noise of size 0: the "corrupted" run is the clean one
        kw = dict(samples=1, method="naive")
        noop = actscope.causal_trace(model, tok, CLEAN, "value", 5, noise=0.0, **kw)
        real = actscope.causal_trace(model, tok, CLEAN, "value", 5, noise=3.0, **kw)
        assert noop.corrupted == noop.clean
        return noop.patched, torch.full_like(noop.patched, noop.clean), torch.tensor(real.corrupted - real.clean)
    else:
        raise AssertionError(what)
    return same, base, changed - base


@pytest.mark.parametrize("what", INTERVENTIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_intervention_noop_is_identical_and_real_edit_changes_output(family, what, tiny_tokenizer, ids, hook_callers):
    model = _model(family)
    if what in NEEDS_LOGITS and not hasattr(model, "lm_head") and model.get_output_embeddings() is None:
        pytest.skip(f"{family} is loaded as a base model without an LM head: {what} measures next-token logits")
    same, base, delta = _pair(what, model, tiny_tokenizer, ids)
    assert torch.equal(same, base), f"{what} as a no-op changed {family}'s output"
    assert bool(delta.ne(0).any()), f"{what} changed nothing on {family}"
    _through_the_core(hook_callers)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # all removed
