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
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from ..errors import ActscopeError
from ..hooks import edits
from ..kvcache import output_cache, with_cache
from ..sites import Site, site_map
from ..trace import trace
from .edits import add_noise, bind, replace_at
from .metrics import Metric, kl_metric, make_metric, measure, normalised  # noqa: F401  (kl_metric, make_metric: old home)
from .prompts import encode_pair, identity_alignment, token_texts
from .results import PatchResult
from .sites import SHORT_SITES, resolve  # noqa: F401  (SHORT_SITES: its old home)


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
    pairs = []
    for cell, row, value in zip(cells, rows, values):
        site, head = _cell(cell)
        pairs.append(bind(site, replace_at(value, rows=row, positions=position, units=head)))
    with edits(model, pairs):
        yield


@contextmanager
def _noise_hook(model: Any, noise: torch.Tensor | None, offset: int = 0, reps: int = 1) -> Iterator[None]:
    """Add ``noise[sample, position]`` to the embedding output; rows are laid out sample-major
    (row = sample * reps + group), positions start at ``offset`` (the tokens already cached)."""
    if noise is None:
        yield
        return
    with edits(model, [bind(site_map(model).sites["hook_embed"], add_noise(noise, start=offset, repeat=reps))]):
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
    with torch.inference_mode(), _noise_hook(model, noise):
        out = model(input_ids=corrupt_ids.expand(S, T), use_cache=True)
    m_corrupt = float(measure(out.logits[:, -1]).mean())
    patched = torch.empty(G, len(positions))
    flat = [(g, cell) for g, group in enumerate(groups) for cell in group]
    for j, p in enumerate(positions):
        vals = [_value(values, cell, alignment[p]) for _, cell in flat]
        if method == "naive":
            for g, group in enumerate(groups):
                with torch.inference_mode(), _noise_hook(model, noise), \
                        _patch_hooks(model, group, [None] * len(group), p, [_value(values, c, alignment[p]) for c in group]):
                    logits = model(input_ids=corrupt_ids.expand(S, T), use_cache=False).logits[:, -1]
                patched[g, j] = measure(logits).mean()
        elif method == "fast":
            past = None
            if p > 0:  # positions before p are exactly the corrupted run's: reuse its KV cache
                past = copy.deepcopy(output_cache(out))
                past.crop(p - T)
                past.batch_repeat_interleave(G)
            rows = [slice(g, None, G) for g, _ in flat]  # row = sample * G + group
            with torch.inference_mode(), _noise_hook(model, noise, offset=p, reps=G), \
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
    resolved = resolve(site_map(model), sites)
    if heads is not None:
        flat_sites = [s.name for s in resolved if s.view is None]
        if flat_sites:
            raise ActscopeError(f"heads= needs per-head sites such as attn.hook_z, not {flat_sites[0]}")
    clean_ids, corrupt_ids = encode_pair(tokenizer, clean, corrupted, model.device, what="patching", alignable=True)
    T = corrupt_ids.shape[1]
    if alignment is None:
        alignment = identity_alignment(clean_ids, corrupt_ids)
    positions = [p for p in (range(T) if positions is None else positions) if p in alignment]
    with torch.inference_mode(), trace(model, resolved) as cache:
        clean_logits = model(input_ids=clean_ids, use_cache=False).logits[:, -1]
    values = {s.name: cache[s.name][0] for s in resolved}

    def corrupt_logits() -> torch.Tensor:  # for the default foil: the corrupted run's answer
        with torch.inference_mode():
            return model(input_ids=corrupt_ids, use_cache=False).logits[:, -1]

    m = measure(tokenizer, metric, target=target, foil=foil, clean_logits=clean_logits, corrupt_logits=corrupt_logits)
    cells = [[s] for s in resolved] if heads is None else [[(s, h)] for s in resolved for h in heads]
    patched, m_corrupt = sweep(model, corrupt_ids, cells, values, alignment, positions, m, method=method)
    m_clean = float(m(clean_logits)[0])
    tokens = token_texts(tokenizer, corrupt_ids[0, positions])
    names = [s.name for s in resolved] if heads is None else [f"{s.name}[head {h}]" for s in resolved for h in heads]
    return PatchResult(names, list(positions), tokens, normalised(patched, m_clean, m_corrupt), patched, m_clean,
                       m_corrupt, m.foil)
