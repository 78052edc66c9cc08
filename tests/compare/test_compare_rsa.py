"""RSA: RDMs and comparisons equal rsatoolbox's (the real package) within 1e-8, in our condition order."""

from __future__ import annotations

import numpy as np
import pytest
import rsatoolbox

from actscope import ActscopeError
from actscope.compare import bootstrap_compare, compare_rdms, noise_ceiling, rdm

LABELS = ["zebra", "apple", "mango", "kiwi", "banana", "cherry", "fig"]


def _data(seed=0, reps=3, ch=40):
    rs = np.random.RandomState(seed)
    cond = [c for _ in range(reps) for c in LABELS]
    X = rs.randn(len(cond), ch) + np.repeat(rs.randn(1, len(LABELS), ch), reps, 0).reshape(-1, ch)
    return X, cond


def _rsa_matrix(X, cond, method, **kw):
    ds = rsatoolbox.data.Dataset(X, obs_descriptors={"conds": np.array(cond)})
    out = rsatoolbox.rdm.calc_rdm(ds, method=method, descriptor="conds", **kw)
    return out.get_matrices()[0], list(out.pattern_descriptors["conds"])


@pytest.mark.parametrize("metric", ["euclidean", "correlation", "crossnobis"])
def test_rdm_equals_rsatoolbox_in_callers_order(metric):
    X, cond = _data()
    ours = rdm(X, metric, conditions=cond)
    ref, ref_order = _rsa_matrix(X, cond, metric)
    assert ref_order == sorted(LABELS)  # rsatoolbox re-sorts alphabetically ...
    perm = [ref_order.index(c) for c in LABELS]  # ... we keep the order the conditions came in
    assert np.max(np.abs(ours - ref[np.ix_(perm, perm)])) < 1e-8
    again = rdm(X, metric, conditions=cond, order=sorted(LABELS))
    assert np.max(np.abs(again - ref)) < 1e-8


def test_crossnobis_with_noise_and_runs_equals_rsatoolbox():
    X, cond = _data(1, reps=4, ch=12)
    rs = np.random.RandomState(3)
    A = rs.randn(12, 12)
    prec = np.linalg.inv(A @ A.T / 12 + np.eye(12))
    runs = np.repeat(np.arange(4), len(LABELS))
    ours = rdm(X, "crossnobis", conditions=cond, runs=runs, noise=prec, order=sorted(LABELS))
    ds = rsatoolbox.data.Dataset(X, obs_descriptors={"conds": np.array(cond), "runs": runs})
    ref = rsatoolbox.rdm.calc_rdm(ds, method="crossnobis", descriptor="conds", cv_descriptor="runs", noise=prec)
    assert np.max(np.abs(ours - ref.get_matrices()[0])) < 1e-8


def test_euclidean_is_squared_and_per_channel():
    X = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert rdm(X, "euclidean")[0, 1] == pytest.approx(1.0)  # |d|^2 = 4, over 4 channels


@pytest.mark.parametrize("method", ["spearman", "corr", "cosine", "tau-a", "rho-a"])
def test_comparisons_equal_rsatoolbox(method):
    rs = np.random.RandomState(4)
    for ties in (False, True):
        a, b = rs.rand(300), rs.rand(300) + 0.3 * rs.rand(300)
        a[:150] = rs.rand(150)
        if ties:
            a, b = np.round(a * 6), np.round(b * 4)  # heavy ties: where tau-a and rho-a differ
        ref = rsatoolbox.rdm.compare(rsatoolbox.rdm.RDMs(a[None]), rsatoolbox.rdm.RDMs(b[None]), method=method)
        assert abs(compare_rdms(a, b, method) - float(ref[0, 0])) < 1e-8


def test_square_and_condensed_agree_and_bad_method():
    X, cond = _data()
    A, B = rdm(X, conditions=cond), rdm(X[::-1], conditions=cond[::-1], order=LABELS)
    iu = np.triu_indices(len(LABELS), 1)
    assert compare_rdms(A, B) == compare_rdms(A[iu], B[iu])
    with pytest.raises(ActscopeError, match="unknown RDM comparison"):
        compare_rdms(A, B, "kendall-z")


@pytest.mark.parametrize("method", ["spearman", "corr", "cosine"])
def test_noise_ceiling_equals_rsatoolbox(method):
    rs = np.random.RandomState(5)
    truth = rs.rand(45)
    subj = np.array([truth + 0.3 * rs.rand(45) for _ in range(6)])
    lo, hi = noise_ceiling(subj, method)
    ref_lo, ref_hi = rsatoolbox.inference.boot_noise_ceiling(rsatoolbox.rdm.RDMs(subj), method=method)
    assert abs(lo - ref_lo) < 1e-8 and abs(hi - ref_hi) < 1e-8 and lo < hi


def test_bootstrap_ci_over_conditions(tmp_path):
    rs = np.random.RandomState(6)
    P = rs.randn(30, 50)
    A, B = rdm(P), rdm(P + 0.8 * rs.randn(30, 50))
    res = bootstrap_compare(A, B, "spearman", n_boot=200, seed=0)
    assert res.low < res.value < res.high and 0.3 < res.value < 1
    unrelated = bootstrap_compare(A, rdm(rs.randn(30, 50)), "spearman", n_boot=200)
    assert unrelated.low < 0.15 < res.low
    assert (res.save(tmp_path) / "rsa.json").exists() and "bootstrap" in res._repr_html_()
