"""``actscope compare ...``: CKA, encoding models and probes from activation stores."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .cli_options import MaxTokens, Out, StoreDir, StoreDirs

compare_app = typer.Typer(add_completion=False, no_args_is_help=True,
                          help="Compare representations: CKA, brain encoding models, linear probes.")
_SITES = typer.Option(["blocks.*.hook_resid_post"], "--sites", "-s", help="site names or globs")


def _npy(path: str, what: str):
    import numpy as np

    from .errors import DataError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} file not found: {p}")
    try:
        if p.suffix == ".npy":
            return np.load(p, allow_pickle=False)
        return np.array([line.strip() for line in p.read_text().splitlines() if line.strip()])
    except (ValueError, OSError) as exc:
        raise DataError(f"{p}: not a readable .npy array ({exc})") from None


def _ints(spec: str, flag: str) -> list[int]:
    from .errors import ActscopeError

    try:
        out: list[int] = []
        for part in spec.split(","):
            a, _, b = part.strip().partition("-")
            out += list(range(int(a), int(b) + 1)) if b else [int(a)]
        return out
    except ValueError:
        raise ActscopeError(f"{flag} {spec!r}: use numbers like 1,2,3 or a range like 1-4") from None


@compare_app.command("cka")
def cka_cmd(
    store: StoreDirs,
    sites: List[str] = typer.Option(["blocks.*.hook_resid_post"], "--sites", "-s",
                                    help="sites of the first store; a second --sites for the second store"),
    out: Out = "runs/compare-cka",
    guard: bool = typer.Option(True, "--guard/--no-guard", help="also the guarded CKA (z-scored, position 0 left out)"),
    max_tokens: MaxTokens = None,
) -> None:
    """Linear CKA (biased and debiased, exact, one pass) between every pair of sites -> cka.json + heatmaps.

    A second --store (recorded on the same tokens) compares two models: sites of A x sites of B.
    """
    from .compare import stream_cka
    from .errors import ActscopeError

    if len(store) > 2:
        raise ActscopeError("--store: give one store (layer x layer) or two (model A x model B)")
    sites_a = sites[:1] if len(store) == 2 and len(sites) == 2 else sites
    sites_b = sites[1:] if len(store) == 2 and len(sites) == 2 else None
    res = stream_cka(store[0], sites_a, store_b=store[1] if len(store) == 2 else None, sites_b=sites_b,
                     guard=guard, max_tokens=max_tokens)
    folder = res.save(out)
    typer.echo(f"linear CKA over {res.n_tokens} tokens: {len(res.sites_a)} x {len(res.sites_b)} sites "
               f"in {res.seconds:.1f} s")
    for site in res.flagged:
        rep = res.outliers[site]
        typer.echo(f"  massive dims in {site}: {rep['dims']} carry {rep['share']:.0%} of the variance")
    n = min(len(res.sites_a), len(res.sites_b))
    typer.echo("  pair                                         plain   debiased" + ("   guarded" if res.guarded else ""))
    for i in range(n - 1):
        cells = f"{res.matrix[i, i + 1]:7.3f}  {res.debiased[i, i + 1]:8.3f}"
        if res.guarded is not None:
            cells += f"  {res.guarded.matrix[i, i + 1]:8.3f}"
        typer.echo(f"  {res.sites_a[i]:>24} ~ {res.sites_b[i + 1]:<20} {cells}")
    typer.echo(f"results: {(folder / 'cka.json').resolve()}  heatmap: {(folder / 'cka.png').resolve()}")


@compare_app.command("encode")
def encode_cmd(
    store: StoreDir,
    sites: List[str] = _SITES,
    responses: str = typer.Option(..., "--responses", help="[TRs, voxels] responses (.npy)"),
    runs: Optional[str] = typer.Option(None, "--runs", help="run label per TR (.npy or one per line)"),
    tokens_per_tr: Optional[int] = typer.Option(None, "--tokens-per-tr", help="default: tokens / TRs"),
    delays: str = typer.Option("1-4", "--delays", help="HRF delays in TRs, e.g. 1-4 or 0,2,4"),
    out: Out = "runs/compare-encode",
) -> None:
    """Ridge encoding model per layer: held-out Pearson r -> encoding.json + encoding.svg."""
    import numpy as np

    from .compare import encode_layers
    from .compare.cka_stream import expand_sites
    from .errors import DataError
    from .store.reader import open_store

    st = open_store(store)
    Y = _npy(responses, "responses")
    if Y.ndim not in (1, 2) or not np.issubdtype(Y.dtype, np.number):
        raise DataError(f"{responses}: responses must be a numeric [TRs, voxels] array, got shape {Y.shape}")
    run_labels = _npy(runs, "runs") if runs else None
    res = encode_layers(st, expand_sites(st, sites), Y, tokens_per_tr=tokens_per_tr, runs=run_labels,
                        delays=_ints(delays, "--delays"))
    folder = res.save(out)
    for s, r in zip(res.sites, res.mean_r):
        typer.echo(f"  {s:<28} mean r {r:.4f}")
    typer.echo(f"best: {res.best_site}  results: {(folder / 'encoding.json').resolve()}  "
               f"plot: {(folder / 'encoding.svg').resolve()}")


@compare_app.command("probe")
def probe_cmd(
    store: StoreDir,
    sites: List[str] = _SITES,
    labels: str = typer.Option(..., "--labels", help="JSONL/CSV: label + token | sequence,position | doc"),
    folds: int = typer.Option(5, "--folds", help="cross-validation folds (contiguous)"),
    C: float = typer.Option(1.0, "--C", help="inverse L2 strength, as scikit-learn's LogisticRegression"),
    mdl: bool = typer.Option(False, "--mdl", help="also the online codelength (slower)"),
    out: Out = "runs/compare-probe",
) -> None:
    """Logistic probe per layer: k-fold accuracy, control task, selectivity -> probe.json + probe.svg."""
    from .compare import probe_layers
    from .compare.cka_stream import expand_sites
    from .store.reader import open_store

    st = open_store(store)
    res = probe_layers(st, expand_sites(st, sites), labels, C=C, folds=folds, mdl=mdl)
    folder = res.save(out)
    for s, a, lo, hi, sel in zip(res.sites, res.accuracy, res.low, res.high, res.selectivity):
        typer.echo(f"  {s:<28} accuracy {a:.3f} [{lo:.3f}, {hi:.3f}]" + ("" if sel is None else f"  selectivity {sel:+.3f}"))
    typer.echo(f"results: {(folder / 'probe.json').resolve()}  plot: {(folder / 'probe.svg').resolve()}")
