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
from .models import context_length
from .sites import site_map
from .stats.attention import AttentionStats
from .stats.mlp import MlpLayerStats
from .report.build import ReportContext, build_report
from .stats.lens import logit_lens_view, skip_layer_kl
from .stats.residual import LayerUse, MassiveTracker, kl_to_final
from .trace import trace
from .validate import finite, positive_int


@dataclass
class ScanConfig:
    """Every threshold and sample size of the scan (docs/methods.md, "Measure", gives the why)."""

    seq_len: int = 128
    """Tokens per packed sequence."""
    max_tokens: int | None = 20_000
    """Stop after this many tokens of the corpus (None: the whole corpus)."""
    batch_size: int = 8
    """Sequences per forward pass."""
    patterns: bool = True
    """Measure attention sinks and dormant heads (switches to eager attention for the pass)."""
    taus: tuple[float, ...] = (0.0, 0.01, 0.05, 0.1)
    """Thresholds ``|a| > tau`` at which MLP density is reported."""
    tau: float | None = None
    """The primary activity threshold; None: 0 for ReLU models, else 0.01."""
    chunk: int = 8
    """Consecutive tokens per chunk for chunk-level sparsity (CLS)."""
    rare: float = 1e-4
    """A neuron active on fewer than this share of tokens is rare."""
    cett_bound: float = 0.2
    """Relative L2 error bound of the MLP output for CETT sparsity."""
    massive_abs: float = 100.0
    """A massive activation exceeds this absolute value ..."""
    massive_ratio: float = 1000.0
    """... and this multiple of its layer's median absolute value."""
    dormant_threshold: float = 0.9
    """A head is dormant on a sequence when more than this share of its attention is on the sink."""
    secondary_threshold: float = 0.3
    """Sink score above which a position other than the first is a secondary sink."""
    lens_samples: int = 2
    """Random tokens per batch for the logit-lens KL and CETT."""
    skip_tokens: int = 32
    """Tokens of the first sequence used to measure the output KL when each layer is skipped."""
    topk: int = 5
    """Top-activating contexts kept per neuron."""
    profile_every: int = 4
    """Per-neuron moments and delta sparsity use every n-th sequence."""
    seed: int = 0
    """Seed of the token sampling (logit lens, CETT)."""
    text_field: str = "text"
    """Field holding the text in JSONL or Parquet data."""


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
        self.down = [model.get_submodule(sm.sites[f"blocks.{l}.mlp.hook_post"].module_path) for l in range(self.n_layers)]
        act = str(getattr(model.config, "hidden_act", getattr(model.config, "activation_function", ""))).lower()
        self.relu = act in {"relu", "relu2", "relu_squared"}
        self.tau = config.tau if config.tau is not None else (0.0 if self.relu else 0.01)
        taus = sorted(set(config.taus) | {self.tau})
        self.taus = tuple(taus)
        norm = sm.sites.get("ln_final.hook_normalized")
        self.final_norm = model.get_submodule(norm.module_path) if norm else None
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
        n = min(cfg.skip_tokens, tokens.seq_len)
        if n >= 2 and self.unembed is not None:
            layers = self.model.get_submodule(self.site_map.layers_path)
            stats.layers.skip_kl = skip_layer_kl(self.model, layers, tokens.input_ids[:1, :n])
        return stats

    def report_context(self, tokens: TokenBatches) -> ReportContext:
        """What the report needs to know about the model and the run, beside the statistics."""
        model, sm = self.model, self.site_map
        lens = {}
        if self.final_norm is not None and self.unembed is not None:
            lens = logit_lens_view(model, self.final_norm, self.unembed, self.n_layers,
                                   tokens.input_ids[:1].to(model.device), self.decode)
        return ReportContext(
            model_name=getattr(model, "actscope_name", None) or getattr(model.config, "_name_or_path", "") or sm.model_type,
            model_type=sm.model_type, n_layers=self.n_layers, n_heads=sm.dims.n_heads,
            config=asdict(self.cfg) | {"tau": self.tau, "taus": list(self.taus)},
            rare=self.cfg.rare, decode=self.decode, logit_lens=lens,
        )

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


def check_config(cfg: ScanConfig) -> None:
    """Refuse bad settings before the pass: ``tau=nan`` used to be reported after it, if at all."""
    for name in ("seq_len", "batch_size", "chunk", "lens_samples", "topk", "profile_every"):
        positive_int(f"--{name.replace('_', '-')}", getattr(cfg, name))
    positive_int("--max-tokens", cfg.max_tokens, allow_none=True)
    if isinstance(cfg.skip_tokens, bool) or not isinstance(cfg.skip_tokens, int) or cfg.skip_tokens < 0:
        raise ActscopeError(f"skip_tokens must be a non-negative integer, got {cfg.skip_tokens!r}")
    if cfg.tau is not None and finite("--tau", cfg.tau) < 0:
        raise ActscopeError(f"--tau must be at least 0, got {cfg.tau!r}")
    for tau in cfg.taus:
        finite("taus", tau)
    for name in ("rare", "cett_bound", "massive_abs", "massive_ratio", "dormant_threshold", "secondary_threshold"):
        finite(name, getattr(cfg, name), positive=True)


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
    base = config or ScanConfig()
    for key in overrides:
        if not hasattr(base, key):
            raise ActscopeError(f"unknown scan option {key!r}; options: {', '.join(asdict(base))}")
    # a copy: the caller's config is often reused for the next scan and must not carry overrides
    cfg = replace(base, **overrides)
    check_config(cfg)
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
    return build_report(scanner.report_context(main.tokens), main, other)
