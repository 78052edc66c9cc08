"""Activation patching: which (site, position) cells carry the clean run's answer.

    result = actscope.patch(model, tok, "The capital of France is", "The capital of Italy is",
                            target=" Paris", foil=" Rome", sites="resid_pre")

Definition (docs/methods.md, "Intervene"): run the corrupted input with one site at one
position replaced by the clean run's value and measure a metric on the last position's logits;
the normalised effect is ``(patched - corrupted) / (clean - corrupted)``.

The fast sweep exploits causality. Patching (layer l, position p) leaves every position before p
unchanged in every layer, so the corrupted run's KV cache for positions < p is reused and only
positions >= p are recomputed; and all sites of one position run together as one batch, row i
patching site i. This gives the naive per-cell loop's results (to float rounding) from one
forward pass per position instead of one per cell.
"""

from __future__ import annotations

import copy
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..errors import ActscopeError
from ..hooks import edits
from ..kvcache import output_cache, with_cache
from ..sites import Site, SiteMap, site_map
from ..trace import trace

SHORT_SITES = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
}
Metric = Callable[[torch.Tensor], torch.Tensor]  # last-position logits [rows, vocab] -> [rows]


@dataclass
class PatchResult:
    sites: list[str]
    positions: list[int]
    tokens: list[str]
    effect: torch.Tensor  # [sites, positions], normalised
    patched: torch.Tensor  # raw metric per cell
    clean: float
    corrupted: float
    foil: str | None = None  # logit_diff's foil token, given or chosen (the corrupted run's top token)

    def to_dict(self) -> dict:
        return {
            "sites": self.sites, "positions": self.positions, "tokens": self.tokens,
            "effect": [[round(float(x), 6) for x in row] for row in self.effect],
            "metric_clean": self.clean, "metric_corrupted": self.corrupted,
        }

    def save(self, folder: str | os.PathLike) -> Path:
        """``effects.json``, ``effects.png`` and ``effects.svg`` (sites down, positions across), ``effects.html``."""
        from ..report.plots import heatmap_figure, heatmap_svg, heatmap_uri

        import base64

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / "effects.json").write_text(json.dumps(self.to_dict(), indent=1))
        lim = max(float(self.effect.abs().max()), 1e-6)
        png = heatmap_uri((self.effect + lim) / (2 * lim), 0.0, 1.0, (12, 24)).split(",", 1)[1]
        (out / "effects.png").write_bytes(base64.b64decode(png))
        labels = [f"{p}: {t!r}" for p, t in zip(self.positions, self.tokens)]
        (out / "effects.svg").write_text(heatmap_svg(self.effect.nan_to_num(0), self.sites, labels,
                                                     "Normalised effect", -lim, lim))
        import html

        cols = " ".join(f"{p}:{html.escape(repr(t))}" for p, t in zip(self.positions, self.tokens))
        fig = heatmap_figure(self.effect, "Normalised patching effect", f"position ({cols})", "site", -lim, lim, (12, 24))
        (out / "effects.html").write_text(f"<!DOCTYPE html><meta charset='utf-8'><body>{fig}<p>sites: {html.escape(', '.join(self.sites))}</p></body>")
        return out


def _token_id(tokenizer: Any, text: str | int) -> int:
    if isinstance(text, int):
        return text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ActscopeError(f"{text!r} encodes to no token")
    return ids[0]


def kl_metric(clean_logits: torch.Tensor) -> Metric:
    """``-KL(p_clean || p)`` of the last position's next-token distribution: 0 for the clean run
    and negative elsewhere, so "higher is more clean-like" as for the other metrics. It needs the
    clean run's logits, which is why callers build it after their clean forward pass."""
    clean_logp = torch.log_softmax(clean_logits.detach().float(), -1)

    def measure(logits: torch.Tensor) -> torch.Tensor:
        return -(clean_logp.exp() * (clean_logp - torch.log_softmax(logits.float(), -1))).sum(-1)

    return measure


def make_metric(
    tokenizer: Any,
    metric: str | Metric,
    target: str | int | None,
    foil: str | int | None,
    clean_logits: torch.Tensor | None = None,
) -> Metric:
    """The one place a metric name becomes a function of the last-position logits ``[rows, vocab]``,
    so ``patch``, ``subspace_patch`` and ``attribution_patch`` mean the same thing by each name.
    ``clean_logits`` (the clean run's last-position logits) is needed by ``"kl"`` only."""
    if callable(metric):
        return metric
    if metric == "kl":
        if clean_logits is None:
            raise ActscopeError("metric 'kl' needs the clean run's logits (clean_logits=)")
        return kl_metric(clean_logits)
    if metric in ("logit_diff", "prob") and target is None:
        raise ActscopeError(f"metric {metric!r} needs a target token")
    t = _token_id(tokenizer, target) if target is not None else None
    if metric == "logit_diff":
        if foil is None:
            raise ActscopeError("metric 'logit_diff' needs a foil token (the corrupted answer)")
        f = _token_id(tokenizer, foil)
        return lambda logits: logits[:, t] - logits[:, f]
    if metric == "prob":
        return lambda logits: torch.softmax(logits.float(), -1)[:, t]
    raise ActscopeError(f"unknown metric {metric!r}: use logit_diff, prob, kl or a function of the logits")


