"""torchrun: two CPU processes (gloo) write one store that equals a single-process run."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from actscope import open_store


def _digest(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_torchrun_two_ranks_equal_single_process(tiny_llama_dir, tmp_path):
    args = [
        "-m", "actscope", "record", "--model", str(tiny_llama_dir), "--sites", "blocks.*.hook_resid_post",
        "--sites", "blocks.0.mlp.hook_post", "--seq-len", "32", "--max-tokens", str(32 * 24),
        "--batch-size", "2", "--shard-mb", "0.02", "--device", "cpu",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    multi = tmp_path / "multi"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         *args, "--out", str(multi)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    single = tmp_path / "single"
    subprocess.run([sys.executable, *args, "--out", str(single)], env=env, check=True, capture_output=True)
    store = open_store(str(multi))
    assert store.complete and store.num_shards >= 4
    assert _digest(multi) == _digest(single)
