"""Re-run issue #11's reliability probe and print the tally (docs/reliability.md).

    .venv/bin/python bench/reliability.py [--json runs/reliability.json]

Every case runs on a tiny random llama with a 256-token BPE (built here, offline, a few seconds)
and is classified as one of: good (the right result, or exit 2 with one ``error:`` line saying
what is wrong), unclear (one error line, but not the expected words), traceback (a traceback, or
the CLI's "unexpected" fallback), silent (exit 0 or data returned where an error was due, or
wrong data), data loss (a file the user had was changed or removed).

The CLI cases are the table of ``tests/test_cli_errors.py``; the store cases mirror
``tests/store/test_store_integrity.py``; the header fuzz flips every bit of a small shard's header.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import struct
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import actscope  # noqa: E402
from actscope import ActscopeError, StoreError, open_store  # noqa: E402

SITE = "blocks.1.hook_resid_post"
KW = dict(seq_len=16, max_tokens=16 * 8, batch_size=2, shard_mb=0.004, progress=False, dtype="float32")


def cli_case(argv: list[str], expected: str, tmp: Path) -> str:
    from actscope.cli import main

    before = {p: p.read_bytes() for p in tmp.rglob("*") if p.is_file()}
    err = io.StringIO()
    code = 0
    old_argv = sys.argv
    sys.argv = ["actscope", *argv]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main()
    except SystemExit as exc:
        code = exc.code or 0
    except BaseException:  # noqa: BLE001 - an exception escaping main() is a traceback
        return "traceback"
    finally:
        sys.argv = old_argv
    if any(not p.exists() or p.read_bytes() != data for p, data in before.items()):
        return "data loss"
    text = err.getvalue()
    lines = [line for line in text.splitlines() if line.strip() and "it/s]" not in line]
    if "Traceback" in text or any("unexpected" in line for line in lines):
        return "traceback"
    if code == 0:
        return "silent"
    if code == 2 and len(lines) == 1 and lines[0].startswith("error: "):
        return "good" if expected in lines[0] else "unclear"
    return "unclear"


def store_cases(model, tok, tmp: Path) -> dict[str, Callable[[], str]]:
    """Python API / store cases: each returns its outcome."""

    def fresh(name: str, **kw) -> Path:
        out = tmp / name
        actscope.record(model, tok, str(out), [SITE], **{**KW, **kw})
        return out

    def expect_error(fn: Callable[[], object], words: str) -> str:
        try:
            fn()
        except ActscopeError as exc:
            return "good" if words in str(exc) else "unclear"
        except Exception:  # noqa: BLE001
            return "traceback"
        return "silent"

    def edited_checkpoint() -> str:
        out = fresh("ckpt")
        edited = copy.deepcopy(model)
        with torch.no_grad():
            edited.model.layers[-1].mlp.down_proj.weight[3, 5] += 0.5
        return expect_error(lambda: actscope.record(edited, tok, str(out), [SITE], **KW), "other model")

    def concurrent() -> str:
        from actscope.store.fs import Location
        from actscope.store.lock import StoreLock

        lock = StoreLock(Location(str(tmp / "busy")))
        lock.acquire()
        try:
            return expect_error(lambda: actscope.record(model, tok, str(tmp / "busy"), [SITE], **KW),
                                "another record (pid")
        finally:
            lock.release()

    def users_folder() -> str:
        out = tmp / "user"
        (out / "shards").mkdir(parents=True)
        (out / "shards" / "notes.txt").write_text("mine")
        result = expect_error(lambda: actscope.record(model, tok, str(out), [SITE], **KW), "holds no actscope store")
        return "data loss" if not (out / "shards" / "notes.txt").exists() else result

    def token_flip() -> str:
        out = fresh("tokens")
        path = out / "tokens.safetensors"
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x04
        path.write_bytes(bytes(data))
        return expect_error(lambda: open_store(str(out)).token_ids(), "checksum mismatch")

    def header_dtype() -> str:
        out = fresh("header")
        path = sorted((out / "shards").iterdir())[1]
        raw = path.read_bytes()
        path.write_bytes(raw.replace(b'"dtype":"F32"', b'"dtype":"I32"', 1))
        return expect_error(lambda: open_store(str(out)).read(SITE), "the manifest says")

    def resume_damaged() -> str:
        out = fresh("damaged")
        want = open_store(str(out)).read(SITE).clone()
        shard = sorted((out / "shards").iterdir())[0]
        shard.write_bytes(shard.read_bytes()[:-7])
        try:
            got = actscope.record(model, tok, str(out), [SITE], **KW).read(SITE)
        except Exception:  # noqa: BLE001
            return "traceback"
        return "good" if torch.equal(got, want) else "silent"

    def empty_sites() -> str:
        return expect_error(lambda: actscope.record(model, tok, str(tmp / "e"), [], **KW), "sites is empty")

    def iter_zero() -> str:
        store = open_store(str(tmp / "ckpt"))
        return expect_error(lambda: next(iter(store.iter_batches(SITE, 0))), "batch_size must be a positive")

    def negative_shards() -> str:
        out = fresh("neg")
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["num_shards"] = -1
        (out / "manifest.json").write_text(json.dumps(manifest))
        return expect_error(lambda: open_store(str(out)), "'num_shards' must be a positive integer")

    def str_prompts() -> str:
        from actscope.intervene.steer import steering_vector

        return expect_error(lambda: steering_vector(model, tok, "I am happy", "I am sad"), "single string")

    def multi_token() -> str:
        return expect_error(lambda: actscope.patch(model, tok, "the value of the list", "the value of the dict",
                                                   target=" mat", sites="resid_pre"), "is 2 tokens")

    return {"edited checkpoint reuses a store": edited_checkpoint, "concurrent record": concurrent,
            "record in a user's folder": users_folder, "flipped bit in tokens.safetensors": token_flip,
            "edited dtype in a shard header": header_dtype, "resume over a truncated shard": resume_damaged,
            "record(sites=[])": empty_sites, "iter_batches(site, 0)": iter_zero,
            "manifest num_shards -1": negative_shards, "steering_vector(str, str)": str_prompts,
            "multi-token --target": multi_token}


def header_fuzz(model, tok, tmp: Path) -> Counter:
    """Flip every bit of a one-shard store's header: each flip is a StoreError or the right data."""
    out = tmp / "fuzz"
    store = actscope.record(model, tok, str(out), [SITE], **{**KW, "max_tokens": 32, "shard_mb": 1})
    want = store.read(SITE).clone()
    path = out / "shards" / "shard-000000.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    tally: Counter = Counter()
    for bit in range(8 * (8 + n)):
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(flipped)
        store._open.clear()
        try:
            tally["good" if torch.equal(store.read(SITE), want) else "silent"] += 1
        except StoreError:
            tally["good"] += 1
        except Exception:  # noqa: BLE001
            tally["traceback"] += 1
    path.write_bytes(raw)
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write every case's outcome here")
    args = parser.parse_args()
    from conftest import build_tokenizer
    from test_cli_errors import CASES, _setup
    from tiny import tiny_model

    outcomes: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as root:
        root_path = Path(root)
        model_dir = root_path / "tiny-llama"
        tok = build_tokenizer()
        tiny_model("llama", max_position_embeddings=256).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        for case, expected in CASES.items():
            tmp = root_path / "cli" / case
            tmp.mkdir(parents=True)
            outcomes[f"cli: {case}"] = cli_case(_setup(case, tmp, str(model_dir)), expected, tmp)
        model, tok = actscope.load_model(str(model_dir))
        for name, fn in store_cases(model, tok, root_path / "api").items():
            (root_path / "api").mkdir(exist_ok=True)
            try:
                outcomes[f"api: {name}"] = fn()
            except Exception:  # noqa: BLE001
                outcomes[f"api: {name}"] = "traceback"
        fuzz = header_fuzz(model, tok, root_path)
    tally = Counter(outcomes.values())
    for case, outcome in outcomes.items():
        print(f"{outcome:>10}  {case}")
    print(f"\nheader bit flips: {sum(fuzz.values())} ({dict(fuzz)})")
    cols = ["good", "unclear", "traceback", "silent", "data loss"]
    print(f"\ncases {len(outcomes)}: " + ", ".join(f"{c} {tally.get(c, 0)}" for c in cols))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"cases": outcomes, "tally": tally, "header_fuzz": fuzz}, indent=1))
    sys.exit(0 if set(tally) <= {"good"} and set(fuzz) <= {"good"} else 1)


if __name__ == "__main__":
    main()
