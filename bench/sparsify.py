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
dense and sparse alike (compiled and warmed up untimed), and also reports the
compiled dense rate against HF's dense ``generate``. ``--modes hf,compiled,cpp`` picks the
decoding paths instead (``cpp``: the compiled step with ``cpp_wrapper=True``), and
``--repeats N`` alternates dense and sparse N times per point and reports the median ratio.
``teal-unfused`` is ``teal`` with one kernel call per linear (``sparsify.swap.FUSE_GROUPS``
off), to measure what running q/k/v and gate/up as one call gives.

``--shape llama-1b`` (or ``llama-8b``, bfloat16 only, where memory allows) measures a model
larger than the caches instead: random weights from a Llama-3.2-1B-shaped (Llama-3-8B-shaped)
config, TEAL thresholds calibrated on the default corpus through the default tokenizer (speed
depends only on the achieved sparsity, which is printed), dense against sparse at
``--sparsities`` (default 50%), in ``--dtypes`` and ``--batches``. Per point: tokens/s with HF's
``generate`` (``--compile``: with the compiled static-cache step), the ratio to dense measured
side by side (``--repeats`` interleaved runs, median), the weight bytes one step reads at the
achieved sparsity and the GB/s that makes, the resident memory outside and inside
``sparsify.apply`` with its overhead as a share of the weight bytes, and the peak RSS. The CPU
model and its vector ISA head the output. Writes bench/out/sparsify-<shape>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import actscope
from actscope.data import TokenBatches, load_tokens
from actscope.sparsify import apply, calibrate, kernel_status, perplexity
from actscope.sparsify import swap

