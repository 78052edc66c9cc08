"""``actscope sparsify ...``: calibrate activation-sparsity thresholds and evaluate them."""

from __future__ import annotations

from typing import Optional

import typer

sparsify_app = typer.Typer(add_completion=False, no_args_is_help=True,
                           help="Training-free activation sparsity: calibrate and evaluate.")
_MODEL = typer.Option("default", "--model", "-m", help='"default", an HF id, a local dir or a .gguf file')
_DATA = typer.Option(None, "--data", "-d", help="text/JSONL/Parquet file or hf:NAME; default: Python's manual")


@sparsify_app.command("calibrate")
def calibrate_cmd(
    out: str = typer.Option(..., "--out", "-o", help="folder for sparsity_config.json + thresholds.safetensors"),
    model: str = _MODEL,
    data: Optional[str] = _DATA,
    method: str = typer.Option("teal", "--method", help="teal, wina, cats, chess, topk or coreinfer"),
    sparsity: float = typer.Option(0.5, "--sparsity", help="target share of zeroed inputs"),
    allocation: str = typer.Option("uniform", "--allocation", help="uniform, or greedy per-layer levels"),
    attention: bool = typer.Option(False, "--attention", help="CHESS: also sparsify Q and O inputs"),
    seq_len: int = typer.Option(256, "--seq-len"),
    max_tokens: int = typer.Option(16384, "--max-tokens", help="calibration tokens"),
) -> None:
    """Compute thresholds for a target sparsity and save them."""
    from .models import load_model
    from .sparsify import calibrate

    m, tok = load_model(model)
    config = calibrate(m, tok, data, method=method, sparsity=sparsity, allocation=allocation,
                       attention=attention, seq_len=seq_len, max_tokens=max_tokens)
    folder = config.save_pretrained(out)
    typer.echo(f"{method} at {sparsity:.0%} ({allocation}): {len(config.targets)} modules -> {folder.resolve()}")


@sparsify_app.command("eval")
def eval_cmd(
    out: str = typer.Option("runs/sparsify-eval", "--out", "-o"),
    model: str = _MODEL,
    data: Optional[str] = _DATA,
    methods: str = typer.Option("teal,wina,cats,chess,topk,coreinfer", "--methods"),
    sparsities: str = typer.Option("0.25,0.4,0.5,0.6,0.7", "--sparsities"),
    calib_tokens: int = typer.Option(8192, "--calib-tokens"),
    eval_tokens: int = typer.Option(8192, "--eval-tokens", help="held-out tokens, after the calibration ones"),
    seq_len: int = typer.Option(256, "--seq-len"),
    choices: Optional[str] = typer.Option(
        None, "--choices", help="multiple-choice accuracy too: a number of continuation items built from the "
        "held-out text, or a JSONL file of {context, choices, answer}"),
) -> None:
    """Perplexity vs sparsity per method on held-out text, with PPL-1% and PPL-5% sparsity."""
    from .errors import SparsifyError
    from .models import load_model
    from .sparsify import evaluate

    try:
        levels = [float(s) for s in sparsities.split(",") if s.strip()]
    except ValueError:
        raise SparsifyError(f"--sparsities must be numbers separated by commas, got {sparsities!r}") from None
    n_choices: int | str | None = int(choices) if choices and choices.strip().isdigit() else choices
    m, tok = load_model(model)
    result = evaluate(m, tok, data, methods=[s.strip() for s in methods.split(",") if s.strip()],
                      sparsities=levels, calib_tokens=calib_tokens, eval_tokens=eval_tokens, seq_len=seq_len,
                      choices=n_choices)
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
