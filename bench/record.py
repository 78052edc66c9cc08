"""Benchmark: recording throughput as a ratio to plain forward throughput, same batches, one run.

    python bench/record.py                 # all methods + the RSS check (needs the bench extra)
    python bench/record.py --no-peers      # actscope only
    python bench/record.py --layers 6      # only the first 6 layers' hook_resid_post, actscope only

Methods, each over the same batches of 8 x 128 tokens of the default corpus on the default model:
- plain:            model(batch), nothing captured (the reference)
- actscope-disk:    actscope.record of all 30 hook_resid_post + 30 mlp.hook_post, bfloat16, to disk
- actscope-memory:  actscope.trace of the same 60 sites, tensors kept in RAM (float32)
- nnsight:          nnsight trace saving the same 60 tensors (RAM)
- tl-bridge:        transformer-lens TransformerBridge.run_with_cache of the same 60 sites (RAM);
                    the bridge forces eager attention, so plain-eager is reported for it as well

Recording to disk is timed as whole runs alternating with whole plain runs; the in-memory
methods are interleaved batch by batch in rotating order. Each round gives its own ratio to the
plain forward pass of the same round (neighbours in time, so drifts of a shared machine cancel);
the table reports the median ratio over rounds. With ``--layers N`` only the first N residual
streams are recorded: the forward pass stops after the last of them, so recording can be faster
than a plain forward pass (which runs all 30 layers and the unembedding). Peak RSS of a
fresh process recording 20k and 80k tokens to disk shows that memory does not grow with the corpus.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import actscope

SITES = ["blocks.*.hook_resid_post", "blocks.*.mlp.hook_post"]
SEQ, BATCH = 128, 8


def plain(model, batches):
    with torch.inference_mode():
        for b in batches:
            model(input_ids=b, use_cache=False)


def actscope_disk(model, tok, tokens, folder):
    shutil.rmtree(folder, ignore_errors=True)
    actscope.record(model, tok, folder, SITES, tokens=tokens, dtype="bfloat16", batch_size=BATCH, progress=False)


# --- in-memory capture of one batch; each returns what it keeps ------------------------------
def plain_batch(model, b):
    with torch.inference_mode():
        model(input_ids=b, use_cache=False)
    return None


def actscope_batch(model, b):
    with torch.inference_mode(), actscope.trace(model, SITES) as cache:
        model(input_ids=b, use_cache=False)
    return dict(cache)


def nnsight_batch(lm, b):
    saved = []
    with torch.inference_mode(), lm.trace(b):
        for layer in range(30):
            saved.append(lm.model.layers[layer].mlp.down_proj.input.save())
            saved.append(lm.model.layers[layer].output.save())
    return saved


def bridge_batch(bridge, b):
    keep = lambda name: name.endswith("hook_resid_post") or name.endswith("mlp.hook_post")  # noqa: E731
    with torch.inference_mode():
        return bridge.run_with_cache(b, names_filter=keep)[1]


def interleaved(per_batch: dict, batches, rounds: int) -> dict[str, list[float]]:
    """Time in-memory methods batch by batch, rotating their order, keeping what each captures
    until the round ends (as a user holding a cache would)."""
    names = list(per_batch)
    times = {n: [] for n in names}
    for r in range(rounds):
        kept = {n: [] for n in names}
        spent = {n: 0.0 for n in names}
        for i, b in enumerate(batches):
            k = (i + r) % len(names)
            for n in names[k:] + names[:k]:
                t0 = time.perf_counter()
                kept[n].append(per_batch[n](b))
                spent[n] += time.perf_counter() - t0
        for n in names:
            times[n].append(spent[n])
        print(f"round {r} in-memory: " + ", ".join(f"{n} {spent[n]:.2f}s" for n in names), flush=True)
        del kept
    return times


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def rss_child(n_tokens: int, folder: str) -> None:
    torch.set_num_threads(2)
    model, tok = actscope.load_model("default")
    tokens = actscope.load_tokens(None, tok, SEQ, n_tokens)
    actscope.record(model, tok, folder, SITES, tokens=tokens, dtype="bfloat16", batch_size=BATCH, progress=False)
    # VmHWM, not ru_maxrss: ru_maxrss survives fork+exec and would report the parent's peak
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(json.dumps({"tokens": tokens.num_tokens, "peak_rss_mb": hwm / 1024}))


def peak_rss(n_tokens: int) -> dict:
    folder = tempfile.mkdtemp(prefix="actscope-bench-rss-")
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--rss-child", str(n_tokens), "--folder", folder],
            check=True, capture_output=True, text=True,
        ).stdout
        return json.loads(out.strip().splitlines()[-1])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--rss", type=int, nargs="*", default=[20_000, 80_000])
    ap.add_argument("--rss-child", type=int)
    ap.add_argument("--folder")
    ap.add_argument("--json", default="bench/out/record.json")
    ap.add_argument("--layers", type=int, help="record only blocks.0..N-1.hook_resid_post (no peers)")
    args = ap.parse_args()
    if args.layers:
        global SITES
        SITES = [f"blocks.{layer}.hook_resid_post" for layer in range(args.layers)]
        args.no_peers, args.rss = True, []
    if args.rss_child:
        return rss_child(args.rss_child, args.folder)

    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    model, tok = actscope.load_model("default")
    tokens = actscope.load_tokens(None, tok, SEQ, args.tokens)
    batches = list(tokens.batches(BATCH))
    folder = tempfile.mkdtemp(prefix="actscope-bench-")
    per_batch = {"plain": lambda b: plain_batch(model, b), "actscope-memory": lambda b: actscope_batch(model, b)}
    peers_ok = not args.no_peers
    if peers_ok:
        try:
            from nnsight import LanguageModel
            from transformer_lens.model_bridge import TransformerBridge
        except ImportError:
            print("peers not installed (pip install -e '.[bench]'); measuring actscope only")
            peers_ok = False
    if peers_ok:
        from actscope.models import resolve_spec

        lm = LanguageModel(model, tokenizer=tok)
        eager_model, _ = actscope.load_model("default", attn_implementation="eager")
        bridge = TransformerBridge.boot_transformers(resolve_spec("default")[1], hf_model=eager_model, tokenizer=tok, device="cpu")
        per_batch["nnsight"] = lambda b: nnsight_batch(lm, b)
        per_batch["plain-eager"] = lambda b: plain_batch(eager_model, b)
        per_batch["tl-bridge"] = lambda b: bridge_batch(bridge, b)

    plain(model, batches[:1])  # warm-up
    # 1) recording to disk is a whole pipeline: alternate whole runs with plain forward passes
    times: dict[str, list[float]] = {"plain-run": [], "actscope-disk": []}
    for r in range(args.rounds):
        order = ["plain-run", "actscope-disk"] if r % 2 == 0 else ["actscope-disk", "plain-run"]
        for name in order:
            run = (lambda: plain(model, batches)) if name == "plain-run" else (lambda: actscope_disk(model, tok, tokens, folder + "/store"))
            seconds, _ = timed(run)
            times[name].append(seconds)
            print(f"round {r} {name:16s} {seconds:7.2f} s", flush=True)
    # 2) in-memory capture: interleaved batch by batch
    times.update(interleaved(per_batch, batches, args.rounds))
    ours = actscope_batch(model, batches[0])

    # agreement: the stored/peer values equal ours
    store = actscope.open_store(folder + "/store")
    last = SITES[-1] if args.layers else "blocks.15.hook_resid_post"
    agree = {"actscope-disk": torch.equal(store.read(last, 0, BATCH * SEQ), ours[last].reshape(-1, 576).bfloat16())}
    if peers_ok:
        nn_saved = nnsight_batch(lm, batches[0])
        agree["nnsight"] = torch.equal(nn_saved[31], ours["blocks.15.hook_resid_post"])
        tl_cache = bridge_batch(bridge, batches[0])
        agree["tl-bridge max abs diff (eager vs sdpa)"] = float(
            (tl_cache["blocks.15.hook_resid_post"] - ours["blocks.15.hook_resid_post"]).abs().max()
        )
    shard_bytes = sum(p.stat().st_size for p in Path(folder, "store", "shards").iterdir())
    shutil.rmtree(folder, ignore_errors=True)

    n_tok = tokens.num_tokens

    def ratio(name: str, ref: str) -> float:
        return statistics.median(a / b for a, b in zip(times[ref], times[name]))

    print(f"\n{n_tok} tokens, batches of {BATCH}x{SEQ}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print("| method | tokens/s (median) | ratio to plain forward (median of per-round ratios) | per-round ratios |")
    print("|---|---|---|---|")
    rows = {}
    labels = [("actscope-disk", "plain-run")] + [(n, "plain") for n in per_batch if n != "plain"]
    labels += [("tl-bridge", "plain-eager")] if "tl-bridge" in per_batch else []
    for name, ref in labels:
        tps = n_tok / statistics.median(times[name])
        per_round = [a / b for a, b in zip(times[ref], times[name])]
        rows[f"{name} vs {ref}"] = {"tokens_per_s": tps, "ratio": ratio(name, ref), "per_round": per_round}
        print(f"| {name} (vs {ref}) | {tps:,.0f} | {ratio(name, ref):.3f} | {', '.join(f'{x:.3f}' for x in per_round)} |")
    disk_s = statistics.median(times["actscope-disk"])
    print(f"disk: {shard_bytes / 2**20:,.0f} MiB of shards, {shard_bytes / 2**20 / disk_s:,.0f} MiB/s")
    print(f"agreement: {agree}")
    rss = [peak_rss(n) for n in args.rss]
    for r in rss:
        print(f"peak RSS recording {r['tokens']:,} tokens to disk: {r['peak_rss_mb']:,.0f} MiB")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"tokens": n_tok, "rows": rows, "agree": agree, "rss": rss,
                                           "shard_mib": shard_bytes / 2**20}, indent=1))


if __name__ == "__main__":
    main()
