"""Reading safetensors files into tensors that compute exactly as the ones that were saved.

``safetensors.torch.load_file`` returns views into one buffer, at whatever byte offset the
file's header left (often not a multiple of 64). Some CPU kernels (BLAS, vectorised updates)
take another path on such data and round differently in the last bits, so an SAE training run
resumed from its checkpoint drifted from the uninterrupted run depending on how long the
checkpoint's metadata happened to be. Every artifact we load comes through here and gets fresh,
allocator-aligned copies, so loading never changes a result.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load, load_file


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file at ``path``, each in its own aligned storage."""
    return {name: t.clone() for name, t in load_file(str(path)).items()}


def load_tensor_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """``load_tensors`` for a safetensors file already read into memory."""
    return {name: t.clone() for name, t in load(data).items()}
