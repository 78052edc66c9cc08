"""Fingerprints that decide whether an existing store may be resumed: the model and the corpus.

The model fingerprint hashes every byte of every parameter, plus the config. A sample of a few
tensors is not enough: a ROME edit, a merged LoRA or a fine-tune with frozen embeddings changes
only some deep layer, and a store recorded from the old weights would be silently reused or
resumed with activations of two models. XXH3 reads memory faster than the model's own forward
pass touches it, so hashing the whole model costs a fraction of one batch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import xxhash

from .data import TokenBatches

#: config keys that say where or how a model was loaded, not what it computes
_VOLATILE_CONFIG = {"_name_or_path", "name_or_path", "transformers_version", "_commit_hash"}


def _config_json(model: Any) -> str:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return "{}"
    items = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG and not k.startswith("_")}
    return json.dumps(items, sort_keys=True, default=str)


def model_fingerprint(model: Any) -> str:
    """A hash of the model's config and of every parameter's name, dtype, shape and bytes."""
    h = xxhash.xxh3_128()
    h.update(_config_json(model).encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{p.dtype}:{tuple(p.shape)};".encode())
        if p.device.type == "meta":  # offloaded weights: only their layout is known here
            continue
        data = p.detach()
        if data.device.type != "cpu":
            data = data.cpu()
        h.update(data.contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def model_spec(model: Any) -> dict:
    """What the manifest says about the model: the spec it was loaded from, its type, its fingerprint."""
    return {
        "name": getattr(model, "actscope_name", None) or getattr(model, "name_or_path", ""),
        "model_type": getattr(getattr(model, "config", None), "model_type", "unknown"),
        "config_sha256": hashlib.sha256(_config_json(model).encode()).hexdigest()[:16],
        "fingerprint": model_fingerprint(model),
    }


def data_fingerprint(tokens: TokenBatches) -> str:
    return hashlib.sha256(tokens.input_ids.numpy().tobytes()).hexdigest()[:16]