SPARSITIES = (0.25, 0.4, 0.5, 0.7)
SHAPES = {  # the real models' configs; weights are random (the GPU bench uses the same 8B one)
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                     rope_theta=500000.0, max_position_embeddings=8192),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                     rope_theta=500000.0, max_position_embeddings=8192),
}
PROMPT = "The Python language reference describes the syntax and the core semantics of the language. In"
VARIANTS = {  # "fuse": False runs q/k/v and gate/up as one kernel call each (sparsify.swap.FUSE_GROUPS)
    "teal": dict(method="teal"),
    "teal-unfused": dict(method="teal", fuse=False),
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
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
    else:
        decoder.generate(ids, n)
    return n / (time.perf_counter() - start)


def compiled_decoder(model, ids: torch.Tensor, n: int, mode: str = "compiled"):
    """A ``StaticDecoder(compile=True)`` for this prompt, compiled and warmed up (untimed);
    ``mode="cpp"``: with ``cpp_wrapper=True``. ``mode="hf"``: ``None`` (HF's ``generate``)."""
    from actscope.sparsify import StaticDecoder

    if mode == "hf":
        return None
    dec = StaticDecoder(model, 1, ids.shape[1] + n, compile=True, cpp_wrapper=mode == "cpp")
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


def rss_mib() -> tuple[float, float]:
    """(resident, peak resident) MiB of this process, from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def default_model_with_teal(sparsity: float = 0.5, calib_tokens: int = 512, more_tokens: int = 0):
    """(model, tokenizer, TEAL config calibrated on the first ``calib_tokens`` of the default
    corpus, the tokens of the ``more_tokens`` that follow): the setup of the default-model
    scripts beside this one (2 threads, warnings off)."""
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    model, tok = actscope.load_model("default")
    toks = load_tokens(None, tok, 256, calib_tokens + more_tokens)
    n = calib_tokens // 256
    cal = TokenBatches(toks.input_ids[:n], toks.doc_ids[:n], toks.source)
    config = calibrate(model, method="teal", sparsity=sparsity, tokens=cal, progress=False)
    return model, tok, config, toks.input_ids[n:]


def cpu_description() -> str:
    sys.path.insert(0, str(Path(__file__).parent))
    from sparse_kernel import cpu_name

    return cpu_name()


def step_bytes(model, handle=None) -> tuple[int, int]:
    """(bytes of the weights one decoding step reads when dense, bytes it reads at the achieved
    sparsity): every linear weight and the unembedding; a sparsified linear reads its kept share
    (for several rows per step, the per-row share: a lower bound on the union actually read)."""
    from actscope.sparsify.swap import SparseLinear

    dense = sparse = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if not isinstance(m, (torch.nn.Linear, SparseLinear)) or w is None:
            continue
        b = w.numel() * w.element_size()
        dense += b
        kept = 1.0
        if handle is not None and isinstance(m, SparseLinear) and m.counter[1] > 0:
            kept = 1.0 - m.achieved
        sparse += int(b * kept)
    return dense, sparse


def shape_bench(args) -> None:
    """``--shape``: dense against sparse decoding on a random model of a real model's shape."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from actscope.sparsify import StaticDecoder

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    if args.shape == "llama-8b" and torch.float32 in dtypes:
        raise SystemExit("--shape llama-8b runs in bfloat16 only (float32 would need 32 GB): pass --dtypes bfloat16")
    print(f"CPU: {cpu_description()}; kernels {kernel_status()}; threads {torch.get_num_threads()}; "
          f"torch {torch.__version__}", flush=True)
    _, tok = actscope.load_model("default")  # the default tokenizer; its ids fit the larger vocabulary
    seq = 256
    toks = load_tokens(None, tok, seq, args.calib_tokens + 8 * seq)
    n_cal = max(1, args.calib_tokens // seq)
    cal = TokenBatches(toks.input_ids[:n_cal], toks.doc_ids[:n_cal], toks.source)
    held = toks.input_ids[n_cal:]
    build_dtype = dtypes[0]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[args.shape]), dtype=build_dtype,
                                             attn_implementation="sdpa").eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.shape}: {n_params / 1e9:.2f}B parameters, random init in {time.perf_counter() - t0:.0f}s", flush=True)
    plan = []
    for s in [float(v) for v in args.sparsities.split(",")]:
        t0 = time.perf_counter()
        config = calibrate(model, method="teal", sparsity=s, tokens=cal, passes=1, progress=False,
                           batch_size=1)
        plan.append((s, config))
        print(f"calibrated TEAL {s:.0%} on {cal.input_ids.numel()} tokens of the default corpus "
              f"({build_dtype}) in {time.perf_counter() - t0:.0f}s", flush=True)
    if args.compile:
        torch._dynamo.config.recompile_limit = 64
    rows = []
    for dtype in dtypes:
        model.to(dtype)
        for batch in [int(b) for b in args.batches.split(",")]:
            ids = held[:batch, :32].clone()
            n = args.new_tokens

            def decoder(model=model, ids=ids):
                if not args.compile:
                    return None
                dec = StaticDecoder(model, ids.shape[0], ids.shape[1] + n, compile=True)
                dec.generate(ids, n)  # compile, untimed
                return dec

            with torch.inference_mode():
                dense_dec = decoder()
                decode_rate(model, ids, 2, dense_dec)  # warm-up
                reset_peak_rss()
                decode_rate(model, ids, 2, dense_dec)
                rss_dense, peak_dense = rss_mib()
            for s, config in plan:
                dense_rates, sparse_rates = [], []
                with torch.inference_mode():  # dense runs bracket the sparse ones: before and after
                    dense_rates.append(decode_rate(model, ids, n, dense_dec))
                with torch.inference_mode(), apply(model, config) as handle:
                    reset_peak_rss()
                    dec = decoder()
                    decode_rate(model, ids, 2, dec)  # warm-up
                    handle.reset()
                    for _ in range(args.repeats):
                        sparse_rates.append(decode_rate(model, ids, n, dec))
                    achieved = handle.achieved()["overall"]
                    rss_sparse, peak_sparse = rss_mib()
                    dense_b, sparse_b = step_bytes(model, handle)
                with torch.inference_mode():
                    for _ in range(max(1, args.repeats - 1)):
                        dense_rates.append(decode_rate(model, ids, n, dense_dec))
                dense, rate = statistics.median(dense_rates), statistics.median(sparse_rates)
                weight_b = sum(p.numel() * p.element_size() for p in model.parameters())
                row = dict(shape=args.shape, dtype=str(dtype).split(".")[1], batch=batch, target=s, achieved=achieved,
                           decode="compiled" if args.compile else "hf-generate", new_tokens=n,
                           dense_tok_s=dense, tok_s=rate, ratio=rate / dense, dense_runs=dense_rates,
                           sparse_runs=sparse_rates, dense_gbs=dense_b * dense / 1e9,
                           sparse_gbs=sparse_b * rate / 1e9, weight_mib=weight_b / 2**20,
                           rss_dense_mib=rss_dense, rss_sparse_mib=rss_sparse, peak_dense_mib=peak_dense,
                           peak_sparse_mib=peak_sparse,
                           rss_overhead=(max(rss_sparse, peak_sparse) - rss_dense) * 2**20 / weight_b)
                rows.append(row)
                print(f"{args.shape} {row['dtype']} batch {batch} TEAL {s:.0%} (achieved {achieved:.1%}): "
                      f"{rate:.2f} tok/s = {rate / dense:.2f}x dense ({dense:.2f}); runs {[f'{r:.2f}' for r in sparse_rates]} "
                      f"vs {[f'{r:.2f}' for r in dense_rates]}; {row['sparse_gbs']:.1f} GB/s sparse, "
                      f"{row['dense_gbs']:.1f} GB/s dense; RSS {rss_dense:.0f} MiB dense, {rss_sparse:.0f} MiB "
                      f"inside apply (peak {peak_sparse:.0f}): {row['rss_overhead']:+.1%} of {weight_b / 2**20:.0f} "
                      f"MiB weights", flush=True)
            del dense_dec
    out = Path("bench/out")
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-compiled" if args.compile else ""
    (out / f"sparsify-{args.shape}{suffix}.json").write_text(
        json.dumps(dict(cpu=cpu_description(), torch=torch.__version__, kernels=kernel_status(), rows=rows), indent=1))
    print(f"\nCPU: {cpu_description()}\n")
    print("| dtype | batch | target | achieved | dense tok/s | sparse tok/s | ratio | GB/s dense / sparse | "
          "RSS dense -> inside apply (MiB) | overhead / weights |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['batch']} | {r['target']:.0%} | {r['achieved']:.1%} | {r['dense_tok_s']:.2f} | "
              f"{r['tok_s']:.2f} | {r['ratio']:.2f}x | {r['dense_gbs']:.1f} / {r['sparse_gbs']:.1f} | "
              f"{r['rss_dense_mib']:.0f} -> {r['rss_sparse_mib']:.0f} (peak {r['peak_sparse_mib']:.0f}) | "
              f"{r['rss_overhead']:+.1%} |")


