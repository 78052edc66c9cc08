"""The command line: real runs, and a one-line error with exit status 2 for each bad input."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from actscope import open_store
from actscope.cli import main


def run(argv, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["actscope", *argv])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_sites_lists_every_site_with_shape(tiny_llama_dir, capsys, monkeypatch):
    code, out, _ = run(["sites", str(tiny_llama_dir)], capsys, monkeypatch)
    assert code == 0
    lines = dict(line.split("\t") for line in out.strip().splitlines())
    assert lines["blocks.1.hook_resid_post"] == "[1, 4, 64]"
    assert lines["blocks.0.attn.hook_k"] == "[1, 4, 2, 16]"
    assert lines["blocks.0.attn.hook_pattern"] == "[1, 4, 4, 4]"
    assert len(lines) == 2 + 2 * 12


def test_record_then_resume_from_cli(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    data = tmp_path / "corpus.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    args = ["record", "--model", str(tiny_llama_dir), "--data", str(data), "--sites", "blocks.*.hook_resid_post",
            "--seq-len", "64", "--out", str(tmp_path / "st"), "--dtype", "float16"]
    code, out, _ = run(args, capsys, monkeypatch)
    assert code == 0 and "2 sites" in out
    store = open_store(str(tmp_path / "st"))
    assert store.dtype == "float16" and store.num_tokens % 64 == 0 and store.num_tokens > 0
    code, _, _ = run(args, capsys, monkeypatch)  # re-run: nothing left to do, still fine
    assert code == 0


def _gguf_without_tokenizer(path):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown_model", "unknown model 'no-such-org/no-such-model'"),
        ("gguf_no_tokenizer", "has no usable tokenizer data"),
        ("missing_gguf", "GGUF file not found"),
        ("unknown_site", "closest valid sites: blocks.1.hook_resid_post"),
        ("empty_file", "file is empty"),
        ("not_utf8", "not UTF-8 text"),
        ("seq_len", "exceeds the model's context length of 256"),
        ("bad_dtype", "unknown dtype 'float8'"),
    ],
)
def test_bad_input_gives_one_line_error(case, message, tiny_llama_dir, tmp_path, capsys, monkeypatch):
    model, data, extra = str(tiny_llama_dir), [], []
    sites = "blocks.*.hook_resid_post"
    if case == "unknown_model":
        model = "no-such-org/no-such-model"
    elif case == "gguf_no_tokenizer":
        model = str(tmp_path / "bare.gguf")
        _gguf_without_tokenizer(model)
    elif case == "missing_gguf":
        model = str(tmp_path / "nothing.gguf")
    elif case == "unknown_site":
        sites = "blocks.1.hook_resid_pots"
    elif case in {"empty_file", "not_utf8"}:
        f = tmp_path / "data.txt"
        f.write_bytes(b"" if case == "empty_file" else b"\xff\xfe bad bytes")
        data = ["--data", str(f)]
    elif case == "seq_len":
        extra = ["--seq-len", "1024"]
    elif case == "bad_dtype":
        extra = ["--dtype", "float8"]
    out = tmp_path / "store"
    code, _, err = run(["record", "--model", model, "--sites", sites, "--out", str(out), *data, *extra],
                       capsys, monkeypatch)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not (out / "manifest.json").exists()


def test_steer_and_generate_from_cli(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("I love this\nWhat a happy day\n")
    neg.write_text("I hate this\nWhat a sad day\n")
    vec = tmp_path / "vec.gguf"
    code, out, err = run(["steer", "--model", str(tiny_llama_dir), "--positive", str(pos), "--negative", str(neg),
                          "--layers", "0-1", "--out", str(vec)], capsys, monkeypatch)
    assert code == 0, err
    assert "layers 0-1" in out and vec.exists()
    code, out, err = run(["generate", "--model", str(tiny_llama_dir), "--steer", str(vec), "--scale", "8",
                          "--prompt", "Today", "--max-new-tokens", "5", "--compare"], capsys, monkeypatch)
    assert code == 0, err
    assert out.count("Today") == 2 and "[steered x8]" in out
    code, _, err = run(["generate", "--model", str(tiny_llama_dir), "--steer", str(vec), "--prompt", "Today",
                        "--static-cache"], capsys, monkeypatch)
    assert code == 2 and "cannot carry steering" in err
    code, _, err = run(["steer", "--model", str(tiny_llama_dir), "--positive", str(pos), "--negative", str(neg),
                        "--layers", "0-x", "--out", str(vec)], capsys, monkeypatch)
    assert code == 2 and "use a range like 8-20" in err


def test_patch_from_cli(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    code, out, err = run(["patch", "--model", str(tiny_llama_dir), "--clean", "the value of the list",
                          "--corrupted", "the value of the dict", "--target", " list", "--out", str(tmp_path)],
                         capsys, monkeypatch)
    assert code == 0, err
    assert "largest effect" in out and (tmp_path / "effects.json").exists() and (tmp_path / "effects.png").exists()


def test_sparsify_calibrate_eval_and_sparse_generation(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    import json

    data = tmp_path / "corpus.txt"
    data.write_text("The quick brown fox jumps over the lazy dog while the cat sleeps. " * 300)
    cfg = tmp_path / "wina"
    code, out, err = run(["sparsify", "calibrate", "--model", str(tiny_llama_dir), "--data", str(data),
                          "--method", "wina", "--sparsity", "0.5", "--seq-len", "32", "--max-tokens", "512",
                          "--out", str(cfg)], capsys, monkeypatch)
    assert code == 0, err
    assert (cfg / "sparsity_config.json").exists() and (cfg / "thresholds.safetensors").exists()
    code, out, err = run(["generate", "--model", str(tiny_llama_dir), "--prompt", "The quick",
                          "--sparsity", str(cfg), "--max-new-tokens", "4"], capsys, monkeypatch)
    assert code == 0, err
    assert out.startswith("The quick") and "achieved" in err and "wina" in err
    code, out_static, err = run(["generate", "--model", str(tiny_llama_dir), "--prompt", "The quick", "--device", "cpu",
                                 "--sparsity", str(cfg), "--max-new-tokens", "4", "--static-cache"], capsys, monkeypatch)
    assert code == 0, err
    assert out_static == out  # the static-cache loop decodes exactly what HF's generate does
    code, out_compiled, err = run(["generate", "--model", str(tiny_llama_dir), "--prompt", "The quick", "--device",
                                   "cpu", "--sparsity", str(cfg), "--max-new-tokens", "4", "--compile"], capsys, monkeypatch)
    assert code == 0, err
    assert out_compiled == out and "compiling included" in err
    code, _, err = run(["generate", "--model", str(tiny_llama_dir), "--prompt", "x", "--compile", "--no-static-cache"],
                       capsys, monkeypatch)
    assert code == 2 and "drop --no-static-cache" in err
    code, out, err = run(["sparsify", "eval", "--model", str(tiny_llama_dir), "--data", str(data),
                          "--methods", "teal,topk", "--sparsities", "0.3,0.6", "--calib-tokens", "256",
                          "--eval-tokens", "256", "--seq-len", "32", "--choices", "6",
                          "--out", str(tmp_path / "ev")], capsys, monkeypatch)
    assert code == 0, err
    assert "accuracy" in out
    result = json.loads((tmp_path / "ev" / "sparsity_eval.json").read_text())
    assert set(result["curves"]) == {"teal", "topk"} and len(result["curves"]["teal"]) == 2
    assert result["meta"]["choice_items"] == 6 and "accuracy" in result["curves"]["topk"][1]
    assert set(result["ppl_p_sparsity"]["teal"]) == {"1%", "5%"}
    paired = result["paired"]["topk vs teal"]["0.3"]
    assert paired["low"] <= paired["ratio"] <= paired["high"] and "perplexity topk vs teal  30%:" in out
    assert (tmp_path / "ev" / "ppl_vs_sparsity.svg").read_text().startswith("<svg xmlns")
    code, _, err = run(["generate", "--model", str(tiny_llama_dir), "--prompt", "x", "--sparsity",
                        str(tmp_path / "nothing")], capsys, monkeypatch)
    assert code == 2 and "no sparsity_config.json" in err
