"""``actscope sae train|eval``: a sweep in one command, eval JSON, one-line errors with exit status 2."""

from __future__ import annotations

import json

import pytest

import actscope
from actscope.sae import load
from conftest import run_cli as run

SITE = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def store_dir(tiny_llama, tmp_path_factory):
    model, tok = tiny_llama
    out = tmp_path_factory.mktemp("sae-cli") / "store"
    actscope.record(model, tok, str(out), [SITE], seq_len=32, max_tokens=32 * 16, batch_size=4, shard_mb=0.05,
                    dtype="float32", progress=False)
    return out


def test_train_a_sweep_then_eval_one(store_dir, tmp_path, tiny_llama_dir, capsys, monkeypatch):
    code, out, err = run(["sae", "train", "--store", str(store_dir), "--site", SITE, "--k", "4", "--k", "8",
                          "--expansion", "2", "--batch-size", "64", "--tokens", "640", "--out", str(tmp_path / "sweep")],
                         capsys, monkeypatch)
    assert code == 0, err
    assert out.count("fvu") == 2 and "-topk-k4-x2" in out and "-topk-k8-x2" in out
    folder = tmp_path / "sweep" / f"{SITE}-topk-k8-x2"
    assert load(folder).k == 8
    code, out, err = run(["sae", "eval", "--sae", str(folder), "--store", str(store_dir), "--model",
                          str(tiny_llama_dir), "--sequences", "2", "--out", str(tmp_path / "m.json")], capsys, monkeypatch)
    assert code == 0, err
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert {"fvu", "l0", "ce_loss_recovered", "kl_score", "ce_delta"} <= set(metrics) and "fvu" in out


def test_one_trained_sae_is_the_out_folder_itself(store_dir, tmp_path, capsys, monkeypatch):
    code, out, err = run(["sae", "train", "--store", str(store_dir), "--site", SITE, "--arch", "relu",
                          "--expansion", "2", "--batch-size", "64", "--tokens", "320", "--out", str(tmp_path / "one")],
                         capsys, monkeypatch)
    assert code == 0, err
    assert load(tmp_path / "one").architecture == "relu"
    assert load(tmp_path / "one").get_params()["optimizer"] == "signum"  # the default
    code, out, err = run(["sae", "train", "--store", str(store_dir), "--site", SITE, "--optimizer", "adam",
                          "--expansion", "2", "--batch-size", "64", "--tokens", "320", "--out", str(tmp_path / "adam")],
                         capsys, monkeypatch)
    assert code == 0, err
    assert load(tmp_path / "adam").get_params()["optimizer"] == "adam"


@pytest.mark.parametrize("argv, message", [
    (["--site", SITE, "--arch", "gated"], "--arch must be one of"),
    (["--site", "blocks.9.nope"], "not in this store"),
    (["--site", SITE, "--k", "four"], "--k takes whole numbers"),
    (["--site", SITE, "--k", "0"], "must be positive"),
    (["--site", SITE, "--optimizer", "sgd"], "optimizer must be one of adam, signum"),
])
def test_bad_training_input_is_one_error_line(store_dir, tmp_path, capsys, monkeypatch, argv, message):
    code, out, err = run(["sae", "train", "--store", str(store_dir), "--out", str(tmp_path / "x"), *argv],
                         capsys, monkeypatch)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_bad_eval_input_is_one_error_line(store_dir, tmp_path, capsys, monkeypatch):
    code, out, err = run(["sae", "eval", "--sae", str(tmp_path), "--store", str(store_dir)], capsys, monkeypatch)
    assert code == 2 and err.startswith("error: ") and "not an SAE folder" in err
    code, out, err = run(["sae", "eval", "--sae", str(tmp_path), "--store", str(tmp_path / "none")], capsys, monkeypatch)
    assert code == 2 and err.startswith("error: ")
