"""``actscope scan``: a one-pass activation atlas of a model (docs/methods.md, "Measure").

    report = actscope.scan(model, tokenizer, data=None, max_tokens=20_000)
    report.save("runs/scan")          # report.json + report.html

One streaming pass feeds every batch's activations into mergeable accumulators (stats/), so
memory does not grow with the corpus. Costly measures run on samples: the logit lens and CETT
on ``lens_samples`` random tokens per batch, layer skipping on the first ``skip_tokens`` tokens.
"""

from __future__ import annotations

import inspect

import random
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from .data import TokenBatches, load_tokens
from .errors import ActscopeError
from .hooks import hook_module
from .models import context_length
from .sites import site_map
from .stats.attention import AttentionStats
from .stats.mlp import MlpLayerStats
from .stats.residual import LayerUse, MassiveTracker, kl_to_final
from .trace import trace


@dataclass
class ScanConfig:
    seq_len: int = 128
    max_tokens: int | None = 20_000
    batch_size: int = 8
    patterns: bool = True  # attention sinks and dormant heads need eager attention
    taus: tuple[float, ...] = (0.0, 0.01, 0.05, 0.1)
    tau: float | None = None  # primary threshold; None: 0 for ReLU models, else 0.01
    chunk: int = 8
    rare: float = 1e-4
    cett_bound: float = 0.2
    massive_abs: float = 100.0
    massive_ratio: float = 1000.0
    dormant_threshold: float = 0.9
    secondary_threshold: float = 0.3
    lens_samples: int = 2
    skip_tokens: int = 32
    topk: int = 5
    profile_every: int = 4  # per-neuron moments and delta sparsity on every n-th sequence
    seed: int = 0
    text_field: str = "text"


@dataclass
class CorpusStats:
    """Everything accumulated over one corpus; ``merge`` combines two runs on the same model."""

    tokens: TokenBatches
    mlp: list[MlpLayerStats]
    massive: MassiveTracker
    layers: LayerUse
    attention: AttentionStats | None
    n_tokens: int = 0

    def merge(self, o: "CorpusStats") -> "CorpusStats":
        for a, b in zip(self.mlp, o.mlp):
            a.merge(b)
        self.massive.merge(o.massive)
        self.layers.merge(o.layers)
        if self.attention is not None and o.attention is not None:
            self.attention.merge(o.attention)
        self.n_tokens += o.n_tokens
        return self


