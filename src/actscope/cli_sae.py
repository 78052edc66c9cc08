"""``actscope sae ...``: train sparse autoencoders from a store, evaluate them, read their features."""

from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer

from .cli_options import BatchSize, Data, Device, MaxTokens, Model, Out, StoreDir, device_name, split_list

sae_app = typer.Typer(add_completion=False, no_args_is_help=True,
                      help="Sparse autoencoders and transcoders trained from an activation store.")


def _ints(values: Optional[List[str]], flag: str) -> list[int]:
    from .sae import SAEError

    try:
        return [int(v) for v in split_list(values)]
    except ValueError:
        raise SAEError(f"{flag} takes whole numbers, got {' '.join(values or [])!r}") from None


@sae_app.command("train")
def train_cmd(
    store: StoreDir,
    out: Out,
    sites: Annotated[List[str], typer.Option("--site", help="a store site to train on; repeat for several")],
    arch: Annotated[str, typer.Option("--arch", help="topk, batchtopk, jumprelu or relu")] = "topk",
    k: Annotated[Optional[List[str]], typer.Option(
        "--k", help="latents per token (topk, batchtopk); repeat for a sweep in one pass")] = None,
    expansion: Annotated[Optional[List[str]], typer.Option(
        "--expansion", help="latents = expansion x d_in; repeat for a sweep in one pass")] = None,
    target: Annotated[Optional[str], typer.Option(
        "--target", help="train transcoders: reconstruct this site from --site")] = None,
    batch_size: BatchSize = 4096,
    tokens: Annotated[Optional[int], typer.Option("--tokens", help="training tokens; default one pass")] = None,
    optimizer: Annotated[str, typer.Option(
        "--optimizer", help="signum (schedule-free sign descent) or adam (SAELens's recipe)")] = "signum",
    lr: Annotated[Optional[float], typer.Option(
        "--lr", help="learning rate; default (5e-3 signum, 2e-4 adam) x sqrt(16384/latents)")] = None,
    seed: Annotated[int, typer.Option("--seed", help="initialisation and shuffling seed")] = 0,
    keep_outliers: Annotated[bool, typer.Option(
        "--keep-outliers", help="train on position 0 and on tokens above 10x the median norm too")] = False,
) -> None:
    """Train one SAE per (site, k, expansion) in one pass over --store; --out holds the SAE (one) or
    one subfolder per SAE (several). Re-running the same command resumes an interrupted run."""
    from .sae import ARCHITECTURES, SAEError, Job, make, train

    if arch not in ARCHITECTURES:
        raise SAEError(f"--arch must be one of {', '.join(sorted(ARCHITECTURES))}, not {arch!r}")
    ks = _ints(k, "--k") or [32]
    widths = _ints(expansion, "--expansion") or [16]
    if any(v <= 0 for v in ks + widths) or batch_size <= 0 or (tokens is not None and tokens <= 0):
        raise SAEError("--k, --expansion, --batch-size and --tokens must be positive")
    common = dict(batch_size=batch_size, tokens=tokens, lr=lr, optimizer=optimizer, seed=seed)
    if keep_outliers:
        common.update(skip_first=False, max_norm_ratio=None)
    takes_k = "k" in ARCHITECTURES[arch]().get_params()
    jobs = [Job(make(arch, expansion=x, **({"k": kk} if takes_k else {}), **common), s, target)
            for s, kk, x in itertools.product(split_list(sites), ks if takes_k else [0], widths)]
    fitted = train(store, jobs, out=out)
    for job, sae in zip(jobs, fitted):
        last = sae.meta_["history"][-1] if sae.meta_["history"] else {}
        where = Path(out) if len(jobs) == 1 else Path(out) / job.name
        typer.echo(f"{job.name}: fvu {last.get('fvu', float('nan')):.4f}  l0 {last.get('l0', 0):.1f}  "
                   f"dead {last.get('dead', 0):.1%}  -> {where.resolve()}")


@sae_app.command("eval")
def eval_cmd(
    sae: Annotated[str, typer.Option("--sae", help="an SAE folder (ours, SAELens, sparsify or dictionary_learning)")],
    store: StoreDir,
    out: Out = "runs/sae-eval.json",
    model: Annotated[Optional[str], Model.__metadata__[0]] = None,
    batch_size: BatchSize = 4096,
    eval_tokens: Annotated[Optional[int], typer.Option("--eval-tokens", help="evaluate at most this many tokens")] = None,
    sequences: Annotated[int, typer.Option("--sequences", help="store sequences for the CE/KL metrics")] = 32,
    keep_outliers: Annotated[bool, typer.Option(
        "--keep-outliers", help="evaluate on the tokens the SAE's outlier policy leaves out, too")] = False,
    device: Device = "auto",
) -> None:
    """Reconstruction and sparsity metrics on a held-out --store; with --model, CE loss recovered,
    KL score and delta CE with the SAE spliced in. Writes the metrics as JSON to --out."""
    from .sae import evaluate, load

    fitted = load(sae)
    m = None
    if model is not None:
        from .models import load_model

        m, _ = load_model(model, device=device_name(device))
    result = evaluate(fitted, store, model=m, batch_size=batch_size, max_tokens=eval_tokens, sequences=sequences,
                      outliers="keep" if keep_outliers else "policy")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    shown = ["fvu", "explained_variance", "mse", "l0", "dead_fraction", "cosine", "ce_loss_recovered", "kl_score",
             "ce_delta"]
    typer.echo("  ".join(f"{k} {result[k]:.4g}" for k in shown if k in result))
    typer.echo(f"metrics: {path.resolve()}")


