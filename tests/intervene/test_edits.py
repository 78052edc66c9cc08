"""Stock edits (intervene/edits.py) do exactly what they say, alone and through actscope.edit."""

from __future__ import annotations

import warnings

import pytest
import torch

import actscope
from actscope.intervene import edits as stock
from actscope.intervene.edits import add, add_noise, mean, project_out, replace_at, zero


def _x(*shape: int) -> torch.Tensor:
    return torch.arange(float(torch.Size(shape).numel())).reshape(shape) + 1.0  # no zeros: a zeroed cell shows


def test_zero_units_positions_and_rows():
    x = _x(2, 3, 4)
    got = zero(units=[1, 3])(x, "s")
    want = x.clone()
    want[:, :, [1, 3]] = 0
    assert torch.equal(got, want) and torch.equal(x, _x(2, 3, 4))  # the argument is left alone
    got = zero(units=[0, 2], positions=[0, 2])(x, "s")  # two lists select their product, not pairs
    want = x.clone()
    for p in (0, 2):
        want[:, p, [0, 2]] = 0
    assert torch.equal(got, want)
    got = zero(rows=1, positions=1)(x, "s")
    want = x.clone()
    want[1, 1] = 0
    assert torch.equal(got, want)
    assert torch.equal(zero()(x, "s"), torch.zeros_like(x))


def test_zero_one_head_of_a_per_head_tensor():
    z = _x(2, 3, 4, 5)  # [batch, pos, head, d_head]
    got = zero(units=[2])(z, "blocks.0.attn.hook_z")
    assert torch.equal(got[:, :, 2], torch.zeros(2, 3, 5))
    assert torch.equal(got[:, :, [0, 1, 3]], z[:, :, [0, 1, 3]])


def test_replace_at_writes_values_where_asked():
    x = _x(3, 4, 2)
    v = torch.tensor([-1.0, -2.0])
    got = replace_at(v, rows=slice(1, None, 2), positions=2)(x, "s")  # row 1 only, position 2
    want = x.clone()
    want[1, 2] = v
    assert torch.equal(got, want)
    z = _x(2, 3, 4, 5)
    got = replace_at(torch.full((5,), 7.0), positions=0, units=3)(z, "s")  # one head at one position
    want = z.clone()
    want[:, 0, 3] = 7.0
    assert torch.equal(got, want)
    with pytest.raises(actscope.ActscopeError, match="units select the axis after"):
        replace_at(0.0, units=[0])(torch.zeros(2, 3), "s")


def test_mean_takes_the_selected_units_of_a_whole_site_mean():
    x = _x(2, 3, 4)
    m = torch.tensor([10.0, 20.0, 30.0, 40.0])  # one entry per unit, as site_mean gives
    got = mean(m, units=[1, 3])(x, "s")
    want = x.clone()
    want[:, :, 1], want[:, :, 3] = 20.0, 40.0
    assert torch.equal(got, want)
    assert torch.equal(mean(m)(x, "s"), m.expand_as(x))
    got = mean(m, positions=[1])(x, "s")
    want = x.clone()
    want[:, 1] = m
    assert torch.equal(got, want)


def test_add_everywhere_at_positions_and_by_mask():
    x = _x(2, 3, 4)
    v = torch.tensor([1.0, 0.0, -1.0, 2.0])
    assert torch.equal(add(v, scale=2.0)(x, "s"), x + 2.0 * v)
    got = add(v, positions=[2])(x, "s")
    want = x.clone()
    want[:, 2] += v
    assert torch.equal(got, want)
    got = add(v, positions=lambda t: torch.tensor([True, False, True]))(x, "s")
    want = x.clone()
    want[:, [0, 2]] += v
    assert torch.equal(got, want)
    z = _x(1, 2, 3, 2)
    assert torch.equal(add(torch.ones(3, 2))(z, "s"), z + 1)  # a [head, d_head] vector on a per-head site
    with pytest.raises(actscope.ActscopeError, match="the vector for blocks.0.x has 3 values"):
        add(torch.ones(3))(x, "blocks.0.x")


def test_project_out_removes_exactly_the_direction():
    x = torch.tensor([[[3.0, 4.0, 5.0]]])
    got = project_out(torch.tensor([0.0, 2.0, 0.0]))(x, "s")  # not a unit vector: it is normalised
    assert torch.equal(got, torch.tensor([[[3.0, 0.0, 5.0]]]))
    assert torch.equal(project_out(torch.zeros(3))(x, "s"), x)  # no direction: nothing removed


def test_add_noise_is_seeded_and_a_fixed_draw_follows_start_and_repeat():
    x = torch.zeros(2, 4, 3)
    a, b = add_noise(0.5, seed=3)(x, "s"), add_noise(0.5, seed=3)(x, "s")
    assert torch.equal(a, b) and not torch.equal(a, add_noise(0.5, seed=4)(x, "s"))
    want = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)) * 0.5
    assert torch.equal(a, want)
    only = add_noise(0.5, seed=3, positions=[1])(x, "s")
    assert torch.equal(only[:, 1], want[:, 1]) and not only[:, [0, 2, 3]].any()
    draw = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # [samples, positions, d]
    got = add_noise(draw, start=2, repeat=2)(torch.zeros(4, 3, 3), "s")  # rows: sample-major, 2 per sample
    assert torch.equal(got, draw[:, 2:5].repeat_interleave(2, dim=0))


def test_stock_edits_plug_into_actscope_edit(tiny_llama, ids):
    model, _ = tiny_llama
    v = torch.randn(64)
    with torch.no_grad(), actscope.trace(model, "blocks.0.hook_resid_post") as plain:
        model(input_ids=ids)
    with torch.no_grad(), actscope.edit(model, {"blocks.0.hook_resid_post": add(v, scale=3.0),
                                                "blocks.1.mlp.hook_post": zero(units=[4])}), \
            actscope.trace(model, ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]) as edited:
        model(input_ids=ids)
    torch.testing.assert_close(edited["blocks.0.hook_resid_post"], plain["blocks.0.hook_resid_post"] + 3.0 * v)
    assert not edited["blocks.1.mlp.hook_post"][..., 4].any()


def test_calling_the_module_is_the_old_edits_context_manager(tiny_llama, ids):
    """``from actscope.intervene import edits; edits(model, pairs)`` was hooks.edits before."""
    model, _ = tiny_llama
    site = actscope.resolve_sites(model, "blocks.0.hook_resid_post")[0]
    with pytest.warns(DeprecationWarning, match="moved to actscope.hooks.edits"):
        ctx = stock(model, [(site, lambda x: x * 0)])
    with warnings.catch_warnings(), torch.no_grad(), ctx, actscope.trace(model, site.name) as c:
        model(input_ids=ids)
    assert not c[site.name].any()


def test_edits_of_one_site_run_in_the_order_given(tiny_llama, ids):
    """``{"blocks.1.hook_resid_post": add(v), "blocks.*.hook_resid_post": project_out(v)}``: the
    projection runs second, so nothing along ``v`` is left."""
    model, _ = tiny_llama
    v = torch.randn(64)
    unit = v / v.norm()
    with torch.no_grad(), actscope.edit(model, {"blocks.1.hook_resid_post": add(v, scale=5.0),
                                                "blocks.*.hook_resid_post": project_out(v)}), \
            actscope.trace(model, "blocks.1.hook_resid_post") as c:
        model(input_ids=ids)
    assert float((c["blocks.1.hook_resid_post"] @ unit).abs().max()) < 1e-4
