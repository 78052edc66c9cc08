"""Benchmark: the cost of actscope's hook paths, to compare two versions of the code side by side.

    PYTHONPATH=/path/to/checkout/src python bench/spine.py --label after

Uses only API that every version since the first has (``trace``, ``ablate``, ``steer``,
``patch``), so the same script runs against an older checkout (put its ``src`` first on
``PYTHONPATH``) and the current one. Each operation is timed interleaved with a plain forward
pass on the same batch, round after round, and reported as a ratio to it (median over rounds):
machine load moves both alike, so ratios from two processes run one after the other compare.

- trace: capture all 30 ``hook_resid_post`` and ``mlp.hook_post`` in memory (the read path);
- ablate: zero 64 neurons of every layer's MLP (the write path);
- steer: add a vector to 13 layers' residual stream (the write path);
- patch: the fast sweep of resid_pre over every layer and position, as forwards-equivalent
  (its time divided by one plain forward of the prompt pair).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

import actscope

CLEAN = "In the summer of that year the famous painter moved from France to the capital city of"
CORRUPT = "In the summer of that year the famous painter moved from Italy to the capital city of"


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="current")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    model, tok = actscope.load_model("default")
    ids = actscope.load_tokens(None, tok, seq_len=128, max_tokens=128 * 4).input_ids[:4]
    L = model.config.num_hidden_layers
    units = list(range(0, 64))
    vec = {l: torch.randn(model.config.hidden_size) for l in range(8, 21)}

    def plain():
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)

    def traced():
        with torch.inference_mode(), actscope.trace(model, ["blocks.*.hook_resid_post", "blocks.*.mlp.hook_post"]):
            model(input_ids=ids, use_cache=False)

    def ablated():
        with torch.inference_mode(), actscope.ablate(model, "blocks.*.mlp.hook_post", units=units):
            model(input_ids=ids, use_cache=False)

    def steered():
        with torch.inference_mode(), actscope.steer(model, vec, 1.0):
            model(input_ids=ids, use_cache=False)

    pair = tok([CLEAN], return_tensors="pt").input_ids

    def plain_pair():
        with torch.inference_mode():
            model(input_ids=pair, use_cache=False)

    metric = lambda logits: logits[:, 0] - logits[:, 1]  # noqa: E731  (any fixed metric: speed only)

    def patched():
        actscope.patch(model, tok, CLEAN, CORRUPT, metric=metric, sites="resid_pre")

    ops = {"trace": traced, "ablate": ablated, "steer": steered}
    for fn in (plain, *ops.values(), patched):  # warm up every path once
        print(f"warm-up {fn.__name__}: {_time(fn):.2f} s", flush=True)  # a slow machine shows itself here
    ratios: dict[str, list[float]] = {k: [] for k in [*ops, "patch"]}
    for _ in range(args.rounds):
        for name, fn in ops.items():
            base = _time(plain)
            ratios[name].append(_time(fn) / base)
        base = statistics.median(_time(plain_pair) for _ in range(3))
        ratios["patch"].append(_time(patched) / base)
    out = {k: statistics.median(v) for k, v in ratios.items()}
    print(f"{args.label}: actscope {getattr(actscope, '__file__', '?')}, {L} layers, batch {tuple(ids.shape)}")
    for k, v in out.items():
        unit = "forwards of the prompt" if k == "patch" else "x plain forward"
        print(f"  {k:<7} {v:8.3f} {unit}   rounds: {', '.join(f'{r:.3f}' for r in ratios[k])}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"label": args.label, **out, "rounds": ratios}) + "\n")


if __name__ == "__main__":
    main()