def _resolve(site_map: SiteMap, sites: str | Sequence[str]) -> list[Site]:
    names = [sites] if isinstance(sites, str) else list(sites)
    expanded: list[str] = []
    for n in names:
        if n in SHORT_SITES:
            expanded += [f"blocks.{l}.{SHORT_SITES[n]}" for l in range(site_map.n_layers)]
        else:
            expanded.append(n)
    resolved = site_map.resolve(expanded)
    patterns = [s.name for s in resolved if s.needs_eager_attention]
    if patterns:
        raise ActscopeError(f"attention patterns cannot be patched (they are recomputed): {', '.join(patterns[:3])}; patch attn.hook_z heads")
    return resolved


def _cell(c: Any) -> tuple[Site, int | None]:
    return c if isinstance(c, tuple) else (c, None)


def _value(values: dict[str, torch.Tensor], cell: Any, q: int) -> torch.Tensor:
    site, head = _cell(cell)
    v = values[site.name][q]
    return v if head is None else v[head]


@contextmanager
def _patch_hooks(model: Any, cells: list[Any], rows: list[Any], position: int, values: list[torch.Tensor]) -> Iterator[None]:
    """Replace cell ``i`` (a site, or a (site, head) pair) at ``position`` with ``values[i]`` in
    batch rows ``rows[i]`` (an index, a slice, or None for all rows). Per-head sites are written
    through their view by the hook core."""

    def swap(site: Site, head: int | None, sel: Any, value: torch.Tensor):
        def fn(h: torch.Tensor) -> torch.Tensor:  # h as traced: per-head sites have a head axis
            h = h.clone()
            if head is None:
                h[sel, position] = value.to(h.dtype)
            else:
                h[sel, position, head] = value.to(h.dtype)
            return h

        return fn

    pairs = []
    for cell, row, value in zip(cells, rows, values):
        site, head = _cell(cell)
        pairs.append((site, swap(site, head, slice(None) if row is None else row, value)))
    with edits(model, pairs):
        yield


@contextmanager
def _noise_hook(model: Any, noise: torch.Tensor | None, state: dict) -> Iterator[None]:
    """Add ``noise[sample, position]`` to the embedding output; rows are laid out sample-major
    (row = sample * state["reps"] + group), positions start at ``state["offset"]``."""
    if noise is None:
        yield
        return

    def add_noise(output: torch.Tensor) -> torch.Tensor:
        T = output.shape[1]
        add = noise[:, state["offset"] : state["offset"] + T].repeat_interleave(state["reps"], dim=0)
        return output + add.to(output.dtype)

    with edits(model, [(site_map(model).sites["hook_embed"], add_noise)]):
        yield


def sweep(
    model: Any,
    corrupt_ids: torch.Tensor,
    groups: list[list[Any]],
    values: dict[str, torch.Tensor],
    alignment: dict[int, int],
    positions: Sequence[int],
    measure: Metric,
    noise: torch.Tensor | None = None,
    method: str = "fast",
) -> tuple[torch.Tensor, float]:
    """The patching engine: for each group of sites and each position, run the corrupted input
    (plus ``noise`` [samples, T, d] on the embeddings, if given) with the group's sites at that
    position set to ``values[site][alignment[position]]`` (a group holds sites or (site, head)
    cells); return the metric averaged over samples, ``[groups, positions]``, and the corrupted
    metric."""
    S = 1 if noise is None else noise.shape[0]
    G, T = len(groups), corrupt_ids.shape[1]
    state = {"offset": 0, "reps": 1}
    with torch.inference_mode(), _noise_hook(model, noise, state):
        out = model(input_ids=corrupt_ids.expand(S, T), use_cache=True)
    m_corrupt = float(measure(out.logits[:, -1]).mean())
    patched = torch.empty(G, len(positions))
    flat = [(g, cell) for g, group in enumerate(groups) for cell in group]
    for j, p in enumerate(positions):
        vals = [_value(values, cell, alignment[p]) for _, cell in flat]
        if method == "naive":
            for g, group in enumerate(groups):
                state.update(offset=0, reps=1)
                with torch.inference_mode(), _noise_hook(model, noise, state), \
                        _patch_hooks(model, group, [None] * len(group), p, [_value(values, c, alignment[p]) for c in group]):
                    logits = model(input_ids=corrupt_ids.expand(S, T), use_cache=False).logits[:, -1]
                patched[g, j] = measure(logits).mean()
        elif method == "fast":
            past = None
            if p > 0:  # positions before p are exactly the corrupted run's: reuse its KV cache
                past = copy.deepcopy(output_cache(out))
                past.crop(p - T)
                past.batch_repeat_interleave(G)
            state.update(offset=p, reps=G)
            rows = [slice(g, None, G) for g, _ in flat]  # row = sample * G + group
            with torch.inference_mode(), _noise_hook(model, noise, state), \
                    _patch_hooks(model, [cell for _, cell in flat], rows, 0, vals):
                logits = model(input_ids=corrupt_ids[:, p:].expand(S * G, -1), **with_cache(past),
                               use_cache=past is not None).logits[:, -1]
            patched[:, j] = measure(logits).reshape(S, G).mean(0)
        else:
            raise ActscopeError(f"method must be 'fast' or 'naive', not {method!r}")
    return patched, m_corrupt


