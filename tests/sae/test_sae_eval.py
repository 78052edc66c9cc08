"""SAE evaluation: exact edge cases, batch-size independence, every metric against a direct computation,
and CE / KL through the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import actscope
from actscope.sae import ReLUSAE, TopKSAE, evaluate

SITE = "blocks.1.hook_resid_post"
D = 64


@pytest.fixture(scope="module")
def store(tiny_llama, tmp_path_factory):
    model, tok = tiny_llama
    out = tmp_path_factory.mktemp("sae-eval") / "store"
    return actscope.record(model, tok, str(out), [SITE], seq_len=32, max_tokens=32 * 24, batch_size=4,
                           shard_mb=0.05, dtype="float32", progress=False)


def _identity_sae() -> ReLUSAE:
    """ReLU(x) - ReLU(-x) = x: a perfect reconstruction with 2*d latents."""
    eye = torch.eye(D)
    return ReLUSAE().set_fitted(torch.cat([eye, -eye], 1), torch.zeros(2 * D), torch.cat([eye, -eye], 0),
                                torch.zeros(D), site=SITE, apply_b_dec_to_input=True)


def _mean_sae(store) -> ReLUSAE:
    """Predicts the eval set's mean for every token."""
    mean = store.read(SITE).double().mean(0).float()
    return ReLUSAE().set_fitted(torch.randn(D, 8), torch.zeros(8), torch.zeros(8, D), mean, site=SITE)


def test_mean_predictor_has_fvu_one_and_perfect_reconstruction_zero(store):
    mean = evaluate(_mean_sae(store), store, outliers="keep")
    assert mean["fvu"] == pytest.approx(1.0, abs=1e-6) and mean["explained_variance"] == pytest.approx(0, abs=1e-6)
    perfect = evaluate(_identity_sae(), store, outliers="keep")
    assert perfect["fvu"] == pytest.approx(0, abs=1e-10) and perfect["cosine"] == pytest.approx(1)
    assert perfect["l2_ratio"] == pytest.approx(1) and perfect["relative_reconstruction_bias"] == pytest.approx(1)


@pytest.fixture(scope="module")
def trained(store):
    return TopKSAE(k=4, expansion=4, batch_size=128, tokens=128 * 20, dead_tokens=300).fit(store, SITE, progress=False)


def test_mse_and_fvu_do_not_depend_on_the_eval_batch_size(store, trained):
    small = evaluate(trained, store, batch_size=7)
    large = evaluate(trained, store, batch_size=500)
    for key in ("fvu", "mse", "l0", "cosine", "l2_ratio", "dead_fraction", "relative_reconstruction_bias"):
        assert small[key] == pytest.approx(large[key], rel=1e-9, abs=1e-12), key
    assert small["explained_variance_legacy"] != pytest.approx(large["explained_variance_legacy"], rel=1e-6)


