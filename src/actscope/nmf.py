"""Semi-NMF of MLP activations, streamed from a store (Shafran, Geiger, Geva 2025).

``A (d_ff x tokens) ~ F G^T`` with ``G >= 0``: each column of ``F`` is a feature (a pattern over
MLP neurons), each row of ``G`` says how much of every feature a token uses. One iteration:

1. ``F = A G (G^T G)^-1`` (least squares, closed form);
2. winner-take-all: each feature keeps only its ``keep_share`` largest neurons (by magnitude);
3. column rescaling: every feature gets unit norm, and G's column absorbs the scale, so the
   product is unchanged;
4. Ding's multiplicative update of ``G``, which keeps it non-negative:
   ``G <- G * sqrt(((A^T F)+ + G (F^T F)-) / ((A^T F)- + G (F^T F)+))``.

Why streamed: the paper's loop holds A (d_ff x tokens) in memory, which caps the token count.
Here every quantity that the updates need is a sum over tokens: ``A G`` (d x K) and ``G^T G``
(K x K), and the loss comes from the Gram identity

    ||A - F G^T||^2 = ||A||^2 - 2 tr(F^T (A G)) + tr((F^T F)(G^T G)),

so ``F G^T`` is never formed. One pass over the store per iteration reads a chunk of tokens and
its rows of G, updates them, and adds the chunk's share to the sums. G lives in a memory-mapped
file beside the output, so memory is ``O(d K + K^2 + chunk)`` whatever the token count.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from .errors import ActscopeError
from .store.reader import ActivationStore, open_store
from .tensorfile import load_tensors

FEATURES, CONFIG = "features.safetensors", "nmf.json"
CHUNK_BYTES = 12 * 2**20


class NMFError(ActscopeError):
    """Bad semi-NMF input."""


def _pos(x: torch.Tensor) -> torch.Tensor:
    return (x.abs() + x) / 2


def _neg(x: torch.Tensor) -> torch.Tensor:
    return (x.abs() - x) / 2


def winner_take_all(F: torch.Tensor, keep_share: float) -> torch.Tensor:
    """Zero all but the ``ceil(keep_share * d)`` largest-magnitude entries of each column."""
    if keep_share >= 1:
        return F
    keep = max(1, math.ceil(keep_share * F.shape[0]))
    idx = F.abs().topk(keep, dim=0).indices
    return torch.zeros_like(F).scatter_(0, idx, F.gather(0, idx))


def closed_form_features(AG: torch.Tensor, GtG: torch.Tensor, keep_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-3: ``F`` from the sums, sparsified and unit-normed; returns ``(F, column scales)``."""
    F = torch.linalg.solve(GtG, AG.T).T  # A G (G^T G)^-1, without forming the inverse
    F = winner_take_all(F, keep_share)
    scale = F.norm(dim=0).clamp_min(1e-12)
    return F / scale, scale


