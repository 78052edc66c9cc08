"""SAE training from a store: batches, kernels, the recipe, sweeps in one pass, seeds, kill -9 resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import actscope
from actscope.sae import BatchTopKSAE, Job, JumpReLUSAE, ReLUSAE, TopKSAE, load, train
from actscope.sae.data import OutlierPolicy, token_batches
from actscope.sae.kernels import dense_topk, sparse_decode, topk_encode
from actscope.sae.train import _Run, geometric_median

SITE, MID, MLP_OUT = "blocks.1.hook_resid_post", "blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out"
FAST = dict(expansion=4, batch_size=128, tokens=128 * 30, dead_tokens=1000)


@pytest.fixture(scope="module")
def store(tiny_llama, tmp_path_factory):
    model, tok = tiny_llama
    out = tmp_path_factory.mktemp("sae") / "store"
    return actscope.record(model, tok, str(out), [SITE, MID, MLP_OUT], seq_len=32, max_tokens=32 * 64,
                           batch_size=4, shard_mb=0.05, dtype="float32", progress=False)


def test_one_pass_yields_every_token_once_and_batches_mix_sequences(store):
    assert store.num_shards >= 8
    seen = []
    for batch in token_batches(store, [SITE], 100, seed=1, window_shards=4):
        seqs = batch.index // store.seq_len
        if batch.index.shape[0] == 100:
            assert seqs.unique().numel() >= 12  # draws from the 4 shards (16 sequences) of its window
        assert torch.equal(batch.rows[SITE], store.read(SITE)[batch.index])  # rows are the tokens named
        seen.append(batch.index)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(store.num_tokens))
    # the store's own iterator mixes sequences too (two-level shuffle over shards then tokens)
    first = next(store.iter_batches(SITE, 100, seed=1))
    rows = store.read(SITE)
    match = (first[:, None, :] == rows[None]).all(-1).float().argmax(1)
    assert (match // store.seq_len).unique().numel() > 10


def test_skip_resumes_the_same_stream(store):
    full = [b.index for b in token_batches(store, [SITE], 64, seed=3, epochs=2)]
    rest = [b.index for b in token_batches(store, [SITE], 64, seed=3, epochs=2, skip=7)]
    assert all(torch.equal(a, b) for a, b in zip(full[7:], rest)) and len(rest) == len(full) - 7


def test_sparse_topk_kernels_equal_dense_autograd():
    torch.manual_seed(0)
    x, W, b, Wd, bd = (torch.randn(*s, dtype=torch.float64, requires_grad=True)
                       for s in [(9, 6), (20, 6), (20,), (20, 5), (5,)])
    values, idx = topk_encode(x, W, b, 4)
    sparse_decode(values, idx, Wd, bd).pow(2).sum().backward()
    grads = [t.grad.clone() for t in (x, W, b, Wd, bd)]
    for t in (x, W, b, Wd, bd):
        t.grad = None
    (dense_topk(x @ W.t() + b, 4) @ Wd + bd).pow(2).sum().backward()
    for g, t in zip(grads, (x, W, b, Wd, bd)):
        torch.testing.assert_close(g, t.grad)


def test_initialisation_follows_the_recipe():
    torch.manual_seed(0)
    x = torch.randn(500, 16) * 3 + 1
    x[0] *= 1000  # a massive activation at position 0
    positions = torch.arange(500) % 50
    sae = TopKSAE(k=4, expansion=4, b_dec_init="geometric_median")
    run = _Run(Job(sae, "s"))
    run.init(x, x, positions, transcoder=False)
    W_enc, W_dec = run.p["W_enc"], run.p["W_dec"]
    assert torch.equal(W_enc, W_dec)  # encoder = decoder transpose (rows of both per latent)
    torch.testing.assert_close(W_dec.norm(dim=1), torch.ones(64))
    assert run.meta["lr"] == pytest.approx(5e-3 / (64 / 2**14) ** 0.5)  # signum, the default
    keep = OutlierPolicy.from_dict(run.meta["outliers"]).keep(x, positions)
    assert not keep[0] and not keep[50] and keep[1:50].all()
    scaled = x[keep] * run.meta["scale_in"]
    assert scaled.pow(2).sum(1).mean().item() == pytest.approx(16, rel=1e-4)
    gm = geometric_median(scaled)
    torch.testing.assert_close(run.p["b_dec"], gm)
    assert (scaled - gm).norm(dim=1).sum() < (scaled - scaled.mean(0)).norm(dim=1).sum()


@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE, JumpReLUSAE, ReLUSAE])
def test_every_architecture_learns(store, cls):
    sae = cls(**FAST).fit(store, SITE, progress=False)
    hist = sae.meta_["history"]
    assert hist[-1]["fvu"] < 0.6 * hist[0]["fvu"]
    assert sae.W_enc_.shape == (64, 256) and sae.W_dec_.shape == (256, 64)
    x = store.read(SITE, 32, 64)
    z = sae.encode(x)
    assert z.shape == (32, 256) and (z >= 0).all()
    if cls is TopKSAE:
        assert ((z > 0).sum(1) <= sae.k).all()
    if sae.unit_norm_decoder:  # the folded scale leaves every decoder row with the same norm
        norms = sae.W_dec_.norm(dim=1)
        torch.testing.assert_close(norms, norms[0].expand_as(norms))
    assert sae.meta_["outliers"]["skip_first"] is True


def test_sweep_in_one_pass_equals_training_each_alone(store, tmp_path):
    jobs = [Job(TopKSAE(k=k, **FAST), SITE) for k in (4, 8)] + [Job(TopKSAE(k=4, **FAST), MID, target=MLP_OUT)]
    together = train(store, jobs, out=tmp_path / "sweep", tokens=128 * 60, progress=False)
    alone = TopKSAE(k=8, **{**FAST, "tokens": 128 * 60}).fit(store, SITE, progress=False)
    assert torch.equal(together[1].W_dec_, alone.W_dec_) and torch.equal(together[1].b_enc_, alone.b_enc_)
    names = sorted(p.name for p in (tmp_path / "sweep").iterdir() if not p.name.startswith("."))
    assert len(names) == 3 and any("to-blocks.0.hook_mlp_out" in n for n in names)
    transcoder = load(tmp_path / "sweep" / [n for n in names if "to-" in n][0])
    assert transcoder.transcoder and transcoder.site_ == MID and transcoder.target_site_ == MLP_OUT
    assert not transcoder.apply_b_dec_to_input_
    keep = torch.arange(store.num_tokens) % store.seq_len != 0  # position 0 is left out of training
    y = store.read(MLP_OUT)[keep]
    fvu = (y - transcoder(store.read(MID)[keep])).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    assert fvu < 1.0  # better than predicting the mean after 60 short steps


def test_same_seed_same_weights_other_seed_other_weights(store):
    a = TopKSAE(k=4, **FAST, seed=5).fit(store, SITE, progress=False)
    b = TopKSAE(k=4, **FAST, seed=5).fit(store, SITE, progress=False)
    c = TopKSAE(k=4, **FAST, seed=6).fit(store, SITE, progress=False)
    assert torch.equal(a.W_enc_, b.W_enc_) and not torch.equal(a.W_enc_, c.W_enc_)


SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from actscope.sae import Job, TopKSAE, train
sae = TopKSAE(k=4, expansion=4, batch_size=64, tokens=64 * 400, dead_tokens=500, optimizer="{optimizer}")
train(sys.argv[1], [Job(sae, "{site}")], out=sys.argv[2], checkpoint_steps=5, progress=False)
"""