def patch(
    model: Any,
    tokenizer: Any,
    clean: str,
    corrupted: str,
    *,
    sites: str | Sequence[str] = "resid_pre",
    positions: Sequence[int] | None = None,
    metric: str | Metric = "logit_diff",
    target: str | int | None = None,
    foil: str | int | None = None,
    alignment: dict[int, int] | None = None,
    heads: Sequence[int] | None = None,
    method: str = "fast",
) -> PatchResult:
    """Patch every (site, position) cell; see the module docstring. ``alignment`` maps corrupted
    positions to clean positions when the prompts differ in length. ``heads`` patches per-head
    sites (e.g. ``blocks.*.attn.hook_z``) one head at a time: rows become ``site[head h]``.
    ``metric="kl"`` measures ``-KL(p_clean || p)`` at the last position (0 for the clean run).
    ``foil`` (for ``logit_diff``) defaults to the corrupted run's top next token."""
    resolved = _resolve(site_map(model), sites)
    if heads is not None:
        flat_sites = [s.name for s in resolved if s.view is None]
        if flat_sites:
            raise ActscopeError(f"heads= needs per-head sites such as attn.hook_z, not {flat_sites[0]}")
    enc = lambda text: tokenizer(text, return_tensors="pt").input_ids.to(model.device)  # noqa: E731
    clean_ids, corrupt_ids = enc(clean), enc(corrupted)
    T = corrupt_ids.shape[1]
    if alignment is None:
        if clean_ids.shape[1] != T:
            raise ActscopeError(
                f"clean ({clean_ids.shape[1]} tokens) and corrupted ({T} tokens) differ in length; "
                "pass alignment={corrupted_position: clean_position}"
            )
        alignment = {p: p for p in range(T)}
    positions = [p for p in (range(T) if positions is None else positions) if p in alignment]
    with torch.inference_mode(), trace(model, resolved) as cache:
        clean_logits = model(input_ids=clean_ids, use_cache=False).logits[:, -1]
    values = {s.name: cache[s.name][0] for s in resolved}
    if metric == "logit_diff" and foil is None and target is not None:  # the corrupted run's answer
        with torch.inference_mode():
            foil = int(model(input_ids=corrupt_ids, use_cache=False).logits[0, -1].argmax())
    measure = make_metric(tokenizer, metric, target, foil, clean_logits)
    cells = [[s] for s in resolved] if heads is None else [[(s, h)] for s in resolved for h in heads]
    patched, m_corrupt = sweep(model, corrupt_ids, cells, values, alignment, positions, measure, method=method)
    m_clean = float(measure(clean_logits)[0])
    tokens = [tokenizer.decode([int(t)]) for t in corrupt_ids[0, positions].tolist()]
    names = [s.name for s in resolved] if heads is None else [f"{s.name}[head {h}]" for s in resolved for h in heads]
    foil_text = (tokenizer.decode([foil]) if isinstance(foil, int) else foil) if metric == "logit_diff" else None
    return PatchResult(names, list(positions), tokens, normalised(patched, m_clean, m_corrupt), patched, m_clean,
                       m_corrupt, foil_text)


def normalised(patched: torch.Tensor, clean: float, corrupted: float) -> torch.Tensor:
    """``(patched - corrupted) / (clean - corrupted)``; NaN when clean equals corrupted."""
    denom = clean - corrupted
    return (patched - corrupted) / (denom if abs(denom) > 1e-12 else float("nan"))
