"""The ``actscope`` command line: a thin layer over the Python API.

Bad input (an ``ActscopeError``) is printed as one line on stderr with exit status 2.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional

import typer

from .errors import ActscopeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])

ModelOpt = typer.Option("default", "--model", "-m", help='"default", an HF id, a local dir or a .gguf file')
DataOpt = typer.Option(None, "--data", "-d", help="text/JSONL/Parquet file or hf:NAME; default: Python's manual")


def _device(device: str) -> str:
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    local_rank = os.environ.get("LOCAL_RANK")
    if device == "cuda" and local_rank is not None:  # one GPU per torchrun rank
        device = f"cuda:{local_rank}"
    return device


@app.command()
def sites(
    model: str = typer.Argument("default", help='"default", an HF id, a local dir or a .gguf file'),
    pattern: Optional[List[str]] = typer.Option(None, "--pattern", "-p", help="only sites matching these"),
    seq_len: int = typer.Option(4, help="sequence length used to report shapes"),
) -> None:
    """Print every activation site of MODEL, one per line, with its shape."""
    from .inspect import site_shapes
    from .models import load_model

    m, _ = load_model(model)
    for name, shape in site_shapes(m, pattern or ["**"], seq_len=seq_len).items():
        typer.echo(f"{name}\t{list(shape)}")


@app.command()
def record(
    out: str = typer.Option(..., "--out", "-o", help="store folder (local path or fsspec URL)"),
    sites: List[str] = typer.Option(..., "--sites", "-s", help="site names, globs or module paths"),
    model: str = ModelOpt,
    data: Optional[str] = DataOpt,
    seq_len: int = typer.Option(128, "--seq-len", help="tokens per sequence"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="stop after this many tokens"),
    dtype: str = typer.Option("bfloat16", "--dtype", help="float32, bfloat16 or float16"),
    batch_size: int = typer.Option(8, "--batch-size", help="sequences per forward pass"),
    shard_mb: float = typer.Option(64, "--shard-mb", help="target shard size in MiB (at least one batch)"),
    text_field: str = typer.Option("text", "--text-field", help="JSONL/Parquet text field"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a store recorded differently"),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto"),
) -> None:
    """Stream a corpus through MODEL and write the chosen sites into a store; re-run to resume."""
    from .models import load_model, parse_dtype
    from .record import record as run_record

    parse_dtype(dtype)  # fail on a bad dtype before loading anything
    m, tok = load_model(model, device=_device(device))
    store = run_record(
        m, tok, out, sites, data,
        seq_len=seq_len, max_tokens=max_tokens, dtype=dtype, batch_size=batch_size,
        shard_mb=shard_mb, overwrite=overwrite, text_field=text_field,
    )
    if store is not None:
        typer.echo(f"store: {out}  ({len(store.sites)} sites x {store.num_tokens} tokens, {store.dtype})")


@app.command()
def scan(
    model: str = ModelOpt,
    data: Optional[str] = DataOpt,
    compare_data: Optional[str] = typer.Option(None, "--compare-data", help="a second corpus to compare with"),
    out: str = typer.Option("runs/scan", "--out", "-o", help="folder for report.json and report.html"),
    seq_len: int = typer.Option(128, "--seq-len"),
    max_tokens: Optional[int] = typer.Option(20_000, "--max-tokens"),
    batch_size: int = typer.Option(8, "--batch-size"),
    patterns: bool = typer.Option(True, "--patterns/--no-patterns", help="attention sinks need eager attention"),
    tau: Optional[float] = typer.Option(None, "--tau", help="activity threshold |a| > tau (default: 0 for ReLU, else 0.01)"),
    text_field: str = typer.Option("text", "--text-field"),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """One streaming pass over a corpus: sparsity, massive activations, sinks, layer use -> JSON + HTML."""
    from .models import load_model
    from .scan import scan as run_scan

    m, tok = load_model(model, device=_device(device))
    report = run_scan(
        m, tok, data, compare_data=compare_data, seq_len=seq_len, max_tokens=max_tokens,
        batch_size=batch_size, patterns=patterns, tau=tau, text_field=text_field,
    )
    page = report.save(out)
    for line in report["summary"]:
        typer.echo(f"- {line}")
    typer.echo(f"report: {page.resolve()}")
    typer.echo(f"json:   {(page.parent / 'report.json').resolve()}")


def _layers(spec: Optional[str]) -> Optional[list[int]]:
    """"8-20" or "3,5,7" -> layer indices; None -> all layers."""
    if not spec:
        return None
    out: list[int] = []
    try:
        for part in spec.split(","):
            a, _, b = part.partition("-")
            out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    except ValueError:
        raise ActscopeError(f"--layers {spec!r}: use a range like 8-20 or a list like 3,5,7") from None
    return out


def _prompts(path: str) -> list[str]:
    from .data import read_texts

    texts, _ = read_texts(path)
    lines = [line.strip() for t in texts for line in (t.splitlines() if path.endswith(".txt") else [t])]
    return [line for line in lines if line]


@app.command()
def steer(
    positive: str = typer.Option(..., "--positive", help="prompts, one per line (or JSONL)"),
    negative: str = typer.Option(..., "--negative", help="contrasting prompts, paired with --positive"),
    out: str = typer.Option(..., "--out", "-o", help="a .gguf control vector, or a folder (safetensors + JSON)"),
    model: str = ModelOpt,
    layers: Optional[str] = typer.Option(None, "--layers", help="e.g. 8-20 (default: all)"),
    method: str = typer.Option("mean_diff", "--method", help="mean_diff or pca"),
    position: str = typer.Option("last", "--position", help="last or mean"),
) -> None:
    """Compute a steering vector from contrastive prompts."""
    from .models import load_model
    from .steer import steering_vector

    m, tok = load_model(model)
    vec = steering_vector(m, tok, _prompts(positive), _prompts(negative), _layers(layers), method, position)
    path = vec.to_gguf(out) if out.endswith(".gguf") else vec.save_pretrained(out)
    norms = ", ".join(f"{l}:{float(vec.directions[l].norm()):.3g}" for l in vec.layers)
    typer.echo(f"steering vector ({method}, layers {vec.layers[0]}-{vec.layers[-1]}) -> {path}\nnorms {norms}")


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p"),
    model: str = ModelOpt,
    steer_path: Optional[str] = typer.Option(None, "--steer", help="a .gguf or saved steering vector"),
    scale: float = typer.Option(1.0, "--scale"),
    positions: str = typer.Option("all", "--positions", help="all, prompt or generated"),
    max_new_tokens: int = typer.Option(40, "--max-new-tokens"),
    compare: bool = typer.Option(False, "--compare", help="also print the unsteered (or dense) continuation"),
    sparsity_path: Optional[str] = typer.Option(None, "--sparsity", help="a folder from `actscope sparsify calibrate`"),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto"),
    static_cache: Optional[bool] = typer.Option(
        None, "--static-cache/--no-static-cache",
        help="decode over a static KV cache, one CUDA graph per step on a GPU (default: on for sparse decoding on "
        "CUDA, where HF's generate is launch-bound and would hide the sparse kernel's gain)"),
    compile_step: bool = typer.Option(
        False, "--compile", help="torch.compile the decoding step (implies --static-cache; compiling takes about "
        "a minute, then decoding is about 1.25x faster on CPU)"),
) -> None:
    """Greedy generation, optionally steered and/or with activation sparsity."""
    import time
    from contextlib import ExitStack

    from .errors import ActscopeError
    from .models import load_model
    from .sparsify import SparsityConfig, greedy_decode
    from .sparsify import apply as apply_sparsity
    from .steer import SteeringVector
    from .steer_effects import generate as run_generate

    m, tok = load_model(model, device=_device(device))
    vec = SteeringVector.from_pretrained(steer_path) if steer_path else None
    config = SparsityConfig.from_pretrained(sparsity_path) if sparsity_path else None
    stateful = vec is not None or (config is not None and config.method == "coreinfer")
    if static_cache is None:
        static_cache = compile_step or (config is not None and not stateful and m.device.type == "cuda")
    if compile_step and not static_cache:
        raise ActscopeError("--compile compiles the static-cache decoding step: drop --no-static-cache")
    if static_cache and stateful:
        raise ActscopeError("--static-cache and --compile run one fixed step: they cannot carry steering or "
                            "CoreInfer, whose hooks keep Python state across steps; drop them")

    def run() -> str:
        if not static_cache:
            return run_generate(m, tok, prompt, max_new_tokens)
        ids = tok(prompt, return_tensors="pt").input_ids.to(m.device)
        out = greedy_decode(m, ids, max_new_tokens, compile=compile_step)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    if compare and (vec is not None or config is not None):
        typer.echo(f"[plain] {prompt}{run()}")
    with ExitStack() as stack:
        if vec is not None:
            stack.enter_context(vec.apply(m, scale, positions=positions))
        handle = stack.enter_context(apply_sparsity(m, config)) if config is not None else None
        start = time.perf_counter()
        text = run()
        seconds = time.perf_counter() - start
    label = f"[steered x{scale:g}] " if vec is not None else ""
    typer.echo(f"{label}{prompt}{text}")
    if handle is not None:
        got = handle.achieved()
        typer.echo(f"[{got['targeted']:.0%} {handle.config.method}: achieved {got['overall']:.1%} sparsity, "
                   f"{max_new_tokens / seconds:.1f} tok/s{', compiling included' if compile_step else ''}]", err=True)


@app.command()
def patch(
    clean: str = typer.Option(..., "--clean", help="the clean prompt"),
    corrupted: str = typer.Option(..., "--corrupted", help="the corrupted prompt (same length in tokens)"),
    target: str = typer.Option(..., "--target", help="the clean answer token, e.g. ' Paris'"),
    foil: Optional[str] = typer.Option(None, "--foil", help="the corrupted answer (logit difference); default: the corrupted run's top token"),
    out: str = typer.Option("runs/patch", "--out", "-o"),
    model: str = ModelOpt,
    sites: List[str] = typer.Option(["resid_pre"], "--sites", help="resid_pre, resid_post, attn_out, mlp_out or site names"),
    metric: str = typer.Option("logit_diff", "--metric", help="logit_diff or prob"),
) -> None:
    """Activation patching over every (site, position): writes effects.json and effects.png."""
    import torch

    from .models import load_model
    from .patch import patch as run_patch

    m, tok = load_model(model)
    if metric == "logit_diff" and foil is None:
        ids = tok(corrupted, return_tensors="pt").input_ids
        with torch.inference_mode():
            foil_id = int(m(input_ids=ids).logits[0, -1].argmax())
        foil = tok.decode([foil_id])
    res = run_patch(m, tok, clean, corrupted, sites=sites if len(sites) > 1 else sites[0],
                    metric=metric, target=target, foil=foil)
    folder = res.save(out)
    best = divmod(int(res.effect.nan_to_num(0).abs().argmax()), len(res.positions))
    typer.echo(f"metric clean {res.clean:.3f}, corrupted {res.corrupted:.3f} (foil {foil!r}); "
               f"largest effect {float(res.effect[best]):.2f} at {res.sites[best[0]]}, position {res.positions[best[1]]} "
               f"({res.tokens[best[1]]!r})")
    typer.echo(f"effects: {(folder / 'effects.json').resolve()}  heatmap: {(folder / 'effects.png').resolve()}")


@app.command("trace")
def trace_cmd(
    prompt: str = typer.Option(..., "--prompt", "-p"),
    subject: str = typer.Option(..., "--subject", help="the words whose embeddings get noised"),
    target: str = typer.Option(..., "--target", help="the answer token, e.g. ' Paris'"),
    out: str = typer.Option("runs/trace", "--out", "-o"),
    model: str = ModelOpt,
    kind: str = typer.Option("resid", "--kind", help="resid, mlp or attn"),
    window: int = typer.Option(1, "--window", help="restore this many neighbouring layers together"),
    samples: int = typer.Option(10, "--samples", help="noise draws averaged"),
) -> None:
    """Causal tracing: noise the subject, restore each (layer, position), measure the target's probability."""
    from .causal import causal_trace
    from .models import load_model

    m, tok = load_model(model)
    res = causal_trace(m, tok, prompt, subject, target, kind=kind, window=window, samples=samples)
    folder = res.save(out)
    typer.echo(f"p(target): clean {res.clean:.3f}, subject noised {res.corrupted:.3f}")
    for j, (p, t) in enumerate(zip(res.positions, res.tokens)):
        col = res.effect[:, j]
        typer.echo(f"  position {p:2d} {t!r:>12}: strongest restore {float(col.max()):.2f} at layer {int(col.argmax())}")
    typer.echo(f"effects: {(folder / 'effects.json').resolve()}  heatmap: {(folder / 'effects.png').resolve()}")


from .cli_sparsify import sparsify_app  # noqa: E402  (sub-commands live in their own module)

app.add_typer(sparsify_app, name="sparsify")

from .cli_compare import compare_app  # noqa: E402

app.add_typer(compare_app, name="compare")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="actscope: %(message)s")
    try:
        app()
    except ActscopeError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; re-run the same command to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
