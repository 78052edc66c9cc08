"""Residual-stream statistics: massive activations and how much each layer is used.

Massive activations (Sun et al. 2024; docs/methods.md, "Measure"): scalar entries of ``h_l`` with
``|x| > abs_threshold`` and ``|x| > ratio_threshold * median(|h_l|)``. Candidates above the
absolute threshold are kept per (layer, dim, position) group (largest instance, count), so
memory is bounded by the number of distinct groups, not by tokens; the median comes from a
quantile sketch of a strided sample of entries.

Layer use (Void in LMs; Do LMs use their depth): per layer and token, the relative update
``||h_l - h_{l-1}|| / ||h_{l-1}||`` and the cosine of each sublayer's output with the residual
it reads; the logit-lens KL ``KL(p_final || p_lens_l)`` on sampled tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import fast
from .accum import QuantileSketch, Sum

_EMPTY = torch.empty(0)


@dataclass
class MassiveTracker:
    abs_threshold: float = 100.0
    ratio_threshold: float = 1000.0
    max_groups: int = 5000
    groups: dict[tuple[int, int, int], dict] = field(default_factory=dict)
    medians: dict[int, QuantileSketch] = field(default_factory=dict)

    def update(self, layer: int, h: torch.Tensor, input_ids: torch.Tensor, offset: int) -> None:
        """``h``: ``[batch, seq, d]`` residual after ``layer``; positions are within-sequence."""
        sketch = self.medians.setdefault(layer, QuantileSketch())
        sketch.update(h.reshape(-1)[::31])  # a strided sample is plenty for a median
        # prefilter with half the ratio bound on the running median; the final filter uses
        # the corpus-wide median
        bound = max(self.abs_threshold, 0.5 * self.ratio_threshold * sketch.quantile(0.5))
        if (kern := fast.kernel_for(h)) is not None:  # one pass, no [batch, seq, d] temporaries
            flat = kern.above(h, bound)
            values = h.reshape(-1)[flat]
            T, D = h.shape[1], h.shape[2]
            hits = torch.stack([flat // (T * D), flat // D % T, flat % D], 1)
        else:
            hits = (h.abs() > bound).nonzero()
            values = h[hits[:, 0], hits[:, 1], hits[:, 2]]
        if hits.numel() == 0:
            return
        for (b, pos, dim), value in zip(hits.tolist(), values.tolist()):
            key = (layer, dim, pos)
            g = self.groups.get(key)
            if g is None:
                if len(self.groups) >= self.max_groups:
                    continue
                g = self.groups[key] = {"count": 0, "value": 0.0, "token_index": -1, "token_id": -1}
            g["count"] += 1
            if abs(value) > abs(g["value"]):
                seq_len = h.shape[1]
                g.update(value=value, token_index=offset + b * seq_len + pos, token_id=int(input_ids[b, pos]))

    def merge(self, o: "MassiveTracker") -> "MassiveTracker":
        for layer, sk in o.medians.items():
            self.medians.setdefault(layer, QuantileSketch()).merge(sk)
        for key, g in o.groups.items():
            mine = self.groups.get(key)
            if mine is None:
                self.groups[key] = dict(g)
            else:
                mine["count"] += g["count"]
                if abs(g["value"]) > abs(mine["value"]):
                    mine.update(value=g["value"], token_index=g["token_index"], token_id=g["token_id"])
        return self

    def median(self, layer: int) -> float:
        return self.medians[layer].quantile(0.5) if layer in self.medians else float("nan")

    def results(self, decode) -> list[dict]:
        """Entries passing both thresholds, largest |value| first."""
        rows = []
        for (layer, dim, pos), g in self.groups.items():
            med = self.median(layer)
            ratio = abs(g["value"]) / med if med > 0 else float("inf")
            if ratio < self.ratio_threshold:
                continue
            rows.append({
                "layer": layer, "dim": dim, "position": pos, "token": decode(g["token_id"]),
                "value": g["value"], "ratio_to_median": ratio, "count": g["count"],
            })
        return sorted(rows, key=lambda r: -abs(r["value"]))


@dataclass
class LayerUse:
    n_layers: int
    rel_update: list[Sum] = field(init=False)
    cos_attn: list[Sum] = field(init=False)
    cos_mlp: list[Sum] = field(init=False)
    lens_kl: list[Sum] = field(init=False)
    skip_kl: list[float | None] = field(init=False)

    def __post_init__(self) -> None:
        self.rel_update = [Sum() for _ in range(self.n_layers)]
        self.cos_attn = [Sum() for _ in range(self.n_layers)]
        self.cos_mlp = [Sum() for _ in range(self.n_layers)]
        self.lens_kl = [Sum() for _ in range(self.n_layers)]
        self.skip_kl = [None] * self.n_layers

    def update(self, layer: int, h_in: torch.Tensor, h_out: torch.Tensor,
               attn_out: torch.Tensor | None, mlp_out: torch.Tensor | None, parallel: bool) -> None:
        n = h_in.shape[0] * h_in.shape[1]
        if (kern := fast.kernel_for(h_in, h_out, attn_out, mlp_out)) is not None:  # one pass, float64 sums
            d = h_in.shape[-1]
            flat = [t.reshape(n, d) if t is not None else _EMPTY for t in (h_in, h_out, attn_out, mlp_out)]
            rel, cos_attn, cos_mlp = kern.layer_use(*flat, parallel).tolist()
            self.rel_update[layer].update(rel, n)
            if attn_out is not None:
                self.cos_attn[layer].update(cos_attn, n)
            if mlp_out is not None:
                self.cos_mlp[layer].update(cos_mlp, n)
            return
        in_norm = h_in.norm(dim=-1).clamp_min(1e-12)
        self.rel_update[layer].update(float(((h_out - h_in).norm(dim=-1) / in_norm).sum()), n)
        if attn_out is not None:
            cos = torch.nn.functional.cosine_similarity(attn_out, h_in, dim=-1)
            self.cos_attn[layer].update(float(cos.sum()), n)
        if mlp_out is not None:
            mid = h_in if parallel or attn_out is None else h_in + attn_out
            cos = torch.nn.functional.cosine_similarity(mlp_out, mid, dim=-1)
            self.cos_mlp[layer].update(float(cos.sum()), n)

    def update_lens(self, layer: int, kl: torch.Tensor) -> None:
        self.lens_kl[layer].update(float(kl.sum()), kl.numel())

    def merge(self, o: "LayerUse") -> "LayerUse":
        for mine, theirs in [(self.rel_update, o.rel_update), (self.cos_attn, o.cos_attn),
                             (self.cos_mlp, o.cos_mlp), (self.lens_kl, o.lens_kl)]:
            for a, b in zip(mine, theirs):
                a.merge(b)
        self.skip_kl = [a if a is not None else b for a, b in zip(self.skip_kl, o.skip_kl)]
        return self

    def results(self) -> list[dict]:
        def val(s: Sum) -> float | None:
            return float(s.mean) if s.n else None

        return [
            {
                "layer": l,
                "relative_update": val(self.rel_update[l]),
                "cos_attn_to_residual": val(self.cos_attn[l]),
                "cos_mlp_to_residual": val(self.cos_mlp[l]),
                "logit_lens_kl": val(self.lens_kl[l]),
                "skip_kl": self.skip_kl[l],
            }
            for l in range(self.n_layers)
        ]


def kl_to_final(final_logits: torch.Tensor, lens_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_final || p_lens)`` per row, in nats."""
    lp = torch.log_softmax(final_logits.float(), dim=-1)
    lq = torch.log_softmax(lens_logits.float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)
