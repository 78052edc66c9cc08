"""Benchmark: scan throughput as a ratio to plain forward throughput, same batches, one run.

    python bench/scan.py                    # ratios + the peak-memory check at 20k vs 80k tokens
    python bench/scan.py --tokens 8192 --rss

Methods over the same batches of 8 x 128 tokens of the default corpus on the default model:
- plain:            model(batch), default (sdpa) attention: the reference
- plain-eager:      the same with eager attention (what attention patterns require)
- plain-no-logits:  model(batch, logits_to_keep=1): the forward without the full unembedding,
                    which the scan skips too (it rebuilds logits at its sampled positions), so
                    "scan-no-patterns vs plain-no-logits" is the overhead on equal model work
- scan:             actscope.scan with attention patterns (end to end: tokenizing, the pass,
                    layer-skip and logit-lens extras, building the report)
- scan-no-patterns: actscope.scan(patterns=False)
- scan-no-patterns-torch: the same with every statistic in torch ops instead of the C++ passes
                    (stats/fast.py), to measure what those passes save

Each round runs every method once, alternating the order; ratios are taken within a round and
the median over rounds is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

import actscope

SEQ, BATCH = 128, 8


def plain(model, batches, **kwargs) -> None:
    with torch.inference_mode():
        for b in batches:
            model(input_ids=b, use_cache=False, **kwargs)


def torch_scan(model, tok, n_tokens: int) -> None:
    """The scan without patterns, its statistics in torch ops (``stats.fast.USE_FAST = False``)."""
    from actscope.stats import fast

    fast.USE_FAST = False
    try:
        actscope.scan(model, tok, None, max_tokens=n_tokens, patterns=False, progress=False)
    finally:
        fast.USE_FAST = True


def peak_child(n_tokens: int) -> None:
    torch.set_num_threads(2)
    model, tok = actscope.load_model("default")
    report = actscope.scan(model, tok, None, max_tokens=n_tokens, progress=False)
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(json.dumps({"tokens": report["tokens"], "peak_rss_mb": hwm / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rss", type=int, nargs="*", default=[20_000, 80_000])
    ap.add_argument("--rss-child", type=int)
    ap.add_argument("--json", default="bench/out/scan.json")
    args = ap.parse_args()
    if args.rss_child:
        return peak_child(args.rss_child)
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    model, tok = actscope.load_model("default")
    eager, _ = actscope.load_model("default", attn_implementation="eager")
    tokens = actscope.load_tokens(None, tok, SEQ, args.tokens)
    batches = list(tokens.batches(BATCH))
    methods = {
        "plain": lambda: plain(model, batches),
        "plain-eager": lambda: plain(eager, batches),
        "plain-no-logits": lambda: plain(model, batches, logits_to_keep=1),
        "scan": lambda: actscope.scan(model, tok, None, max_tokens=args.tokens, progress=False),
        "scan-no-patterns": lambda: actscope.scan(model, tok, None, max_tokens=args.tokens, patterns=False, progress=False),
        "scan-no-patterns-torch": lambda: torch_scan(model, tok, args.tokens),
    }
    plain(model, batches[:1])
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.rounds):
        for name in (list(methods) if r % 2 == 0 else list(reversed(methods))):
            t0 = time.perf_counter()
            methods[name]()
            times[name].append(time.perf_counter() - t0)
            print(f"round {r} {name:26s} {times[name][-1]:7.2f} s", flush=True)
    n = tokens.num_tokens
    print(f"\n{n} tokens, batches of {BATCH}x{SEQ}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print("| method | tokens/s (median) | ratio to plain forward (median of per-round ratios) | per-round |")
    print("|---|---|---|---|")
    rows = {}
    pairs = [(m, "plain") for m in methods] + [("scan", "plain-eager"), ("scan-no-patterns", "plain-no-logits"),
                                               ("scan-no-patterns-torch", "plain-no-logits")]
    for name, ref in pairs:
        per = [a / b for a, b in zip(times[ref], times[name])]
        tps = n / statistics.median(times[name])
        rows[f"{name} vs {ref}"] = {"tokens_per_s": tps, "ratio": statistics.median(per), "per_round": per}
        print(f"| {name} (vs {ref}) | {tps:,.0f} | {statistics.median(per):.3f} | {', '.join(f'{x:.3f}' for x in per)} |")
    rss = []
    for k in args.rss:
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(k)], check=True, capture_output=True, text=True)
        rss.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"peak RSS of a scan of {rss[-1]['tokens']:,} tokens: {rss[-1]['peak_rss_mb']:,.0f} MiB", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"tokens": n, "rows": rows, "rss": rss}, indent=1))


if __name__ == "__main__":
    main()
