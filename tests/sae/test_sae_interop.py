"""SAE folders against the real peers: SAELens loads what we save and encodes identically; we load
EleutherAI sparsify folders (W_dec orientation checked by a round trip) and dictionary_learning ae.pt."""

from __future__ import annotations

import os

import pytest
import torch

from actscope.sae import BatchTopKSAE, JumpReLUSAE, ReLUSAE, TopKSAE, load
from conftest import require_peer

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's Triton decoder needs a GPU; use its eager one
D, N = 16, 48


def _fitted(cls, seed=0, transcoder=False, **kw):
    g = torch.Generator().manual_seed(seed)
    sae = cls(n_latents=N, **kw)
    extra = {"threshold": torch.rand(N, generator=g) * 0.5} if cls in (BatchTopKSAE, JumpReLUSAE) else {}
    sae.set_fitted(torch.randn(D, N, generator=g), torch.randn(N, generator=g) * 0.1, torch.randn(N, D, generator=g),
                   torch.randn(D, generator=g), site="blocks.3.hook_resid_mid" if transcoder else "blocks.3.hook_resid_post",
                   target_site="blocks.3.hook_mlp_out" if transcoder else None, apply_b_dec_to_input=not transcoder,
                   extra=extra, meta={"model_name": "tiny", "outliers": {"skip_first": True, "max_norm_ratio": 10.0,
                                                                         "median_norm": 3.0}})
    sae.log_density_ = torch.rand(N, generator=g).log10()
    return sae


def test_saelens_loads_what_we_save_and_encodes_identically(tmp_path):
    sae_lens = require_peer("sae_lens")
    x = torch.randn(50, D)
    cases = [(TopKSAE, {"k": 5}, False), (BatchTopKSAE, {"k": 5}, False), (JumpReLUSAE, {}, False),
             (ReLUSAE, {}, False), (TopKSAE, {"k": 5}, True), (ReLUSAE, {}, True), (JumpReLUSAE, {}, True)]
    for i, (cls, kw, transcoder) in enumerate(cases):
        ours = _fitted(cls, seed=i, transcoder=transcoder, **kw)
        folder = ours.save_pretrained(tmp_path / f"sae{i}")
        assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]
        theirs = sae_lens.SAE.load_from_disk(str(folder))
        assert theirs.cfg.metadata.hook_name == ours.site_ and theirs.cfg.metadata.model_name == "tiny"
        with torch.no_grad():
            torch.testing.assert_close(theirs.encode(x), ours.encode(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(theirs.decode(ours.encode(x)), ours.decode(ours.encode(x)), atol=1e-5, rtol=1e-5)
        back = load(folder)  # and our own reader gives back the same estimator
        assert type(back) is cls and back.site_ == ours.site_ and back.target_site_ == ours.target_site_
        assert back.get_params() == ours.get_params()
        torch.testing.assert_close(back(x), ours(x))
        torch.testing.assert_close(back.log_density_, ours.log_density_)


def test_sparsify_folder_round_trip_keeps_w_dec_orientation(tmp_path):
    sparsify = require_peer("sparsify")
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(k=6, num_latents=N))
    with torch.no_grad():
        coder.b_dec.normal_()
        coder.encoder.bias.normal_(std=0.1)
        coder.W_dec.normal_()  # not the encoder's transpose: a swapped orientation would show
    coder.save_to_disk(tmp_path / "layers.3")
    ours = load(tmp_path / "layers.3")
    assert ours.k == 6 and ours.W_dec_.shape == (N, D) and ours.W_enc_.shape == (D, N)
    x = torch.randn(40, D)
    with torch.no_grad():
        out = coder(x)
        enc = coder.encode(x)
    dense = torch.zeros(40, N).scatter_(1, enc.top_indices, enc.top_acts)
    torch.testing.assert_close(ours.encode(x), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(x), out.sae_out, atol=1e-5, rtol=1e-5)
    # and back: our save, reloaded by SAELens, still matches sparsify's coder
    sae_lens = require_peer("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(str(ours.save_pretrained(tmp_path / "saelens")))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), out.sae_out, atol=1e-5, rtol=1e-5)


def test_dictionary_learning_ae_pt_loads_through_weights_only(tmp_path):
    torch.manual_seed(0)
    enc_w, enc_b, dec_w, b_dec = torch.randn(N, D), torch.randn(N), torch.randn(D, N), torch.randn(D)
    folder = tmp_path / "dl"
    folder.mkdir()
    torch.save({"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w, "b_dec": b_dec,
                "k": torch.tensor(4)}, folder / "ae.pt")
    sae = load(folder)
    x = torch.randn(10, D)
    pre = (x - b_dec) @ enc_w.t() + enc_b
    top = pre.topk(4, dim=1)
    z = torch.zeros_like(pre).scatter_(1, top.indices, top.values.relu())
    torch.testing.assert_close(sae(x), z @ dec_w.t() + b_dec)
    # a pickle with an object in it is refused, never executed
    torch.save({"encoder.weight": enc_w, "evil": object()}, folder / "ae.pt")
    import pickle

    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        load(folder)


def test_nothing_we_write_is_a_pickle(tmp_path):
    folder = _fitted(TopKSAE, k=4).save_pretrained(tmp_path / "s")
    for p in folder.iterdir():
        head = p.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", p  # pickle protocol or torch's zip container
