"""Semi-NMF streamed from a store equals a direct in-memory implementation of the same updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import actscope
from actscope.nmf import NMFError, SemiNMF, load

SITE = "blocks.0.mlp.hook_post"


@pytest.fixture(scope="module")
def store(tiny_llama, tmp_path_factory):
    model, tok = tiny_llama
    out = tmp_path_factory.mktemp("nmf") / "store"
    return actscope.record(model, tok, str(out), [SITE], seq_len=32, max_tokens=32 * 20, batch_size=4,
                           shard_mb=0.05, dtype="float32", progress=False)


def direct_semi_nmf(A: np.ndarray, G: np.ndarray, iters: int, keep_share: float):
    """The updates written out on the whole matrix A (d x n), loss from the explicit product."""
    d = A.shape[0]
    keep = int(np.ceil(keep_share * d))
    losses = []
    for _ in range(iters):
        F = A @ G @ np.linalg.inv(G.T @ G)
        order = np.argsort(-np.abs(F), axis=0)[:keep]
        mask = np.zeros_like(F, dtype=bool)
        np.put_along_axis(mask, order, True, axis=0)
        F = np.where(mask, F, 0.0)
        s = np.linalg.norm(F, axis=0)
        F, G = F / s, G * s
        AtF, FtF = A.T @ F, F.T @ F
        pos, neg = lambda M: (np.abs(M) + M) / 2, lambda M: (np.abs(M) - M) / 2  # noqa: E731
        G = G * np.sqrt((pos(AtF) + G @ neg(FtF)) / (neg(AtF) + G @ pos(FtF)))
        losses.append(((A - F @ G.T) ** 2).sum())
    return F, G, losses


def test_streaming_equals_in_memory_over_50_iterations(store):
    A = store.read(SITE).double().numpy().T  # d_ff x tokens
    nmf = SemiNMF(rank=6, keep_share=0.25, max_iter=50, tol=0, chunk_tokens=97, seed=3)
    G0 = nmf.init_codes(A.shape[1])
    nmf.fit(store, SITE, init=G0)
    F, G, losses = direct_semi_nmf(A, G0.numpy(), 50, 0.25)
    assert len(nmf.loss_history_) == 50
    np.testing.assert_allclose(nmf.loss_history_, losses, rtol=1e-5)
    np.testing.assert_allclose(nmf.features_.double().numpy(), F, atol=1e-5)
    np.testing.assert_allclose(nmf.codes().numpy(), G, rtol=1e-5, atol=1e-5 * G.max())
    assert losses[-1] < 0.9 * losses[0]  # winner-take-all makes it non-monotone, but it falls
    # the default start is the same draw whatever the chunking
    a = SemiNMF(rank=4, max_iter=3, chunk_tokens=50).fit(store, SITE)
    b = SemiNMF(rank=4, max_iter=3, chunk_tokens=333).fit(store, SITE)
    np.testing.assert_allclose(a.loss_history_, b.loss_history_, rtol=1e-10)


def test_features_are_sparse_unit_norm_and_saved(store, tiny_llama, tmp_path):
    model, _ = tiny_llama
    nmf = SemiNMF(rank=5, keep_share=0.1, max_iter=20, tol=1e-6).fit(store, SITE, codes_path=tmp_path / "codes.npy")
    F = nmf.features_
    assert ((F != 0).sum(0) <= int(np.ceil(0.1 * 96))).all()
    torch.testing.assert_close(F.norm(dim=0), torch.ones(5))
    assert (nmf.codes() >= 0).all()
    resid = nmf.residual_features(model)  # W_out f, from the MLP's down projection
    torch.testing.assert_close(resid, model.model.layers[0].mlp.down_proj.weight.detach() @ F)
    back = load(nmf.save(tmp_path / "out", model=model))
    torch.testing.assert_close(back.features_, F)
    x = store.read(SITE, 0, 8)
    assert (nmf.transform(x) >= 0).all()


def test_bad_input_is_refused(store):
    with pytest.raises(NMFError, match="rank"):
        SemiNMF(rank=0)
    with pytest.raises(NMFError, match="at least as many tokens"):
        SemiNMF(rank=100).fit(store, SITE, tokens=50)


def test_cli_fit_writes_features_and_codes(store, tiny_llama_dir, tmp_path, capsys, monkeypatch):
    from test_cli import run

    code, out, err = run(["nmf", "fit", "--store", str(store.loc.url), "--site", SITE, "--rank", "4", "--max-iter", "5",
                          "--model", str(tiny_llama_dir), "--out", str(tmp_path / "nmf")], capsys, monkeypatch)
    assert code == 0, err
    assert {p.name for p in (tmp_path / "nmf").iterdir()} == {"features.safetensors", "nmf.json", "codes.npy"}
    assert "relative loss" in out
    code, out, err = run(["nmf", "fit", "--store", str(store.loc.url), "--site", SITE, "--rank", "0",
                          "--out", str(tmp_path / "bad")], capsys, monkeypatch)
    assert code == 2 and err.startswith("error: ")


def test_transform_recovers_codes_of_an_exact_factorisation():
    """With the features fixed, transform's multiplicative updates fit X ~ G F^T: on X built
    exactly from non-negative codes the residual vanishes (checked against the same updates
    written out here, in float64)."""
    gen = torch.Generator().manual_seed(0)
    F = torch.nn.functional.normalize(torch.randn(20, 4, generator=gen, dtype=torch.float64), dim=0)
    G_true = torch.rand(50, 4, generator=gen, dtype=torch.float64)
    X = G_true @ F.T
    nmf = SemiNMF(rank=4)
    nmf.features_ = F.float()
    G = nmf.transform(X, iters=500).double()
    F32 = F.float().double()
    assert float((X - G @ F32.T).norm() / X.norm()) < 1e-3
    pos, neg = (lambda M: (M.abs() + M) / 2), (lambda M: (M.abs() - M) / 2)
    ref = torch.full((50, 4), 0.5, dtype=torch.float64)
    XF, FtF = X @ F32, F32.T @ F32
    for _ in range(500):
        ref = ref * torch.sqrt((pos(XF) + ref @ neg(FtF)) / (neg(XF) + ref @ pos(FtF)).clamp_min(1e-12))
    torch.testing.assert_close(G, ref.float().double(), rtol=1e-5, atol=1e-6)


def test_nmf_features_browse_and_steer_through_the_sae_tools(store, tiny_llama, tiny_llama_dir, tmp_path,
                                                              capsys, monkeypatch):
    """A semi-NMF folder fitted with a model: its features as latents (codes = transform, rows in
    residual space) feed the feature browser and steering; without the model they cannot steer."""
    from actscope.intervene.steer import SteeringVector
    from actscope.nmf import NMFLatents
    from actscope.sae.features import feature_data
    from conftest import run_cli

    model, tok = tiny_llama
    nmf = SemiNMF(rank=4, keep_share=0.25, max_iter=10).fit(store, SITE)
    latents = NMFLatents(load(nmf.save(tmp_path / "with", model=model)))
    resid = model.model.layers[0].mlp.down_proj.weight.detach() @ nmf.features_
    torch.testing.assert_close(latents.W_dec_, resid.t())
    assert latents.residual_site_ == "blocks.0.hook_resid_post"
    vec = SteeringVector.from_sae(latents, 2)
    assert vec.layers == [0]
    torch.testing.assert_close(vec.directions[0], resid[:, 2] / resid[:, 2].norm())

    records = feature_data(latents, store, tokenizer=tok, model=model, top=3, bins=2, per_bin=2)
    x = store.read(SITE)[torch.arange(store.num_tokens) % store.seq_len != 0]  # position 0 left out
    codes = nmf.transform(x)
    assert len(records) == 4 and "logits_top" in records[0]
    torch.testing.assert_close(torch.tensor([r["max"] for r in records]), codes.max(0).values, rtol=1e-3, atol=1e-4)

    neurons = NMFLatents(load(nmf.save(tmp_path / "without")))
    assert neurons.W_dec_.shape == (4, nmf.features_.shape[0]) and neurons.residual_site_ is None
    with pytest.raises(actscope.ActscopeError, match="semi-NMF saved with --model"):
        SteeringVector.from_sae(neurons, 0)
    code, out, err = run_cli(["sae", "features", "--sae", str(tmp_path / "with"), "--store", str(store.loc.url),
                              "--model", str(tiny_llama_dir), "--bins", "2", "--out", str(tmp_path / "browse")],
                             capsys, monkeypatch)
    assert code == 0, err
    assert "4 latents" in out and (tmp_path / "browse" / "features.html").exists()
    code, out, err = run_cli(["generate", "--model", str(tiny_llama_dir), "--prompt", "the cat", "--max-new-tokens",
                              "3", "--steer-sae", str(tmp_path / "with"), "--latent", "1", "--scale", "4"],
                             capsys, monkeypatch)
    assert code == 0, err
    assert "steered" in out
