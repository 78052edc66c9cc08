"""``actscope generate --steer-sae DIR --latent N``: the same tokens as the Python API, cached or not,
a KL-calibrated scale, and one-line errors for every bad combination."""

from __future__ import annotations

import re

import pytest
import torch

import actscope
from actscope import SteeringVector
from actscope.cli_generate import kl_scale
from actscope.intervene.steer_effects import generate as api_generate
from actscope.intervene.steer_effects import kl_steered
from actscope.sae import ReLUSAE, TopKSAE, load
from conftest import run_cli as run

SITE = "blocks.1.hook_resid_post"
PROMPT = "The quick brown"


@pytest.fixture(scope="module")
def sae_dir(tiny_llama, tmp_path_factory):
    model, tok = tiny_llama
    folder = tmp_path_factory.mktemp("steer-sae")
    store = actscope.record(model, tok, str(folder / "store"), [SITE], seq_len=32, max_tokens=32 * 8, batch_size=4,
                            shard_mb=0.05, dtype="float32", progress=False)
    sae = TopKSAE(k=4, expansion=2, batch_size=64, tokens=320).fit(store, SITE, progress=False)
    sae.save_pretrained(folder / "sae")
    return folder / "sae"


def _generate(model_dir, sae_dir, capsys, monkeypatch, *extra):
    return run(["generate", "--model", str(model_dir), "--prompt", PROMPT, "--max-new-tokens", "6",
                "--device", "cpu", *(["--steer-sae", str(sae_dir)] if sae_dir else []), *extra], capsys, monkeypatch)


def test_cli_steers_like_the_api_and_the_cache_changes_nothing(tiny_llama, tiny_llama_dir, sae_dir, capsys,
                                                               monkeypatch):
    model, tok = tiny_llama
    code, out, err = _generate(tiny_llama_dir, sae_dir, capsys, monkeypatch, "--latent", "3", "--scale", "40",
                               "--compare")
    assert code == 0, err
    plain, steered = out.strip().splitlines()
    assert plain.startswith("[plain] ") and steered.startswith(f"[steered latent 3 x40] {PROMPT}")
    vec = SteeringVector.from_sae(load(sae_dir), 3)
    with vec.apply(model, 40.0):
        want = api_generate(model, tok, PROMPT, 6)  # HF's generate, with its KV cache
    assert steered == f"[steered latent 3 x40] {PROMPT}{want}"
    enc = tok(PROMPT, return_tensors="pt")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.inference_mode(), vec.apply(model, 40.0):
        cached = model.generate(**enc, **kw, use_cache=True)
        uncached = model.generate(**enc, **kw, use_cache=False)
    assert torch.equal(cached, uncached)
    assert tok.decode(uncached[0, enc["input_ids"].shape[1]:], skip_special_tokens=True) == want
    assert plain != f"[plain] {PROMPT}{want}", "a scale of 40 along a unit latent changes this tiny model's text"


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_kl_calibrated_scale_is_the_largest_under_the_bound(tiny_llama, sae_dir, sign):
    model, tok = tiny_llama
    vec = SteeringVector.from_sae(load(sae_dir), 5)
    scale = kl_scale(model, tok, vec, PROMPT, 0.01, sign=sign)  # this model's KL saturates near 0.02
    assert scale * sign > 0
    assert kl_steered(model, tok, vec, [PROMPT], scale) <= 0.01
    assert kl_steered(model, tok, vec, [PROMPT], scale * 1.1) > 0.01


def test_cli_kl_prints_the_calibrated_scale(tiny_llama_dir, sae_dir, capsys, monkeypatch):
    code, out, err = _generate(tiny_llama_dir, sae_dir, capsys, monkeypatch, "--latent", "5", "--kl", "0.01",
                               "--scale", "-1")
    assert code == 0, err
    got = re.match(r"\[steered latent 5 x(-[0-9.e+]+), KL 0\.01\] ", out)
    assert got and float(got.group(1)) < 0, out
    code, out, err = _generate(tiny_llama_dir, sae_dir, capsys, monkeypatch, "--latent", "5", "--kl", "5")
    assert code == 0 and "warning: --kl 5: the KL stays under the bound up to scale 4096" in err, err


def _sae_on_mlp(tmp_path):
    bad = ReLUSAE().set_fitted(torch.zeros(64, 4), torch.zeros(4), torch.zeros(4, 64), torch.zeros(64),
                               site="blocks.1.mlp.hook_post")
    bad.save_pretrained(tmp_path / "mlp-sae")
    return tmp_path / "mlp-sae"


@pytest.mark.parametrize("extra, message", [
    (["--latent", "999"], "--latent 999 is out of range"),
    (["--latent", "-1"], "--latent -1 is out of range"),
    ([], "--steer-sae needs --latent N"),
    (["--latent", "1", "--steer", "x.gguf"], "--steer and --steer-sae both given"),
    (["--latent", "1", "--kl", "0"], "--kl must be positive"),
])
def test_bad_steer_sae_input_is_one_error_line(tiny_llama_dir, sae_dir, capsys, monkeypatch, extra, message):
    code, out, err = _generate(tiny_llama_dir, sae_dir, capsys, monkeypatch, *extra)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_latent_or_kl_without_a_steering_vector_and_a_non_residual_sae_are_refused(tiny_llama_dir, tmp_path, capsys,
                                                                                  monkeypatch):
    code, _, err = _generate(tiny_llama_dir, None, capsys, monkeypatch, "--latent", "1")
    assert code == 2 and "--latent picks a latent of --steer-sae DIR" in err, err
    code, _, err = _generate(tiny_llama_dir, None, capsys, monkeypatch, "--kl", "0.5")
    assert code == 2 and "--kl calibrates a steering scale" in err, err
    code, _, err = _generate(tiny_llama_dir, _sae_on_mlp(tmp_path), capsys, monkeypatch, "--latent", "1")
    assert code == 2 and "steering needs an SAE on blocks.L.hook_resid_post" in err, err
