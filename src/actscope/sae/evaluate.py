"""Evaluating an SAE: reconstruction and sparsity on a held-out store, CE and KL with the model.

Every reconstruction metric is a ratio of sums accumulated in float64 over the whole eval set,
so no metric depends on the eval batch size (SAELens's MSE once did, #711), and FVU's mean is
the mean of the whole eval set, not of each batch (its explained variance once read ~0, #659):

    fvu  = sum ||y - y_hat||^2 / sum ||y - mean(y)||^2
    mse  = sum ||y - y_hat||^2 / tokens                       (summed over dimensions)
    explained_variance = 1 - fvu
    explained_variance_legacy = mean over tokens of 1 - ||y - y_hat||^2 / ||y - batch mean||^2
                                (the older per-batch formula, kept to compare with published figures;
                                 it does depend on the batch size)
    cosine, l2_ratio = means over tokens of cos(y, y_hat) and ||y_hat|| / ||y||
    relative_reconstruction_bias = mean ||y_hat||^2 / mean <y, y_hat>  (1 = unbiased, < 1 shrinks)

Tokens that the SAE's outlier policy left out of training are left out here too (the result says
how many), unless ``outliers="keep"``. With a model, the SAE is spliced in through the public
``actscope.edit`` and replaces the site's activation at the same tokens; the excluded ones keep
their own values, in the SAE run and in the zero-ablation run alike.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..store.reader import ActivationStore, open_store
from .base import SAEError, SparseAutoencoder
from .data import OutlierPolicy, token_batches

DENSITY_BINS = torch.linspace(-8, 0, 33, dtype=torch.float64)  # log10 firing rate


class _Sums:
    """Float64 running sums from which every reconstruction metric is a ratio."""

    def __init__(self, d_out: int, d_sae: int):
        self.n = 0
        self.sum_y = torch.zeros(d_out, dtype=torch.float64)
        self.sq_y = self.sse = self.cos = self.ratio = self.sq_hat = self.dot = self.legacy = 0.0
        self.l0 = torch.zeros(d_sae + 1, dtype=torch.long)
        self.fires = torch.zeros(d_sae, dtype=torch.long)

    def add(self, y: torch.Tensor, y_hat: torch.Tensor, z: torch.Tensor) -> None:
        y, y_hat = y.double(), y_hat.double()
        err = (y - y_hat).pow(2).sum(1)
        self.n += y.shape[0]
        self.sum_y += y.sum(0)
        self.sq_y += float(y.pow(2).sum())
        self.sse += float(err.sum())
        ny, nh = y.norm(dim=1), y_hat.norm(dim=1)
        self.cos += float(((y * y_hat).sum(1) / (ny * nh).clamp_min(1e-30)).sum())
        self.ratio += float((nh / ny.clamp_min(1e-30)).sum())
        self.sq_hat += float(nh.pow(2).sum())
        self.dot += float((y * y_hat).sum())
        batch_var = (y - y.mean(0)).pow(2).sum(1).clamp_min(1e-30)
        self.legacy += float((1 - err / batch_var).sum())
        active = z != 0
        self.l0 += torch.bincount(active.sum(1), minlength=self.l0.shape[0])
        self.fires += active.sum(0)

    def metrics(self) -> dict[str, Any]:
        n = max(self.n, 1)
        total_var = self.sq_y - float(self.sum_y.pow(2).sum()) / n
        fvu = self.sse / total_var if total_var > 0 else math.nan
        density = self.fires.double() / n
        alive = density[density > 0]
        hist = torch.histogram(alive.log10().clamp(-8, 0), bins=DENSITY_BINS).hist if alive.numel() else torch.zeros(32)
        l0_values = torch.arange(self.l0.shape[0], dtype=torch.float64)
        return {
            "tokens": self.n, "fvu": fvu, "explained_variance": 1 - fvu, "mse": self.sse / n,
            "explained_variance_legacy": self.legacy / n, "cosine": self.cos / n, "l2_ratio": self.ratio / n,
            "relative_reconstruction_bias": (self.sq_hat / n) / (self.dot / n) if self.dot else math.nan,
            "l0": float((self.l0.double() * l0_values).sum()) / n,
            "l0_histogram": self.l0[: int(self.l0.nonzero().max()) + 1].tolist() if self.l0.any() else [],
            "dead_fraction": float((self.fires == 0).double().mean()),
            "log10_density_histogram": {"edges": DENSITY_BINS.tolist(), "counts": [int(c) for c in hist.tolist()],
                                        "dead": int((self.fires == 0).sum())},
        }


def _policy(sae: SparseAutoencoder, outliers: str) -> OutlierPolicy:
    if outliers == "keep":
        return OutlierPolicy(skip_first=False, max_norm_ratio=None)
    if outliers != "policy":
        raise SAEError(f"outliers must be 'policy' or 'keep', not {outliers!r}")
    return OutlierPolicy.from_dict(sae.meta_.get("outliers")) if sae.meta_.get("outliers") else OutlierPolicy(max_norm_ratio=None)


def reconstruction_metrics(sae: SparseAutoencoder, store: ActivationStore, *, site: str | None = None,
                           target: str | None = None, batch_size: int = 4096, max_tokens: int | None = None,
                           outliers: str = "policy") -> dict[str, Any]:
    """Reconstruction and sparsity metrics over the store's tokens, in store order."""
    site = site or sae.site_
    target = target or (sae.target_site_ if sae.transcoder else site)
    if site is None:
        raise SAEError("this SAE does not name its site: pass site=")
    policy = _policy(sae, outliers)
    sums = _Sums(sae.W_dec_.shape[1], sae.d_sae)
    excluded = 0
    limit = max_tokens or store.num_tokens
    sites = [site] if target == site else [site, target]
    for batch in token_batches(store, sites, batch_size, shuffle=False):
        x = batch.rows[site]
        keep = policy.keep(x, batch.positions(store.seq_len))
        room = limit - sums.n - excluded
        if room <= 0:
            break
        keep[room:] = False
        excluded += int((~keep[:room]).sum())
        x = x[keep].float()
        y = batch.rows[target][keep].float()
        with torch.no_grad():
            z = sae.encode(x)
            sums.add(y, sae.decode(z), z)
    out = sums.metrics()
    out["excluded_tokens"] = excluded
    out["outliers"] = policy.to_dict()
    return out


