"""Loaded safetensors tensors start on a 64-byte boundary, as fresh ones do (see actscope/tensorfile.py)."""

from __future__ import annotations

import torch
from safetensors.torch import save, save_file

from actscope.tensorfile import load_tensor_bytes, load_tensors


def test_loaded_tensors_are_aligned_whatever_the_header_length(tmp_path):
    tensors = {"a": torch.randn(5, 7), "b": torch.arange(3, dtype=torch.int64), "c": torch.randn(9).bfloat16()}
    for pad in range(0, 80, 7):  # the header's length moves every tensor's offset in the file
        meta = {"note": "x" * pad}
        save_file(tensors, tmp_path / "t.safetensors", metadata=meta)
        for got in (load_tensors(tmp_path / "t.safetensors"), load_tensor_bytes(save(tensors, metadata=meta))):
            assert got.keys() == tensors.keys()
            for name, t in got.items():
                assert torch.equal(t, tensors[name]) and t.dtype == tensors[name].dtype
                assert t.data_ptr() % 64 == 0, (pad, name)
