"""Issue #11, the store: it never holds the wrong data and never deletes a user's files.

Each test is one case of the reliability probe (docs/reliability.md): another checkpoint, a
concurrent run, a user's folder, flipped bits in the token file and in shard headers, damaged
files under a resume, and bad arguments that used to be saved into the manifest.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import struct
from pathlib import Path

import pytest
import torch

import actscope
from actscope import ActscopeError, StoreError, open_store
from actscope.store.lock import StoreLock
from actscope.store.fs import Location

SITE = "blocks.1.hook_resid_post"
KW = dict(seq_len=16, max_tokens=16 * 8, batch_size=2, shard_mb=0.004, progress=False, dtype="float32")


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tiny_llama, tmp_path_factory):
    model, tok = tiny_llama
    out = tmp_path_factory.mktemp("ref") / "store"
    store = actscope.record(model, tok, str(out), [SITE], **KW)
    assert store.num_shards >= 4
    return out, store


def _edited(model):
    """The model with one weight of its last layer changed (a ROME-style edit)."""
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.model.layers[-1].mlp.down_proj.weight[3, 5] += 0.5
    return edited


def test_another_checkpoint_never_reuses_a_store(tiny_llama, reference, tmp_path):
    model, tok = tiny_llama
    edited = _edited(model)
    assert actscope.record.__module__  # the module, not the function, holds the fingerprint
    from actscope.fingerprint import model_fingerprint

    assert model_fingerprint(edited) != model_fingerprint(model)
    out = tmp_path / "store"
    actscope.record(model, tok, str(out), [SITE], **KW)
    with pytest.raises(StoreError, match="other model.*--overwrite"):
        actscope.record(edited, tok, str(out), [SITE], **KW)
    # a partial store is not resumed with the other model either
    shards = sorted((out / "shards").iterdir())
    shards[-1].unlink()
    with pytest.raises(StoreError, match="other model"):
        actscope.record(edited, tok, str(out), [SITE], **KW)
    # --overwrite starts fresh: every value now comes from the edited model
    store = actscope.record(edited, tok, str(out), [SITE], overwrite=True, **KW)
    with torch.inference_mode(), actscope.trace(edited, [SITE]) as cache:
        edited(input_ids=store.token_ids()[:2])
    assert torch.equal(store.read(SITE, 0, 32), cache[SITE].reshape(32, -1))
    assert not torch.equal(store.read(SITE), reference[1].read(SITE))


def test_overwrite_with_the_same_settings_starts_fresh(tiny_llama, reference, tmp_path):
    model, tok = tiny_llama
    out = tmp_path / "store"
    actscope.record(model, tok, str(out), [SITE], **KW)
    first = sorted((out / "shards").iterdir())[0]
    first.write_bytes(b"junk")  # even a shard whose name fits is rewritten
    actscope.record(model, tok, str(out), [SITE], overwrite=True, **KW)
    assert _digest(out) == _digest(reference[0])


def test_a_second_record_on_the_same_folder_is_refused_while_the_first_writes(tiny_llama, tmp_path):
    model, tok = tiny_llama
    out = tmp_path / "store"
    holder = StoreLock(Location(str(out)))
    holder.acquire()  # what a running `record` holds
    try:
        with pytest.raises(StoreError, match=r"another record \(pid \d+\) is writing this store"):
            actscope.record(model, tok, str(out), [SITE], **KW)
    finally:
        holder.release()
    assert not (out / "manifest.json").exists()
    # a stale lock (its holder was killed: the file remains, the kernel dropped the lock) is taken over
    (out / ".actscope.lock").write_text("999999\n")
    store = actscope.record(model, tok, str(out), [SITE], **KW)
    assert store.complete and (out / ".actscope.lock").read_text() == ""


def test_record_never_deletes_a_users_folder(tiny_llama, reference, tmp_path):
    model, tok = tiny_llama
    out = tmp_path / "mine"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "notes.txt").write_text("my notes")
    (out / "paper.tex").write_text("draft")
    with pytest.raises(StoreError, match="not empty and holds no actscope store.*--overwrite"):
        actscope.record(model, tok, str(out), [SITE], **KW)
    assert (out / "shards" / "notes.txt").read_text() == "my notes"
    store = actscope.record(model, tok, str(out), [SITE], overwrite=True, **KW)  # removes only our own files
    assert store.complete and (out / "shards" / "notes.txt").read_text() == "my notes"
    assert (out / "paper.tex").read_text() == "draft"
    actscope.record(model, tok, str(out), [SITE], overwrite=True, **KW)
    assert (out / "shards" / "notes.txt").exists() and (out / "paper.tex").exists()
    with pytest.raises(StoreError, match="is a file"):
        actscope.record(model, tok, str(out / "paper.tex"), [SITE], **KW)


def test_a_flipped_bit_in_the_token_file_is_caught_and_a_resume_repairs_it(tiny_llama, reference, tmp_path):
    model, tok = tiny_llama
    out = tmp_path / "store"
    actscope.record(model, tok, str(out), [SITE], **KW)
    tokens = out / "tokens.safetensors"
    data = bytearray(tokens.read_bytes())
    data[-3] ^= 0x04  # a high bit of the last token id: a huge id, valid safetensors
    tokens.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="tokens.safetensors: checksum mismatch"):
        open_store(str(out))
    actscope.record(model, tok, str(out), [SITE], **KW)
    assert _digest(out) == _digest(reference[0])
    tokens.write_bytes(bytes(data[:50]))  # truncated
    actscope.record(model, tok, str(out), [SITE], **KW)
    assert torch.equal(open_store(str(out)).token_ids(), reference[1].token_ids())


def _rewrite_header(path: Path, edit) -> None:
    """Apply ``edit`` to a shard's header JSON, keeping its length (padding with spaces)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    path.write_bytes(raw[:8] + new + b" " * (n - len(new)) + raw[8 + n :])


