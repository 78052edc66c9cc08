"""Linear probes: logistic (or ridge) read-outs of a property from one layer's activations.

A probe's accuracy alone does not say the representation *encodes* the property: a flexible
probe can memorise. Two standard answers are built in:

* the control task of Hewitt & Liang (2019): every word type gets a random label drawn from
  the label distribution; ``selectivity = accuracy - control accuracy``;
* the online (prequential) codelength of Voita & Titov (2020): transmit the labels block by
  block, each block coded with a probe trained on the blocks before it. Fewer bits than the
  uniform code = the property is easy to extract.

The logistic probe minimises ``C * sum(log loss) + |W|^2 / 2`` (intercept not penalised), the
objective of scikit-learn's ``LogisticRegression``, with L-BFGS in float64 run to a tight
tolerance, so its probabilities equal scikit-learn's (checked to 1e-6 in the tests).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ActscopeError
from ._arrays import as_f64


class LinearProbe:
    """``kind="logistic"`` (classes) or ``"ridge"`` (a continuous target, score = R^2)."""

    def __init__(self, kind: str = "logistic", C: float = 1.0, alpha: float = 1.0, max_iter: int = 1000,
                 tol: float = 1e-10):
        if kind not in ("logistic", "ridge"):
            raise ActscopeError(f"unknown probe kind {kind!r}: use logistic or ridge")
        self.kind, self.C, self.alpha, self.max_iter, self.tol = kind, C, alpha, max_iter, tol

    def fit(self, X: Any, y: Any, classes: Sequence[Any] | None = None) -> "LinearProbe":
        X = as_f64(X, name="X")
        y = np.asarray(y)
        if len(y) != len(X):
            raise ActscopeError(f"{len(X)} feature rows but {len(y)} labels")
        if self.kind == "ridge":
            yf = y.astype(np.float64)
            xm, ym = X.mean(0), yf.mean()
            Xc = X - xm
            self.coef_ = np.linalg.solve(Xc.T @ Xc + self.alpha * np.eye(X.shape[1]), Xc.T @ (yf - ym))
            self.intercept_ = ym - xm @ self.coef_
            return self
        self.classes_ = np.array(sorted(set(y.tolist())) if classes is None else list(classes))
        idx = np.searchsorted(self.classes_, y)
        k = len(self.classes_)
        out = 1 if k <= 2 else k
        if (X.shape[1] + 1) * out <= 3000:
            self.coef_, self.intercept_ = _newton_logistic(X, idx, out, self.C, self.tol, self.max_iter)
        else:
            self.coef_, self.intercept_ = _lbfgs_logistic(X, idx, out, self.C, self.tol, self.max_iter)
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        return as_f64(X, name="X") @ self.coef_.T + self.intercept_

    def predict_proba(self, X: Any) -> np.ndarray:
        z = self.decision_function(X)
        if z.shape[1] == 1:
            p = 1 / (1 + np.exp(-z[:, 0]))
            return np.stack([1 - p, p], 1)
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    def predict(self, X: Any) -> np.ndarray:
        if self.kind == "ridge":
            return as_f64(X, name="X") @ self.coef_ + self.intercept_
        return self.classes_[np.argmax(self.predict_proba(X), 1)]

    def score(self, X: Any, y: Any) -> float:
        """Accuracy (logistic) or R^2 (ridge)."""
        y = np.asarray(y)
        if self.kind == "ridge":
            p = self.predict(X)
            yf = y.astype(np.float64)
            return float(1 - np.sum((yf - p) ** 2) / np.sum((yf - yf.mean()) ** 2))
        return float(np.mean(self.predict(X) == y))


def _objective(Xa: np.ndarray, Y: np.ndarray, Wb: np.ndarray, out: int, reg: np.ndarray) -> tuple[float, np.ndarray]:
    z = Xa @ Wb
    if out == 1:
        zz = z[:, 0]
        loss = float(np.sum(np.logaddexp(0, zz) - Y[:, 0] * zz))
        P = (1 / (1 + np.exp(-zz)))[:, None]
    else:
        zmax = z.max(1, keepdims=True)
        lse = zmax[:, 0] + np.log(np.exp(z - zmax).sum(1))
        loss = float(np.sum(lse - (z * Y).sum(1)))
        P = np.exp(z - lse[:, None])
    return loss + 0.5 * float(np.sum(reg * Wb * Wb)), P


def _newton_logistic(X: np.ndarray, idx: np.ndarray, out: int, C: float, tol: float,
                     max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Newton's method with backtracking on ``sum(log loss) + |W|^2 / (2C)``: converges to the
    optimum to machine precision in a few dozen steps when (features + 1) x classes is small."""
    n, d = X.shape
    Xa = np.concatenate([X, np.ones((n, 1))], 1)
    Y = (idx[:, None] == np.arange(max(out, 1))[None]).astype(np.float64) if out > 1 else idx[:, None].astype(np.float64)
    reg = np.ones((d + 1, out)) / C
    reg[-1] = 0.0  # the intercept is not penalised
    Wb = np.zeros((d + 1, out))
    f, P = _objective(Xa, Y, Wb, out, reg)
    for _ in range(max_iter):
        G = Xa.T @ (P - Y) + reg * Wb
        if np.max(np.abs(G)) <= tol * max(1.0, n):
            break
        if out == 1:
            w = (P * (1 - P))[:, 0]
            H = (Xa * w[:, None]).T @ Xa + np.diag(reg[:, 0])
        else:
            H = np.empty(((d + 1) * out, (d + 1) * out))
            for a in range(out):
                for b in range(a, out):
                    w = P[:, a] * ((a == b) - P[:, b])
                    blk = (Xa * w[:, None]).T @ Xa
                    H[a::out, b::out] = blk
                    H[b::out, a::out] = blk.T
            H += np.diag(reg.ravel())
        H[np.diag_indices_from(H)] += 1e-12 * max(1.0, float(np.abs(H).max()))  # softmax: one flat direction
        step = np.linalg.solve(H, G.ravel()).reshape(d + 1, out)
        t = 1.0
        while True:
            f_new, P_new = _objective(Xa, Y, Wb - t * step, out, reg)
            if f_new <= f - 1e-4 * t * float(np.sum(G * step)) or t < 1e-10:
                break
            t *= 0.5
        if f_new >= f:  # no further decrease at float64 precision: at the optimum
            break
        Wb, f, P = Wb - t * step, f_new, P_new
        if float(np.max(np.abs(t * step))) < 1e-13:
            break
    return Wb[:-1].T.copy(), Wb[-1].copy()


