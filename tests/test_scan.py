"""The scan: planted phenomena are found exactly, and each diagnostic equals an independent
computation over all tokens of a tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

import actscope
from actscope.data import load_tokens
from actscope.stats.mlp import MlpLayerStats, CETT_GRID
from planted import DEAD, MASSIVE_DIM, SINK_HEAD, SINK_LAYER, planted_gpt2
from tiny import tiny_model

KW = dict(seq_len=64, max_tokens=64 * 24, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def planted_report(tiny_tokenizer):
    model = planted_gpt2()
    return model, actscope.scan(model, tiny_tokenizer, None, **KW)


def test_planted_massive_activation_found_exactly(planted_report):
    _, report = planted_report
    found = report["massive_activations"]
    assert {(m["dim"], m["position"]) for m in found} == {(MASSIVE_DIM, 0)}
    assert sorted(m["layer"] for m in found) == [0, 1, 2]
    assert all(m["value"] > 2900 and m["ratio_to_median"] > 1000 for m in found)
    assert found[0]["count"] == 24  # every sequence's first token


def test_planted_sink_head_is_the_only_dormant_head(planted_report):
    _, report = planted_report
    dormant = {(d["layer"], d["head"]) for d in report["dormant_heads"]}
    assert dormant == {(SINK_LAYER, SINK_HEAD)}
    head = report["attention_sinks"]["per_layer"][SINK_LAYER]["heads"][SINK_HEAD]
    assert head["sink_position"] == 0 and head["mass_on_first_token"] > 0.99 and head["dormant_rate"] == 1.0


def test_planted_dead_neurons_found_exactly(planted_report):
    _, report = planted_report
    assert [d["dead"] for d in report["dead_neurons"]] == [len(DEAD)] * 3
    density = report.arrays["neuron_density"]
    assert set((density == 0).nonzero()[:, 1].tolist()) == set(DEAD)


def test_diagnostics_equal_an_independent_full_computation(tiny_tokenizer):
    model = tiny_model("llama", max_position_embeddings=256)
    report = actscope.scan(model, tiny_tokenizer, None, **KW)
    tokens = load_tokens(None, tiny_tokenizer, 64, 64 * 24)
    with torch.inference_mode(), actscope.trace(model, ["blocks.**"]) as c:
        model(input_ids=tokens.input_ids)
    tau = report["config"]["tau"]
    for l in range(2):
        a = c[f"blocks.{l}.mlp.hook_post"].double()  # [seqs, T, d_ff]
        mag = a.abs()
        got = report["mlp_sparsity"][l]
        profiled = mag[:: report["config"]["profile_every"]]  # every n-th sequence
        for t, value in got["density"].items():
            assert value == pytest.approx(float((profiled > float(t)).double().mean()), abs=1e-6)
        active = mag > tau
        assert got["token_sparsity"] == pytest.approx(1 - float(active.double().mean()), abs=1e-6)
        union = active.reshape(24, 8, 8, -1).any(2).double().mean()
        assert got["chunk_sparsity_8"] == pytest.approx(1 - float(union), abs=1e-6)
        sub = a[:: report["config"]["profile_every"]]
        delta = ((sub[:, 1:] - sub[:, :-1]).abs() <= tau).double().mean()
        assert got["delta_sparsity"] == pytest.approx(float(delta), abs=1e-6)
        assert report["dead_neurons"][l]["dead"] == int((~active.reshape(-1, a.shape[-1]).any(0)).sum())
        codes = {tuple(row) for row in active.reshape(-1, a.shape[-1]).tolist()}
        assert report["neural_codes"][l]["uniqueness"] == pytest.approx(len(codes) / a[..., 0].numel(), abs=0.03)
        flat = a.reshape(-1, a.shape[-1])
        prof = sub.reshape(-1, a.shape[-1])
        torch.testing.assert_close(report.arrays["neuron_mean"][l].double(), prof.mean(0), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(report.arrays["neuron_std"][l].double(), prof.std(0, unbiased=False), atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(report.arrays["neuron_max"][l].double(), flat.max(0).values, atol=1e-6, rtol=1e-5)
        # attention: sink scores and mass on the first token
        p = c[f"blocks.{l}.attn.hook_pattern"].double()  # [S, H, T, T]
        mass = p[:, :, 1:, 0].mean(-1).mean(0)
        heads = report["attention_sinks"]["per_layer"][l]["heads"]
        for h, head in enumerate(heads):
            assert head["mass_on_first_token"] == pytest.approx(float(mass[h]), abs=1e-5)
        seen = torch.arange(64, 0, -1, dtype=torch.float64)
        scores = p.sum(2).mean(0) / seen  # [H, T]
        torch.testing.assert_close(report.arrays["sink_scores"][l].double(), scores, atol=1e-5, rtol=1e-4)
        # layer use: relative update and cosines
        h_in = c[f"blocks.{l}.hook_resid_pre"].double()
        h_out = c[f"blocks.{l}.hook_resid_post"].double()
        rel = ((h_out - h_in).norm(dim=-1) / h_in.norm(dim=-1)).mean()
        use = report["layer_use"][l]
        assert use["relative_update"] == pytest.approx(float(rel), rel=1e-5)
        cos = torch.nn.functional.cosine_similarity(c[f"blocks.{l}.hook_attn_out"].double(), h_in, dim=-1).mean()
        assert use["cos_attn_to_residual"] == pytest.approx(float(cos), abs=1e-5)
    assert report["layer_use"][1]["logit_lens_kl"] == pytest.approx(0.0, abs=1e-5)  # last layer: lens = output


def test_cett_equals_a_brute_force_search():
    torch.manual_seed(0)
    down = torch.nn.Linear(32, 8)
    a = torch.randn(5, 32)
    stats = MlpLayerStats(32, (0.0,), 0.0)
    with torch.no_grad():
        stats.update_cett(a, down, bound=0.3)
        want = []
        for row in a:
            best = 0.0
            order = row.abs().argsort()
            for s in CETT_GRID.tolist():
                kept = row.clone()
                kept[order[: int(s * 32)]] = 0
                err = (down(kept) - down(row)).norm() / (down(row) - down.bias).norm()
                if err <= 0.3:
                    best = max(best, s)
            want.append(best)
    assert stats.cett_sum / stats.cett_n == pytest.approx(sum(want) / len(want), abs=1e-6)


def test_active_dormant_heads_from_two_corpora(tmp_path, tiny_tokenizer):
    plain_text = "a cat sat on a mat and a dog ran to a log. " * 200
    switch_text = "the cat sat on the mat and the dog ran to the log. " * 200
    switch_id = tiny_tokenizer("the", add_special_tokens=False)["input_ids"][0]
    assert switch_id not in tiny_tokenizer(plain_text, add_special_tokens=False)["input_ids"]
    model = planted_gpt2(switch_token=switch_id)
    report = actscope.scan(model, tiny_tokenizer, [plain_text], compare_data=[switch_text], **KW)
    heads = report["comparison"]["active_dormant_heads"]
    assert [(h["layer"], h["head"], h["dormant_on"]) for h in heads] == [(SINK_LAYER, SINK_HEAD, "main")]
    assert "dormant on one corpus and active on the other" in " ".join(report["summary"])


def test_report_files_and_json_keys(planted_report, tmp_path):
    _, report = planted_report
    page = report.save(tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    for key in ["model", "tokens", "mlp_sparsity", "massive_activations", "attention_sinks", "dormant_heads",
                "layer_use", "dead_neurons", "neural_codes", "logit_lens", "summary"]:
        assert key in data, key
    assert data["tokens"] == 64 * 24
    assert len(data["attention_sinks"]["per_layer"][0]["heads"]) == 4
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "data:image/png;base64," in text
    assert "http://" not in text and "https://" not in text  # self-contained
    assert "<svg" in report._repr_html_()
    assert not math.isnan(data["layer_use"][0]["relative_update"])


def test_scan_without_patterns_and_bad_options(tiny_tokenizer):
    model = tiny_model("llama", max_position_embeddings=256)
    report = actscope.scan(model, tiny_tokenizer, None, patterns=False, **KW)
    assert report["attention_sinks"] == {"enabled": False}
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(actscope.ActscopeError, match="unknown scan option 'sequence_length'"):
        actscope.scan(model, tiny_tokenizer, None, sequence_length=3)
    with pytest.raises(actscope.ActscopeError, match="exceeds the model's context length of 256"):
        actscope.scan(model, tiny_tokenizer, None, seq_len=1024)


def test_scan_leaves_the_callers_config_unchanged(tiny_tokenizer):
    from dataclasses import asdict

    model = tiny_model("llama")
    cfg = actscope.ScanConfig(seq_len=32, max_tokens=64, batch_size=2, patterns=False)
    before = asdict(cfg)
    report = actscope.scan(model, tiny_tokenizer, None, config=cfg, progress=False, seq_len=16, topk=2)
    assert asdict(cfg) == before and cfg.seq_len == 32 and cfg.topk == 5
    assert report["config"]["seq_len"] == 16 and report["config"]["topk"] == 2  # the overrides did apply


def test_summary_names_the_layer_runs_and_the_peak():
    from actscope.report.summary import summarize

    def row(layer: int, value: float, dim: int = 507) -> dict:
        return {"layer": layer, "dim": dim, "position": 0, "token": "<s>", "value": value,
                "ratio_to_median": value / 0.5, "count": 20}

    # like the default model: 938 in layer 2, nothing in 3-10, about 25,000 in 11-27 (peak in 19)
    rows = [row(2, 938.0)] + [row(l, 25_000.0 + (500.0 if l == 19 else l)) for l in range(11, 28)]
    rows.append(row(5, 300.0, dim=9))  # another dimension must not join dimension 507's layers
    report = {"massive_activations": sorted(rows, key=lambda r: -abs(r["value"])),
              "tokens": 64 * 20, "config": {"seq_len": 64}}
    assert summarize(report)[0] == (
        "Massive activation: residual dimension 507 at position 0 of every sequence appears in "
        "layer 2 and layers 11-27, peaking in layer 19 at 25,500 (51,000x the median; largest on token '<s>')."
    )
    from actscope.report.summary import _span

    assert _span([9, 0, 1, 2, 5, 8]) == "layers 0-2, layer 5 and layers 8-9"
