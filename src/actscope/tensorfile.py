"""Reading safetensors files into tensors that compute exactly as the ones that were saved.

``safetensors.torch.load_file`` returns views into one buffer, at whatever byte offset the
file's header left (often not a multiple of 64). Some CPU kernels (BLAS, vectorised updates)
take another path on such data and round differently in the last bits, so an SAE training run
resumed from its checkpoint drifted from the uninterrupted run depending on how long the
checkpoint's metadata happened to be. The artifacts we compute with (SAEs, training
checkpoints, semi-NMF features, steering vectors, sparsity thresholds) load through here, and a
tensor that is not 64-byte aligned gets its own aligned copy, as a fresh allocation would be.
Store shards do not come through here: ``store.reader`` keeps them memory-mapped views, and
the same store read twice gives the same offsets (SAE training copies its batches anyway).
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load, load_file

ALIGN = 64  # bytes: what torch's CPU allocator gives, and the widest vector load (AVX-512)


def aligned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with each one that starts off a 64-byte boundary replaced by an aligned copy."""
    return {name: t if t.data_ptr() % ALIGN == 0 else t.clone() for name, t in tensors.items()}


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file at ``path``, each starting on a 64-byte boundary."""
    return aligned(load_file(str(path)))


def load_tensor_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """``load_tensors`` for a safetensors file already read into memory."""
    return aligned(load(data))
