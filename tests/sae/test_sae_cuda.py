"""SAE training on CUDA with bf16 autocast (the default there). Skipped without a GPU; run by
bench/gpu_check.sh, the prepared GPU session, with the other CUDA tests."""

from __future__ import annotations

import pytest
import torch

import actscope
from actscope.sae import BatchTopKSAE, JumpReLUSAE, ReLUSAE, TopKSAE

SITE = "blocks.1.hook_resid_post"
FAST = dict(expansion=4, batch_size=128, tokens=128 * 30, dead_tokens=1000)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def store(tiny_llama, tmp_path_factory):
    model, tok = tiny_llama
    out = tmp_path_factory.mktemp("sae-cuda") / "store"
    return actscope.record(model, tok, str(out), [SITE], seq_len=32, max_tokens=32 * 64, batch_size=4,
                           shard_mb=0.05, dtype="float32", progress=False)


@needs_cuda
@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE, JumpReLUSAE, ReLUSAE])
def test_cuda_bf16_autocast_training_learns_and_tracks_float32(store, cls):
    amp = cls(**FAST).fit(store, SITE, device="cuda", progress=False)  # autocast on by default on CUDA
    full = cls(**FAST).fit(store, SITE, device="cuda", autocast=False, progress=False)
    first, last = amp.meta_["history"][0]["fvu"], amp.meta_["history"][-1]["fvu"]
    assert last < 0.6 * first
    assert abs(last - full.meta_["history"][-1]["fvu"]) < 0.05 * max(first, 1e-6) + 0.02
    assert amp.W_enc_.dtype == torch.float32 and amp.W_enc_.device.type == "cpu"
    x = store.read(SITE, 32, 64)
    torch.testing.assert_close(amp.encode(x).shape, (32, amp.d_sae))