def load_latents(folder: str) -> Any:
    """An SAE folder, or a semi-NMF folder (``nmf.json``) seen as latents (``nmf.NMFLatents``):
    what ``sae features`` and ``generate --steer-sae`` read."""
    if (Path(folder) / "nmf.json").exists():
        from .nmf import NMFLatents
        from .nmf import load as load_nmf

        return NMFLatents(load_nmf(folder))
    from .sae import load

    return load(folder)


nmf_app = typer.Typer(add_completion=False, no_args_is_help=True,
                      help="Semi-NMF of MLP activations, streamed from an activation store.")


@nmf_app.command("fit")
def nmf_fit_cmd(
    store: StoreDir,
    out: Out,
    site: Annotated[str, typer.Option("--site", help="the store site, e.g. blocks.6.mlp.hook_post")],
    rank: Annotated[int, typer.Option("--rank", help="number of features")] = 64,
    keep_share: Annotated[float, typer.Option(
        "--keep-share", help="share of neurons each feature keeps (winner-take-all)")] = 0.05,
    max_iter: Annotated[int, typer.Option("--max-iter", help="iterations at most")] = 100,
    tol: Annotated[float, typer.Option("--tol", help="stop when the loss improves by less than this share")] = 1e-5,
    tokens: Annotated[Optional[int], typer.Option("--tokens", help="use the store's first N tokens")] = None,
    model: Annotated[Optional[str], Model.__metadata__[0]] = None,
    device: Device = "auto",
) -> None:
    """Fit F (features over neurons) and G >= 0 (codes per token); writes features.safetensors,
    nmf.json and codes.npy to --out. With --model, the features in residual space (W_out f) too."""
    from .nmf import SemiNMF

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    nmf = SemiNMF(rank, keep_share=keep_share, max_iter=max_iter, tol=tol).fit(
        store, site, tokens=tokens, codes_path=folder / "codes.npy")
    m = None
    if model is not None:
        from .models import load_model

        m, _ = load_model(model, device=device_name(device))
    nmf.save(folder, model=m)
    typer.echo(f"semi-NMF rank {rank} on {nmf.tokens_} tokens: {len(nmf.loss_history_)} iterations, "
               f"relative loss {nmf.relative_loss_:.4f} -> {folder.resolve()}")


@sae_app.command("features")
def features_cmd(
    sae: Annotated[str, typer.Option(
        "--sae", help="an SAE folder (ours, SAELens, sparsify or dictionary_learning), or a semi-NMF folder")],
    store: Annotated[Optional[str], StoreDir.__metadata__[0]] = None,
    out: Out = "runs/sae-features",
    model: Annotated[Optional[str], Model.__metadata__[0]] = None,
    data: Data = None,
    max_tokens: MaxTokens = None,
    top: Annotated[int, typer.Option("--top", help="top contexts kept per latent")] = 10,
    bins: Annotated[int, typer.Option(
        "--bins", help="equal-width activation bins between 0 and each latent's max, sampled for contexts; "
        "0 skips the second pass")] = 4,
    per_bin: Annotated[int, typer.Option("--per-bin", help="contexts sampled per bin and latent")] = 5,
    seed: Annotated[int, typer.Option("--seed", help="the bin samples' seed")] = 0,
    device: Device = "auto",
) -> None:
    """Top activating contexts, a sample of contexts per activation bin, density, nearest latents (and
    with --model, logit effects and readable tokens) per latent, in two streaming passes with memory
    bounded by the number of latents; writes features.html, features.json and Neuronpedia
    batch-N.json files to --out. Without --store, --model runs on --data (default: the Python
    reference manual) and the SAE's site is recorded to a temporary store first."""
    from .sae import SAEError
    from .sae.features import feature_data, write_browser, write_neuronpedia

    if top < 1 or bins < 0 or per_bin < 1:
        raise SAEError(f"--top and --per-bin must be positive and --bins at least 0, got {top}, {per_bin} and {bins}")
    if store is None and model is None:
        raise SAEError("give --store DIR, or --model M (with --data, default the Python reference manual) to "
                       "record the SAE's site on the fly")
    if store is not None and (data is not None or max_tokens is not None):
        raise SAEError("--data and --max-tokens choose what to record without --store; with --store they do nothing")
    fitted = load_latents(sae)
    m = tok = None
    if model is not None:
        from .models import load_model

        m, tok = load_model(model, device=device_name(device))
    with tempfile.TemporaryDirectory(prefix="actscope-features-") as tmp:
        if store is None:  # one recording of the one site, float32 so the SAE sees what it would live
            from .record import record

            store = record(m, tok, str(Path(tmp) / "store"), [fitted.site_], data, max_tokens=max_tokens,
                           dtype="float32")
        records = feature_data(fitted, store, tokenizer=tok, model=m, top=top, bins=bins, per_bin=per_bin, seed=seed)
    folder = Path(out)
    page = write_browser(records, folder / "features.html", title=f"{fitted.site_} ({fitted.architecture})")
    (folder / "features.json").write_text(json.dumps(records))
    write_neuronpedia(records, folder / "neuronpedia", fitted.meta_.get("model_name") or "model", str(fitted.site_))
    typer.echo(f"{len(records)} latents -> {page.resolve()}")
