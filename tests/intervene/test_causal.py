"""Causal tracing: the fast sweep equals the naive loop; subjects map to their tokens; kinds are site shorthands."""

from __future__ import annotations

import pytest
import torch

import actscope

CLEAN = "the value of the list"


@pytest.mark.parametrize("kind, window", [("resid_post", 1), ("mlp_out", 2)])
def test_causal_trace_fast_equals_naive(tiny_llama, kind, window):
    model, tok = tiny_llama
    kw = dict(kind=kind, window=window, samples=3, seed=1)
    fast = actscope.causal_trace(model, tok, CLEAN, "value", " value", **kw)
    naive = actscope.causal_trace(model, tok, CLEAN, "value", " value", method="naive", **kw)
    torch.testing.assert_close(fast.patched, naive.patched, rtol=1e-4, atol=1e-6)
    assert fast.effect.shape == (2, len(fast.positions))
    # restoring the residual after the last layer at the last position restores the clean output
    if kind == "resid_post":
        assert float(fast.patched[-1, -1]) == pytest.approx(fast.clean, rel=1e-4)


def test_subject_positions_and_errors(tiny_llama):
    from actscope.intervene.causal import subject_positions

    _, tok = tiny_llama
    toks = tok.convert_ids_to_tokens(tok(CLEAN).input_ids)
    pos = subject_positions(tok, CLEAN, "list")
    assert "".join(toks[p] for p in pos).replace("▁", "") == "list"
    with pytest.raises(actscope.ActscopeError, match="does not occur"):
        subject_positions(tok, CLEAN, "Paris")


def test_old_kinds_still_work_with_a_warning(tiny_llama):
    """kind="resid"/"mlp"/"attn" were causal_trace's own names before the shared shorthands."""
    model, tok = tiny_llama
    kw = dict(samples=2, seed=1)
    new = actscope.causal_trace(model, tok, CLEAN, "value", " value", kind="mlp_out", **kw)
    with pytest.warns(DeprecationWarning, match="kind='mlp' is now kind='mlp_out'"):
        old = actscope.causal_trace(model, tok, CLEAN, "value", " value", kind="mlp", **kw)
    assert old.sites == new.sites and torch.equal(old.patched, new.patched)
    with pytest.raises(actscope.ActscopeError, match="kind must be one of resid_pre, resid_mid"):
        actscope.causal_trace(model, tok, CLEAN, "value", " value", kind="mlp_in")


def test_cli_kind_takes_the_shorthands_and_the_old_kinds_warn(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    import sys

    from actscope.cli import main

    def run(kind: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["actscope", "causal-trace", "-m", str(tiny_llama_dir), "-p", CLEAN,
                                          "--subject", "value", "--target", " value", "--samples", "1",
                                          "--kind", kind, "-o", str(tmp_path / kind)])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        return code, capsys.readouterr().err

    code, err = run("attn_out")
    assert code == 0 and "warning" not in err and (tmp_path / "attn_out" / "effects.json").exists()
    code, err = run("attn")
    assert code == 0 and err.startswith("warning: --kind attn is deprecated; use --kind attn_out"), err