def _next_token_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")


def _kl(clean: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    p = clean[:, :-1].float().log_softmax(-1)
    q = other[:, :-1].float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).flatten()


def model_metrics(sae: SparseAutoencoder, model: Any, ids: torch.Tensor, *, batch_size: int = 8,
                  outliers: str = "policy") -> dict[str, Any]:
    """CE loss recovered, KL score and delta CE with the SAE spliced in (mean over next-token
    predictions of ``ids``); zero-ablation of the same tokens is the reference for "nothing"."""
    from ..hooks import edit

    policy = _policy(sae, outliers)
    site, target = sae.site_, sae.target_site_
    stash: dict[str, torch.Tensor] = {}

    def mask_of(x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1).reshape(-1)
        return policy.keep(x.reshape(-1, x.shape[-1]).float(), pos.cpu()).reshape(x.shape[:2]).to(x.device)

    def replace(t: torch.Tensor, new: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask[..., None], new.to(t.dtype), t)

    def splice(t: torch.Tensor, name: str) -> torch.Tensor:
        src = stash.pop("x") if sae.transcoder else t
        with torch.no_grad():
            return replace(t, sae(src.float()), mask_of(src))

    def zero(t: torch.Tensor, name: str) -> torch.Tensor:
        src = stash.pop("x") if sae.transcoder else t
        return replace(t, torch.zeros_like(t), mask_of(src))

    def keep_input(t: torch.Tensor, name: str) -> torch.Tensor:
        stash["x"] = t
        return t

    def run(fn: Any, chunk: torch.Tensor) -> torch.Tensor:
        edits = {target: fn} if fn is not None else {}
        if fn is not None and sae.transcoder:
            edits = {site: keep_input, target: fn}
        with torch.inference_mode(), edit(model, edits):
            return model(input_ids=chunk).logits

    ce = {"clean": [], "sae": [], "zero": []}
    kl = {"sae": [], "zero": []}
    for i in range(0, ids.shape[0], batch_size):
        chunk = ids[i: i + batch_size]
        clean = run(None, chunk)
        ce["clean"].append(_next_token_losses(clean, chunk))
        for name, fn in (("sae", splice), ("zero", zero)):
            logits = run(fn, chunk)
            ce[name].append(_next_token_losses(logits, chunk))
            kl[name].append(_kl(clean, logits))
    m = {k: float(torch.cat(v).double().mean()) for k, v in ce.items()}
    k = {n: float(torch.cat(v).double().mean()) for n, v in kl.items()}
    return {"ce_clean": m["clean"], "ce_sae": m["sae"], "ce_zero_ablation": m["zero"],
            "ce_delta": m["sae"] - m["clean"],
            "ce_loss_recovered": (m["zero"] - m["sae"]) / (m["zero"] - m["clean"]) if m["zero"] != m["clean"] else math.nan,
            "kl_sae": k["sae"], "kl_zero_ablation": k["zero"],
            "kl_score": (k["zero"] - k["sae"]) / k["zero"] if k["zero"] > 0 else math.nan,
            "model_sequences": int(ids.shape[0])}


def evaluate(sae: SparseAutoencoder, store: ActivationStore | str, *, model: Any = None, batch_size: int = 4096,
             max_tokens: int | None = None, sequences: int = 32, model_batch_size: int = 8,
             outliers: str = "policy") -> dict[str, Any]:
    """All metrics of ``sae`` on a held-out ``store``; with ``model`` (the store's model), also CE
    loss recovered, KL score and delta CE on the store's first ``sequences`` sequences."""
    sae._need_fit()
    store = open_store(str(store)) if not isinstance(store, ActivationStore) else store
    out = reconstruction_metrics(sae, store, batch_size=batch_size, max_tokens=max_tokens, outliers=outliers)
    out["site"], out["target_site"] = sae.site_, sae.target_site_
    if model is not None:
        ids = store.token_ids()[:sequences]
        device = next(model.parameters()).device
        out.update(model_metrics(sae, model, ids.to(device), batch_size=model_batch_size, outliers=outliers))
    return out
