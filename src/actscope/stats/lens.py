"""What each layer contributes to the output: layer skipping and the logit-lens view.

Both run the model themselves on a small sample, unlike the streaming accumulators beside
them, and both read the residual stream through the final norm and the unembedding
(docs/methods.md, "Measure", layer use and logit lens).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..hooks import hook_module, hooks
from ..trace import trace
from .residual import kl_to_final


def _skip_row(row: int):
    """A forward hook that makes the layer an identity for batch row ``row`` only."""

    def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        out = (output[0] if isinstance(output, tuple) else output).clone()
        out[row] = hidden[row]
        return (out, *output[1:]) if isinstance(output, tuple) else out

    return hook


def skip_layer_kl(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor) -> list[float]:
    """``KL(p || p_without_l)`` for each layer ``l``, averaged over the positions of ``ids`` [1, n].

    One forward pass does all layers: row ``l`` of a batch of copies skips layer ``l`` (its
    output replaced by its input), and the last row is the unmodified baseline; rows never
    interact, so each row is exactly the model with one layer skipped.
    """
    L, n = len(layers), ids.shape[1]
    batch = ids[:1].expand(L + 1, n).to(next(model.parameters()).device)
    with torch.inference_mode(), hooks([lambda l=l: hook_module(layers[l], _skip_row(l), when="after")
                                        for l in range(L)]):
        logits = model(input_ids=batch, use_cache=False).logits
    return [float(kl_to_final(logits[L], logits[l]).mean()) for l in range(L)]


def logit_lens_view(model: nn.Module, final_norm: nn.Module, unembed: nn.Module, n_layers: int,
                    ids: torch.Tensor, decode: Callable[[int], str], n_positions: int = 8,
                    top: int = 3) -> dict:
    """Top tokens per layer at ``n_positions`` evenly spaced positions of ``ids`` [1, T], and
    the rank of the model's final prediction in each layer's decoded distribution."""
    T = ids.shape[1]
    positions = sorted({int(round(i * (T - 1) / max(n_positions - 1, 1))) for i in range(n_positions)})
    with torch.inference_mode(), trace(model, "blocks.*.hook_resid_post") as cache:
        final = model(input_ids=ids, use_cache=False).logits[0, positions]
    final_top = final.argmax(-1)
    h = torch.cat([cache[f"blocks.{l}.hook_resid_post"][0, positions] for l in range(n_layers)])
    with torch.inference_mode():  # one unembedding call: the vocab matrix is read once, not per layer
        all_logits = unembed(final_norm(h)).reshape(n_layers, len(positions), -1)
    layers = []
    for l in range(n_layers):
        logits = all_logits[l]
        top_ids = logits.topk(top, dim=-1).indices
        rank = (logits > logits.gather(1, final_top[:, None])).sum(-1)
        layers.append({
            "layer": l,
            "top": [[decode(t) for t in row] for row in top_ids.tolist()],
            "final_token_rank": rank.tolist(),
        })
    return {
        "positions": positions,
        "tokens": [decode(t) for t in ids[0, positions].tolist()],
        "next_token_prediction": [decode(t) for t in final_top.tolist()],
        "layers": layers,
    }
