"""Probes: scikit-learn parity (the real package), planted feature, chance, control task, MDL, labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

import actscope
from actscope.compare import LinearProbe, control_labels, kfold_score, load_labels, online_codelength, probe_layers


@pytest.mark.parametrize("classes, C", [(2, 0.5), (3, 2.0)])
def test_probabilities_equal_sklearn(classes, C):
    rs = np.random.RandomState(classes)
    X = rs.randn(400, 12)
    y = np.digitize(X[:, 0] + 0.7 * rs.randn(400), [-0.4, 0.4][: classes - 1])
    ours = LinearProbe(C=C).fit(X, y)
    ref = LogisticRegression(C=C, solver="lbfgs", tol=1e-10, max_iter=10_000).fit(X, y)
    assert np.abs(ours.predict_proba(X) - ref.predict_proba(X)).max() < 1e-6
    assert (ours.predict(X) == ref.predict(X)).all()


def _planted(n=1500, d=32, seed=0):
    rs = np.random.RandomState(seed)
    X = rs.randn(n, d)
    w = rs.randn(d)
    y = (X @ w > 0).astype(int)
    types = rs.randint(0, 600, n)  # word types unrelated to the feature
    return X, y, types


def test_planted_feature_is_found_and_selective():
    X, y, types = _planted()
    task = kfold_score(LinearProbe(), X, y)
    ctrl = kfold_score(LinearProbe(), X, control_labels(types, y))
    assert task["score"] >= 0.95 and task["low"] < task["score"] < task["high"]
    assert task["score"] - ctrl["score"] >= 0.4


def test_random_labels_stay_at_chance():
    X, _, _ = _planted(seed=1)
    y = np.random.RandomState(5).randint(0, 2, len(X))
    res = kfold_score(LinearProbe(), X, y)
    assert res["low"] <= 0.5 + 0.02 and abs(res["score"] - 0.5) < 0.05


def test_control_labels_are_per_type():
    ctrl = control_labels([5, 7, 5, 9, 7, 5], ["a", "b", "a", "b", "a", "b"], seed=3)
    assert ctrl[0] == ctrl[2] == ctrl[5] and ctrl[1] == ctrl[4]


def test_online_codelength_compresses_only_a_real_signal():
    X, y, _ = _planted(n=800)
    real = online_codelength(X, y)
    noise = online_codelength(X, np.random.RandomState(2).randint(0, 2, 800))
    assert real["uniform_bits"] == 800 and real["compression"] > 2 and noise["compression"] < 1.1


def test_ridge_probe_r2():
    X, _, _ = _planted(n=300)
    t = X[:, 0] * 2 + 0.1 * np.random.RandomState(0).randn(300)
    assert kfold_score(LinearProbe("ridge", alpha=1.0), X, t)["score"] > 0.95


@pytest.fixture(scope="module")
def store(tiny_llama, tmp_path_factory):
    model, tok = tiny_llama
    out = tmp_path_factory.mktemp("probe") / "store"
    return actscope.record(model, tok, str(out), ["blocks.*.hook_resid_post"], dtype="float32", seq_len=32,
                           max_tokens=32 * 20, batch_size=4, shard_mb=0.1, progress=False)


def test_probe_layers_from_label_files(store, tmp_path):
    ids = store.token_ids().reshape(-1).numpy()
    labels = tmp_path / "labels.jsonl"
    # a lexical property: does the token id fall in the upper half? (layer 0 sees the embedding)
    labels.write_text("\n".join(json.dumps({"token": i, "label": int(ids[i] >= 128)}) for i in range(0, 640, 2)))
    res = probe_layers(store, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], labels, mdl=True)
    assert len(res.accuracy) == 2 and all(0 <= a <= 1 for a in res.accuracy)
    assert res.accuracy[0] > res.chance and res.control[0] is not None and res.mdl[0]["compression"] > 0
    folder = res.save(tmp_path / "out")
    data = json.loads((folder / "probe.json").read_text())
    assert data["sites"] == res.sites and "selectivity" in data and (folder / "probe.svg").exists()
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("sequence,position,label\n0,3,x\n1,4,y\n2,5,x\n")
    lab = load_labels(csv_file, store)
    assert lab.rows.tolist() == [3, 36, 69] and lab.types.tolist() == ids[[3, 36, 69]].tolist()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"token": 99999, "label": 1}\n')
    with pytest.raises(actscope.DataError, match="token indices must be in"):
        load_labels(bad, store)
