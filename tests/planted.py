"""A tiny GPT-2 with planted phenomena, to check that the scan finds exactly those.

- a massive activation: position embedding 0 gets MASSIVE_VALUE in dimension MASSIVE_DIM, so the
  residual stream carries it at position 0 in every layer;
- a sink head (SINK_LAYER, SINK_HEAD): its query is a constant and its key reads the massive
  dimension, so it puts almost all attention on position 0; if ``switch_token`` is given, that
  token's embedding makes a stronger key, so the head leaves the sink when the token occurs
  (an active-dormant head);
- dead neurons: DEAD neurons of every MLP get zero weights and a bias of -10 (GELU ~ 0).
"""

from __future__ import annotations

import torch

from tiny import tiny_model

MASSIVE_DIM, MASSIVE_VALUE = 5, 3000.0
SWITCH_DIM = 7
SINK_LAYER, SINK_HEAD = 1, 2
DEAD = [3, 17, 40]


@torch.no_grad()
def planted_gpt2(switch_token: int | None = None, n_layer: int = 3):
    model = tiny_model("gpt2", n_layer=n_layer)
    tr = model.transformer
    tr.wpe.weight[0, MASSIVE_DIM] = MASSIVE_VALUE
    d, hd = model.config.n_embd, model.config.n_embd // model.config.n_head
    attn = tr.h[SINK_LAYER].attn.c_attn  # Conv1D: y = x @ W + b, columns [q | k | v]
    q = slice(SINK_HEAD * hd, (SINK_HEAD + 1) * hd)
    k = slice(d + SINK_HEAD * hd, d + (SINK_HEAD + 1) * hd)
    attn.weight[:, q] = 0
    attn.bias[q] = 1.0
    attn.weight[:, k] = 0
    attn.bias[k] = 0
    attn.weight[MASSIVE_DIM, k] = 5.0
    if switch_token is not None:
        tr.wte.weight[switch_token, SWITCH_DIM] = MASSIVE_VALUE
        attn.weight[SWITCH_DIM, k] = 10.0
    for block in tr.h:
        block.mlp.c_fc.weight[:, DEAD] = 0
        block.mlp.c_fc.bias[DEAD] = -10.0
    return model