@pytest.mark.parametrize("edit", ["dtype", "shape", "plan", "range"])
def test_shard_headers_are_checked_against_the_manifest(tiny_llama, reference, tmp_path, edit):
    model, tok = tiny_llama
    out = tmp_path / "store"
    actscope.record(model, tok, str(out), [SITE], **KW)
    victim = sorted((out / "shards").iterdir())[1]

    def change(header):
        entry = header[SITE]
        if edit == "dtype":  # same byte count: the bytes would be read as int32
            entry["dtype"] = "I32"
        elif edit == "shape":  # same element count, another layout
            rows, d = entry["shape"]
            entry["shape"] = [rows * 2, d // 2]
        else:
            meta = json.loads(header["__metadata__"]["actscope"])
            if edit == "plan":
                meta["plan"] = "0" * 16
            else:
                meta["seq_start"], meta["seq_end"] = meta["seq_start"] + 1, meta["seq_end"] + 1
            header["__metadata__"]["actscope"] = json.dumps(meta, sort_keys=True)

    _rewrite_header(victim, change)
    store = open_store(str(out))
    assert torch.equal(store.read(SITE, 0, 16), reference[1].read(SITE, 0, 16))  # shard 0 is fine
    with pytest.raises(StoreError, match="the manifest|another plan"):
        store.read(SITE)
    actscope.record(model, tok, str(out), [SITE], **KW)  # a resume rewrites it
    assert _digest(out) == _digest(reference[0])


def test_a_shard_of_another_plan_is_rejected_on_read_and_on_resume(tiny_llama, reference, tmp_path):
    model, tok = tiny_llama
    other = tmp_path / "other"
    actscope.record(model, tok, str(other), [SITE], data=["Another corpus entirely. " * 400], **KW)
    out = tmp_path / "store"
    actscope.record(model, tok, str(out), [SITE], **KW)
    name = sorted((out / "shards").iterdir())[2].name
    (out / "shards" / name).write_bytes((other / "shards" / name).read_bytes())
    with pytest.raises(StoreError, match="another plan"):
        open_store(str(out)).read(SITE)
    actscope.record(model, tok, str(out), [SITE], **KW)
    assert _digest(out) == _digest(reference[0])


def test_a_resume_rewrites_damaged_shards_before_reporting_success(tiny_llama, reference, tmp_path):
    model, tok = tiny_llama
    out = tmp_path / "store"
    actscope.record(model, tok, str(out), [SITE], **KW)
    shards = sorted((out / "shards").iterdir())
    shards[0].write_bytes(shards[0].read_bytes()[:-7])  # truncated: caught by the size check
    data = bytearray(shards[1].read_bytes())
    data[-5] ^= 0x10  # corrupted data: caught by --verify's checksums
    shards[1].write_bytes(bytes(data))
    kept = shards[2].stat().st_mtime_ns
    store = actscope.record(model, tok, str(out), [SITE], **KW)  # header and size only
    assert shards[0].read_bytes() == (reference[0] / "shards" / shards[0].name).read_bytes()
    with pytest.raises(StoreError, match="checksum mismatch"):
        store.read(SITE)
    actscope.record(model, tok, str(out), [SITE], verify=True, **KW)
    assert _digest(out) == _digest(reference[0])
    assert shards[2].stat().st_mtime_ns == kept  # sound shards are not rewritten


def test_every_bit_flip_in_a_shard_header_is_an_error_or_the_right_data(tiny_llama, tmp_path):
    model, tok = tiny_llama
    out = tmp_path / "one"
    store = actscope.record(model, tok, str(out), [SITE], **{**KW, "max_tokens": 32, "shard_mb": 1})
    assert store.num_shards == 1
    want = store.read(SITE).clone()
    path = out / "shards" / "shard-000000.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    outcomes = {"error": 0, "same": 0}
    for byte in range(8 + n):
        for bit in range(8):
            flipped = bytearray(raw)
            flipped[byte] ^= 1 << bit
            path.write_bytes(flipped)
            store._open.clear()
            try:
                got = store.read(SITE)
            except StoreError:
                outcomes["error"] += 1
                continue
            assert torch.equal(got, want), f"byte {byte} bit {bit}: wrong data without an error"
            outcomes["same"] += 1
    assert outcomes["error"] > 0.5 * 8 * (8 + n), outcomes


def test_python_api_arguments_are_validated(tiny_llama, reference):
    model, tok = tiny_llama
    out = reference[0].parent / "never"
    for kwargs, message in [
        (dict(sites=[]), "sites is empty"),
        (dict(sites=[3]), "must hold strings"),
        (dict(batch_size=-3), "--batch-size must be a positive integer, got -3"),
        (dict(batch_size=0), "--batch-size must be a positive integer, got 0"),
        (dict(max_tokens=-100), "--max-tokens must be a positive integer"),
        (dict(shard_mb=float("nan")), "--shard-mb must be finite"),
        (dict(shard_mb=0), "--shard-mb must be positive"),
    ]:
        args = {**KW, "sites": [SITE], **kwargs}
        sites = args.pop("sites")
        with pytest.raises(ActscopeError, match=message):
            actscope.record(model, tok, str(out), sites, **args)
    assert not out.exists()
    store = reference[1]
    for size in (0, -4, 2.5):
        with pytest.raises(ActscopeError, match="batch_size must be a positive integer"):
            next(iter(store.iter_batches(SITE, size)))


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(num_shards=-1), "'num_shards' must be a positive integer"),
    (lambda m: m.update(num_shards=m["num_shards"] - 1), "does not match"),
    (lambda m: m.update(sites={}), "'sites' must be a non-empty object"),
    (lambda m: m["sites"][SITE].update(shape=[-64]), "needs a shape of positive integers"),
    (lambda m: m.update(seq_len=17), "plan_id does not match"),
    (lambda m: m.pop("tokens"), "plan_id does not match|'tokens' needs"),
])
def test_the_manifest_is_validated(reference, tmp_path, change, message):
    import shutil

    out = tmp_path / "store"
    shutil.copytree(reference[0], out)
    manifest = json.loads((out / "manifest.json").read_text())
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=message):
        open_store(str(out))


