"""SAE training under ``torchrun`` (gloo on CPU): 2 ranks equal 1 process with the same slices, only rank 0
writes, and a 2-rank run resumes a checkpoint written by a 1-process run."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import actscope
from actscope.sae import train

SITE = "blocks.1.hook_resid_post"
STEPS = 10
JOBS = """
from actscope.sae import BatchTopKSAE, Job, TopKSAE
def jobs():
    kw = dict(expansion=4, batch_size=128, tokens=128 * {steps}, dead_tokens=200, decay_share=0.5)
    return [Job(TopKSAE(k=4, **kw), "{site}"), Job(BatchTopKSAE(k=4, **kw), "{site}")]
""".format(steps=STEPS, site=SITE)

SCRIPT = """
import sys, torch, torch.distributed as dist
torch.set_num_threads(1)
dist.init_process_group("gloo")  # ours: train() joins it and leaves it to us, so both runs share it
sys.path.insert(0, sys.argv[1])
from ddp_jobs import jobs
from actscope.sae import train
store, fresh, resumed = sys.argv[2:5]
train(store, jobs(), out=fresh, progress=False, checkpoint_steps=3)
train(store, jobs(), out=resumed, progress=False, checkpoint_steps=3)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def store(tiny_llama, tmp_path_factory):
    model, tok = tiny_llama
    out = tmp_path_factory.mktemp("sae-ddp") / "store"
    return actscope.record(model, tok, str(out), [SITE], seq_len=32, max_tokens=32 * 32, batch_size=4,
                           shard_mb=0.05, dtype="float32", progress=False)


def _jobs(tmp_path: Path):
    (tmp_path / "ddp_jobs.py").write_text(JOBS)
    sys.path.insert(0, str(tmp_path))
    try:
        from ddp_jobs import jobs
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("ddp_jobs", None)
    return jobs


def _weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p / "sae_weights.safetensors") for p in sorted(folder.iterdir()) if p.is_dir()
            and not p.name.startswith(".")}


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_two_ranks_equal_one_process_with_two_slices_and_resume_from_its_checkpoint(store, tmp_path, monkeypatch):
    jobs = _jobs(tmp_path)
    single = tmp_path / "single"
    train(store, jobs(), out=single, micro_batches=2, progress=False, checkpoint_steps=3)
    # a 1-process run stopped right after its first checkpoint (step 3): the 2-rank run resumes it
    T = importlib.import_module("actscope.sae.train")  # the module (the package's ``train`` is the function)
    stopped = tmp_path / "resumed"
    save = T._save_checkpoint

    def save_then_stop(folder, runs, step, fingerprint):
        save(folder, runs, step, fingerprint)
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(store, jobs(), out=stopped, micro_batches=2, progress=False, checkpoint_steps=3)
    monkeypatch.undo()
    assert not any(stopped.glob("*/sae_weights.safetensors"))

    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    fresh = tmp_path / "fresh"
    env = dict(os.environ, PYTHONPATH=str(Path(actscope.__file__).parents[1]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path), str(store.loc.url), str(fresh), str(stopped)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    want = _weights(single)
    assert len(want) == 2
    for folder in (fresh, stopped):
        got = _weights(folder)
        assert got.keys() == want.keys()
        for name in want:
            assert got[name].keys() == want[name].keys()
            for key in want[name]:
                torch.testing.assert_close(got[name][key], want[name][key], atol=1e-5, rtol=1e-5,
                                           msg=lambda m, n=name, k=key: f"{n}/{k}: {m}")
        # rank 0 alone wrote: the same files as the 1-process run, no second copy, no stray temporary
        assert _files(folder) == _files(single)