def ding_update(G: torch.Tensor, XF: torch.Tensor, FtF: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Step 4 on a block of G's rows; ``XF`` is those tokens' ``A^T F`` (overwritten).

    ``G (F^T F)-`` and ``G (F^T F)+`` come from one product with the two halves side by side, and
    the elementwise work runs in place: this runs once per chunk per iteration.
    """
    K = FtF.shape[0]
    GF = G @ torch.cat([_neg(FtF), _pos(FtF)], dim=1)
    den = XF.neg().clamp_min_(0).add_(GF[:, K:]).clamp_min_(eps)
    num = XF.clamp_min_(0).add_(GF[:, :K])
    return num.div_(den).sqrt_().mul_(G)


class SemiNMF:
    """Semi-NMF with ``rank`` features; ``fit(store, site)`` streams the site's activations."""

    def __init__(self, rank: int = 64, *, keep_share: float = 0.05, max_iter: int = 100, tol: float = 1e-5,
                 chunk_tokens: int | None = None, seed: int = 0):
        """``keep_share``: share of neurons each feature keeps (winner-take-all); ``tol``: stop
        when the loss improves by less than this share of itself in one iteration;
        ``chunk_tokens=None`` sizes each chunk to about 12 MiB of float64, so that the converted
        chunk stays in cache for the two products that read it (1,024 tokens at d_ff 1,536; on
        the benchmark's Xeon that is 1.3x faster than 8,192-token chunks)."""
        if rank <= 0 or not 0 < keep_share <= 1 or max_iter < 0 or (chunk_tokens is not None and chunk_tokens <= 0):
            raise NMFError("rank and chunk_tokens must be positive, keep_share in (0, 1], max_iter >= 0")
        self.rank, self.keep_share, self.max_iter, self.tol = rank, keep_share, max_iter, tol
        self.chunk_tokens, self.seed = chunk_tokens, seed

    def get_params(self) -> dict[str, Any]:
        return {"rank": self.rank, "keep_share": self.keep_share, "max_iter": self.max_iter, "tol": self.tol,
                "chunk_tokens": self.chunk_tokens, "seed": self.seed}

    def _chunks(self, store: ActivationStore, site: str, n: int):
        """Float64 chunks of the site, converted into one reused buffer: a fresh 100 MB tensor per
        chunk would be page-faulted in anew every time (the allocator hands large blocks back to
        the OS), which cost more than the conversion itself. A yielded chunk is valid until the
        next one."""
        d = math.prod(store.shape(site))
        chunk = self.chunk_tokens or max(256, CHUNK_BYTES // (8 * d))
        buf = torch.empty(min(chunk, n), d, dtype=torch.float64)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            X = buf[: stop - start]
            at = 0
            for piece in store.read_pieces(site, start, stop):  # across shards: no concatenated copy
                X[at : at + piece.shape[0]].copy_(piece)
                at += piece.shape[0]
            yield start, stop, X

    def init_codes(self, n: int) -> torch.Tensor:
        """The default starting G: uniform in [0, 1), seeded; chunk-wise equal to one draw."""
        return torch.rand(n, self.rank, generator=torch.Generator().manual_seed(self.seed), dtype=torch.float64)

    def fit(self, store: ActivationStore | str, site: str, *, tokens: int | None = None,
            init: torch.Tensor | None = None, codes_path: str | Path | None = None) -> "SemiNMF":
        """Fit on the first ``tokens`` tokens of ``site``; ``init`` is a starting G (tokens x rank)."""
        store = open_store(str(store)) if not isinstance(store, ActivationStore) else store
        d = store.shape(site)
        if len(d) != 1:
            raise NMFError(f"{site} has per-token shape {d}; semi-NMF takes a vector per token (e.g. mlp.hook_post)")
        n = min(tokens or store.num_tokens, store.num_tokens)
        if n < self.rank:
            raise NMFError(f"rank {self.rank} needs at least as many tokens, got {n}")
        if codes_path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="actscope-nmf-")
            codes_path = Path(self._tmp.name) / "codes.f64"
        G_map = np.lib.format.open_memmap(str(codes_path), mode="w+", dtype=np.float64, shape=(n, self.rank))
        G_all = torch.from_numpy(G_map)
        gen = torch.Generator().manual_seed(self.seed)
        AG = torch.zeros(d[0], self.rank, dtype=torch.float64)
        GtG = torch.zeros(self.rank, self.rank, dtype=torch.float64)
        sq = 0.0
        for start, stop, X in self._chunks(store, site, n):  # pass 0: G0 and its sums
            G = init[start:stop].to(torch.float64) if init is not None else \
                torch.rand(stop - start, self.rank, generator=gen, dtype=torch.float64)
            G_all[start:stop] = G
            AG += X.T @ G
            GtG += G.T @ G
            sq += float(torch.dot(X.view(-1), X.view(-1)))
        self.loss_history_: list[float] = []
        F = torch.zeros(d[0], self.rank, dtype=torch.float64)
        for _ in range(self.max_iter):
            F, scale = closed_form_features(AG, GtG, self.keep_share)
            FtF = F.T @ F
            AG.zero_()
            GtG.zero_()
            for start, stop, X in self._chunks(store, site, n):
                G = ding_update(G_all[start:stop] * scale, X @ F, FtF)
                G_all[start:stop] = G
                AG += X.T @ G
                GtG += G.T @ G
            loss = sq - 2 * float((F * AG).sum()) + float((FtF * GtG).sum())
            self.loss_history_.append(loss)
            if len(self.loss_history_) > 1 and abs(self.loss_history_[-2] - loss) <= self.tol * abs(self.loss_history_[-2]):
                break
        G_map.flush()
        self.features_ = F.float()  # [d_ff, rank], unit-norm columns
        self.residual_: torch.Tensor | None = None  # W_out f [d_model, rank], set by save(model=...)
        self.site_, self.tokens_, self.codes_path_ = site, n, Path(codes_path)
        self.relative_loss_ = self.loss_history_[-1] / sq if self.loss_history_ else math.nan
        return self

    def codes(self) -> torch.Tensor:
        """G (tokens x rank), memory-mapped from the file the fit wrote."""
        return torch.from_numpy(np.load(self.codes_path_, mmap_mode="c"))

    def transform(self, X: torch.Tensor, iters: int = 100) -> torch.Tensor:
        """Non-negative codes of new activations ``X`` (tokens x d_ff) under the fitted features."""
        F = self.features_.double()
        X = X.double()
        FtF, XF = F.T @ F, X @ F
        G = torch.full((X.shape[0], self.rank), 0.5, dtype=torch.float64)
        for _ in range(iters):
            G = ding_update(G, XF.clone(), FtF)  # ding_update overwrites its XF
        return G.float()

    def residual_features(self, model: Any) -> torch.Tensor:
        """The features written into the residual stream, ``W_out f`` ([d_model, rank]), from the
        weight of the module whose input is the fitted site (the MLP's down/out projection)."""
        from .sites import site_map

        site = site_map(model).resolve(self.site_)[0]
        weight = model.get_submodule(site.module_path).weight.detach().float().cpu()
        if weight.shape[1] != self.features_.shape[0]:  # GPT-2's Conv1D stores [d_in, d_out]
            weight = weight.T
        return weight @ self.features_

    def save(self, folder: str | Path, model: Any = None) -> Path:
        """``features.safetensors`` (features [d_ff, rank], residual [d_model, rank] with a model)
        and ``nmf.json``; the codes stay in their own ``.npy`` file (no pickle anywhere)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"features": self.features_.contiguous()}
        if model is not None:
            self.residual_ = self.residual_features(model).contiguous()
            tensors["residual"] = self.residual_
        save_file(tensors, str(folder / FEATURES))
        (folder / CONFIG).write_text(json.dumps({**self.get_params(), "site": self.site_, "tokens": self.tokens_,
                                                 "loss_history": self.loss_history_,
                                                 "relative_loss": self.relative_loss_,
                                                 "codes": str(self.codes_path_)}, indent=1))
        return folder


def load(folder: str | Path) -> SemiNMF:
    """A fitted ``SemiNMF`` from ``save``'s folder."""
    folder = Path(folder)
    if not (folder / CONFIG).exists():
        raise NMFError(f"{folder}: no {CONFIG} here (not a semi-NMF folder)")
    cfg = json.loads((folder / CONFIG).read_text())
    nmf = SemiNMF(**{k: cfg[k] for k in ("rank", "keep_share", "max_iter", "tol", "chunk_tokens", "seed")})
    tensors = load_tensors(folder / FEATURES)
    nmf.features_ = tensors["features"]
    nmf.residual_ = tensors.get("residual")  # [d_model, rank] when fitted with a model
    nmf.site_, nmf.tokens_, nmf.codes_path_ = cfg["site"], cfg["tokens"], Path(cfg["codes"])
    nmf.loss_history_, nmf.relative_loss_ = cfg["loss_history"], cfg["relative_loss"]
    return nmf


class NMFLatents:
    """A fitted semi-NMF seen through the SAE interface, so the SAE tools take it: the feature
    browser and Neuronpedia export (``sae features --sae DIR`` with an NMF folder) and steering
    (``SteeringVector.from_sae``, ``generate --steer-sae DIR --latent N``).

    ``encode`` is ``transform`` (non-negative codes of new activations); the decoder rows are the
    features in residual space (``W_out f``) when the fit was saved with a model, else over the
    MLP's neurons. Only residual-space rows can steer: they are what the MLP writes into the
    residual stream after its block, so they steer at ``blocks.L.hook_resid_post``.
    """

    architecture = "semi-nmf"

    def __init__(self, nmf: SemiNMF):
        self.nmf, self.site_, self.d_sae = nmf, nmf.site_, nmf.rank
        residual = nmf.residual_
        self.W_dec_ = (residual if residual is not None else nmf.features_).t().contiguous()
        match = re.fullmatch(r"blocks\.(\d+)\.mlp\.hook_post", str(nmf.site_))
        self.residual_site_ = f"blocks.{match.group(1)}.hook_resid_post" if residual is not None and match else None
        self.meta_: dict[str, Any] = {}  # no outlier policy: browsing leaves out position 0 only

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.nmf.transform(x)


def fit(store: ActivationStore | str, site: str, rank: int, **kwargs: Any) -> SemiNMF:
    """``SemiNMF(rank, **kwargs).fit(store, site)``."""
    return SemiNMF(rank, **kwargs).fit(store, site)
