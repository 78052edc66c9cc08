"""Reading an SAE's latents: top contexts, contexts across activation bins, density, logit effects,
nearest latents, an HTML browser and Neuronpedia files.

Two streaming passes over a store, each encoding the SAE batch by batch, with memory bounded by
the number of latents whatever the store's size:

1. the ``top`` strongest activations per latent (a running top-k: ``[d_sae, top]`` values and
   token indices, merged batch by batch), how often each latent fires, and so its maximum;
2. a uniform sample of ``per_bin`` contexts from each of ``bins`` equal-width activation bins
   between 0 and that maximum (bin ``b`` holds activations in ``[b, b + 1) x max / bins``, the
   maximum itself in the top bin), and how many activations fall in each bin.

Why two passes: the bins are fractions of the latent's final maximum, and with bins relative to
a running maximum an activation that was dropped from a bin early on may belong, once the
maximum grows, to a bin where it would have been kept; the sample would then depend on the
order of the store. A pass that only encodes costs what the first pass costs.

The sample is a bottom-``per_bin`` sketch: every (token, latent) gets a pseudo-random key, a
fixed hash of (token index, latent, seed), and each bin keeps the activations with the smallest
keys. That is a uniform sample without replacement, bounded at ``d_sae x bins x per_bin`` slots,
and a pure function of the seed: the batch size and the order of batches do not change it.

Contexts are cut from the store's own token ids, so no model run is needed for them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import torch

from ..store.reader import ActivationStore, open_store
from .base import SAEError, SparseAutoencoder
from .browser import safe_json as _safe_json, write_browser  # noqa: F401  (the browser's old home)
from .data import OutlierPolicy, token_batches

EMPTY = torch.iinfo(torch.int64).max  # an unused sample slot's key
_M32 = 0xFFFFFFFF


def _encoded(sae: SparseAutoencoder, store: ActivationStore, batch_size: int,
             max_tokens: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(z [n, d_sae], token index [n])`` over the store's tokens in order, those that the SAE's
    outlier policy keeps, stopping at the batch that reaches ``max_tokens``."""
    policy = OutlierPolicy.from_dict(sae.meta_.get("outliers")) if sae.meta_.get("outliers") else OutlierPolicy(max_norm_ratio=None)
    seen = 0
    for batch in token_batches(store, [sae.site_], batch_size, shuffle=False):
        if max_tokens is not None and seen >= max_tokens:
            break
        x = batch.rows[sae.site_]
        keep = policy.keep(x, batch.positions(store.seq_len))
        with torch.no_grad():
            z = sae.encode(x[keep].float())
        seen += int(keep.sum())
        yield z, batch.index[keep]