def _lbfgs_logistic(X: np.ndarray, idx: np.ndarray, out: int, C: float, tol: float,
                    max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Many features x classes: L-BFGS (torch, float64) on the same objective."""
    n, d = X.shape
    Xt, target = torch.from_numpy(X), torch.from_numpy(idx)
    W = torch.zeros(d, out, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(out, dtype=torch.float64, requires_grad=True)
    reg = 1.0 / (2 * C * n)  # the objective divided by n: same optimum, better scaled
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-16,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        z = Xt @ W + b
        if out == 1:
            data = torch.nn.functional.binary_cross_entropy_with_logits(z[:, 0], target.double())
        else:
            data = torch.nn.functional.cross_entropy(z, target)
        value = data + reg * (W * W).sum()
        value.backward()
        return value

    opt.step(closure)
    return W.detach().numpy().T.copy(), b.detach().numpy().copy()


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default)."""
    if n == 0:
        return float("nan"), float("nan")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def kfold_score(probe: LinearProbe, X: Any, y: Any, folds: int = 5, seed: int = 0) -> dict:
    """k-fold held-out score. Logistic: accuracy over all held-out rows with a Wilson 95% CI;
    ridge: mean R^2 over folds with a normal CI over folds."""
    X = as_f64(X, name="X")
    y = np.asarray(y)
    n = len(y)
    if n < folds:
        raise ActscopeError(f"{n} labelled rows for {folds} folds")
    order = np.random.default_rng(seed).permutation(n)
    parts = np.array_split(order, folds)
    classes = sorted(set(y.tolist())) if probe.kind == "logistic" else None
    scores, correct = [], 0
    for k in range(folds):
        test = parts[k]
        train = np.concatenate([parts[j] for j in range(folds) if j != k])
        probe.fit(X[train], y[train], classes=classes)
        s = probe.score(X[test], y[test])
        scores.append(s)
        correct += int(round(s * len(test)))
    if probe.kind == "logistic":
        low, high = wilson(correct, n)
        return {"score": correct / n, "low": low, "high": high, "folds": scores}
    m, sd = float(np.mean(scores)), float(np.std(scores, ddof=1)) if folds > 1 else 0.0
    half = 1.96 * sd / math.sqrt(folds)
    return {"score": m, "low": m - half, "high": m + half, "folds": scores}


def control_labels(types: Sequence[Any], labels: Sequence[Any], seed: int = 0) -> np.ndarray:
    """Hewitt & Liang's control task: each type (e.g. token id) gets one random label, drawn from
    the empirical label distribution; every occurrence of the type carries it."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    uniq = list(dict.fromkeys(np.asarray(types).tolist()))
    drawn = dict(zip(uniq, labels[rng.integers(0, len(labels), len(uniq))]))
    return np.array([drawn[t] for t in np.asarray(types).tolist()])


MDL_FRACTIONS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.0625, 0.125, 0.25, 0.5, 1.0)


def online_codelength(X: Any, y: Any, *, C: float = 1.0, fractions: Sequence[float] = MDL_FRACTIONS,
                      min_first: int = 10, seed: int = 0) -> dict:
    """Online codelength in bits (Voita & Titov 2020) of labels ``y`` given ``X``.

    The first block is sent with the uniform code (log2 K bits per label); block i+1 is coded
    with a logistic probe trained on blocks 1..i. ``compression`` = uniform / online bits.
    """
    X = as_f64(X, name="X")
    y = np.asarray(y)
    n = len(y)
    order = np.random.default_rng(seed).permutation(n)
    X, y = X[order], y[order]
    classes = sorted(set(y.tolist()))
    k = max(len(classes), 2)
    ends = sorted({min(n, max(min_first, int(round(f * n)))) for f in fractions} | {n})
    bits = ends[0] * math.log2(k)
    lookup = {c: i for i, c in enumerate(classes)}
    for start, stop in zip(ends[:-1], ends[1:]):
        probe = LinearProbe(C=C, max_iter=300, tol=1e-7).fit(X[:start], y[:start], classes=classes)
        p = probe.predict_proba(X[start:stop])
        if p.shape[1] != len(classes):  # two-class code for a single present class
            p = p[:, :len(classes)]
        got = p[np.arange(stop - start), [lookup[c] for c in y[start:stop].tolist()]]
        bits += float(-np.log2(np.clip(got, 1e-12, 1)).sum())
    uniform = n * math.log2(k)
    return {"codelength_bits": bits, "uniform_bits": uniform, "compression": uniform / bits, "blocks": ends}
