"""Benchmark on a CUDA GPU: the Triton sparse kernel, and bfloat16 greedy decoding with TEAL/WINA.

    python bench/sparsify_gpu.py [--quick] [--models smollm2-135m,llama-8b-shape] [--compile]

Part 1, kernel: ``F.linear`` (cuBLAS) time / Triton sparse kernel time for a 1-, 4- and
16-row bfloat16 input at 0-90% input sparsity, on the default model's shapes and on
Llama-3-8B's. Timed by ``triton.testing.do_bench_cudagraph`` (median of CUDA-graph replays, so
Python launch overhead is not counted; the sparse time includes zeroing the float32 split-K
output and casting it back to bfloat16).

Part 2, decoding: batch-1 greedy decoding of 128 tokens in bfloat16, dense against
``sparsify.apply`` at 25/40/50/70% (TEAL and WINA thresholds), with ``sparsify.StaticDecoder``:
each step replayed as one CUDA graph over a static KV cache (without graphs, decoding is bound
by Python and kernel launches, not by weight reads, and no kernel can speed it up; the eager
ratio is printed too). The GPU machine reaches no model hub and cannot carry the default model's weights, so the
models are randomly initialised from the real configs (SmolLM2-135M's and Llama-3-8B's), and
thresholds are calibrated on random tokens: the kernel's speed depends on how many inputs are
kept, which is measured and printed, not on what the weights mean. Perplexity is a CPU-bench
matter (bench/sparsify.py): thresholds are dtype- and device-free. ``--compile`` adds rows
decoded with ``StaticDecoder(compile=True)`` (``torch.compile`` inside the CUDA graph) at 50%.

``--sweep`` is the short form of issue 14's GPU check (bench/gpu_check.sh runs it on the 8B
shape, batch 1 and 4): TEAL at 25/40/50/70% with CUDA graphs, no eager rows, every point also
with the gather-first Triton kernel (``ACTSCOPE_TRITON_GATHER``) at 50%; with ``--compile`` the
compiled CUDA-graph step at 50% (dense and sparse compiled alike). The kernel table then also
times the gather-first kernel. ``--batches`` decodes several sequences at once.

``--variants`` names the decode variants to run, each against dense in the same run: words
joined by ``+`` from graph, eager, compiled, gather, one-launch, mask (the fused mask) and tuned
(tiles from ``--tiles``, the JSON ``bench/sparsify_gpu_tune.py`` writes), with ``@B`` to run one
at batch size B only; e.g. ``graph,one-launch+tuned,gather+one-launch+tuned@1``.
``--dry-run`` runs the decode loop on CPU with a tiny model, to check this script without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

SPARSITIES = (0.25, 0.4, 0.5, 0.7)
DEFAULT_TILES: list[dict] = [{}, {}]  # the kernel's own tiles, read at start
DEVICE = "cuda"  # "cpu" for --dry-run
CONFIGS = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                         max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,  # --dry-run
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True, max_position_embeddings=512),
    "llama-8b-shape": dict(  # also bench/sparsify.py's --shape llama-8b
                           hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                           max_position_embeddings=8192),
}


def kernel_table(quick: bool, only_8b: bool = False) -> list[dict]:
    import triton.testing

    from actscope.sparsify import triton_kernel as tk

    rows_out = []
    shapes = [("135m gate/up", 576, 1536), ("135m down", 1536, 576), ("8b gate/up", 4096, 14336),
              ("8b down", 14336, 4096), ("8b q/o", 4096, 4096), ("8b k/v", 4096, 1024)]
    g = torch.Generator(device="cuda").manual_seed(0)
    if only_8b:
        shapes = [sh for sh in shapes if sh[0].startswith("8b")]
    for label, d_in, d_out in shapes[:3] if quick else shapes:
        w = torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        wt = w.t().contiguous()
        for rows in (1, 4, 16):
            x = torch.randn(rows, d_in, device="cuda", dtype=torch.bfloat16, generator=g)
            dense = triton.testing.do_bench_cudagraph(lambda: F.linear(x, w), return_mode="median")
            for s in (0.0, 0.25, 0.5, 0.7, 0.9):
                t = torch.tensor([float(x.float().abs().flatten().kthvalue(max(1, int(s * x.numel()))).values) if s else -1.0], device="cuda")
                counter = torch.zeros(2, dtype=torch.int64, device="cuda")
                empty = torch.empty(0, device="cuda")
                y = tk.sparse_linear(x, wt, None, t, empty, counter)
                keep = x.float().abs() > t
                ref = ((x.float() * keep) @ wt.float())
                err = float((y.float() - ref).abs().max() / ref.abs().max())
                union = float(keep.any(0).float().mean())
                sparse = triton.testing.do_bench_cudagraph(
                    lambda: tk.sparse_linear(x, wt, None, t, empty, None, gather=False), return_mode="median")
                yg = tk.sparse_linear(x, wt, None, t, empty, None, gather=True)
                err_g = float((yg.float() - ref).abs().max() / ref.abs().max())
                gathered = triton.testing.do_bench_cudagraph(
                    lambda: tk.sparse_linear(x, wt, None, t, empty, None, gather=True), return_mode="median")
                r = dict(shape=label, d_in=d_in, d_out=d_out, rows=rows, sparsity=s, union_kept=union,
                         dense_us=dense * 1e3, sparse_us=sparse * 1e3, speedup=dense / sparse, rel_err=err,
                         gather_us=gathered * 1e3, gather_speedup=dense / gathered, gather_rel_err=err_g)
                rows_out.append(r)
                print(f"{label:>13} rows {rows:2d} sparsity {s:.0%} (union kept {union:.0%}): cuBLAS {dense*1e3:7.1f} us, "
                      f"sparse {sparse*1e3:7.1f} us, {dense/sparse:.2f}x, rel err {err:.1e}; gather-first "
                      f"{gathered*1e3:7.1f} us, {dense/gathered:.2f}x, rel err {err_g:.1e}", flush=True)
    return rows_out


def build(name: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**CONFIGS[name])
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def decode_rate(dec, prompt: torch.Tensor, n_new: int) -> float:
    """Tokens/s of one greedy continuation (prefill included) with a ready ``StaticDecoder``."""
    sync()
    start = time.perf_counter()
    dec.generate(prompt, n_new)
    sync()
    return n_new / (time.perf_counter() - start)


VARIANT_WORDS = {"graph", "eager", "compiled", "gather", "one-launch", "mask", "tuned"}


def parse_variants(spec: str) -> list[tuple[str, set[str], int | None]]:
    """``"graph,one-launch+tuned,gather+one-launch@1"``: (label, words, only this batch or None)."""
    out = []
    for item in spec.split(","):
        label, _, batch = item.partition("@")
        words = set(label.split("+"))
        if words - VARIANT_WORDS:
            raise SystemExit(f"unknown variant words {sorted(words - VARIANT_WORDS)}; known: {sorted(VARIANT_WORDS)}")
        out.append((label, words, int(batch) if batch else None))
    return out


def use_variant(words: set[str], tiles: dict | None) -> None:
    """Set the Triton kernel's module flags and tiles for one decode variant (tk's defaults first).
    A variant whose kernel failed earlier falls back to dense matmuls for good (``kernel.py``); each
    variant starts with the kernel on again, and ``fell_back`` says whether it kept it."""
    from actscope.sparsify import kernel
    from actscope.sparsify import triton_kernel as tk

    kernel.gpu_kernel(retry=True)
    tk.set_tiles(gemv=DEFAULT_TILES[0], dot=DEFAULT_TILES[1])
    tk.GATHER, tk.ONE_LAUNCH, tk.FUSED_MASK = "gather" in words, "one-launch" in words, "mask" in words
    if "tuned" in words:
        if not tiles:
            raise SystemExit("a 'tuned' variant needs --tiles (bench/sparsify_gpu_tune.py writes the file)")
        gemv = tiles.get("GATHER" if "gather" in words else "GEMV")
        if gemv is None:
            print(f"{'+'.join(sorted(words))}: the tuner found no working tiles; the defaults run", flush=True)
        tk.set_tiles(gemv=gemv, dot=tiles.get("DOT"))


def fell_back(words: set[str]) -> bool:
    """Whether the Triton kernel (or, for ``mask``, the mask kernel) failed and was switched off."""
    from actscope.sparsify import kernel
    from actscope.sparsify import triton_kernel as tk

    if DEVICE != "cuda" or os.environ.get("ACTSCOPE_NO_KERNEL"):  # off on purpose: nothing failed
        return False
    return kernel.gpu_kernel() is None or ("mask" in words and not tk.FUSED_MASK)


def decode_table(names: list[str], quick: bool, variants: list, batches: tuple[int, ...] = (1,),
                 sparsities: tuple[float, ...] = SPARSITIES, methods: tuple[str, ...] = ("teal", "wina"),
                 n_new: int = 128, tiles: dict | None = None, out=None) -> list[dict]:
    from actscope.data import TokenBatches
    from actscope.sparsify import StaticDecoder, apply, calibrate

    rows = []
    for name in names:
        model = build(name)
        vocab = model.config.vocab_size
        gen = torch.Generator().manual_seed(1)
        n_cal = 2 if "8b" in name else 8
        ids = torch.randint(0, vocab, (n_cal, 128), generator=gen)
        cal = TokenBatches(ids, torch.zeros_like(ids, dtype=torch.int32), "random tokens")
        n_new = 32 if quick else n_new
        plan = []
        for method in methods:
            for s in sparsities:
                plan.append((method, s, calibrate(model, method=method, sparsity=s, tokens=cal, progress=False,
                                                  passes=1 if "8b" in name else 2)))
        for batch in batches:
            prompt = torch.randint(0, vocab, (batch, 32), generator=gen).to(DEVICE)
            for label, words, only in variants:
                if only is not None and only != batch:
                    continue
                graph, comp = "eager" not in words and DEVICE == "cuda", "compiled" in words and DEVICE == "cuda"
                use_variant(words, tiles)
                dense_dec = StaticDecoder(model, batch, prompt.shape[1] + n_new, cuda_graph=graph, compile=comp)
                decode_rate(dense_dec, prompt, n_new)  # capture / warm-up
                for method, s, config in plan:
                    if words & {"eager", "compiled"} and s != 0.5:
                        continue  # eager decoding is launch-bound, compiling is slow: one point each
                    dense = decode_rate(dense_dec, prompt, n_new)
                    with torch.inference_mode(), apply(model, config) as handle:
                        dec = StaticDecoder(model, batch, prompt.shape[1] + n_new, cuda_graph=graph, compile=comp)
                        decode_rate(dec, prompt, n_new)  # capture / warm-up
                        handle.reset()
                        rate = decode_rate(dec, prompt, n_new)
                        achieved = handle.achieved()["overall"]
                        del dec
                    r = dict(model=name, batch=batch, variant=label, graph=graph, compiled=comp,
                             gather="gather" in words, method=method, target=s, achieved=achieved, new_tokens=n_new,
                             dense_tok_s=dense, tok_s=rate, ratio=rate / dense, fell_back=fell_back(words))
                    rows.append(r)
                    print(f"{name} batch {batch} {label} {method} {s:.0%}: {rate:7.1f} tok/s = {rate/dense:.2f}x "
                          f"dense ({dense:.1f}); achieved {achieved:.1%}"
                          + ("; THE KERNEL FAILED: dense matmuls were timed" if r["fell_back"] else ""), flush=True)
                    if out is not None:  # after every row, so a run cut off by a time limit keeps its rows
                        out(rows)
                del dense_dec
        use_variant(set(), None)
        del model
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="smollm2-135m,llama-8b-shape")
    ap.add_argument("--skip-kernel", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also decode with StaticDecoder(compile=True) at 50%%")
    ap.add_argument("--sweep", action="store_true", help="issue 14's short check: TEAL 25-70%% with CUDA graphs, "
                    "the gather-first kernel at 50%%, 8B kernel shapes only")
    ap.add_argument("--batches", default="1", help="sequences decoded at once, e.g. 1,4")
    ap.add_argument("--variants", default=None, help="decode variants, comma-separated, words joined by '+' "
                    f"from {sorted(VARIANT_WORDS)}, '@B' for one batch size only (default: from --sweep/--compile)")
    ap.add_argument("--tiles", default=None, help="tile settings from bench/sparsify_gpu_tune.py (its 'best')")
    ap.add_argument("--sparsities", default=None, help="e.g. 0.5,0.7 (default 0.25,0.4,0.5,0.7)")
    ap.add_argument("--methods", default=None, help="teal,wina (default; --sweep: teal)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens decoded (default 128; --sweep 32)")
    ap.add_argument("--out", default="bench/out/sparsify-gpu.json")
    ap.add_argument("--dry-run", action="store_true", help="check this script on CPU: a tiny model, no graphs")
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # transformers' and torch's notices, but not ours:
    warnings.filterwarnings("always", message="actscope")  # a kernel that fails is printed, every time
    global DEVICE
    if args.dry_run:
        DEVICE, args.models, args.skip_kernel = "cpu", "tiny", True
    elif not torch.cuda.is_available():
        raise SystemExit("bench/sparsify_gpu.py needs a CUDA GPU")
    from actscope.sparsify import triton_kernel as tk

    DEFAULT_TILES[:] = [dict(tk.GEMV), dict(tk.DOT)]
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (dry run)"
    print(f"{name}  torch {torch.__version__}", flush=True)
    result = dict(device=name, torch=torch.__version__)
    result["kernel"] = [] if args.skip_kernel else kernel_table(args.quick, only_8b=args.sweep)
    if args.compile or (args.variants and "compiled" in args.variants):
        torch._dynamo.config.recompile_limit = 64  # one compiled step per configuration
    spec = args.variants or ",".join(["graph", "graph+gather" if args.sweep else "eager"]
                                     + (["compiled"] if args.compile else []))
    tiles = json.loads(Path(args.tiles).read_text())["best"] if args.tiles else None
    batches = tuple(int(b) for b in args.batches.split(","))
    sparsities = tuple(float(s) for s in args.sparsities.split(",")) if args.sparsities else SPARSITIES
    methods = tuple(args.methods.split(",")) if args.methods else (("teal",) if args.sweep else ("teal", "wina"))
    n_new = args.new_tokens or (32 if args.sweep else 128)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def write(rows: list[dict]) -> None:
        Path(args.out).write_text(json.dumps(dict(result, decode=rows), indent=1))

    result["decode"] = decode_table(args.models.split(","), args.quick, parse_variants(spec), batches, sparsities,
                                    methods, n_new, tiles, write)
    write(result["decode"])
    print("\n| model | batch | variant | method | target | achieved | new tokens | decode speed vs dense bf16 |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in result["decode"]:
        print(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['method']} | {r['target']:.0%} | "
              f"{r['achieved']:.1%} | {r['new_tokens']} | {r['ratio']:.2f}x ({r['dense_tok_s']:.0f} tok/s dense)"
              + (" kernel failed, dense timed |" if r["fell_back"] else " |"))


if __name__ == "__main__":
    main()
