"""Prompts to token ids, in one place for every intervention.

Patching, attribution patching, subspace patching and causal tracing compare runs position by
position, so a clean/corrupted pair must have the same length in tokens (or, for ``patch``, an
explicit alignment); ``encode_pair`` is the one check, with one message.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import ActscopeError


def encode(tokenizer: Any, text: str, device: Any) -> torch.Tensor:
    """``[1, T]`` token ids of one prompt, with the tokenizer's special tokens, on ``device``."""
    return tokenizer(text, return_tensors="pt").input_ids.to(device)


def encode_pair(tokenizer: Any, clean: str, corrupted: str, device: Any, *, what: str,
                alignable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of a clean/corrupted pair, refusing pairs of different lengths.

    ``alignable``: the caller accepts an alignment instead (``patch``), so say how to pass one.
    """
    for name, text in (("clean", clean), ("corrupted", corrupted)):
        if not isinstance(text, str) or not text.strip():
            raise ActscopeError(f"the {name} prompt is empty; {what} needs text in both prompts")
    clean_ids, corrupt_ids = encode(tokenizer, clean, device), encode(tokenizer, corrupted, device)
    if clean_ids.shape[1] != corrupt_ids.shape[1] and not alignable:
        raise ActscopeError(f"clean ({clean_ids.shape[1]} tokens) and corrupted ({corrupt_ids.shape[1]} tokens) "
                            f"differ in length; {what} needs prompts of the same length in tokens")
    return clean_ids, corrupt_ids


def identity_alignment(clean_ids: torch.Tensor, corrupt_ids: torch.Tensor) -> dict[int, int]:
    """``{p: p}`` for a pair of equal length; the error for a pair that needs an alignment."""
    n, m = clean_ids.shape[1], corrupt_ids.shape[1]
    if n != m:
        raise ActscopeError(f"clean ({n} tokens) and corrupted ({m} tokens) differ in length; "
                            "pass alignment={corrupted_position: clean_position}")
    return {p: p for p in range(m)}


def encode_batch(tokenizer: Any, texts: Sequence[str], device: Any) -> dict[str, torch.Tensor]:
    """A right-padded batch (``input_ids``, ``attention_mask``): the last real token of row ``i``
    is at ``mask[i].sum() - 1``. The tokenizer's own settings are left as they were."""
    pad = tokenizer.pad_token
    if pad is None:  # a tokenizer without a pad token (GPT-2's): pad with EOS for this call only
        tokenizer.pad_token = tokenizer.eos_token
    try:
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="right")
    finally:
        if pad is None:
            tokenizer.pad_token = pad
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def token_id(tokenizer: Any, text: str | int, what: str = "target") -> int:
    """The one token of ``text`` (an id passes through): the answer token a metric reads.

    A text of several tokens is an error naming them: the metrics score the next token only, and
    silently scoring the first piece of " Paris" (" P") measured a different answer than asked
    (docs/interventions.md, "Targets and foils")."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
        if text < 0 or (size is not None and text >= size):
            raise ActscopeError(f"{what} token id {text} is outside the vocabulary (0..{(size or 1) - 1})")
        return text
    if not isinstance(text, str) or not text:
        raise ActscopeError(f"{what} must be a non-empty string or a token id, got {text!r}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ActscopeError(f"{what} {text!r} encodes to no token")
    if len(ids) > 1:
        pieces = " + ".join(repr(tokenizer.decode([i])) for i in ids)
        raise ActscopeError(f"{what} {text!r} is {len(ids)} tokens ({pieces}); metrics score one next token: "
                            "give a single-token answer or its token id")
    return ids[0]


def token_texts(tokenizer: Any, ids: torch.Tensor) -> list[str]:
    """Each id of a 1-D tensor decoded on its own: the column labels of a heatmap."""
    return [tokenizer.decode([int(t)]) for t in ids.tolist()]


def subject_positions(tokenizer: Any, prompt: str, subject: str) -> list[int]:
    """Token positions of ``subject`` in ``prompt`` (its last occurrence), from character offsets."""
    start = prompt.rfind(subject)
    if start < 0 or not subject:
        raise ActscopeError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
    end = start + len(subject)
    enc = tokenizer(prompt, return_offsets_mapping=True)
    pos = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > start and a < end and b > a]
    if not pos:
        raise ActscopeError(f"subject {subject!r} maps to no token of the prompt")
    return pos