def test_every_metric_equals_a_direct_numpy_computation(store, trained):
    got = evaluate(trained, store, batch_size=100)
    x = store.read(SITE).numpy().astype(np.float64)
    pos = np.arange(len(x)) % store.seq_len
    med = trained.meta_["outliers"]["median_norm"]
    keep = (pos != 0) & (np.linalg.norm(x, axis=1) <= 10 * med)
    x = x[keep]
    W_enc, b_enc = trained.W_enc_.double().numpy(), trained.b_enc_.double().numpy()
    W_dec, b_dec = trained.W_dec_.double().numpy(), trained.b_dec_.double().numpy()
    pre = (x - b_dec) @ W_enc + b_enc
    z = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, :4]
    np.put_along_axis(z, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    xh = z @ W_dec + b_dec
    sse = ((x - xh) ** 2).sum()
    assert got["tokens"] == len(x) and got["excluded_tokens"] == (~keep).sum()
    assert got["fvu"] == pytest.approx(sse / ((x - x.mean(0)) ** 2).sum(), rel=1e-5)
    assert got["mse"] == pytest.approx(sse / len(x), rel=1e-5)
    cos = (x * xh).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(xh, axis=1)
    assert got["cosine"] == pytest.approx(cos.mean(), rel=1e-5)
    assert got["l2_ratio"] == pytest.approx((np.linalg.norm(xh, axis=1) / np.linalg.norm(x, axis=1)).mean(), rel=1e-5)
    assert got["relative_reconstruction_bias"] == pytest.approx((xh ** 2).sum(1).mean() / (x * xh).sum(1).mean(), rel=1e-5)
    l0 = (z != 0).sum(1)
    assert got["l0"] == pytest.approx(l0.mean()) and got["l0_histogram"] == np.bincount(l0).tolist()
    fires = (z != 0).sum(0)
    assert got["dead_fraction"] == pytest.approx((fires == 0).mean())
    hist, _ = np.histogram(np.clip(np.log10(fires[fires > 0] / len(x)), -8, 0), bins=np.linspace(-8, 0, 33))
    assert got["log10_density_histogram"]["counts"] == hist.tolist()
    legacy = []
    for i in range(0, keep.size, 100):  # batches of 100 store tokens, outliers removed within each
        k = keep[i:i + 100]
        xb = store.read(SITE, i, i + 100).numpy().astype(np.float64)[k]
        hb = xh[keep[:i].sum(): keep[:i].sum() + k.sum()]
        legacy.append(1 - ((xb - hb) ** 2).sum(1) / ((xb - xb.mean(0)) ** 2).sum(1))
    assert got["explained_variance_legacy"] == pytest.approx(np.concatenate(legacy).mean(), rel=1e-5)


def test_ce_and_kl_through_the_model(tiny_llama, store, trained):
    model, _ = tiny_llama
    perfect = evaluate(_identity_sae(), store, model=model, sequences=4)
    assert perfect["ce_loss_recovered"] == pytest.approx(1, abs=1e-4) and perfect["kl_score"] == pytest.approx(1, abs=1e-4)
    assert perfect["ce_delta"] == pytest.approx(0, abs=1e-4)
    got = evaluate(trained, store, model=model, sequences=4)
    # the same numbers, computed by hand: a plain torch hook on the decoder layer that writes the site
    ids = store.token_ids()[:4]
    layer = model.model.layers[1]

    def run(fn):
        handle = layer.register_forward_hook(lambda m, a, out: fn(out[0] if isinstance(out, tuple) else out)) if fn else None
        try:
            with torch.no_grad():
                return model(input_ids=ids).logits
        finally:
            if handle:
                handle.remove()

    def keep_first(h, new):
        new = new.clone()
        new[:, 0] = h[:, 0]  # position 0 is outside the SAE's policy: it keeps its own value
        return new

    clean = run(None)
    sae_logits = run(lambda h: keep_first(h, trained(h)))
    zero_logits = run(lambda h: keep_first(h, torch.zeros_like(h)))
    ce = lambda lg: F.cross_entropy(lg[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()  # noqa: E731
    kl = lambda lg: F.kl_div(lg[:, :-1].log_softmax(-1), clean[:, :-1].log_softmax(-1), log_target=True,  # noqa: E731
                             reduction="none").sum(-1).mean().item()
    assert got["ce_clean"] == pytest.approx(ce(clean), rel=1e-5)
    # components, then the ratios from them (a random tiny model's CE barely moves under ablation,
    # so the ratios themselves amplify float32 rounding)
    assert got["ce_sae"] == pytest.approx(ce(sae_logits), rel=1e-5)
    assert got["ce_zero_ablation"] == pytest.approx(ce(zero_logits), rel=1e-5)
    assert got["kl_sae"] == pytest.approx(kl(sae_logits), rel=1e-4)
    assert got["kl_zero_ablation"] == pytest.approx(kl(zero_logits), rel=1e-4)
    assert got["ce_loss_recovered"] == (got["ce_zero_ablation"] - got["ce_sae"]) / (got["ce_zero_ablation"] - got["ce_clean"])
    assert got["kl_score"] == (got["kl_zero_ablation"] - got["kl_sae"]) / got["kl_zero_ablation"]
    assert got["ce_delta"] == got["ce_sae"] - got["ce_clean"]
