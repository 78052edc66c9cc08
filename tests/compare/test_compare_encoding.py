"""Ridge encoding: parity with himalaya's RidgeCV (the real package), helpers, synthetic fMRI."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from himalaya.ridge import RidgeCV
from sklearn.model_selection import LeaveOneGroupOut

import actscope
from actscope.compare import (RidgeEncoder, ceiling_r, contiguous_folds, delay_features, double_gamma_hrf,
                              encode_layers, explainable_variance, normalize_by_ceiling, pool_features, synthetic_fmri, tr_units, zscore_runs)

ALPHAS = np.logspace(-2, 5, 10)


def _problem(n, p, t, seed=0):
    rs = np.random.RandomState(seed)
    X = rs.randn(n, p)
    W = rs.randn(p, t) * (rs.rand(p, t) > 0.5) * rs.choice([0.02, 0.1, 0.5], t)
    return X, X @ W + rs.randn(n, t)


def _check(ours, ref):
    same = np.isclose(ours.best_alphas_, ref.best_alphas_, rtol=1e-9)
    assert same.mean() >= 0.999
    rel = np.abs(ours.coef_ - ref.coef_).max() / np.abs(ref.coef_).max()
    assert rel < 1e-5
    assert np.allclose(ours.cv_scores_[same], ref.cv_scores_[same], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("n, p, svd", [(240, 30, "auto"), (240, 30, False), (60, 150, "auto")])
def test_equals_himalaya_ridgecv(n, p, svd):
    X, Y = _problem(n, p, 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # himalaya warns that n < p would suit kernel ridge better
        ref = RidgeCV(alphas=ALPHAS, cv=5).fit(X, Y)
    ours = RidgeEncoder(alphas=ALPHAS, cv=5, svd_scoring=svd).fit(X, Y)
    assert ours.coef_.shape == (p, 1000) and ours.best_alphas_.shape == (1000,)
    _check(ours, ref)


def test_groups_and_intercept_equal_himalaya():
    X, Y = _problem(200, 20, 300, seed=1)
    runs = np.repeat(np.arange(4), 50)
    ref = RidgeCV(alphas=ALPHAS, cv=list(LeaveOneGroupOut().split(X, groups=runs))).fit(X, Y)
    _check(RidgeEncoder(alphas=ALPHAS).fit(X, Y, groups=runs), ref)
    ref_i = RidgeCV(alphas=ALPHAS, cv=5, fit_intercept=True).fit(X + 3, Y - 1)
    ours_i = RidgeEncoder(alphas=ALPHAS, cv=5, fit_intercept=True).fit(X + 3, Y - 1)
    _check(ours_i, ref_i)
    assert np.allclose(ours_i.intercept_, ref_i.intercept_, atol=1e-8)


def test_folds_are_contiguous_and_score_is_pearson():
    folds = contiguous_folds(10, 3)
    assert [list(te) for _, te in folds] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    X, Y = _problem(200, 10, 3)
    enc = RidgeEncoder(alphas=[1.0], cv=4).fit(X, Y)
    r = enc.score(X, Y)
    assert np.allclose(r, [np.corrcoef(enc.predict(X)[:, j], Y[:, j])[0, 1] for j in range(3)], atol=1e-12)
    assert enc.predict(X[:, :]).shape == (200, 3) and RidgeEncoder([1.0]).fit(X, Y[:, 0]).predict(X).shape == (200,)
    with pytest.raises(actscope.ActscopeError, match="alphas must be positive"):
        RidgeEncoder(alphas=[0.0, 1.0]).fit(X, Y)


def test_helpers():
    X = np.arange(12.0).reshape(6, 2)
    D = delay_features(X, [0, 1, 2], runs=[0, 0, 0, 1, 1, 1])
    assert D.shape == (6, 6)
    assert D[3, 2:4].tolist() == [0.0, 0.0] and D[4, 2:4].tolist() == X[3].tolist()  # no shift across runs
    Z = zscore_runs(np.r_[np.ones((3, 1)) * np.arange(3)[:, None], 10 + np.arange(3)[:, None] * 5.0], [0] * 3 + [1] * 3)
    assert np.allclose(Z[:3].ravel(), Z[3:].ravel())
    h = double_gamma_hrf(2.0)
    assert abs(h.sum() - 1) < 1e-12 and 2 <= int(np.argmax(h)) <= 3  # peak at 4-6 s
    assert np.allclose(normalize_by_ceiling([0.3, 0.2], [0.6, 0.0]), [0.5, np.nan], equal_nan=True)


def test_synthetic_fmri_recovers_the_planted_ceiling():
    rs = np.random.RandomState(0)
    F = rs.randn(7000, 6)
    sim = synthetic_fmri(F, 60, ceiling=0.6, n_repeats=4, ar=0.5, seed=1)
    assert np.allclose(ceiling_r(sim.repeats).mean(), 0.6, atol=0.02)  # estimated from the repeats
    ev = explainable_variance(sim.repeats)
    assert np.allclose(ev.mean(), 1 / (1 + 4 * (1 / 0.36 - 1)), atol=0.02)  # single-trial share
    X = delay_features(F, range(17))  # the HRF spans 17 TRs of 2 s: the planted model is in the span
    enc = RidgeEncoder(alphas=np.logspace(-1, 5, 13)).fit(X[:5500], sim.responses[:5500])
    r = enc.score(X[5500:], sim.responses[5500:])
    assert abs(r.mean() - 0.6) < 0.02
    assert abs(np.nanmean(normalize_by_ceiling(r, sim.ceiling)) - 1) < 0.04


@pytest.fixture(scope="module")
def store(tiny_llama, tmp_path_factory):
    model, tok = tiny_llama
    out = tmp_path_factory.mktemp("enc") / "store"
    return actscope.record(model, tok, str(out), ["blocks.*.hook_resid_post"], dtype="float32", seq_len=32,
                           max_tokens=32 * 40, batch_size=8, shard_mb=0.2, progress=False)


def test_pooling_and_layer_curve_from_a_store(store, tmp_path):
    units = tr_units(store.num_tokens, 4)
    F0 = pool_features(store, "blocks.0.hook_resid_post", units, chunk=100)
    raw = store.read("blocks.0.hook_resid_post").double().numpy()
    assert np.allclose(F0, raw.reshape(-1, 4, 64).mean(1), atol=1e-12)
    last = pool_features(store, "blocks.0.hook_resid_post", units, how="last")
    assert np.allclose(last, raw[3::4])
    F1 = pool_features(store, "blocks.1.hook_resid_post", units)
    sim = synthetic_fmri(F1, 30, ceiling=0.9, n_repeats=2, seed=0)  # planted on layer 1
    res = encode_layers(store, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], sim.responses,
                        tokens_per_tr=4, delays=range(9), alphas=np.logspace(0, 6, 7), ceiling=sim.ceiling)
    assert res.best_site == "blocks.1.hook_resid_post" and res.mean_r[1] > 0.5
    folder = res.save(tmp_path)
    assert (folder / "encoding.svg").read_text().startswith("<svg") and "encoding" in res._repr_html_().lower()
