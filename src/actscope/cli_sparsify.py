"""``actscope sparsify ...``: calibrate activation-sparsity thresholds and evaluate them."""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from .cli_options import BatchSize, Data, Device, MaxTokens, Model, Out, SeqLen, device_name, split_list

sparsify_app = typer.Typer(add_completion=False, no_args_is_help=True,
                           help="Training-free activation sparsity: calibrate and evaluate.")


@sparsify_app.command("calibrate")
def calibrate_cmd(
    out: Out,
    model: Model = "default",
    data: Data = None,
    method: Annotated[str, typer.Option("--method", help="teal, wina, cats, chess, topk or coreinfer")] = "teal",
    sparsity: Annotated[float, typer.Option("--sparsity", help="target share of zeroed inputs")] = 0.5,
    allocation: Annotated[str, typer.Option(
        "--allocation", help="uniform, or greedy per-layer levels")] = "uniform",
    attention: Annotated[bool, typer.Option("--attention", help="CHESS: also sparsify Q and O inputs")] = False,
    seq_len: SeqLen = 256,
    max_tokens: MaxTokens = 16384,
    batch_size: BatchSize = 8,
    device: Device = "auto",
) -> None:
    """Compute thresholds for a target sparsity and save them to --out (sparsity_config.json +
    thresholds.safetensors), for `actscope generate --sparsity-config`."""
    from .models import load_model
    from .sparsify import calibrate

    m, tok = load_model(model, device=device_name(device))
    config = calibrate(m, tok, data, method=method, sparsity=sparsity, allocation=allocation,
                       attention=attention, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size)
    folder = config.save_pretrained(out)
    typer.echo(f"{method} at {sparsity:.0%} ({allocation}): {len(config.targets)} modules -> {folder.resolve()}")


@sparsify_app.command("eval")
def eval_cmd(
    out: Out = "runs/sparsify-eval",
    model: Model = "default",
    data: Data = None,
    methods: Annotated[List[str], typer.Option(
        "--methods", help="a sparsity method; repeat for several (teal,wina also works)")] = [
        "teal", "wina", "cats", "chess", "topk", "coreinfer"],
    sparsities: Annotated[List[str], typer.Option(
        "--sparsities", help="a target sparsity; repeat for several (0.3,0.6 also works)")] = [
        "0.25", "0.4", "0.5", "0.6", "0.7"],
    calib_tokens: Annotated[int, typer.Option(
        "--calib-tokens", help="calibration tokens, from the start of --data")] = 8192,
    eval_tokens: Annotated[int, typer.Option(
        "--eval-tokens", help="held-out tokens, after the calibration ones")] = 8192,
    seq_len: SeqLen = 256,
    batch_size: BatchSize = 4,
    choices: Annotated[Optional[str], typer.Option(
        "--choices", help="multiple-choice accuracy too: a number of continuation items built from the "
        "held-out text, or a JSONL file of {context, choices, answer}")] = None,
    device: Device = "auto",
) -> None:
    """Perplexity vs sparsity per method on held-out text, with PPL-1% and PPL-5% sparsity; writes
    sparsity_eval.json and ppl_vs_sparsity.svg to --out."""
    from .errors import SparsifyError
    from .models import load_model
    from .sparsify import evaluate

    try:
        levels = [float(s) for s in split_list(sparsities)]
    except ValueError:
        raise SparsifyError(f"--sparsities must be numbers, got {' '.join(sparsities)!r}") from None
    n_choices: int | str | None = int(choices) if choices and choices.strip().isdigit() else choices
    m, tok = load_model(model, device=device_name(device))
    result = evaluate(m, tok, data, methods=split_list(methods), sparsities=levels, calib_tokens=calib_tokens,
                      eval_tokens=eval_tokens, seq_len=seq_len, batch_size=batch_size, choices=n_choices)
    folder = result.save(out)
    dense_acc = result.meta.get("dense_accuracy")
    typer.echo(f"dense perplexity {result.dense_ppl:.3f}" + (f", accuracy {dense_acc:.1%}" if dense_acc is not None else ""))
    for method, points in result.curves.items():
        curve = "  ".join(f"{p['achieved']:.0%}:{p['ppl']:.2f}" + (f"/{p['accuracy']:.0%}" if "accuracy" in p else "")
                          for p in points)
        typer.echo(f"{method:>10}  PPL-1% {result.ppl_p_sparsity(method, 1):.0%}  "
                   f"PPL-5% {result.ppl_p_sparsity(method, 5):.0%}   {curve}")
    for pair, points in result.comparisons().items():  # same held-out rows: a paired 95% interval
        cells = "  ".join(f"{float(t):.0%}: {r['ratio'] - 1:+.2%} [{r['low'] - 1:+.2%}, {r['high'] - 1:+.2%}]"
                          for t, r in points.items())
        typer.echo(f"perplexity {pair}  {cells}")
    typer.echo(f"results: {(folder / 'sparsity_eval.json').resolve()}  plot: {(folder / 'ppl_vs_sparsity.svg').resolve()}")