def measure_modes(model, ids, config, name: str, modes: list[str], dense_decs: dict, args) -> dict:
    """Per decoding mode: median dense and sparse tok/s, achieved sparsity, and the median of the
    ratios of ``args.repeats`` alternating dense/sparse runs."""
    got = {}
    for mode in modes:
        if mode != "hf" and name == "coreinfer":
            continue
        with torch.inference_mode(), apply(model, config):
            dec = compiled_decoder(model, ids, args.new_tokens, mode)
        runs = []
        for _ in range(args.repeats):  # dense and sparse alternate; each ratio pairs neighbours
            with torch.inference_mode():
                dense = decode_rate(model, ids, args.new_tokens, dense_decs.get(mode))
            with torch.inference_mode(), apply(model, config) as handle:
                decode_rate(model, ids, 4, dec)  # untimed: CoreInfer's fresh prompt; a re-trace if any
                handle.reset()
                rate = decode_rate(model, ids, args.new_tokens, dec)
                runs.append((dense, rate, handle.achieved()["overall"]))
        got[mode] = (statistics.median(d for d, _, _ in runs), statistics.median(r for _, r, _ in runs),
                     runs[-1][2], statistics.median(r / d for d, r, _ in runs))
    return got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a random model of this real model's shape (see above)")
    ap.add_argument("--sparsities", help="targets, e.g. 0.25,0.4,0.5,0.7 (default: 0.5 with --shape, else all four)")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="--shape only")
    ap.add_argument("--batches", default="1,4", help="--shape only")
    ap.add_argument("--repeats", type=int, default=None,
                    help="interleaved dense/sparse runs per point, ratio = median (default 2 with --shape, else 1)")
    ap.add_argument("--modes", help="decoding paths, of hf (HF generate), compiled (StaticDecoder(compile=True)), "
                    "cpp (the same with cpp_wrapper=True); default hf,compiled")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--methods", default=",".join(VARIANTS))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--quick", action="store_true", help="small run to check the script")
    ap.add_argument("--speed-only", action="store_true", help="skip perplexity (e.g. for bfloat16 on CPU)")
    ap.add_argument("--plot", help="only redraw the plot of a saved result JSON into docs/img/sparsify/")
    ap.add_argument("--compile", action="store_true", help="decode with StaticDecoder(compile=True)")
    ap.add_argument("--hf", action="store_true", help="decode with HF's generate (the default without --shape is "
                    "to report both HF's generate and the compiled static-cache step)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.shape:
        args.repeats = args.repeats or 2
        args.sparsities = args.sparsities or "0.5"
        if args.new_tokens == 128:
            args.new_tokens = 16
        if args.calib_tokens == 4096:
            args.calib_tokens = 256
        shape_bench(args)
        return
    args.repeats = max(1, args.repeats or 1)
    if args.plot:
        result = json.loads(Path(args.plot).read_text())
        write_plot(result, Path("docs/img/sparsify") / f"ppl_vs_sparsity-{result['dtype']}.svg")
        return
    modes = ["hf"] if args.hf else ["compiled"] if args.compile else ["hf", "compiled"]
    modes = args.modes.split(",") if args.modes else modes
    if "hf" not in modes and "coreinfer" in args.methods.split(","):
        raise SystemExit("--compile runs one fixed step per configuration: CoreInfer's prompt detection cannot "
                         "live in it; pass --methods without coreinfer")
    if args.quick:
        args.new_tokens, args.calib_tokens, args.eval_tokens = 16, 1024, 1024
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    model, tok = actscope.load_model("default")  # float32; calibration always runs in float32
    dtype = getattr(torch, args.dtype)
    print(f"CPU: {cpu_description()}; kernels: {kernel_status()}  dtype {args.dtype}  threads {torch.get_num_threads()}"
          f"  decoding: {' and '.join(modes)}")
    seq = 256
    toks = load_tokens(None, tok, seq, args.calib_tokens + args.eval_tokens)
    n_cal = args.calib_tokens // seq
    cal = TokenBatches(toks.input_ids[:n_cal], toks.doc_ids[:n_cal], toks.source)
    held = TokenBatches(toks.input_ids[n_cal:], toks.doc_ids[n_cal:], toks.source)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    # bfloat16 prefill is slow on CPUs without bf16 matmul units, so thresholds are always
    # calibrated in float32 (they are dtype-free); decoding and perplexity run in the asked dtype.
    plan = []
    targets = [float(v) for v in args.sparsities.split(",")] if args.sparsities else SPARSITIES
    for name in args.methods.split(","):
        for s in targets:
            t0 = time.perf_counter()
            config = calibrate(model, method=VARIANTS[name]["method"], sparsity=s, tokens=cal, progress=False,
                               **{k: v for k, v in VARIANTS[name].items() if k not in ("method", "fuse")})
            plan.append((name, s, config, time.perf_counter() - t0))
    model.to(dtype)
    decode_rate(model, ids, 8)  # warm-up
    dense_decs = {}
    if set(modes) - {"hf"}:
        # each apply() makes new modules, which a compiled step may guard on: the step is then
        # re-traced (Inductor's cache makes that quick) in the untimed warm-up before each timing
        torch._dynamo.config.recompile_limit = 1024
        torch._dynamo.config.accumulated_recompile_limit = 4096
        with torch.inference_mode():
            dense_decs = {m: compiled_decoder(model, ids, args.new_tokens, m) for m in modes}
            hf = decode_rate(model, ids, args.new_tokens)
            comp = {m: decode_rate(model, ids, args.new_tokens, d) for m, d in dense_decs.items() if d is not None}
        print(f"dense: HF generate {hf:.1f} tok/s; " + "; ".join(f"{m} {r:.1f} tok/s = {r / hf:.2f}x"
                                                              for m, r in comp.items()))
    dense_ppl, _ = perplexity(model, held) if not args.speed_only else (float("nan"), 0.0)
    rows = []
    dense_rates = []
    print(f"dense perplexity {dense_ppl:.3f}")
    for name, s, config, cal_s in plan:
        swap.FUSE_GROUPS = VARIANTS[name].get("fuse", True)
        try:
            got = measure_modes(model, ids, config, name, modes, dense_decs, args)
        finally:
            swap.FUSE_GROUPS = True
        first = got[modes[0]] if modes[0] in got else next(iter(got.values()))
        dense, rate, achieved, ratio = first
        dense_rates.append(dense)
        ppl, ppl_achieved = perplexity(model, held, config) if not args.speed_only else (float("nan"), achieved)
        # achieved: measured on the held-out continuations (after each prompt), i.e. while decoding
        row = dict(method=name, target=s, generate_achieved=achieved, achieved=ppl_achieved,
                   dense_tok_s=dense, tok_s=rate, ratio=ratio, ppl=ppl, calibrate_s=cal_s,
                   decode=modes[0] if modes[0] in got else "hf")
        for mode, (d, r, _, q) in got.items():
            row[f"{mode}_dense_tok_s"], row[f"{mode}_tok_s"], row[f"{mode}_ratio"] = d, r, q
        rows.append(row)
        speeds = "; ".join(f"{m}: {r:6.1f} tok/s = {q:.2f}x dense ({d:.1f})" for m, (d, r, _, q) in got.items())
        print(f"{name:>10} {s:.0%}: {speeds}; achieved {ppl_achieved:.1%}; ppl {ppl:.2f} (dense {dense_ppl:.2f}); "
              f"calibrate {cal_s:.0f}s", flush=True)
    out = Path("bench/out")
    out.mkdir(parents=True, exist_ok=True)
    result = dict(dtype=args.dtype, dense_ppl=dense_ppl, dense_tok_s=sum(dense_rates) / len(dense_rates),
                  new_tokens=args.new_tokens, rows=rows, kernels=kernel_status())
    suffix = "-compiled" if modes == ["compiled"] else "-hf" if modes == ["hf"] else ""
    (out / f"sparsify-{args.dtype}{suffix}.json").write_text(json.dumps(result, indent=1))
    if not args.speed_only:
        write_plot(result, Path("docs/img/sparsify") / f"ppl_vs_sparsity-{args.dtype}.svg")
    cols = [m for m in modes]
    print(f"\nCPU: {cpu_description()}")
    print("| method | target | achieved | " + " | ".join(f"speed vs dense ({m})" for m in cols)
          + f" | perplexity (dense {dense_ppl:.2f}) |")
    print("|---|---|---|" + "---|" * len(cols) + "---|")
    for r in rows:
        cells = " | ".join(f"{r[m + '_ratio']:.2f}x" if m + "_ratio" in r else "n/a" for m in cols)
        print(f"| {r['method']} | {r['target']:.0%} | {r['achieved']:.1%} | {cells} | {r['ppl']:.2f} |")

if __name__ == "__main__":
    main()
