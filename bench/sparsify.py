"""Benchmark: batch-1 greedy decoding with activation sparsity, and the perplexity it costs.

    python bench/sparsify.py [--dtype float32|bfloat16] [--methods teal,wina,...] [--quick] [--compile]

Default model, 2 threads, 128 generated tokens per measurement. For each method and target
sparsity (25/40/50/70%) in one run: decode tokens/s as a ratio to dense decoding measured
right before it (same prompt, same run), the achieved sparsity during decoding, and the
perplexity on held-out text (the calibration text is the first 4k tokens of the default
corpus; the held-out text is the next 4k). ``teal-paper`` is TEAL as its paper describes it:
thresholds from dense-model statistics (one pass) with greedy per-layer allocation; ``teal``
is our default (uniform, re-measured in a second pass). TEAL's own kernel is GPU-only, so
every CPU row uses actscope's kernel. Writes bench/out/sparsify.json and a Markdown table.

``--compile`` decodes with ``sparsify.StaticDecoder(compile=True)`` instead of HF's ``generate``,
dense and sparse alike (each configuration compiles once, untimed), and also reports the
compiled dense rate against HF's dense ``generate``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

import actscope
from actscope.data import TokenBatches, load_tokens
from actscope.sparsify import apply, calibrate, kernel_status, perplexity

SPARSITIES = (0.25, 0.4, 0.5, 0.7)
PROMPT = "The Python language reference describes the syntax and the core semantics of the language. In"
VARIANTS = {
    "teal": dict(method="teal"),
    "teal-paper": dict(method="teal", allocation="greedy", passes=1),
    "wina": dict(method="wina"),
    "cats": dict(method="cats"),
    "chess": dict(method="chess", attention=True),
    "topk": dict(method="topk"),
    "coreinfer": dict(method="coreinfer"),
}


def decode_rate(model, ids: torch.Tensor, n: int, decoder=None) -> float:
    """Tokens/s of HF's greedy ``generate``, or of a ready ``StaticDecoder`` when one is given."""
    start = time.perf_counter()
    if decoder is None:
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    else:
        decoder.generate(ids, n)
    return n / (time.perf_counter() - start)


def compiled_decoder(model, ids: torch.Tensor, n: int):
    """A ``StaticDecoder(compile=True)`` for this prompt, compiled and warmed up (untimed)."""
    from actscope.sparsify import StaticDecoder

    dec = StaticDecoder(model, 1, ids.shape[1] + n, compile=True)
    dec.generate(ids, n)
    return dec


