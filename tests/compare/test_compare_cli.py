"""``actscope compare cka|encode|probe``: real runs on a tiny store, and one-line errors (exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli as run
import actscope
from actscope.compare import synthetic_fmri, pool_features, tr_units




@pytest.fixture(scope="module")
def store(tiny_llama, tmp_path_factory):
    model, tok = tiny_llama
    out = tmp_path_factory.mktemp("cli") / "store"
    actscope.record(model, tok, str(out), ["blocks.*.hook_resid_post"], dtype="bfloat16", seq_len=32,
                    max_tokens=32 * 24, batch_size=4, shard_mb=0.1, progress=False)
    return out


def test_cka_encode_probe(store, tmp_path, capsys, monkeypatch):
    code, out, err = run(["compare", "cka", "--store", str(store), "--out", str(tmp_path / "c")], capsys, monkeypatch)
    assert code == 0, err
    data = json.loads((tmp_path / "c" / "cka.json").read_text())
    assert data["sites_a"] == data["sites_b"] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert np.allclose(np.diag(data["matrix"]), 1) and "guarded" in data and "guarded" in out

    st = actscope.open_store(str(store))
    F = pool_features(st, "blocks.1.hook_resid_post", tr_units(st.num_tokens, 4))
    np.save(tmp_path / "y.npy", synthetic_fmri(F, 20, ceiling=0.9, seed=0).responses)
    (tmp_path / "runs.txt").write_text("\n".join(str(i // 48) for i in range(192)))
    code, out, err = run(["compare", "encode", "--store", str(store), "--responses", str(tmp_path / "y.npy"),
                          "--runs", str(tmp_path / "runs.txt"), "--delays", "0-8", "--out", str(tmp_path / "e")],
                         capsys, monkeypatch)
    assert code == 0, err
    assert json.loads((tmp_path / "e" / "encoding.json").read_text())["best_site"] == "blocks.1.hook_resid_post"

    ids = st.token_ids().reshape(-1).numpy()
    (tmp_path / "l.jsonl").write_text("\n".join(json.dumps({"token": i, "label": int(ids[i] % 2)}) for i in range(300)))
    code, out, err = run(["compare", "probe", "--store", str(store), "--labels", str(tmp_path / "l.jsonl"),
                          "--out", str(tmp_path / "p")], capsys, monkeypatch)
    assert code == 0, err
    assert "selectivity" in out and (tmp_path / "p" / "probe.svg").exists()


@pytest.mark.parametrize("argv, message", [
    (["cka", "--sites", "blocks.*.nope"], "no site of the store matches"),
    (["encode", "--responses", "missing.npy"], "responses file not found"),
    (["encode", "--responses", "BAD"], "not a readable .npy array"),
    (["probe", "--labels", "missing.jsonl"], "label file not found"),
    (["cka", "--store", "STORE2"], "no activation store here"),
])
def test_bad_input_one_error_line(store, tmp_path, capsys, monkeypatch, argv, message):
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    argv = [a.replace("BAD", str(tmp_path / "bad.npy")).replace("STORE2", str(tmp_path)) for a in argv]
    argv = [argv[0], "--store", str(store), *argv[1:], "--out", str(tmp_path / "o")]
    code, _, err = run(["compare", *argv], capsys, monkeypatch)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
