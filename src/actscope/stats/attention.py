"""Attention statistics: sinks, dormant heads and the extreme-token triad.

Definitions (docs/methods.md, "Measure"): for head (l, h) with pattern ``A[q, k]``,
- sink score of key position j = mean of ``A[q, j]`` over the queries that can see it (q >= j);
- mass on the first token = mean over queries q >= 1 of ``A[q, 0]`` (q = 0 is trivially 1);
- a head is *dormant* on a sequence when that mass exceeds ``dormant_threshold`` (0.9);
- a *secondary sink* is a later key token that receives, on average over at least
  ``min_queries`` later queries, more than ``secondary_threshold`` of some head's attention;
  it is reported by token with the layers where it acts as one (its lifetime);
- the triad compares first tokens with the rest: attention received, value-state norm,
  and residual norm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionStats:
    n_layers: int
    n_heads: int
    seq_len: int
    vocab: int
    dormant_threshold: float = 0.9
    secondary_threshold: float = 0.3
    min_queries: int = 8
    received: torch.Tensor = field(init=False)  # [L, H, T] summed attention per key position
    first_mass: torch.Tensor = field(init=False)  # [L, H] summed over sequences
    dormant: torch.Tensor = field(init=False)  # [L, H] sequences on which the head is dormant
    n_seqs: int = 0
    sink_events: torch.Tensor = field(init=False)  # [L, vocab] key tokens acting as sinks
    token_seen: torch.Tensor = field(init=False)  # [vocab] occurrences of eligible key tokens
    triad: torch.Tensor = field(init=False)  # [L, 2 groups, 3 measures] sums
    triad_n: torch.Tensor = field(init=False)  # [L, 2]

    def __post_init__(self) -> None:
        L, H, T = self.n_layers, self.n_heads, self.seq_len
        self.received = torch.zeros(L, H, T, dtype=torch.float64)
        self.first_mass = torch.zeros(L, H, dtype=torch.float64)
        self.dormant = torch.zeros(L, H, dtype=torch.int64)
        self.sink_events = torch.zeros(L, self.vocab, dtype=torch.int64)
        self.token_seen = torch.zeros(self.vocab, dtype=torch.int64)
        self.triad = torch.zeros(L, 2, 3, dtype=torch.float64)
        self.triad_n = torch.zeros(L, 2, dtype=torch.int64)

    def count_tokens(self, input_ids: torch.Tensor) -> None:
        """Once per batch: occurrences of tokens eligible as secondary sinks."""
        T = input_ids.shape[1]
        eligible = input_ids[:, 1 : T - self.min_queries + 1]
        self.token_seen += torch.bincount(eligible.reshape(-1), minlength=self.vocab)[: self.vocab]
        self.n_seqs += input_ids.shape[0]

    def update(self, layer: int, pattern: torch.Tensor, input_ids: torch.Tensor,
               values: torch.Tensor | None, resid: torch.Tensor | None) -> None:
        """``pattern``: ``[batch, head, query, key]``; ``values``: ``[batch, seq, kv_head, d]``."""
        B, H, T, _ = pattern.shape
        per_key = pattern.sum(2)  # [B, H, key]: total attention each key receives
        self.received[layer, :, :T] += per_key.sum(0).double()
        first = pattern[:, :, 1:, 0].mean(-1)  # [B, H]
        self.first_mass[layer] += first.sum(0).double()
        self.dormant[layer] += (first > self.dormant_threshold).sum(0)
        # secondary sinks: average received over the queries that can see each key
        seen_by = torch.arange(T, 0, -1, dtype=pattern.dtype)  # queries q >= k
        avg = per_key / seen_by  # [B, H, key]
        window = avg[:, :, 1 : T - self.min_queries + 1].amax(1)  # [B, key]: strongest head
        hit = window > self.secondary_threshold
        if bool(hit.any()):
            ids = input_ids[:, 1 : T - self.min_queries + 1][hit]
            self.sink_events[layer] += torch.bincount(ids, minlength=self.vocab)[: self.vocab]
        # triad: first token (group 0) vs others (group 1)
        recv = avg.mean(1)  # [B, key] mean over heads
        self._triad(layer, 0, recv[:, 0])
        self._triad(layer, 1, recv[:, 1:].reshape(-1))
        if values is not None:
            vn = values.norm(dim=-1).mean(-1)  # [B, T]
            self.triad[layer, 0, 1] += float(vn[:, 0].sum())
            self.triad[layer, 1, 1] += float(vn[:, 1:].sum())
        if resid is not None:
            rn = resid.norm(dim=-1)
            self.triad[layer, 0, 2] += float(rn[:, 0].sum())
            self.triad[layer, 1, 2] += float(rn[:, 1:].sum())

    def _triad(self, layer: int, group: int, received: torch.Tensor) -> None:
        self.triad[layer, group, 0] += float(received.sum())
        self.triad_n[layer, group] += received.numel()

    def merge(self, o: "AttentionStats") -> "AttentionStats":
        for name in ("received", "first_mass", "dormant", "sink_events", "token_seen", "triad", "triad_n"):
            setattr(self, name, getattr(self, name) + getattr(o, name))
        self.n_seqs += o.n_seqs
        return self

    # --- results --------------------------------------------------------------------------
    def sink_scores(self) -> torch.Tensor:
        """``[L, H, T]`` mean attention each key position receives from the queries that see it."""
        seen_by = torch.arange(self.seq_len, 0, -1, dtype=torch.float64)
        return self.received / (seen_by * max(self.n_seqs, 1))

    def mass_on_first(self) -> torch.Tensor:
        return self.first_mass / max(self.n_seqs, 1)

    def dormant_rate(self) -> torch.Tensor:
        return self.dormant.double() / max(self.n_seqs, 1)

    def secondary_sinks(self, decode, min_rate: float = 0.5, min_count: int = 3) -> list[dict]:
        """Tokens acting as sinks on at least ``min_rate`` of their occurrences, with lifetimes."""
        rate = self.sink_events.double() / self.token_seen.clamp_min(1).double()  # [L, vocab]
        strong = (rate >= min_rate) & (self.sink_events >= min_count)
        rows = []
        for tok in strong.any(0).nonzero().reshape(-1).tolist():
            layers = strong[:, tok].nonzero().reshape(-1).tolist()
            rows.append({
                "token": decode(tok), "token_id": tok, "layers": layers,
                "lifetime": [layers[0], layers[-1]], "occurrences": int(self.token_seen[tok]),
                "max_rate": float(rate[:, tok].max()),
            })
        return sorted(rows, key=lambda r: (-len(r["layers"]), -r["max_rate"]))

    def triad_table(self) -> list[dict]:
        n = self.triad_n.clamp_min(1).double()
        rows = []
        for l in range(self.n_layers):
            t = self.triad[l]
            rows.append({
                "layer": l,
                "first_token": {"attention_received": float(t[0, 0] / n[l, 0]), "value_norm": float(t[0, 1] / n[l, 0]), "residual_norm": float(t[0, 2] / n[l, 0])},
                "other_tokens": {"attention_received": float(t[1, 0] / n[l, 1]), "value_norm": float(t[1, 1] / n[l, 1]), "residual_norm": float(t[1, 2] / n[l, 1])},
            })
        return rows