class Scanner:
    """Runs the model over a corpus and feeds the accumulators. One instance per model."""

    def __init__(self, model: Any, tokenizer: Any, config: ScanConfig):
        self.model, self.tokenizer, self.cfg = model, tokenizer, config
        self.site_map = site_map(model)
        sm = self.site_map
        self.n_layers = sm.n_layers
        if "blocks.0.mlp.hook_post" not in sm.sites:
            raise ActscopeError(f"scan needs MLP sites, which model type {sm.model_type!r} lacks")
        self.parallel = "blocks.0.hook_resid_mid" not in sm.sites
        self.modules = dict(model.named_modules())
        self.down = [self.modules[sm.sites[f"blocks.{l}.mlp.hook_post"].module_path] for l in range(self.n_layers)]
        act = str(getattr(model.config, "hidden_act", getattr(model.config, "activation_function", ""))).lower()
        self.relu = act in {"relu", "relu2", "relu_squared"}
        self.tau = config.tau if config.tau is not None else (0.0 if self.relu else 0.01)
        taus = sorted(set(config.taus) | {self.tau})
        self.taus = tuple(taus)
        norm = sm.sites.get("ln_final.hook_normalized")
        self.final_norm = self.modules[norm.module_path] if norm else None
        self.unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        # The scan reads final logits at a few sampled positions only: when it can rebuild them
        # (final norm + unembedding, no soft-capping), the model is asked for the last position's
        # logits alone instead of all B x T x vocab of them.
        cfg_ = getattr(model, "config", None)
        self.lazy_logits = (
            self.final_norm is not None and self.unembed is not None
            and "logits_to_keep" in inspect.signature(model.forward).parameters
            and getattr(cfg_, "final_logit_softcapping", None) is None
            and getattr(getattr(cfg_, "text_config", None), "final_logit_softcapping", None) is None
        )
        if config.patterns and "blocks.0.attn.hook_pattern" not in sm.sites:
            raise ActscopeError(f"model type {sm.model_type!r} has no attention-pattern site")

    def sites(self) -> list[str]:
        names = ["blocks.0.hook_resid_pre", "blocks.*.hook_resid_post", "blocks.*.hook_attn_out",
                 "blocks.*.hook_mlp_out", "blocks.*.mlp.hook_post"]
        if self.cfg.patterns:
            names += ["blocks.*.attn.hook_pattern", "blocks.*.attn.hook_v"]
        return names

    def decode(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)])

    def new_stats(self, tokens: TokenBatches, d_ff: int) -> CorpusStats:
        cfg = self.cfg
        vocab = int(getattr(self.model.config, "vocab_size", 0) or int(tokens.input_ids.max()) + 1)
        attention = None
        if cfg.patterns:
            attention = AttentionStats(self.n_layers, self.site_map.dims.n_heads, tokens.seq_len, vocab,
                                       cfg.dormant_threshold, cfg.secondary_threshold)
        return CorpusStats(
            tokens=tokens,
            mlp=[MlpLayerStats(d_ff, self.taus, self.tau, cfg.chunk, cfg.topk, cfg.profile_every) for _ in range(self.n_layers)],
            massive=MassiveTracker(cfg.massive_abs, cfg.massive_ratio),
            layers=LayerUse(self.n_layers),
            attention=attention,
        )

    def run(self, tokens: TokenBatches, progress: bool = True, desc: str = "scan") -> CorpusStats:
        cfg = self.cfg
        acts: dict[str, torch.Tensor] = {}
        rng = random.Random(cfg.seed)
        stats: CorpusStats | None = None
        bar = tqdm(total=tokens.num_tokens, unit="tok", unit_scale=True, desc=desc, disable=not progress,
                   dynamic_ncols=True)
        offset = 0
        with torch.inference_mode(), trace(self.model, self.sites(), on_activation=lambda s, x: acts.__setitem__(s.name, x)):
            for ids in tokens.batches(cfg.batch_size):
                extra = {"logits_to_keep": 1} if self.lazy_logits else {}
                logits = self.model(input_ids=ids.to(self.model.device), use_cache=False, **extra).logits
                if stats is None:
                    stats = self.new_stats(tokens, acts["blocks.0.mlp.hook_post"].shape[-1])
                self._consume(stats, acts, ids, None if self.lazy_logits else logits, offset, rng)
                offset += ids.numel()
                bar.update(ids.numel())
        bar.close()
        assert stats is not None
        stats.n_tokens = offset
        self._skip_layers(stats, tokens)
        return stats

    def _consume(self, st: CorpusStats, acts: dict, ids: torch.Tensor, logits: Any, offset: int, rng: random.Random) -> None:
        B, T = ids.shape
        sample = torch.tensor(rng.sample(range(B * T), min(self.cfg.lens_samples, B * T)), dtype=torch.long)
        final = logits.reshape(B * T, -1)[sample] if logits is not None else None
        if st.attention is not None:
            st.attention.count_tokens(ids)
        h_in = acts["blocks.0.hook_resid_pre"]
        lens_inputs = []
        for l in range(self.n_layers):
            p = f"blocks.{l}."
            h_out = acts[p + "hook_resid_post"]
            st.layers.update(l, h_in, h_out, acts.get(p + "hook_attn_out"), acts.get(p + "hook_mlp_out"), self.parallel)
            st.massive.update(l, h_out, ids, offset)
            a = acts[p + "mlp.hook_post"]
            st.mlp[l].update(a, offset, offset // T)
            st.mlp[l].update_cett(a.reshape(B * T, -1)[sample].float(), self.down[l], self.cfg.cett_bound)
            lens_inputs.append(h_out.reshape(B * T, -1)[sample])
            if st.attention is not None:
                st.attention.update(l, acts[p + "attn.hook_pattern"], ids, acts.get(p + "attn.hook_v"), h_in)
            h_in = h_out
        if (final is not None or self.lazy_logits) and self.final_norm is not None and self.unembed is not None:
            # one unembedding call for all layers: the matrix is read once per batch, not per layer
            lens = self.unembed(self.final_norm(torch.cat(lens_inputs))).reshape(self.n_layers, len(sample), -1)
            if final is None:  # lazy logits: the last layer's lens *is* the model's output distribution
                final = lens[-1]
            for l in range(self.n_layers):
                st.layers.update_lens(l, kl_to_final(final, lens[l]))

    def _skip_layers(self, st: CorpusStats, tokens: TokenBatches) -> None:
        """Output KL when each layer is skipped (its output replaced by its input).

        One forward pass does all layers: row l of a batch of copies skips layer l, and the
        last row is the unmodified baseline (rows never interact).
        """
        n = min(self.cfg.skip_tokens, tokens.seq_len)
        if n < 2 or self.unembed is None:
            return
        L = self.n_layers
        batch = tokens.input_ids[:1, :n].expand(L + 1, n).to(self.model.device)
        layers = self.modules[self.site_map.layers_path]
        handles = [hook_module(layers[l], _skip_row(l), when="after") for l in range(L)]
        try:
            with torch.inference_mode():
                logits = self.model(input_ids=batch, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        for l in range(L):
            st.layers.skip_kl[l] = float(kl_to_final(logits[L], logits[l]).mean())

    def logit_lens_view(self, tokens: TokenBatches, n_positions: int = 8, top: int = 3) -> dict:
        """Top tokens per layer at a few positions of the first sequence."""
        if self.final_norm is None or self.unembed is None:
            return {}
        ids = tokens.input_ids[:1].to(self.model.device)
        T = ids.shape[1]
        positions = sorted({int(round(i * (T - 1) / max(n_positions - 1, 1))) for i in range(n_positions)})
        with torch.inference_mode(), trace(self.model, "blocks.*.hook_resid_post") as cache:
            final = self.model(input_ids=ids, use_cache=False).logits[0, positions]
        final_top = final.argmax(-1)
        layers = []
        h = torch.cat([cache[f"blocks.{l}.hook_resid_post"][0, positions] for l in range(self.n_layers)])
        with torch.inference_mode():  # one unembedding call: the vocab matrix is read once, not per layer
            all_logits = self.unembed(self.final_norm(h)).reshape(self.n_layers, len(positions), -1)
        for l in range(self.n_layers):
            logits = all_logits[l]
            top_ids = logits.topk(top, dim=-1).indices
            rank = (logits > logits.gather(1, final_top[:, None])).sum(-1)
            layers.append({
                "layer": l,
                "top": [[self.decode(t) for t in row] for row in top_ids.tolist()],
                "final_token_rank": rank.tolist(),
            })
        return {
            "positions": positions,
            "tokens": [self.decode(t) for t in ids[0, positions].tolist()],
            "next_token_prediction": [self.decode(t) for t in final_top.tolist()],
            "layers": layers,
        }


def _skip_row(row: int):
    """A forward hook that makes the layer an identity for batch row ``row`` only."""

    def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        out = (output[0] if isinstance(output, tuple) else output).clone()
        out[row] = hidden[row]
        return (out, *output[1:]) if isinstance(output, tuple) else out

    return hook


def scan(
    model: Any,
    tokenizer: Any,
    data: Any = None,
    *,
    compare_data: Any = None,
    progress: bool = True,
    config: ScanConfig | None = None,
    **overrides: Any,
):
    """Scan ``model`` over ``data`` (default: Python's manual); returns a ``ScanReport``.

    ``overrides`` set ``ScanConfig`` fields, e.g. ``max_tokens=5000, patterns=False``.
    """
    from .report.build import build_report

    base = config or ScanConfig()
    for key in overrides:
        if not hasattr(base, key):
            raise ActscopeError(f"unknown scan option {key!r}; options: {', '.join(asdict(base))}")
    # a copy: the caller's config is often reused for the next scan and must not carry overrides
    cfg = replace(base, **overrides)
    limit = context_length(model)
    if limit is not None and cfg.seq_len > limit:
        raise ActscopeError(f"--seq-len {cfg.seq_len} exceeds the model's context length of {limit} tokens")
    scanner = Scanner(model, tokenizer, cfg)
    tokens = load_tokens(data, tokenizer, cfg.seq_len, cfg.max_tokens, cfg.text_field)
    main = scanner.run(tokens, progress, "scan")
    other = None
    if compare_data is not None:
        other_tokens = load_tokens(compare_data, tokenizer, cfg.seq_len, cfg.max_tokens, cfg.text_field)
        other = scanner.run(other_tokens, progress, "scan (compare)")
    return build_report(scanner, main, other)
