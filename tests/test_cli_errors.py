"""Issue #11: every bad input on the command line ends in one ``error:`` line and exit status 2.

A table of the probe's bad inputs (docs/reliability.md) and more: each row sets up its files,
runs the CLI's ``main`` in-process, and asserts exit 2, exactly one non-empty stderr line, that
line starting with ``error:`` and holding the expected words, and no traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli as run




def _vector(folder: Path, tensors: dict) -> str:
    from safetensors.torch import save_file

    folder.mkdir()
    save_file(tensors, folder / "vectors.safetensors")
    (folder / "steering_config.json").write_text(json.dumps({"method": "mean_diff", "layers": [0]}))
    return str(folder)


def _setup(case: str, tmp: Path, model: str) -> list[str]:
    """The argv of one case; files it needs are created under ``tmp``."""
    text = tmp / "corpus.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 100)
    rec = ["record", "--model", model, "--sites", "blocks.0.hook_resid_post", "--data", str(text), "--seq-len", "32"]
    store = ["--out", str(tmp / "store")]
    gen = ["generate", "--model", model, "--max-new-tokens", "3"]
    good = {"direction.0": torch.ones(64), "direction.1": torch.ones(64)}
    patch = ["patch", "--model", model, "--target", " the"]
    if case == "batch_size_0":
        return rec + store + ["--batch-size", "0"]
    if case == "batch_size_neg":
        return rec + store + ["--batch-size", "-3"]
    if case == "batch_size_text":
        return rec + store + ["--batch-size", "abc"]
    if case == "max_tokens_neg":
        return rec + store + ["--max-tokens", "-100"]
    if case == "max_tokens_0":
        return rec + store + ["--max-tokens", "0"]
    if case == "max_tokens_below_seq":
        return rec + store + ["--max-tokens", "10"]
    if case == "shard_mb_nan":
        return rec + store + ["--shard-mb", "nan"]
    if case == "shard_mb_neg":
        return rec + store + ["--shard-mb", "-1"]
    if case == "empty_site":
        return ["record", "--model", model, "--sites", " ", "--data", str(text)] + store
    if case == "unknown_option":
        return rec + store + ["--bogus"]
    if case == "data_is_dir":
        return ["record", "--model", model, "--sites", "blocks.0.hook_resid_post", "--data", str(tmp)] + store
    if case == "hf_no_text_field":
        ds = tmp / "ds"
        ds.mkdir()
        (ds / "train.jsonl").write_text(json.dumps({"body": "hello world " * 50}) + "\n")
        return ["record", "--model", model, "--sites", "blocks.0.hook_resid_post", "--data", f"hf:{ds}"] + store
    if case == "out_is_file":
        (tmp / "afile").write_text("x")
        return rec + ["--out", str(tmp / "afile")]
    if case == "out_users_folder":
        (tmp / "store" / "shards").mkdir(parents=True)
        (tmp / "store" / "shards" / "mine.txt").write_text("keep")
        return rec + store
    if case in {"manifest_list", "manifest_negative_shards"}:
        (tmp / "store").mkdir()
        body = [1, 2] if case == "manifest_list" else {
            "format": "actscope.store", "version": 2, "seq_len": 32, "num_sequences": 4, "sequences_per_shard": 2,
            "batch_size": 2, "num_shards": -1}
        (tmp / "store" / "manifest.json").write_text(json.dumps(body))
        return rec + store
    if case == "broken_config":
        bad = tmp / "model"
        bad.mkdir()
        (bad / "config.json").write_text('{"model_type": "llama",')
        return ["record", "--model", str(bad), "--sites", "blocks.0.hook_resid_post"] + store
    if case == "truncated_gguf":
        from test_cli import _gguf_without_tokenizer

        path = tmp / "m.gguf"
        _gguf_without_tokenizer(path)
        path.write_bytes(path.read_bytes()[:40])
        return ["record", "--model", str(path), "--sites", "blocks.0.hook_resid_post"] + store
    if case == "scan_batch_size_0":
        return ["scan", "--model", model, "--batch-size", "0", "--out", str(tmp / "scan")]
    if case == "scan_tau_nan":
        return ["scan", "--model", model, "--tau", "nan", "--out", str(tmp / "scan")]
    if case == "scan_out_file":
        (tmp / "afile").write_text("x")
        return ["scan", "--model", model, "--out", str(tmp / "afile")]
    if case == "scan_out_foreign":
        (tmp / "scan").mkdir()
        (tmp / "scan" / "thesis.tex").write_text("x")
        return ["scan", "--model", model, "--out", str(tmp / "scan")]
    if case == "generate_empty_prompt":
        return gen + ["--prompt", ""]
    if case == "generate_zero_tokens":
        return ["generate", "--model", model, "--prompt", "Hi", "--max-new-tokens", "0"]
    if case in {"scale_nan", "scale_inf"}:
        return gen + ["--prompt", "Hi", "--steer", _vector(tmp / "v", good), "--scale", case[6:]]
    if case == "scale_huge":
        # finite, but scale x vector overflows float32: the logits become NaN
        big = {"direction.0": torch.full((64,), 1e10)}
        return gen + ["--prompt", "Hi", "--steer", _vector(tmp / "v", big), "--scale", "1e30"]
    if case == "vector_nan":
        return gen + ["--prompt", "Hi", "--steer", _vector(tmp / "v", {"direction.0": torch.full((64,), float("nan"))})]
    if case == "vector_unknown_tensor":
        return gen + ["--prompt", "Hi", "--steer", _vector(tmp / "v", {"weights": torch.ones(64)})]
    if case == "vector_missing":
        return gen + ["--prompt", "Hi", "--steer", str(tmp / "nothing")]
    if case == "patch_empty":
        return patch + ["--clean", "", "--corrupted", "The cat"]
    if case == "patch_same":
        return patch + ["--clean", "The cat sat", "--corrupted", "The cat sat"]
    if case == "patch_multi_token_target":
        return ["patch", "--model", model, "--clean", "the value of the list", "--corrupted", "the value of the dict",
                "--target", " mat"]
    if case == "patch_multi_token_foil":
        return ["patch", "--model", model, "--clean", "the value of the list", "--corrupted", "the value of the dict",
                "--target", " value", "--foil", " mat"]
    if case == "trace_samples_0":
        return ["causal-trace", "--model", model, "--prompt", "The cat sat", "--subject", "cat", "--target", " on",
                "--samples", "0"]
    if case == "steer_missing_file":
        return ["steer", "--model", model, "--positive", str(tmp / "no.txt"), "--negative", str(text),
                "--out", str(tmp / "v")]
    raise AssertionError(case)


CASES = {
    "batch_size_0": "--batch-size must be a positive integer, got 0",
    "batch_size_neg": "--batch-size must be a positive integer, got -3",
    "batch_size_text": "Invalid value for '--batch-size'",
    "max_tokens_neg": "--max-tokens must be a positive integer, got -100",
    "max_tokens_0": "--max-tokens must be a positive integer, got 0",
    "max_tokens_below_seq": "--max-tokens 10 is less than one sequence of --seq-len 32",
    "shard_mb_nan": "--shard-mb must be finite",
    "shard_mb_neg": "--shard-mb must be positive",
    "empty_site": "sites is empty",
    "unknown_option": "No such option: --bogus",
    "data_is_dir": "is a directory; give a text, JSONL or Parquet file",
    "hf_no_text_field": "row 0 has no 'text' field (fields: body)",
    "out_is_file": "is a file; give a folder for the store",
    "out_users_folder": "not empty and holds no actscope store (shards/mine.txt)",
    "manifest_list": "is not an actscope manifest",
    "manifest_negative_shards": "'num_shards' must be a positive integer, got -1",
    "broken_config": "config.json is not valid JSON",
    "truncated_gguf": "is not a readable GGUF file (truncated or corrupted",
    "scan_batch_size_0": "--batch-size must be a positive integer, got 0",
    "scan_tau_nan": "--tau must be finite",
    "scan_out_file": "is a file; give a folder for the report",
    "scan_out_foreign": "holds other files (thesis.tex)",
    "generate_empty_prompt": "--prompt is empty",
    "generate_zero_tokens": "--max-new-tokens must be a positive integer, got 0",
    "scale_nan": "--scale must be finite",
    "scale_inf": "--scale must be finite",
    "scale_huge": "logits are NaN or infinite",
    "vector_nan": "direction.0 holds NaN or infinite values",
    "vector_unknown_tensor": "unknown tensor 'weights'",
    "vector_missing": "not a saved steering vector",
    "patch_empty": "--clean is empty",
    "patch_same": "are the same prompt",
    "patch_multi_token_target": "target ' mat' is 2 tokens ('m' + 'at')",
    "patch_multi_token_foil": "foil ' mat' is 2 tokens",
    "trace_samples_0": "--samples must be a positive integer, got 0",
    "steer_missing_file": "no such file",
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_ends_in_one_error_line(case, tiny_llama_dir, tmp_path, capsys, monkeypatch):
    argv = _setup(case, tmp_path, str(tiny_llama_dir))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, _, err = run(argv, capsys, monkeypatch)
    # progress bars (transformers' "Loading weights") are not messages
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert CASES[case] in lines[0], lines[0]
    assert "Traceback" not in err and "unexpected" not in lines[0]
    for path, data in before.items():  # nothing the user had is changed or removed
        assert path.exists() and path.read_bytes() == data, path


def test_ctrl_c_says_how_to_resume(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    import actscope.models

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(actscope.models, "load_model", interrupted)
    code, _, err = run(["record", "--model", str(tiny_llama_dir), "--sites", "blocks.0.hook_resid_post",
                        "--out", str(tmp_path / "s")], capsys, monkeypatch)
    assert code == 130 and err.strip() == "interrupted; re-run the same command to resume"
    code, _, err = run(["sites", "--model", str(tiny_llama_dir)], capsys, monkeypatch)
    assert code == 130 and err.strip() == "interrupted"


def test_scan_checks_out_before_the_pass(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    import actscope.models

    loaded = []
    monkeypatch.setattr(actscope.models, "load_model", lambda *a, **k: loaded.append(1))
    (tmp_path / "afile").write_text("x")
    code, _, err = run(["scan", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "afile")], capsys, monkeypatch)
    assert code == 2 and loaded == []  # refused before the model even loads


def test_a_scan_report_folder_never_mixes_two_runs(tmp_path, monkeypatch):
    """A kill between the report's files used to leave a new report.json beside an old report.html."""
    from actscope.report.build import ScanReport

    out = tmp_path / "scan"
    old = ScanReport({"run": "old"}, {"a": torch.zeros(2)})
    monkeypatch.setattr(ScanReport, "to_html", lambda self: f"<html>{self.data['run']}</html>")
    old.save(out)
    new = ScanReport({"run": "new"}, {"a": torch.ones(2)})

    def killed(self, path):
        raise KeyboardInterrupt  # the run dies after report.json, before report.html

    monkeypatch.setattr(ScanReport, "save_html", killed)
    with pytest.raises(KeyboardInterrupt):
        new.save(out)
    assert json.loads((out / "report.json").read_text()) == {"run": "old"}
    assert (out / "report.html").read_text() == "<html>old</html>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan"]  # no temporary folder left behind
    monkeypatch.undo()
    monkeypatch.setattr(ScanReport, "to_html", lambda self: f"<html>{self.data['run']}</html>")
    new.save(out)
    assert json.loads((out / "report.json").read_text()) == {"run": "new"}
    assert (out / "report.html").read_text() == "<html>new</html>"
