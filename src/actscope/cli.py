"""The ``actscope`` command line: a thin layer over the Python API.

Bad input (an ``ActscopeError``) is printed as one line on stderr with exit status 2. The options
that several commands share (``--model``, ``--data``, ``--out``, ...) are defined once, in
``cli_options``; ``-p`` is always ``--prompt``, and list options are repeated.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Annotated, List, Optional

import typer

from .cli_generate import generate
from .cli_options import (BatchSize, Data, Device, MaxTokens, Model, Out, Prompt, SeqLen, TextField, deprecated,
                          device_name, split_list)
from .errors import ActscopeError
from .intervene.metrics import METRICS
from .intervene.sites import OLD_KINDS, shorthands
from .validate import positive_int

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])


@app.command()
def sites(
    model: Model = "default",
    pattern: Annotated[Optional[List[str]], typer.Option(
        "--pattern", help="only sites matching this name or glob; repeat for several")] = None,
    seq_len: SeqLen = 4,
    device: Device = "cpu",
    model_arg: Annotated[Optional[str], typer.Argument(
        hidden=True, show_default=False, help="deprecated: use --model")] = None,
    old_pattern: Annotated[Optional[List[str]], typer.Option(
        "-p", hidden=True, help="deprecated: use --pattern (-p means --prompt)")] = None,
) -> None:
    """Print every activation site of the model, one per line, with its shape on a [1, --seq-len] input."""
    from .inspect import site_shapes
    from .models import load_model

    if model_arg is not None:
        if model != "default":
            raise ActscopeError(f"two models given: {model_arg!r} and --model {model!r}; use --model only")
        deprecated("`actscope sites MODEL`", "`actscope sites --model MODEL`")
        model = model_arg
    if old_pattern:
        deprecated("`actscope sites -p PATTERN`", "--pattern PATTERN (-p means --prompt)")
    m, _ = load_model(model, device=device_name(device))
    for name, shape in site_shapes(m, [*(pattern or []), *(old_pattern or [])] or ["**"], seq_len=seq_len).items():
        typer.echo(f"{name}\t{list(shape)}")


@app.command()
def record(
    out: Out,
    sites: Annotated[List[str], typer.Option(
        "--sites", "-s", help="a site name, glob or module path; repeat for several")],
    model: Model = "default",
    data: Data = None,
    seq_len: SeqLen = 128,
    max_tokens: MaxTokens = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16")] = "bfloat16",
    batch_size: BatchSize = 8,
    shard_mb: Annotated[float, typer.Option(
        "--shard-mb", help="target shard size in MiB (at least one batch)")] = 64,
    text_field: TextField = "text",
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="start the store afresh (removes only a store's own files)")] = False,
    verify: Annotated[bool, typer.Option(
        "--verify", help="on resume, also check every existing shard's checksums (header and size are always checked)")] = False,
    device: Device = "auto",
) -> None:
    """Stream a corpus through the model and write the chosen sites into the store at --out; re-run to resume."""
    from .models import load_model
    from .record import check_record_args
    from .record import record as run_record

    # bad values fail before the model loads, and never reach a manifest
    check_record_args(out, sites, seq_len=seq_len, max_tokens=max_tokens, dtype=dtype, batch_size=batch_size,
                      shard_mb=shard_mb)
    m, tok = load_model(model, device=device_name(device))
    store = run_record(
        m, tok, out, sites, data,
        seq_len=seq_len, max_tokens=max_tokens, dtype=dtype, batch_size=batch_size,
        shard_mb=shard_mb, overwrite=overwrite, verify=verify, text_field=text_field,
    )
    if store is not None:
        typer.echo(f"store: {out}  ({len(store.sites)} sites x {store.num_tokens} tokens, {store.dtype})")


@app.command()
def scan(
    model: Model = "default",
    data: Data = None,
    compare_data: Annotated[Optional[str], typer.Option(
        "--compare-data", help="a second corpus to compare with (active-dormant heads)")] = None,
    out: Out = "runs/scan",
    seq_len: SeqLen = 128,
    max_tokens: MaxTokens = 20_000,
    batch_size: BatchSize = 8,
    patterns: Annotated[bool, typer.Option(
        "--patterns/--no-patterns", help="attention patterns and sinks (they need eager attention)")] = True,
    tau: Annotated[Optional[float], typer.Option(
        "--tau", help="activity threshold |a| > tau (default: 0 for ReLU, else 0.01)")] = None,
    text_field: TextField = "text",
    device: Device = "auto",
) -> None:
    """One streaming pass over a corpus: sparsity, massive activations, sinks, layer use -> report.json and
    report.html in --out."""
    from .models import load_model
    from .report.build import check_report_folder
    from .scan import ScanConfig, check_config
    from .scan import scan as run_scan

    # bad settings and an unusable --out fail now, not after the whole pass
    check_config(ScanConfig(seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size, patterns=patterns, tau=tau))
    check_report_folder(out)
    m, tok = load_model(model, device=device_name(device))
    report = run_scan(
        m, tok, data, compare_data=compare_data, seq_len=seq_len, max_tokens=max_tokens,
        batch_size=batch_size, patterns=patterns, tau=tau, text_field=text_field,
    )
    page = report.save(out)
    for line in report["summary"]:
        typer.echo(f"- {line}")
    typer.echo(f"report: {page.resolve()}")
    typer.echo(f"json:   {(page.parent / 'report.json').resolve()}")


def _layers(specs: Optional[List[str]]) -> Optional[list[int]]:
    """["8-20"], ["3,5,7"] or ["3", "5-7"] -> layer indices; none -> all layers."""
    out: list[int] = []
    for part in split_list(specs):
        try:
            a, _, b = part.partition("-")
            out += list(range(int(a), int(b) + 1)) if b else [int(a)]
        except ValueError:
            raise ActscopeError(f"--layers {part!r}: use a range like 8-20 or a layer like 5 (repeat --layers "
                                "for several)") from None
    return out or None


def _prompts(path: str) -> list[str]:
    from .data import read_texts

    texts, _ = read_texts(path)
    lines = [line.strip() for t in texts for line in (t.splitlines() if path.endswith(".txt") else [t])]
    return [line for line in lines if line]


@app.command()
def steer(
    positive: Annotated[str, typer.Option("--positive", help="a file of prompts, one per line (or JSONL)")],
    negative: Annotated[str, typer.Option(
        "--negative", help="a file of contrasting prompts, paired with --positive")],
    out: Out,
    model: Model = "default",
    layers: Annotated[Optional[List[str]], typer.Option(
        "--layers", help="a layer or a range like 8-20; repeat for several (default: all)")] = None,
    method: Annotated[str, typer.Option("--method", help="mean_diff or pca")] = "mean_diff",
    position: Annotated[str, typer.Option("--position", help="last or mean")] = "last",
    device: Device = "auto",
) -> None:
    """Compute a steering vector from contrastive prompts; --out is a .gguf control vector, or a folder
    (safetensors + JSON)."""
    from .models import load_model
    from .intervene.steer import steering_vector

    pos, neg, layer_ids = _prompts(positive), _prompts(negative), _layers(layers)  # file errors before the model loads
    m, tok = load_model(model, device=device_name(device))
    vec = steering_vector(m, tok, pos, neg, layer_ids, method, position)
    path = vec.to_gguf(out) if out.endswith(".gguf") else vec.save_pretrained(out)
    norms = ", ".join(f"{l}:{float(vec.directions[l].norm()):.3g}" for l in vec.layers)
    typer.echo(f"steering vector ({method}, layers {vec.layers[0]}-{vec.layers[-1]}) -> {path}\nnorms {norms}")


app.command()(generate)  # defined in cli_generate, registered here to keep the commands' order


@app.command()
def patch(
    clean: Annotated[str, typer.Option("--clean", help="the clean prompt")],
    corrupted: Annotated[str, typer.Option(
        "--corrupted", help="the corrupted prompt (same length in tokens)")],
    target: Annotated[str, typer.Option("--target", help="the clean answer token, e.g. ' Paris'")],
    foil: Annotated[Optional[str], typer.Option(
        "--foil", help="the corrupted answer (logit difference); default: the corrupted run's top token")] = None,
    out: Out = "runs/patch",
    model: Model = "default",
    sites: Annotated[List[str], typer.Option(
        "--sites", help=f"{shorthands()} (every layer), or a site name or glob; repeat for several")] = ["resid_pre"],
    metric: Annotated[str, typer.Option("--metric", help=" or ".join(METRICS))] = "logit_diff",
    device: Device = "auto",
) -> None:
    """Activation patching over every (site, position): writes effects.json and effects.png to --out."""
    from .models import load_model
    from .intervene.patch import patch as run_patch

    for name, text in (("--clean", clean), ("--corrupted", corrupted), ("--target", target), ("--foil", foil)):
        if text is not None and not text.strip():
            raise ActscopeError(f"{name} is empty")
    if clean == corrupted:
        raise ActscopeError("--clean and --corrupted are the same prompt: every effect would be 0/0; give a corrupted "
                            "prompt that changes the answer")
    m, tok = load_model(model, device=device_name(device))
    res = run_patch(m, tok, clean, corrupted, sites=sites if len(sites) > 1 else sites[0],
                    metric=metric, target=target, foil=foil)
    folder = res.save(out)
    best = divmod(int(res.effect.nan_to_num(0).abs().argmax()), len(res.positions))
    typer.echo(f"metric clean {res.clean:.3f}, corrupted {res.corrupted:.3f} (foil {res.foil!r}); "
               f"largest effect {float(res.effect[best]):.2f} at {res.sites[best[0]]}, position {res.positions[best[1]]} "
               f"({res.tokens[best[1]]!r})")
    typer.echo(f"effects: {(folder / 'effects.json').resolve()}  heatmap: {(folder / 'effects.png').resolve()}")


@app.command("causal-trace")
def causal_trace_cmd(
    prompt: Prompt,
    subject: Annotated[str, typer.Option("--subject", help="the words whose embeddings get noised")],
    target: Annotated[str, typer.Option("--target", help="the answer token, e.g. ' Paris'")],
    out: Out = "runs/trace",
    model: Model = "default",
    kind: Annotated[str, typer.Option(
        "--kind", help=f"what is restored at every layer: {shorthands()}")] = "resid_post",
    window: Annotated[int, typer.Option(
        "--window", help="restore this many neighbouring layers together")] = 1,
    samples: Annotated[int, typer.Option("--samples", help="noise draws averaged")] = 10,
    device: Device = "auto",
) -> None:
    """Causal tracing (ROME style): noise the subject, restore each (layer, position), measure the target's
    probability; writes effects.json and effects.png to --out."""
    from .intervene.causal import causal_trace
    from .models import load_model

    for name, text in (("--prompt", prompt), ("--subject", subject), ("--target", target)):
        if not text.strip():
            raise ActscopeError(f"{name} is empty")
    positive_int("--window", window)
    positive_int("--samples", samples)
    if kind in OLD_KINDS:
        deprecated(f"--kind {kind}", f"--kind {OLD_KINDS[kind]}")
        kind = OLD_KINDS[kind]
    m, tok = load_model(model, device=device_name(device))
    res = causal_trace(m, tok, prompt, subject, target, kind=kind, window=window, samples=samples)
    folder = res.save(out)
    typer.echo(f"p(target): clean {res.clean:.3f}, subject noised {res.corrupted:.3f}")
    for j, (p, t) in enumerate(zip(res.positions, res.tokens)):
        col = res.effect[:, j]
        typer.echo(f"  position {p:2d} {t!r:>12}: strongest restore {float(col.max()):.2f} at layer {int(col.argmax())}")
    typer.echo(f"effects: {(folder / 'effects.json').resolve()}  heatmap: {(folder / 'effects.png').resolve()}")


@app.command("trace", hidden=True)
@functools.wraps(causal_trace_cmd)
def trace_alias(*args, **kwargs) -> None:  # the old name, which clashed with the Python recorder actscope.trace
    deprecated("`actscope trace`", "`actscope causal-trace`")
    causal_trace_cmd(*args, **kwargs)


from .cli_sae import nmf_app, sae_app  # noqa: E402  (sub-commands live in their own module)
from .cli_sparsify import sparsify_app  # noqa: E402

app.add_typer(sparsify_app, name="sparsify")
app.add_typer(sae_app, name="sae")
app.add_typer(nmf_app, name="nmf")

from .cli_compare import compare_app  # noqa: E402

app.add_typer(compare_app, name="compare")


def main() -> None:
    """Run the CLI: every failure ends in one ``error:`` line on stderr and exit status 2.

    Click runs in non-standalone mode so that Ctrl-C reaches us (typer would turn it into a silent
    exit 130) and usage errors become one line like every other error. Anything that is not an
    ``ActscopeError`` is a bug; it still gets one line, and ``ACTSCOPE_DEBUG=1`` shows the traceback.
    """
    import os

    logging.basicConfig(level=logging.WARNING, format="actscope: %(message)s")
    try:
        code = app(standalone_mode=False)
    except ActscopeError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # noqa: BLE001 - click's own errors (typer vendors click), or a bug
        kinds = {k.__name__ for k in type(exc).__mro__}
        if "NoArgsIsHelpError" in kinds:
            exc.show()  # type: ignore[attr-defined]
            sys.exit(2)
        if "Abort" in kinds:
            code = 130
        elif "ClickException" in kinds:
            ctx = getattr(exc, "ctx", None)
            command = " ".join(ctx.command_path.split()[1:]) + " " if ctx is not None else ""
            _fail(f"{exc.format_message()} (see actscope {command.lstrip()}--help)")  # type: ignore[attr-defined]
        elif os.environ.get("ACTSCOPE_DEBUG"):
            raise
        else:
            first = str(exc).splitlines()[0] if str(exc) else ""
            _fail(f"unexpected {type(exc).__name__}: {first} (a bug in actscope: please report it; "
                  "ACTSCOPE_DEBUG=1 shows the traceback)")
    if code == 130:
        resumable = len(sys.argv) > 1 and sys.argv[1] == "record"
        typer.echo("interrupted" + ("; re-run the same command to resume" if resumable else ""), err=True)
        sys.exit(130)
    sys.exit(code or 0)


def _fail(message: str) -> None:
    typer.echo(f"error: {' '.join(message.split())}", err=True)  # always one line
    sys.exit(2)


if __name__ == "__main__":
    main()
