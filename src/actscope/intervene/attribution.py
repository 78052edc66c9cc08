"""Attribution patching: a first-order estimate of every patching effect from 2 forwards + 1 backward.

    res = actscope.attribution_patch(model, tok, clean, corrupted, target=" Paris", foil=" Rome")
    res.correlation     # Pearson r with real activation patching on the same grid

Definition (docs/methods.md, "Intervene"): effect(site, position) ~
``(a_clean - a_corrupt) . d metric / d a``, the gradient taken on the corrupted run, normalised
like patching effects. The RelP paper found this estimate almost uncorrelated with real patching
on some sites (docs/methods.md, "Intervene", attribution patching), so the real sweep runs by
default (``check=True``) and its correlation is always reported with the estimate.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from ..hooks import edits, hook_module, hooks
from ..sites import Site, site_map
from ..trace import trace
from .metrics import Metric, measure, normalised
from .patch import patch
from .prompts import encode_pair, token_texts
from .results import AttributionResult, PatchResult
from .sites import resolve


@contextmanager
def _frozen(model: Any) -> Iterator[None]:
    """No parameter gradients: the backward pass only needs activation gradients."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    keep = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[keep] - a[keep].mean(), b[keep] - b[keep].mean()
    denom = (a.norm() * b.norm()).item()
    return float((a @ b).item() / denom) if denom > 0 else float("nan")


def attribution_patch(
    model: Any,
    tokenizer: Any,
    clean: str,
    corrupted: str,
    *,
    sites: str | Sequence[str] = "resid_pre",
    metric: str | Metric = "logit_diff",
    target: str | int | None = None,
    foil: str | int | None = None,
    check: bool = True,
) -> AttributionResult:
    """Estimate every (site, position) patching effect; with ``check``, also run the real sweep.
    Metrics, and the default foil for ``logit_diff``, are those of ``patch``."""
    sm = site_map(model)
    resolved: list[Site] = resolve(sm, sites)
    clean_ids, corrupt_ids = encode_pair(tokenizer, clean, corrupted, model.device, what="attribution patching")
    with torch.inference_mode(), trace(model, resolved) as cache:
        clean_logits = model(input_ids=clean_ids, use_cache=False).logits[:, -1]

    def corrupt_logits() -> torch.Tensor:  # for the default foil: the corrupted run's answer
        with torch.inference_mode():
            return model(input_ids=corrupt_ids, use_cache=False).logits[:, -1]

    # built outside inference mode: the "kl" metric's clean distribution enters the backward pass
    m = measure(tokenizer, metric, target=target, foil=foil, clean_logits=clean_logits, corrupt_logits=corrupt_logits)
    m_clean = float(m(clean_logits)[0])
    clean_acts = {s.name: cache[s.name][0].clone() for s in resolved}
    acts: dict[str, torch.Tensor] = {}

    def capture(site: Site):
        def keep(x: torch.Tensor) -> torch.Tensor:  # an identity edit puts x itself on the graph,
            if x.requires_grad:                      # so even a per-head view gets its gradient
                x.retain_grad()
            acts[site.name] = x
            return x

        return keep

    embed = model.get_submodule(sm.sites["hook_embed"].module_path) if "hook_embed" in sm.sites else None
    grad_from_embed = [lambda: hook_module(embed, lambda m, a, kw, out: out.requires_grad_(True), when="after")]
    with _frozen(model), torch.enable_grad(), hooks(grad_from_embed if embed is not None else []), \
            edits(model, [(s, capture(s)) for s in resolved]):
        logits = model(input_ids=corrupt_ids, use_cache=False).logits[:, -1]
        value = m(logits)[0]
        value.backward()
    m_corrupt = float(value.detach())
    est = torch.stack([
        ((clean_acts[s.name] - acts[s.name][0].detach()) * acts[s.name].grad[0]).flatten(1).sum(-1) for s in resolved
    ])  # [sites, positions]; a per-head site counts all its heads, as patch() without heads= does
    T = corrupt_ids.shape[1]
    tokens = token_texts(tokenizer, corrupt_ids[0])
    estimate = PatchResult([s.name for s in resolved], list(range(T)), tokens,
                           normalised(est + m_corrupt, m_clean, m_corrupt), est + m_corrupt, m_clean, m_corrupt, m.foil)
    if not check:
        return AttributionResult(estimate, None, None)
    actual = patch(model, tokenizer, clean, corrupted, sites=[s.name for s in resolved], metric=m.fn)
    actual.foil = m.foil  # the same metric, so the same foil
    return AttributionResult(estimate, actual, _pearson(estimate.effect, actual.effect))
