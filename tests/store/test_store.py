"""The activation store: exact round trip, resume, corruption, refusals, full disk, URLs."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import actscope
from actscope import StoreError, open_store
from actscope.store import writer as writer_mod

SITES = ["blocks.*.hook_resid_post", "blocks.0.mlp.hook_post", "blocks.1.attn.hook_pattern"]
KW = dict(seq_len=32, max_tokens=32 * 12, batch_size=2, shard_mb=0.05, progress=False)


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def reference(tiny_llama, tmp_path_factory):
    model, tok = tiny_llama
    out = tmp_path_factory.mktemp("ref") / "store"
    store = actscope.record(model, tok, str(out), SITES, dtype="float32", **KW)
    return out, store


def test_round_trip_equals_a_direct_trace(tiny_llama, reference):
    model, _ = tiny_llama
    out, store = reference
    assert store.complete and store.num_shards > 3
    assert store.num_tokens == 12 * 32 and store.token_ids().shape == (12, 32)
    ids = store.token_ids()
    with torch.inference_mode(), actscope.trace(model, SITES) as cache:
        model(input_ids=ids[:2])
    for layer in range(2):
        got = store.read(f"blocks.{layer}.hook_resid_post", 0, 64)
        assert torch.equal(got, cache[f"blocks.{layer}.hook_resid_post"].reshape(64, -1))
    pattern = store.read("blocks.1.attn.hook_pattern", 32, 64)  # query rows of sequence 1
    assert torch.equal(pattern, cache["blocks.1.attn.hook_pattern"][1].permute(1, 0, 2))
    assert store.shape("blocks.1.attn.hook_pattern") == (4, 32)
    # a range crossing shards concatenates; within a shard it is a view of the mapped file
    assert store.read("blocks.0.mlp.hook_post", 10, 300).shape == (290, 96)


def test_bfloat16_store_equals_converted_values(tiny_llama, tmp_path):
    model, tok = tiny_llama
    kw = {**KW, "shard_mb": 10}  # same batches for both: results do not depend on shard size
    store = actscope.record(model, tok, str(tmp_path / "bf"), SITES[:1], dtype="bfloat16", **kw)
    f32 = actscope.record(model, tok, str(tmp_path / "f32"), SITES[:1], dtype="float32", **kw)
    ref = f32.read("blocks.1.hook_resid_post")
    assert store.read("blocks.1.hook_resid_post").dtype == torch.bfloat16
    assert torch.equal(store.read("blocks.1.hook_resid_post"), ref.bfloat16())


def test_resume_redoes_only_missing_shards_and_equals_uninterrupted(tiny_llama, reference, tmp_path):
    model, tok = tiny_llama
    out = tmp_path / "store"
    actscope.record(model, tok, str(out), SITES, dtype="float32", **KW)
    shards = sorted((out / "shards").iterdir())
    for p in shards[2:5]:
        p.unlink()
    (out / "shards" / (shards[5].name + ".tmp-123-abc")).write_bytes(b"half a shard")
    keep_mtime = shards[0].stat().st_mtime_ns
    with pytest.raises(StoreError, match="incomplete store, 3 of"):
        open_store(str(out))
    actscope.record(model, tok, str(out), SITES, dtype="float32", **KW)
    assert shards[0].stat().st_mtime_ns == keep_mtime  # untouched
    assert _digest(out) == _digest(reference[0])


def test_kill_9_then_resume_equals_uninterrupted(tiny_llama_dir, tmp_path):
    base = [
        sys.executable, "-m", "actscope", "record", "--model", str(tiny_llama_dir),
        "--sites", "blocks.*.hook_resid_post", "--seq-len", "32", "--max-tokens", str(32 * 400),
        "--batch-size", "1", "--shard-mb", "0.001", "--dtype", "float32",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(base + ["--out", str(killed)], env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if len(list((killed / "shards").glob("*.safetensors"))) >= 20 if (killed / "shards").exists() else False:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(list((killed / "shards").glob("*.safetensors")))
    assert 20 <= written < 400, "the run should have been killed part-way"
    subprocess.run(base + ["--out", str(killed)], env=env, check=True, capture_output=True)
    clean = tmp_path / "clean"
    subprocess.run(base + ["--out", str(clean)], env=env, check=True, capture_output=True)
    assert _digest(killed) == _digest(clean)
    assert open_store(str(killed)).num_tokens == 400 * 32


def test_corrupted_shard_is_detected_on_read(tiny_llama, tmp_path):
    model, tok = tiny_llama
    out = tmp_path / "store"
    actscope.record(model, tok, str(out), SITES, dtype="float32", **KW)
    victim = sorted((out / "shards").iterdir())[1]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF
    victim.write_bytes(bytes(data))
    store = open_store(str(out))
    store.read("blocks.0.hook_resid_post", 0, 10)  # shard 0 is fine
    with pytest.raises(StoreError, match="checksum mismatch"):
        for site in SITES[1:] + ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]:
            if "*" not in site:
                store.read(site)
    victim.write_bytes(bytes(data[:100]))
    with pytest.raises(StoreError, match="corrupted shard header|truncated"):
        open_store(str(out)).read("blocks.0.hook_resid_post")


def test_other_sites_or_model_are_refused_and_store_left_intact(tiny_llama, tmp_path):
    model, tok = tiny_llama
    out = tmp_path / "store"
    actscope.record(model, tok, str(out), SITES[:1], **KW)
    before = _digest(out)
    with pytest.raises(StoreError, match="other sites.*--overwrite"):
        actscope.record(model, tok, str(out), ["blocks.0.hook_mlp_out"], **KW)
    with pytest.raises(StoreError, match="other seq_len"):
        actscope.record(model, tok, str(out), SITES[:1], **{**KW, "seq_len": 16})
    from tiny import tiny_model

    other = tiny_model("llama", seed=1, max_position_embeddings=256)
    with pytest.raises(StoreError, match="other model"):
        actscope.record(other, tok, str(out), SITES[:1], **KW)
    assert _digest(out) == before
    store = actscope.record(model, tok, str(out), ["blocks.0.hook_mlp_out"], overwrite=True, **KW)
    assert store.sites == ["blocks.0.hook_mlp_out"]


def test_disk_full_keeps_written_shards_and_resumes(tiny_llama, reference, tmp_path, monkeypatch):
    model, tok = tiny_llama
    out = tmp_path / "store"
    real = writer_mod.write_shard
    calls = {"n": 0}

    def failing(f, tensors, meta):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, tensors, meta)

    monkeypatch.setattr(writer_mod, "write_shard", failing)
    with pytest.raises(StoreError, match="disk full .* re-run the same command to resume"):
        actscope.record(model, tok, str(out), SITES, dtype="float32", **KW)
    partial = open_store(str(out), allow_partial=True)
    assert not partial.complete and len(partial.missing_shards) == partial.num_shards - 2
    assert not [p for p in (out / "shards").iterdir() if ".tmp-" in p.name]
    assert torch.equal(partial.read("blocks.0.hook_resid_post", 0, 20), reference[1].read("blocks.0.hook_resid_post", 0, 20))
    monkeypatch.setattr(writer_mod, "write_shard", real)
    actscope.record(model, tok, str(out), SITES, dtype="float32", **KW)
    assert _digest(out) == _digest(reference[0])


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_fsspec_urls(tiny_llama, reference, tmp_path, scheme):
    model, tok = tiny_llama
    url = f"file://{tmp_path}/store" if scheme == "file" else f"memory://actscope-test-{os.getpid()}"
    store = actscope.record(model, tok, url, SITES, dtype="float32", **KW)
    for site in ["blocks.1.hook_resid_post", "blocks.1.attn.hook_pattern"]:
        assert torch.equal(store.read(site, 5, 200), reference[1].read(site, 5, 200))
    assert torch.equal(open_store(url).token_ids(), reference[1].token_ids())


def test_shuffled_batches_cover_every_token_once(reference):
    store = reference[1]
    seen, total = [], 0
    for batch in store.iter_batches(["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], 50, seed=3):
        assert batch["blocks.0.hook_resid_post"].shape[0] == batch["blocks.1.hook_resid_post"].shape[0]
        seen.append(batch["blocks.0.hook_resid_post"])
        total += batch["blocks.0.hook_resid_post"].shape[0]
    assert total == store.num_tokens
    got = torch.cat(seen)
    want = store.read("blocks.0.hook_resid_post")
    assert not torch.equal(got, want)  # shuffled
    assert torch.equal(got.sort(0).values, want.sort(0).values)  # same multiset of rows
    ordered = torch.cat(list(store.iter_batches("blocks.0.hook_resid_post", 64, shuffle=False)))
    assert torch.equal(ordered, want)


def test_seq_len_above_context_and_unknown_site(tiny_llama, tmp_path):
    model, tok = tiny_llama
    with pytest.raises(StoreError, match="exceeds the model's context length of 256"):
        actscope.record(model, tok, str(tmp_path / "s"), SITES, **{**KW, "seq_len": 512})
    with pytest.raises(actscope.SiteError, match="closest valid sites"):
        actscope.record(model, tok, str(tmp_path / "s"), ["blocks.0.hook_resid_psot"], **KW)
    assert not (tmp_path / "s").exists()


def test_unknown_site_in_store_suggests(reference):
    with pytest.raises(StoreError, match="closest: blocks.1.hook_resid_post"):
        reference[1].read("blocks.1.hook_resid_pots")
    with pytest.raises(StoreError, match="no activation store here"):
        open_store("/nonexistent/folder")


def test_recording_early_sites_skips_the_later_layers(tiny_llama, tmp_path):
    """The forward pass stops after the last recorded site; values equal a full pass's."""
    model, tok = tiny_llama
    calls = []
    handle = model.model.layers[-1].register_forward_hook(lambda *a: calls.append(1))
    try:
        store = actscope.record(model, tok, str(tmp_path / "early"), ["blocks.0.hook_resid_post"], dtype="float32", **KW)
    finally:
        handle.remove()
    assert calls == [1]  # the shape probe runs the whole model once; recording never reaches the last layer
    ids = store.token_ids()
    with torch.inference_mode(), actscope.trace(model, ["blocks.0.hook_resid_post"]) as cache:
        model(input_ids=ids[:2])
    assert torch.equal(store.read("blocks.0.hook_resid_post", 0, 64), cache["blocks.0.hook_resid_post"].reshape(64, -1))


def test_a_site_that_fires_twice_is_refused_before_writing(tiny_llama, tmp_path):
    model, tok = tiny_llama
    mlp = model.model.layers[0].mlp
    twice = mlp.forward
    mlp.forward = lambda x: twice(x) + twice(x) * 0  # the MLP's inner modules now run twice per pass
    try:
        with pytest.raises(StoreError, match="fired 2 times in 1 forward passes"):
            actscope.record(model, tok, str(tmp_path / "twice"), ["blocks.0.mlp.hook_post"], **KW)
    finally:
        del mlp.forward
    assert not (tmp_path / "twice" / "manifest.json").exists()