def test_a_bad_or_unreadable_manifest_never_blocks_overwrite(tiny_llama, reference, tmp_path):
    model, tok = tiny_llama
    out = tmp_path / "store"
    out.mkdir()
    for text in ["[1, 2]", "{not json", json.dumps({"format": "actscope.store", "version": 2, "batch_size": -3})]:
        (out / "manifest.json").write_text(text)
        with pytest.raises(StoreError, match="--overwrite|not an actscope manifest"):
            actscope.record(model, tok, str(out), [SITE], **KW)
        if text.startswith("["):
            continue  # a JSON list is not our manifest: it is never removed
        actscope.record(model, tok, str(out), [SITE], overwrite=True, **KW)
        assert _digest(out) == _digest(reference[0])


def test_the_thread_count_is_recorded_and_a_resume_on_another_warns(tiny_llama, reference, tmp_path, monkeypatch,
                                                                    caplog):
    model, tok = tiny_llama
    out = tmp_path / "store"
    actscope.record(model, tok, str(out), [SITE], **KW)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["threads"] == torch.get_num_threads()
    sorted((out / "shards").iterdir())[-1].unlink()
    monkeypatch.setattr(torch, "get_num_threads", lambda: manifest["threads"] + 3)
    with caplog.at_level(logging.WARNING, logger="actscope.record"):
        actscope.record(model, tok, str(out), [SITE], **KW)
    assert f"recorded with {manifest['threads']} threads on {manifest['threads'] + 3} threads" in caplog.text
    assert "may differ in the last bits" in caplog.text
    assert json.loads((out / "manifest.json").read_text())["threads"] == manifest["threads"]
