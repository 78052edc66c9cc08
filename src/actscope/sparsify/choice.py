"""Multiple-choice accuracy under sparsity: does the model still pick the right continuation?

Perplexity says how much worse every token got; a multiple-choice set says whether the model
still ranks the right answer first, which is what downstream benchmarks (HellaSwag, PIQA, ...)
measure. Two sources of items:

- ``continuation_items``: built from held-out text, offline: given ``context`` tokens, which of
  ``n_choices`` spans of ``length`` tokens comes next? The true span against spans from other rows.
- ``load_choice_file``: the user's own JSONL, one ``{"context": str, "choices": [str, ...],
  "answer": int}`` per line.

Scoring follows decoding, as the perplexity evaluation does: the context runs with the KV
cache (so CoreInfer picks its core neurons on the context alone), then every choice is scored
from that cache by its mean token log-probability, and the highest wins.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import TokenBatches
from ..errors import SparsifyError
from ..kvcache import output_cache, with_cache
from .config import SparsityConfig
from .swap import apply


@dataclass
class ChoiceItem:
    """One question: context token ids, candidate continuations, and the index of the right one."""

    context: torch.Tensor
    choices: list[torch.Tensor]
    answer: int


def continuation_items(tokens: TokenBatches, n: int = 200, n_choices: int = 4, context: int = 48,
                       length: int = 16, seed: int = 0) -> list[ChoiceItem]:
    """``n`` items from ``tokens``: the true next ``length`` tokens against spans from other rows."""
    ids = tokens.input_ids
    per_row = max(1, (tokens.seq_len - context) // (context + length))
    if tokens.seq_len < context + length or tokens.num_sequences < n_choices:
        raise SparsifyError(f"continuation items need rows of at least {context + length} tokens and at least "
                            f"{n_choices} rows; got {tokens.num_sequences} rows of {tokens.seq_len}")
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        row, slot = (i // per_row) % tokens.num_sequences, i % per_row
        start = slot * (context + length)
        true = ids[row, start + context: start + context + length]
        others = [r for r in torch.randperm(tokens.num_sequences, generator=g).tolist() if r != row][: n_choices - 1]
        wrong = []
        for r in others:
            at = int(torch.randint(0, tokens.seq_len - length + 1, (1,), generator=g))
            wrong.append(ids[r, at: at + length])
        answer = int(torch.randint(0, n_choices, (1,), generator=g))
        choices = wrong[:answer] + [true] + wrong[answer:]
        items.append(ChoiceItem(ids[row, start: start + context], choices, answer))
    return items


def load_choice_file(path: str | os.PathLike, tokenizer: Any) -> list[ChoiceItem]:
    """Items from a JSONL file of ``{"context": str, "choices": [str, ...], "answer": int}``."""
    file = Path(path)
    if not file.is_file():
        raise SparsifyError(f"multiple-choice file {file} does not exist")
    items = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ctx, choices, answer = rec["context"], rec["choices"], int(rec["answer"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise SparsifyError(f"{file}, line {n}: expected a JSON object with 'context' (text), 'choices' "
                                f"(list of texts) and 'answer' (index): {type(exc).__name__}: {exc}") from None
        if not isinstance(choices, list) or len(choices) < 2 or not 0 <= answer < len(choices):
            raise SparsifyError(f"{file}, line {n}: need at least 2 choices and 0 <= answer < {len(choices)}")
        enc = [torch.tensor(tokenizer(" " + c.lstrip(), add_special_tokens=False)["input_ids"]) for c in choices]
        if any(e.numel() == 0 for e in enc):
            raise SparsifyError(f"{file}, line {n}: a choice is empty once tokenized")
        context = torch.tensor(tokenizer(ctx)["input_ids"])
        if context.numel() == 0:
            raise SparsifyError(f"{file}, line {n}: the context is empty once tokenized")
        items.append(ChoiceItem(context, enc, answer))
    if not items:
        raise SparsifyError(f"multiple-choice file {file} holds no items")
    return items


@torch.inference_mode()
def choice_accuracy(model: nn.Module, items: list[ChoiceItem], config: SparsityConfig | None = None) -> float:
    """Share of items whose right choice has the highest mean log-probability (under ``config``)."""
    device = next(model.parameters()).device
    right = 0
    with apply(model, config or SparsityConfig("teal", 0.0)):
        for item in items:
            k, width = len(item.choices), max(c.numel() for c in item.choices)
            ctx = item.context.to(device).expand(k, -1)
            first = model(input_ids=ctx, use_cache=True)
            batch = torch.zeros(k, width, dtype=torch.long, device=device)
            valid = torch.zeros(k, width, dtype=torch.bool, device=device)
            for j, c in enumerate(item.choices):
                batch[j, : c.numel()] = c.to(device)
                valid[j, : c.numel()] = True
            logits = first.logits[:, -1:].float()
            if width > 1:  # padding sits after each choice's last token: causal attention never lets it in
                rest = model(input_ids=batch[:, :-1], **with_cache(output_cache(first)), use_cache=True)
                logits = torch.cat([logits, rest.logits.float()], dim=1)
            logp = torch.log_softmax(logits, -1).gather(-1, batch[..., None])[..., 0]
            score = (logp * valid).sum(1) / valid.sum(1)
            right += int(int(score.argmax()) == item.answer)
    return right / len(items)
