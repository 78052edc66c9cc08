"""CKA: exact formulas, Kornblith's golden values, conventions, the outlier guard, streaming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import actscope
from actscope.compare import (OutlierWarning, center_gram, cka, cka_angle, cka_distance, cka_gram, gram_rbf, minibatch_cka, minibatch_cka_matrix, outlier_report, stream_cka)


@pytest.fixture(scope="module")
def golden():
    rs = np.random.RandomState(1337)
    X = rs.randn(100, 10)
    Y = rs.randn(100, 10) + X
    return X, Y


def test_kornblith_golden_values(golden):
    X, Y = golden
    assert round(cka(X, Y), 5) == 0.55761
    assert round(cka(X, Y, debiased=True), 5) == 0.51346
    assert round(cka(X, Y, kernel="rbf", threshold=0.5), 5) == 0.65483


def _hsic_biased(K, L):
    n = len(K)
    H = np.eye(n) - np.ones((n, n)) / n
    return np.trace(K @ H @ L @ H) / (n - 1) ** 2


def _hsic_unbiased(K, L):  # Song et al. (2012), eq. 5, written out
    n = len(K)
    Kt, Lt = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
    one = np.ones(n)
    return (np.trace(Kt @ Lt) + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ Kt @ Lt @ one) / (n * (n - 3))


@pytest.mark.parametrize("debiased", [False, True])
def test_feature_space_equals_gram_space_formulas(debiased):
    rs = np.random.RandomState(0)
    X, Y = rs.randn(60, 7) * 3 + 5, rs.randn(60, 12) @ rs.randn(12, 12) - 2
    K, L = X @ X.T, Y @ Y.T
    h = _hsic_unbiased if debiased else _hsic_biased
    ref = h(K, L) / np.sqrt(h(K, K) * h(L, L))
    assert abs(cka(X, Y, debiased=debiased) - ref) < 1e-10
    assert abs(cka_gram(K, L, debiased=debiased) - ref) < 1e-10
    # torch input, float32 or not, gives the same float64 value from the same numbers
    assert abs(cka(torch.from_numpy(X), torch.from_numpy(Y), debiased=debiased) - ref) < 1e-10
    # the rbf path in Gram space agrees with the explicit HSIC too
    Kr, Lr = gram_rbf(X, 0.8), gram_rbf(Y, 0.8)
    assert abs(cka(X, Y, kernel="rbf", threshold=0.8, debiased=debiased)
               - h(Kr, Lr) / np.sqrt(h(Kr, Kr) * h(Lr, Lr))) < 1e-10
    assert np.allclose(center_gram(K).sum(0), 0, atol=1e-9)


def test_self_cka_is_one_and_invariances(golden):
    X, _ = golden
    Q, _ = np.linalg.qr(np.random.RandomState(1).randn(10, 10))
    for debiased in (False, True):
        assert abs(cka(X, X, debiased=debiased) - 1) < 1e-12
        assert abs(cka(X, 3 * X @ Q + 7, debiased=debiased) - 1) < 1e-12  # rotation, scale, shift
    assert abs(cka(X, X, kernel="rbf") - 1) < 1e-12


def test_conventions_are_stated_conversions(golden):
    X, Y = golden
    c = cka(X, Y)
    assert cka_distance(c) == pytest.approx(1 - 0.5576132566, abs=1e-9)  # anatome: 1 - CKA
    assert cka_angle(c) == pytest.approx(np.arccos(0.5576132566), abs=1e-9)  # netrep: arccos(CKA)
    assert cka_angle(1.0) == 0.0 and cka_angle(0.0) == pytest.approx(np.pi / 2)
    assert np.allclose(cka_distance(np.array([1.0, 0.25])), [0.0, 0.75])


def test_planted_outlier_collapses_linear_cka_and_is_flagged():
    rs = np.random.RandomState(0)
    X = rs.randn(2000, 64)
    Y = X @ rs.randn(64, 64) * 0.3 + rs.randn(2000, 64)
    base = cka(X, Y)
    Xo = X.copy()
    Xo[rs.choice(2000, 20, replace=False), 5] += 500.0  # one dimension, 1% of rows
    with pytest.warns(OutlierWarning, match="carry"):
        plain = cka(Xo, Y)
    assert base > 0.5 and plain < 0.1
    rep = outlier_report(Xo)
    assert rep.flagged and rep.dims[0] == 5 and rep.share > 0.9
    assert not outlier_report(X).flagged
    guarded = cka(Xo, Y, standardize=True)
    assert guarded > 0.4


def test_exclude_positions_drops_rows():
    rs = np.random.RandomState(0)
    X, Y = rs.randn(64, 5), rs.randn(64, 6)
    keep = np.arange(64) % 8 != 0
    assert cka(X, Y, exclude_positions=[0], seq_len=8) == pytest.approx(cka(X[keep], Y[keep]), abs=1e-14)


def test_minibatch_cka_converges_to_debiased_not_biased():
    rs = np.random.RandomState(2)
    X = rs.randn(4096, 40)
    Y = X[:, :20] @ rs.randn(20, 30) + 2 * rs.randn(4096, 30)
    mb = minibatch_cka(X=X, Y=Y, batch_size=512, seed=0)
    assert abs(mb - cka(X, Y, debiased=True)) < 0.02
    # one batch holding everything is exactly the debiased value
    assert abs(minibatch_cka([(X[:300], Y[:300])]) - cka(X[:300], Y[:300], debiased=True)) < 1e-10
    # with few rows per batch the biased estimate is inflated; the minibatch one is not
    small = minibatch_cka(X=X[:, :40], Y=rs.randn(4096, 30), batch_size=64, seed=0)
    assert abs(small) < 0.05 and cka(X[:64], rs.randn(64, 30)) > 0.2


def test_minibatch_cka_matrix_equals_each_pair_and_an_independent_hsic():
    rs = np.random.RandomState(3)
    sites = [rs.randn(512, d) for d in (8, 12, 5)]
    sites[1][:, :8] += sites[0]
    batches = [[x[i:i + 128] for x in sites] for i in range(0, 512, 128)]
    m = minibatch_cka_matrix((b, b[::-1]) for b in batches)
    assert m.shape == (3, 3)
    for i in range(3):
        for j in range(3):
            pair = minibatch_cka([(b[i], b[::-1][j]) for b in batches])
            assert abs(m[i, j] - pair) < 1e-12

    def hsic_u(K, L):  # Song et al. 2012, eq. 5, written out with explicit loops over the terms
        n = len(K)
        K, L = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
        one = np.ones(n)
        return (np.trace(K @ L) + one @ K @ one * (one @ L @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * one @ K @ L @ one) / (n * (n - 3))

    grams = [[x @ x.T for x in b] for b in batches]
    num = np.mean([hsic_u(g[0], g[1]) for g in grams])
    den = np.sqrt(np.mean([hsic_u(g[0], g[0]) for g in grams]) * np.mean([hsic_u(g[1], g[1]) for g in grams]))
    assert abs(m[0, 1] - num / den) < 1e-12


@pytest.fixture(scope="module")
def store(tiny_llama, tmp_path_factory):
    model, tok = tiny_llama
    out = tmp_path_factory.mktemp("cka") / "store"
    return actscope.record(model, tok, str(out), ["blocks.*.hook_resid_post", "blocks.0.mlp.hook_post"],
                           dtype="float32", seq_len=32, max_tokens=32 * 12, batch_size=4, shard_mb=0.05,
                           progress=False)


def test_streaming_equals_in_memory(store):
    sites = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.0.mlp.hook_post"]
    res = stream_cka(store, sites, chunk=100)  # chunks cross shard and sequence boundaries
    data = {s: store.read(s) for s in sites}
    for i, a in enumerate(sites):
        for j, b in enumerate(sites):
            assert abs(res.matrix[i, j] - cka(data[a], data[b], warn=False)) < 1e-10
            assert abs(res.debiased[i, j] - cka(data[a], data[b], debiased=True, warn=False)) < 1e-10
    assert res.n_tokens == store.num_tokens and np.allclose(res.matrix, res.matrix.T)
    guarded = stream_cka(store, sites, standardize=True, exclude_positions=[0], chunk=77)
    for i, a in enumerate(sites):
        for j, b in enumerate(sites):
            for deb, mat in ((False, guarded.matrix), (True, guarded.debiased)):
                want = cka(data[a], data[b], debiased=deb, standardize=True, exclude_positions=[0], seq_len=32)
                assert abs(mat[i, j] - want) < 1e-10
    assert guarded.n_tokens == store.num_tokens * 31 // 32


def test_stream_globs_rectangles_and_saves(store, tmp_path):
    res = stream_cka(store, "blocks.*.hook_resid_post", sites_b=["blocks.0.mlp.hook_post"], guard=True)
    assert res.sites_a == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert res.matrix.shape == (2, 1) and res.guarded is not None
    folder = res.save(tmp_path / "out")
    import json

    data = json.loads((folder / "cka.json").read_text())
    assert data["sites_a"] == res.sites_a and len(data["matrix"]) == 2 and "guarded" in data
    assert (folder / "cka.png").read_bytes()[:4] == b"\x89PNG" and (folder / "cka_guarded.svg").exists()
    assert "<img" in res._repr_html_()
    with pytest.raises(actscope.ActscopeError, match="no site of the store matches"):
        stream_cka(store, "blocks.*.hook_nothing")


def test_two_stores_on_the_same_tokens(store, tiny_llama, tmp_path):
    res = stream_cka(store, "blocks.1.hook_resid_post", store_b=store, sites_b="blocks.*.hook_resid_post")
    assert res.matrix[0, 1] == pytest.approx(1.0, abs=1e-12)


def test_reachable_from_import_actscope():
    assert actscope.compare.cka is cka
