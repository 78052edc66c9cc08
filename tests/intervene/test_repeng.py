"""Control vectors move between actscope and repeng through llama.cpp's GGUF format, both ways.

repeng 0.4 uses ``np.float_``, removed in numpy 2 (which transformers 5 needs); the alias is
restored for the import only. `make test` installs repeng without its numpy<2 pin.
"""

from __future__ import annotations


import numpy as np
import torch

from conftest import require_peer
from actscope import SteeringVector



def _repeng():
    if not hasattr(np, "float_"):
        np.float_ = np.float64  # repeng 0.4 still names the numpy 1 alias
    return require_peer("repeng").ControlVector


def test_actscope_vector_reads_in_repeng(tmp_path):
    ControlVector = _repeng()
    g = torch.Generator().manual_seed(0)
    vec = SteeringVector({l: torch.randn(64, generator=g) for l in (3, 4, 7)}, "mean_diff", "llama")
    vec.to_gguf(tmp_path / "v.gguf")
    theirs = ControlVector.import_gguf(str(tmp_path / "v.gguf"))
    assert theirs.model_type == "llama" and sorted(theirs.directions) == [3, 4, 7]
    for l in (3, 4, 7):
        assert np.array_equal(np.asarray(theirs.directions[l]).reshape(-1), vec.directions[l].numpy())


def test_repeng_vector_reads_in_actscope(tmp_path):
    ControlVector = _repeng()
    rng = np.random.default_rng(0)
    directions = {l: rng.standard_normal(64).astype(np.float32) for l in (1, 2, 5)}
    ControlVector(model_type="qwen2", directions=directions).export_gguf(str(tmp_path / "r.gguf"))
    ours = SteeringVector.from_gguf(tmp_path / "r.gguf")
    assert ours.model_type == "qwen2" and ours.layers == [1, 2, 5]
    for l in (1, 2, 5):
        assert torch.equal(ours.directions[l], torch.from_numpy(directions[l]))
