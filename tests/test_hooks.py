"""The one hook core: edit() writes exactly what trace() reads, on every site of every family."""

from __future__ import annotations

import gc
import re
import weakref
from pathlib import Path

import pytest
import torch

import actscope
from actscope import SiteError
from actscope.sites import site_map
from tiny import FAMILIES, tiny_model

SRC = Path(__file__).resolve().parents[1] / "src"


def _out(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _all_sites(model) -> list[str]:
    """Every named site plus the raw ``model:output``-style site of the decoder stack's owner."""
    sm = site_map(model)
    owner = sm.layers_path.rsplit(".", 1)[0] if "." in sm.layers_path else ""
    return sm.names + ([f"{owner}:output"] if owner else [])


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_writes_what_trace_reads_on_every_site(family, ids):
    """For each site: an identity edit is bit-identical; ``x + 1`` is what an open trace records."""
    model = tiny_model(family)
    model.set_attn_implementation("eager")  # patterns need it; one setting for every comparison
    with torch.no_grad():
        base = _out(model, ids)
        for name in _all_sites(model):
            if name.endswith("attn.hook_pattern"):  # read-only: its output is computed before it is returned
                with pytest.raises(SiteError, match="cannot be edited"), actscope.edit(model, {name: lambda x, n: x}):
                    pass
                continue
            with actscope.edit(model, {name: lambda x, n: x}):
                assert torch.equal(_out(model, ids), base), name
            with actscope.trace(model, name) as before:
                model(input_ids=ids)
            with actscope.edit(model, {name: lambda x, n: x + 1}), actscope.trace(model, name) as after:
                changed = _out(model, ids)
            assert torch.equal(after[name], before[name] + 1), name
            assert not torch.equal(changed, base), name


def test_edit_on_model_output_and_one_head(tiny_llama, ids):
    model, _ = tiny_llama
    with torch.no_grad(), actscope.trace(model, ["blocks.1.attn.hook_z", "model:output"]) as plain:
        base = model(input_ids=ids).logits

    def zero_head(x, name):
        x = x.clone()
        x[:, :, 2] = 0
        return x

    with torch.no_grad(), actscope.edit(model, {"blocks.1.attn.hook_z": zero_head}), \
            actscope.trace(model, ["blocks.1.attn.hook_z", "model:output"]) as edited:
        logits = model(input_ids=ids).logits
    z, z0 = edited["blocks.1.attn.hook_z"], plain["blocks.1.attn.hook_z"]
    assert torch.equal(z[:, :, 2], torch.zeros_like(z[:, :, 2]))
    assert torch.equal(z[:, :, [0, 1, 3]], z0[:, :, [0, 1, 3]])  # the other heads are untouched
    assert not torch.equal(logits, base)
    # model:output is a ModelOutput: the edit goes back into its first field, and the head reads it
    with torch.no_grad(), actscope.edit(model, {"model:output": lambda x, n: torch.zeros_like(x)}):
        out = model(input_ids=ids).logits
    bias = model.lm_head.bias
    assert torch.equal(out, torch.zeros_like(out) if bias is None else bias.expand_as(out))


def test_edit_glob_passes_each_site_its_name(tiny_llama, ids):
    model, _ = tiny_llama
    seen = []

    def record(x, name):
        seen.append(name)
        return x

    with torch.no_grad(), actscope.edit(model, {"blocks.*.hook_resid_post": record}):
        model(input_ids=ids)
    assert seen == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def test_edit_refuses_bad_edits_clearly(tiny_llama, ids):
    model, _ = tiny_llama
    with pytest.raises(SiteError, match="returned shape"):
        with torch.no_grad(), actscope.edit(model, {"blocks.0.hook_resid_post": lambda x, n: x[:, :1]}):
            model(input_ids=ids)
    with pytest.raises(SiteError, match="not a tensor"):
        with torch.no_grad(), actscope.edit(model, {"blocks.0.hook_resid_post": lambda x, n: None}):
            model(input_ids=ids)
    with pytest.raises(SiteError, match="unknown site"):
        with actscope.edit(model, {"blocks.0.hook_resid_pots": lambda x, n: x}):
            pass
    with pytest.raises(SiteError, match="not a function"):
        with actscope.edit(model, {"blocks.0.hook_resid_post": 3.0}):
            pass
    with pytest.raises(SiteError, match="takes a dict"):
        with actscope.edit(model, [("blocks.0.hook_resid_post", lambda x, n: x)]):
            pass
    # every hook is gone after the failures
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_torch_hooks_are_registered_in_one_module_only():
    pattern = re.compile(r"register_(forward|full_backward|module_forward)")
    found = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if pattern.search(p.read_text()))
    assert found == ["actscope/hooks.py"]


def test_site_map_is_built_once_per_model_and_freed_with_it():
    model = tiny_model("llama")
    sm = site_map(model)
    assert site_map(model) is sm
    ref = weakref.ref(model)
    del model, sm
    gc.collect()
    assert ref() is None  # the cache does not keep the model alive


def test_interventions_on_model_output_and_per_head_sites(tiny_llama, ids):
    """ablate, patch and steer take model:output and per-head sites (they go through the core)."""
    model, tok = tiny_llama
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with actscope.ablate(model, "model:output", units=[0, 5]), actscope.trace(model, "model:output") as c:
            model(input_ids=ids)
        assert torch.equal(c["model:output"][..., [0, 5]], torch.zeros_like(c["model:output"][..., [0, 5]]))
        with actscope.ablate(model, "blocks.0.attn.hook_z", units=[1]), actscope.trace(model, "blocks.0.attn.hook_z") as c:
            model(input_ids=ids)
        assert float(c["blocks.0.attn.hook_z"][:, :, 1].abs().max()) == 0.0
        v = torch.randn(4, 16)
        with actscope.steer(model, {"blocks.1.attn.hook_z": v}, scale=2.0), \
                actscope.trace(model, "blocks.1.attn.hook_z") as steered:
            model(input_ids=ids)
        with actscope.trace(model, "blocks.1.attn.hook_z") as plain:
            assert torch.equal(model(input_ids=ids).logits, base)
        torch.testing.assert_close(steered["blocks.1.attn.hook_z"] - plain["blocks.1.attn.hook_z"],
                                   (2.0 * v).expand_as(plain["blocks.1.attn.hook_z"]))
    clean, corrupt = "the value of the list", "the value of the dict"
    res = actscope.patch(model, tok, clean, corrupt, sites="model:output", metric=lambda lg: lg[:, 5] - lg[:, 9])
    # patching the final hidden state at the last position restores the clean logits exactly
    assert res.effect.shape[0] == 1 and abs(float(res.effect[0, -1]) - 1.0) < 1e-4
    heads = actscope.patch(model, tok, clean, corrupt, sites="blocks.1.attn.hook_z", heads=range(4),
                           metric=lambda lg: lg[:, 5] - lg[:, 9])
    assert heads.effect.shape[0] == 4


def test_attribution_patch_on_per_head_sites(tiny_llama):
    model, tok = tiny_llama
    res = actscope.attribution_patch(model, tok, "the value of the list", "the value of the dict",
                                     sites="blocks.*.attn.hook_z", metric=lambda lg: lg[:, 5] - lg[:, 9])
    assert res.estimate.effect.shape == res.actual.effect.shape
    assert res.correlation is not None and -1.0 <= res.correlation <= 1.0