def top_activations(sae: SparseAutoencoder, store: ActivationStore, *, top: int = 10, batch_size: int = 4096,
                    max_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """``values``/``index`` [d_sae, top] (strongest first; index -1 where fewer fired) and
    ``fires`` per latent, over the store's tokens that the SAE's outlier policy keeps."""
    values = torch.full((sae.d_sae, top), -torch.inf)
    index = torch.full((sae.d_sae, top), -1, dtype=torch.long)
    fires = torch.zeros(sae.d_sae, dtype=torch.long)
    seen = 0
    for z, idx in _encoded(sae, store, batch_size, max_tokens):
        seen += z.shape[0]
        fires += (z > 0).sum(0)
        k = min(top, z.shape[0])
        bv, bi = z.t().topk(k, dim=1)  # [d_sae, k]
        all_v = torch.cat([values, bv], 1)
        all_i = torch.cat([index, idx[bi]], 1)
        values, order = all_v.topk(top, dim=1)
        index = all_i.gather(1, order)
    index[values <= 0] = -1
    return {"values": values.clamp_min(0), "index": index, "fires": fires, "tokens": torch.tensor(seen)}


def sample_keys(token: torch.Tensor, latent: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The bin sample's key of each (token, latent): 31 hashed bits above the token index's 32.

    The hash (multiply-xorshift rounds on 32 bits, every product below 2**63) makes the order
    pseudo-random; the token index in the low bits makes keys unique, so ties cannot arise.
    """
    x = (token.long() * 0x45D9F3B + latent.long() * 0x119DE1F3 + (seed & 0x7FFFFFFF) * 0x2C1B3C6D) & _M32
    for _ in range(3):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return ((x >> 1) << 32) | token.long()


def bin_of(z: torch.Tensor, max_values: torch.Tensor, bins: int) -> torch.Tensor:
    """Each activation's bin: ``floor(bins x z / max)``, the maximum itself in the top bin."""
    return (z * bins / max_values.clamp_min(1e-30)).floor().long().clamp(0, bins - 1)


def _keep_smallest(keys: torch.Tensor, values: torch.Tensor, group: torch.Tensor, n_groups: int,
                   slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the ``slots`` smallest keys and their values, as ``[n_groups, slots]`` (EMPTY where
    fewer): a sort by (group, key) and each entry's rank within its group."""
    by_key = torch.argsort(keys, stable=True)
    order = by_key[torch.argsort(group[by_key], stable=True)]  # by group, then key
    g, k, v = group[order], keys[order], values[order]
    counts = torch.bincount(g, minlength=n_groups)
    rank = torch.arange(g.shape[0]) - (counts.cumsum(0) - counts)[g]
    take = rank < slots
    out_k = torch.full((n_groups, slots), EMPTY, dtype=torch.long)
    out_v = torch.zeros((n_groups, slots))
    out_k[g[take], rank[take]] = k[take]
    out_v[g[take], rank[take]] = v[take]
    return out_k, out_v


def bin_samples(sae: SparseAutoencoder, store: ActivationStore, max_values: torch.Tensor, *, bins: int = 4,
                per_bin: int = 5, seed: int = 0, batch_size: int = 4096,
                max_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """``values``/``index`` [d_sae, bins, per_bin] (index -1 in unused slots, the sample in key
    order) and ``count`` [d_sae, bins]: a uniform sample of the activations in each bin of
    ``[0, max_values]`` per latent (see the module docstring)."""
    if bins < 1 or per_bin < 1:
        raise SAEError(f"bins and per_bin must be positive, got {bins} and {per_bin}")
    if store.num_tokens >= 2 ** 32:
        raise SAEError(f"bin samples index tokens in 32 bits; this store has {store.num_tokens} tokens")
    n_groups = sae.d_sae * bins
    keys = torch.full((n_groups, per_bin), EMPTY, dtype=torch.long)
    values = torch.zeros((n_groups, per_bin))
    count = torch.zeros(n_groups, dtype=torch.long)
    for z, idx in _encoded(sae, store, batch_size, max_tokens):
        t, j = (z > 0).nonzero(as_tuple=True)
        v = z[t, j]
        group = j * bins + bin_of(v, max_values[j], bins)
        count += torch.bincount(group, minlength=n_groups)
        held = keys != EMPTY
        slot_group = torch.arange(n_groups).unsqueeze(1).expand_as(keys)
        keys, values = _keep_smallest(torch.cat([keys[held], sample_keys(idx[t], j, seed)]),
                                         torch.cat([values[held], v]), torch.cat([slot_group[held], group]),
                                         n_groups, per_bin)
    index = torch.where(keys == EMPTY, -1, keys & _M32)
    shape = (sae.d_sae, bins, per_bin)
    return {"values": values.reshape(shape), "index": index.reshape(shape), "count": count.reshape(sae.d_sae, bins)}


def logit_effects(sae: SparseAutoencoder, unembed: torch.Tensor, n: int = 8) -> dict[str, torch.Tensor]:
    """Top and bottom vocabulary entries of ``W_dec @ W_U`` per latent (``unembed``: [vocab, d]),
    1,024 latents at a time: the whole product is d_sae x vocab (1.8 GB for 9,216 x 49,152)."""
    W_U = unembed.float().t()
    top, bottom = [], []
    for rows in sae.W_dec_.float().split(1024):
        effects = rows @ W_U
        top.append(effects.topk(n, dim=1).indices)
        bottom.append((-effects).topk(n, dim=1).indices)
    return {"top": torch.cat(top), "bottom": torch.cat(bottom)}


def nearest_latents(sae: SparseAutoencoder, n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """For each latent, the ``n`` others with the most similar decoder rows (cosine)."""
    W = sae.W_dec_.float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sims = W @ W.t()
    sims.fill_diagonal_(-2)
    top = sims.topk(min(n, W.shape[0] - 1), dim=1)
    return top.indices, top.values


def feature_data(sae: SparseAutoencoder, store: ActivationStore | str, *, tokenizer: Any = None, model: Any = None,
                 top: int = 10, window: int = 8, max_tokens: int | None = None, bins: int = 4, per_bin: int = 5,
                 seed: int = 0, batch_size: int = 4096) -> list[dict[str, Any]]:
    """One record per latent: max, density, top contexts (text around the token), a sample of
    contexts per activation bin (highest bin first), nearest latents, and with a model, logit
    effects. ``bins=0`` skips the second pass."""
    store = open_store(str(store)) if not isinstance(store, ActivationStore) else store
    acts = top_activations(sae, store, top=top, max_tokens=max_tokens, batch_size=batch_size)
    maxima = acts["values"][:, 0]
    binned = (bin_samples(sae, store, maxima, bins=bins, per_bin=per_bin, seed=seed, batch_size=batch_size,
                          max_tokens=max_tokens) if bins else None)
    ids = store.token_ids()
    decode = lru_cache(maxsize=None)((lambda t: tokenizer.decode([t])) if tokenizer is not None else str)
    near_i, near_v = nearest_latents(sae)
    logits = None
    emb = model.get_output_embeddings() if model is not None else None
    if emb is not None and sae.W_dec_.shape[1] == emb.weight.shape[1]:  # rows in the residual stream
        logits = logit_effects(sae, emb.weight.detach().cpu())
    n_tok = max(int(acts["tokens"]), 1)

    def context(v: float, t: int) -> dict[str, Any]:
        s, p = divmod(t, store.seq_len)
        lo = max(0, p - window)
        return {"value": round(v, 4), "tokens": [decode(x) for x in ids[s, lo: p + 2].tolist()], "at": p - lo}

    records = []
    for j in range(sae.d_sae):
        m = float(maxima[j])
        contexts = [context(v, t) for v, t in zip(acts["values"][j].tolist(), acts["index"][j].tolist()) if t >= 0]
        rec = {"latent": j, "max": round(m, 4), "density": int(acts["fires"][j]) / n_tok, "contexts": contexts,
               "nearest": [[int(i), round(float(c), 3)] for i, c in zip(near_i[j], near_v[j])]}
        if binned is not None:
            rec["bins"] = [{"lo": round(m * b / bins, 4), "hi": round(m * (b + 1) / bins, 4),
                            "count": int(binned["count"][j, b]),
                            "contexts": [context(v, t) for v, t in zip(binned["values"][j, b].tolist(),
                                                                      binned["index"][j, b].tolist()) if t >= 0]}
                           for b in reversed(range(bins))]
        if logits is not None:
            rec["logits_top"] = [decode(int(t)) for t in logits["top"][j]]
            rec["logits_bottom"] = [decode(int(t)) for t in logits["bottom"][j]]
        records.append(rec)
    return records


def _np_activation(c: dict[str, Any], bin_min: float, bin_max: float, contains: float) -> dict[str, Any]:
    """One context as a Neuronpedia activation: per-token values (the latent's value at its
    token, 0 elsewhere, since only the peak is kept) and the bin it was drawn from."""
    values = [c["value"] if i == c["at"] else 0.0 for i in range(len(c["tokens"]))]
    return {"tokens": c["tokens"], "values": values, "maxValue": c["value"], "maxValueTokenIndex": c["at"],
            "binMin": bin_min, "binMax": bin_max, "binContains": contains}


def write_neuronpedia(records: list[dict[str, Any]], folder: str | Path, model_id: str, layer: str,
                      per_file: int = 128) -> list[Path]:
    """``batch-{n}.json`` files in Neuronpedia's feature-upload layout: one object per latent
    with its activating contexts. Neuronpedia marks the top examples with ``binMin = -1`` and
    ``binContains = -1``, and a quantile sample with its bin's bounds and the share of the
    latent's activations that fall in it; the sample from every bin is exported that way."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, start in enumerate(range(0, len(records), per_file)):
        batch = []
        for r in records[start: start + per_file]:
            acts = [_np_activation(c, -1.0, r["max"], -1.0) for c in r["contexts"]]
            fired = sum(b["count"] for b in r.get("bins", []))
            for b in r.get("bins", []):
                share = b["count"] / fired if fired else 0.0
                acts += [_np_activation(c, b["lo"], b["hi"], share) for c in b["contexts"]]
            batch.append({"modelId": model_id, "layer": layer, "index": str(r["latent"]),
                          "frac_nonzero": r["density"], "activations": acts,
                          "pos_str": r.get("logits_top", []), "neg_str": r.get("logits_bottom", [])})
        p = folder / f"batch-{n}.json"
        p.write_text(json.dumps(batch))
        paths.append(p)
    return paths
