"""Voxel-wise ridge encoding models: ``RidgeEncoder``, scikit-learn style, exact and fast.

Why it is fast: in each cross-validation fold the training features are decomposed once
(thin SVD of X, or the eigendecomposition of the kernel X X^T when features outnumber samples),
and every alpha is a rescaling of the same singular values. Predictions for alpha are
``A @ (f_alpha * U^T Y)`` with ``A = X_test V``. When the test fold is much larger than the
rank r, the squared error is computed in that r-dimensional space instead
(``|y|^2 - 2 <A^T y, b> + b^T (A^T A) b``), so no [n_test, targets] prediction is ever built
per alpha. Selection follows himalaya's ``RidgeCV``: mean over folds of the negative mean
squared error, best alpha per target, ties broken towards larger alphas; then one refit on all
samples. ``score`` reports Pearson r per target (the usual brain-encoding metric).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import ActscopeError
from ._arrays import as_f64

DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-2, 8, 11))


def contiguous_folds(n: int, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k contiguous, unshuffled folds (scikit-learn's ``KFold(k)``): time series stay in order."""
    if not 2 <= k <= n:
        raise ActscopeError(f"cv={k} folds for {n} samples")
    sizes = np.full(k, n // k)
    sizes[: n % k] += 1
    edges = np.r_[0, np.cumsum(sizes)]
    idx = np.arange(n)
    return [(np.r_[idx[: edges[i]], idx[edges[i + 1]:]], idx[edges[i]: edges[i + 1]]) for i in range(k)]


def group_folds(groups: Sequence[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Leave-one-group-out folds (e.g. leave one run out), groups in order of first appearance."""
    g = np.asarray(list(groups))
    names = list(dict.fromkeys(g.tolist()))
    if len(names) < 2:
        raise ActscopeError("leave-one-group-out needs at least two groups (runs)")
    return [(np.flatnonzero(g != v), np.flatnonzero(g == v)) for v in names]


class _Basis:
    """One decomposition of training features: ``X = U diag(s) V^T`` (primal or via the kernel)."""

    def __init__(self, X: np.ndarray):
        self.X = X
        n, p = X.shape
        self.dual = p > n
        if self.dual:  # kernel form: eigh of the n x n Gram matrix
            lam, Q = np.linalg.eigh(X @ X.T)
            lam = np.clip(lam, 0, None)
            keep = lam > lam.max() * 1e-14 if lam.max() > 0 else lam > 0
            self.U, self.s = Q[:, keep], np.sqrt(lam[keep])
        else:
            self.U, self.s, Vt = np.linalg.svd(X, full_matrices=False)
            self.Vt = Vt

    def project(self, X_new: np.ndarray) -> np.ndarray:
        """``X_new @ V`` ([m, r])."""
        if self.dual:
            return (X_new @ self.X.T) @ self.U / self.s
        return X_new @ self.Vt.T

    def weights(self, B: np.ndarray) -> np.ndarray:
        """Primal coefficients ``V @ B`` for per-target rows ``B = f * U^T Y`` ([p, t])."""
        if self.dual:
            return self.X.T @ (self.U @ (B / self.s[:, None]))
        return self.Vt.T @ B


class RidgeEncoder:
    """Ridge regression with a per-target alpha chosen by cross-validation.

    ``alphas``: the grid. ``cv``: a number of contiguous folds, or an iterable of
    ``(train, test)`` index arrays; ``fit(X, Y, groups=runs)`` uses leave-one-run-out instead.
    ``fit_intercept=False`` expects zero-mean X and Y (as himalaya). ``svd_scoring``: "auto"
    scores in the SVD space when a test fold has more rows than the rank.

    After ``fit``: ``best_alphas_`` [targets], ``coef_`` [features, targets], ``cv_scores_``
    [targets] (mean fold score of the best alpha), ``intercept_`` when fitted.
    """

    def __init__(self, alphas: Sequence[float] = DEFAULT_ALPHAS, cv: int | Iterable = 5, fit_intercept: bool = False,
                 svd_scoring: str | bool = "auto", n_targets_batch: int | None = None):
        self.alphas = alphas
        self.cv = cv
        self.fit_intercept = fit_intercept
        self.svd_scoring = svd_scoring
        self.n_targets_batch = n_targets_batch

    def _folds(self, n: int, groups: Sequence[Any] | None) -> list[tuple[np.ndarray, np.ndarray]]:
        if groups is not None:
            return group_folds(groups)
        if isinstance(self.cv, (int, np.integer)):
            return contiguous_folds(n, int(self.cv))
        if hasattr(self.cv, "split"):
            return [(np.asarray(a), np.asarray(b)) for a, b in self.cv.split(np.zeros((n, 1)))]
        return [(np.asarray(a), np.asarray(b)) for a, b in self.cv]

    def fit(self, X: Any, Y: Any, groups: Sequence[Any] | None = None) -> "RidgeEncoder":
        X, Y = as_f64(X, name="X"), as_f64(Y, ndim=None, name="Y")
        self._ravel = Y.ndim == 1
        Y = Y[:, None] if Y.ndim == 1 else Y
        if X.shape[0] != Y.shape[0]:
            raise ActscopeError(f"X has {X.shape[0]} samples but Y has {Y.shape[0]}")
        alphas = np.asarray(self.alphas, dtype=np.float64).ravel()
        if alphas.size == 0 or (alphas <= 0).any():
            raise ActscopeError("alphas must be positive")
        n, t = Y.shape
        scores = np.zeros((len(alphas), t))
        folds = self._folds(n, groups)
        for train, test in folds:
            Xtr, Xte, Ytr, Yte = X[train], X[test], Y[train], Y[test]
            if self.fit_intercept:
                xm, ym = Xtr.mean(0), Ytr.mean(0)
                Xtr, Xte, Ytr, Yte = Xtr - xm, Xte - xm, Ytr - ym, Yte - ym
            scores += self._fold_scores(_Basis(Xtr), Xte, Ytr, Yte, alphas)
        mean = scores / len(folds)
        pick = np.argmax(mean + (np.log(alphas) * 1e-10)[:, None], axis=0)  # ties: the larger alpha
        self.best_alphas_ = alphas[pick]
        self.cv_scores_ = mean[pick, np.arange(t)]
        self.n_splits_ = len(folds)
        self._refit(X, Y, alphas, pick)
        return self

    def _fold_scores(self, basis: _Basis, Xte: np.ndarray, Ytr: np.ndarray, Yte: np.ndarray,
                     alphas: np.ndarray) -> np.ndarray:
        """Negative mean squared error [alphas, targets] of one fold, for every alpha."""
        A = basis.project(Xte)
        r, m = A.shape[1], A.shape[0]
        in_svd = self.svd_scoring is True or (self.svd_scoring == "auto" and m > r)
        G = A.T @ A if in_svd else None
        s2 = basis.s ** 2
        out = np.empty((len(alphas), Ytr.shape[1]))
        step = self.n_targets_batch or Ytr.shape[1]
        for lo in range(0, Ytr.shape[1], step):
            sl = slice(lo, lo + step)
            UtY = basis.U.T @ Ytr[:, sl]
            if in_svd:
                C, yy = A.T @ Yte[:, sl], np.einsum("ij,ij->j", Yte[:, sl], Yte[:, sl])
            for k, alpha in enumerate(alphas):
                B = (basis.s / (s2 + alpha))[:, None] * UtY
                if in_svd:
                    sse = yy - 2 * np.einsum("ij,ij->j", C, B) + np.einsum("ij,ij->j", G @ B, B)
                else:
                    R = Yte[:, sl] - A @ B
                    sse = np.einsum("ij,ij->j", R, R)
                out[k, sl] = -sse / m
        return out

    def _refit(self, X: np.ndarray, Y: np.ndarray, alphas: np.ndarray, pick: np.ndarray) -> None:
        xm = X.mean(0) if self.fit_intercept else np.zeros(X.shape[1])
        ym = Y.mean(0) if self.fit_intercept else np.zeros(Y.shape[1])
        basis = _Basis(X - xm)
        B = np.empty((len(basis.s), Y.shape[1]))
        UtY = basis.U.T @ (Y - ym)
        for k in np.unique(pick):
            cols = pick == k
            B[:, cols] = (basis.s / (basis.s ** 2 + alphas[k]))[:, None] * UtY[:, cols]
        self.coef_ = basis.weights(B)
        self.intercept_ = ym - xm @ self.coef_ if self.fit_intercept else np.zeros(Y.shape[1])
        self.n_features_in_ = X.shape[1]

    def predict(self, X: Any) -> np.ndarray:
        if not hasattr(self, "coef_"):
            raise ActscopeError("call fit before predict")
        P = as_f64(X, name="X") @ self.coef_ + self.intercept_
        return P[:, 0] if self._ravel else P

    def score(self, X: Any, Y: Any) -> np.ndarray:
        """Pearson r per target between predictions and ``Y``."""
        return pearson_r(self.predict(X), Y)


def pearson_r(P: Any, Y: Any) -> np.ndarray:
    """Column-wise Pearson correlation (NaN where a column is constant)."""
    P, Y = as_f64(P, ndim=None), as_f64(Y, ndim=None)
    P, Y = (P[:, None], Y[:, None]) if P.ndim == 1 else (P, Y)
    P, Y = P - P.mean(0), Y - Y.mean(0)
    den = np.sqrt(np.einsum("ij,ij->j", P, P) * np.einsum("ij,ij->j", Y, Y))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.einsum("ij,ij->j", P, Y) / den