@pytest.mark.parametrize("optimizer", ["signum", "adam"])
def test_kill_9_then_rerun_gives_bit_identical_weights(store, tmp_path, optimizer):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(site=SITE, optimizer=optimizer))
    env = dict(os.environ, PYTHONPATH=str(Path(actscope.__file__).parents[1]))
    cmd = [sys.executable, str(script), str(store.loc.url)]
    killed = tmp_path / "killed"
    ckpt = killed / ".actscope-train" / "state.safetensors"
    proc = subprocess.Popen(cmd + [str(killed)], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.01)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (killed / "sae_weights.safetensors").exists(), "killed too late"
    subprocess.run(cmd + [str(killed)], env=env, check=True, capture_output=True)
    clean = tmp_path / "clean"
    subprocess.run(cmd + [str(clean)], env=env, check=True, capture_output=True)
    a, b = load_file(killed / "sae_weights.safetensors"), load_file(clean / "sae_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_any_checkpoint_is_bit_identical(store, tmp_path, monkeypatch):
    """Interrupted after steps whose checkpoints put the tensors at different byte offsets in the
    file (the metadata's length changes with the step): each resumed run ends bit for bit where
    the uninterrupted one does. Loading at an unaligned offset once made some resumes drift."""
    params = dict(k=4, expansion=4, batch_size=64, tokens=64 * 60, dead_tokens=500, optimizer="adam")

    def run(out: Path, stop: int | None = None) -> dict[str, torch.Tensor]:
        if stop is not None:
            real, calls = _Run.step, []

            def step(self, *args, **kwargs):
                calls.append(1)
                if len(calls) > stop:
                    raise KeyboardInterrupt  # as a kill between steps
                return real(self, *args, **kwargs)

            with monkeypatch.context() as m:
                m.setattr(_Run, "step", step)
                with pytest.raises(KeyboardInterrupt):
                    train(store, [Job(TopKSAE(**params), SITE)], out=out, checkpoint_steps=5, progress=False)
            assert not (out / "sae_weights.safetensors").exists()
        train(store, [Job(TopKSAE(**params), SITE)], out=out, checkpoint_steps=5, progress=False)
        return load_file(out / "sae_weights.safetensors")

    clean = run(tmp_path / "clean")
    for stop in (7, 12, 23, 36, 52):
        resumed = run(tmp_path / f"stopped-{stop}", stop)
        assert all(torch.equal(clean[k], resumed[k]) for k in clean), stop


def test_autocast_is_refused_on_cpu_and_on_by_default_on_cuda(store):
    from actscope.sae.train import _use_autocast

    with pytest.raises(actscope.sae.SAEError, match="autocast=True is for CUDA"):
        ReLUSAE(**FAST).fit(store, SITE, device="cpu", autocast=True, progress=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _use_autocast(None, cuda) and _use_autocast(True, cuda)
    assert not _use_autocast(None, cpu) and not _use_autocast(False, cuda)
    if not torch.cuda.is_available():
        with pytest.raises(actscope.sae.SAEError, match="no CUDA device"):
            ReLUSAE(**FAST).fit(store, SITE, device="cuda", progress=False)


@pytest.mark.parametrize("cls", [ReLUSAE, JumpReLUSAE, TopKSAE, BatchTopKSAE])
def test_bf16_autocast_step_keeps_float32_master_weights(store, cls):
    """The autocast code path, run with CPU autocast (the CUDA one has no GPU here): the matmuls of the
    loss run in bf16, so the step is close to the float32 one but not equal, and the parameters and Adam
    moments stay float32."""
    from actscope.sae.data import token_batches

    batch = next(token_batches(store, [SITE], 256, seed=0))
    x = store.read(SITE, 0, 2048)
    runs = {}
    for amp in (False, True):
        r = _Run(Job(cls(**FAST), SITE), "cpu", amp=amp)
        r.init(x, x, torch.arange(x.shape[0]) % store.seq_len, transcoder=False)
        before = {k: t.clone() for k, t in r.p.items()}
        part = r.forward(batch, store.seq_len)
        r.update(part, 1.0, 0)
        runs[amp] = (r, part, before)
    (r32, p32, before), (r16, p16, _) = runs[False], runs[True]
    for d in (r16.p, r16.m, r16.v):
        assert all(t.dtype == torch.float32 for t in d.values())
    assert all(g.dtype == torch.float32 for g in p16.grads if g is not None)
    g32, g16 = p32.grads[0], p16.grads[0]  # W_enc
    assert not torch.equal(g16, g32), "autocast did not change the encoder's arithmetic"
    assert float((g16 - g32).norm() / g32.norm()) < 0.05
    assert p16.loss == pytest.approx(p32.loss, rel=0.02)
    moved16, moved32 = r16.p["W_dec"] - before["W_dec"], r32.p["W_dec"] - before["W_dec"]
    assert float((moved16 - moved32).norm() / moved32.norm()) < 0.2  # Adam's first step is ~sign(g): robust


def test_work_from_before_the_optimizer_choice_still_loads_and_resumes(store, tmp_path):
    """Before ``optimizer`` existed every run was Adam: an SAE saved then loads as Adam, and an
    Adam run's checkpoint fingerprint is the one it had (signum runs get a different one)."""
    import json

    from actscope.sae.train import _fingerprint

    sae = TopKSAE(k=4, optimizer="adam", **FAST).fit(store, SITE, progress=False)
    sae.save_pretrained(tmp_path / "old")
    cfg_path = tmp_path / "old" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["metadata"]["actscope"]["hyperparameters"]["optimizer"]
    cfg_path.write_text(json.dumps(cfg))
    assert load(tmp_path / "old").get_params()["optimizer"] == "adam"
    settings = {"batch_size": 128}
    adam = json.loads(_fingerprint(store, [Job(TopKSAE(k=4, optimizer="adam"), SITE)], settings))
    signum = json.loads(_fingerprint(store, [Job(TopKSAE(k=4), SITE)], settings))
    assert "optimizer" not in adam["jobs"][0][1] and signum["jobs"][0][1]["optimizer"] == "signum"