def write_plot(result: dict, path: Path) -> None:
    """The perplexity-vs-sparsity plot of a bench result, as a standalone SVG."""
    from actscope.sparsify.evaluate import SparsityEval, standalone_svg

    ev = SparsityEval(result["dense_ppl"])
    for r in result["rows"]:
        ev.curves.setdefault(r["method"], []).append({"target": r["target"], "achieved": r["achieved"], "ppl": r["ppl"]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(standalone_svg(ev.plot_svg()))
    for m in ev.curves:
        print(f"{m:>10}: PPL-1% sparsity {ev.ppl_p_sparsity(m, 1):.1%}, PPL-5% sparsity {ev.ppl_p_sparsity(m, 5):.1%}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--methods", default=",".join(VARIANTS))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--quick", action="store_true", help="small run to check the script")
    ap.add_argument("--speed-only", action="store_true", help="skip perplexity (e.g. for bfloat16 on CPU)")
    ap.add_argument("--plot", help="only redraw the plot of a saved result JSON into docs/img/sparsify/")
    ap.add_argument("--compile", action="store_true", help="decode with StaticDecoder(compile=True)")
    args = ap.parse_args()
    if args.plot:
        result = json.loads(Path(args.plot).read_text())
        write_plot(result, Path("docs/img/sparsify") / f"ppl_vs_sparsity-{result['dtype']}.svg")
        return
    if args.compile and "coreinfer" in args.methods.split(","):
        raise SystemExit("--compile runs one fixed step per configuration: CoreInfer's prompt detection cannot "
                         "live in it; pass --methods without coreinfer")
    if args.quick:
        args.new_tokens, args.calib_tokens, args.eval_tokens = 16, 1024, 1024
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    model, tok = actscope.load_model("default")  # float32; calibration always runs in float32
    dtype = getattr(torch, args.dtype)
    print(f"kernels: {kernel_status()}  dtype {args.dtype}  threads {torch.get_num_threads()}")
    seq = 256
    toks = load_tokens(None, tok, seq, args.calib_tokens + args.eval_tokens)
    n_cal = args.calib_tokens // seq
    cal = TokenBatches(toks.input_ids[:n_cal], toks.doc_ids[:n_cal], toks.source)
    held = TokenBatches(toks.input_ids[n_cal:], toks.doc_ids[n_cal:], toks.source)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    # bfloat16 prefill is slow on CPUs without bf16 matmul units, so thresholds are always
    # calibrated in float32 (they are dtype-free); decoding and perplexity run in the asked dtype.
    plan = []
    for name in args.methods.split(","):
        for s in SPARSITIES:
            t0 = time.perf_counter()
            config = calibrate(model, method=VARIANTS[name]["method"], sparsity=s, tokens=cal, progress=False,
                               **{k: v for k, v in VARIANTS[name].items() if k != "method"})
            plan.append((name, s, config, time.perf_counter() - t0))
    model.to(dtype)
    decode_rate(model, ids, 8)  # warm-up
    dense_dec = None
    if args.compile:
        torch._dynamo.config.recompile_limit = 64  # one compiled step per configuration
        with torch.inference_mode():
            dense_dec = compiled_decoder(model, ids, args.new_tokens)
            hf, comp = decode_rate(model, ids, args.new_tokens), decode_rate(model, ids, args.new_tokens, dense_dec)
        print(f"dense: HF generate {hf:.1f} tok/s, compiled static-cache step {comp:.1f} tok/s = {comp / hf:.2f}x")
    dense_ppl, _ = perplexity(model, held) if not args.speed_only else (float("nan"), 0.0)
    rows = []
    dense_rates = []
    print(f"dense perplexity {dense_ppl:.3f}")
    for name, s, config, cal_s in plan:
        with torch.inference_mode():
            dense = decode_rate(model, ids, args.new_tokens, dense_dec)
        dense_rates.append(dense)
        with torch.inference_mode(), apply(model, config) as handle:
            dec = compiled_decoder(model, ids, args.new_tokens) if args.compile else None
            decode_rate(model, ids, 4, dec)  # CoreInfer: fresh prompt; kernels warm
            handle.reset()
            rate = decode_rate(model, ids, args.new_tokens, dec)
            achieved = handle.achieved()["overall"]
        ppl, ppl_achieved = perplexity(model, held, config) if not args.speed_only else (float("nan"), achieved)
        # achieved: measured on the held-out continuations (after each prompt), i.e. while decoding
        row = dict(method=name, target=s, generate_achieved=achieved, achieved=ppl_achieved,
                   dense_tok_s=dense, tok_s=rate, ratio=rate / dense, ppl=ppl, calibrate_s=cal_s)
        rows.append(row)
        print(f"{name:>10} {s:.0%}: {rate:6.1f} tok/s = {rate / dense:.2f}x dense ({dense:.1f}); "
              f"achieved {ppl_achieved:.1%}; ppl {ppl:.2f} (dense {dense_ppl:.2f}); calibrate {cal_s:.0f}s", flush=True)
    out = Path("bench/out")
    out.mkdir(parents=True, exist_ok=True)
    result = dict(dtype=args.dtype, dense_ppl=dense_ppl, dense_tok_s=sum(dense_rates) / len(dense_rates),
                  new_tokens=args.new_tokens, rows=rows, kernels=kernel_status())
    suffix = "-compiled" if args.compile else ""
    (out / f"sparsify-{args.dtype}{suffix}.json").write_text(json.dumps(result, indent=1))
    if not args.speed_only:
        write_plot(result, Path("docs/img/sparsify") / f"ppl_vs_sparsity-{args.dtype}.svg")
    print(f"\n| method | target | achieved | decode speed vs dense | perplexity (dense {dense_ppl:.2f}) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['target']:.0%} | {r['achieved']:.1%} | {r['ratio']:.2f}x | {r['ppl']:.2f} |")


if __name__ == "__main__":
    main()
