"""Disable or force routed experts in mixture-of-experts models, without editing the model.

Supported routers (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE in transformers 5; any family in
families.py with a ``router``) all return ``(router_logits, top_k_weights, top_k_index)`` from
softmax-then-top-k routing. A forward hook re-selects the top k from the router's own
probabilities with some experts excluded (disabled) or always included (forced):

- a disabled expert is never selected; the next-best expert takes its slot;
- a forced expert always takes a slot; the remaining slots go to the best other experts;
- weights are the router's probabilities of the selected experts, renormalised exactly when
  the model renormalises (Mixtral always; Qwen/OLMoE when ``norm_topk_prob``).

Re-selection is checked against the model's own router on the first call of every block: with
nothing changed it must reproduce the router's output bit for bit, or we refuse with an error
rather than route by a rule the model does not use.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..errors import ActscopeError
from ..families import FAMILIES, family_of
from ..hooks import hook_module
from ..sites import site_map

ExpertSpec = Mapping[int, Sequence[int]] | Sequence[int] | None


def _per_layer(spec: ExpertSpec, n_layers: int) -> dict[int, list[int]]:
    """``{layer: experts}``; a plain list applies to every layer."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        return {int(k): [int(e) for e in v] for k, v in spec.items()}
    return {layer: [int(e) for e in spec] for layer in range(n_layers)}


def _select(probs: torch.Tensor, k: int, disabled: list[int], forced: list[int], normalise: bool,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``probs`` with ``disabled`` excluded and ``forced`` included: (weights, index)."""
    key = probs.clone()
    if disabled:
        key[:, disabled] = -1.0  # below every probability
    if forced:
        key[:, forced] = 2.0 + probs[:, forced]  # above every probability, keeping their order
    index = key.topk(k, dim=-1).indices
    weights = probs.gather(-1, index)
    if normalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), index


@contextmanager
def route_experts(model: nn.Module, *, disable: ExpertSpec = None, force: ExpertSpec = None) -> Iterator[None]:
    """Route around ``disable`` and always through ``force`` experts for the block's duration.

    ``disable={3: [0, 5]}`` disables experts 0 and 5 in layer 3; ``disable=[0]`` in every layer.
    """
    model_type = getattr(model.config, "model_type", "")
    family = family_of(model)
    spec = family.router if family is not None else None  # where the router sits, and how it normalises
    if spec is None:
        supported = sorted(t for t, f in FAMILIES.items() if f.router is not None)
        raise ActscopeError(f"expert routing edits support {', '.join(supported)}; this model is {model_type!r}")
    sm = site_map(model)
    off, on = _per_layer(disable, sm.n_layers), _per_layer(force, sm.n_layers)
    flag = spec.normalise  # True: always renormalise; a str: the config flag that decides
    normalise = flag if isinstance(flag, bool) else bool(getattr(model.config, flag, False))
    handles = []
    try:
        for layer in sorted(set(off) | set(on)):
            if not 0 <= layer < sm.n_layers:
                raise ActscopeError(f"layer {layer} does not exist (the model has {sm.n_layers})")
            path = f"{sm.layers_path}.{layer}.{spec.module}"
            try:
                router = model.get_submodule(path)
            except AttributeError:
                raise ActscopeError(f"layer {layer} has no router at {path} (a dense layer?)") from None
            handles.append(hook_module(router, _hook(router, layer, off.get(layer, []), on.get(layer, []),
                                                     normalise), when="after"))
        yield
    finally:
        for h in handles:
            h.remove()


def _hook(router: nn.Module, layer: int, disabled: list[int], forced: list[int], normalise: bool):
    n_experts, k = int(router.num_experts), int(router.top_k)
    for e in (*disabled, *forced):
        if not 0 <= e < n_experts:
            raise ActscopeError(f"layer {layer}: expert {e} does not exist (the router has {n_experts})")
    if set(disabled) & set(forced):
        raise ActscopeError(f"layer {layer}: experts {sorted(set(disabled) & set(forced))} are both disabled and forced")
    if n_experts - len(disabled) < k or len(forced) > k:
        raise ActscopeError(f"layer {layer}: {k} experts are chosen per token; cannot disable {len(disabled)} "
                            f"of {n_experts} or force {len(forced)}")
    checked = [False]

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        logits, weights, index = output
        probs = torch.softmax(logits.float(), dim=-1)
        if not checked[0]:
            w0, i0 = _select(probs, k, [], [], normalise, weights.dtype)
            if not (torch.equal(i0, index) and torch.equal(w0, weights)):
                raise ActscopeError(f"layer {layer}: this router does not route by softmax then top-k as expected; "
                                    "expert edits would not be faithful, so none were made")
            checked[0] = True
        new_w, new_i = _select(probs, k, disabled, forced, normalise, weights.dtype)
        return logits, new_w, new_i

    return hook
