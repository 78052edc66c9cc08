"""Benchmark: SAE training and semi-NMF from a store, against the peers, in one run (ratios first).

    python bench/sae.py            # every section on the default model (see --help for sizes)
    python bench/sae.py --quick    # tiny sizes, a few steps: checks that every section runs

Default model, 2 CPU threads, sites blocks.6.hook_resid_post (SAEs) and blocks.6.mlp.hook_post
(semi-NMF), TopK k=32 at 16x. The default corpus (Python's reference manual) is tokenized once and
split by sequence: the first ``--tokens`` train, the last ``--heldout`` are held out, disjoint.
It holds about 113k tokens, so the defaults are 98,304 train + 14,720 held-out tokens.

Sections, each printed as a markdown table for docs/benchmarks.md and saved to bench/out/sae.json:
1. step:     one TopK forward+backward step, actscope's sparse kernels vs a plain dense TopK step,
             on the same batch of real activations (scaled as training scales them), alternating
             rounds; the median of the per-round ratios.
2. saelens:  actscope.sae.train with optimizer="adam" vs SAELens's SAETrainer on the same store
             tokens, in the same order, same batch size, token count, learning rate and decay;
             tokens/s, and FVU and L0 on the held-out tokens by one FVU computation of this
             script's own (float64); actscope's default (signum) beside them.
3. sparsify: EleutherAI sparsify trained on the fly (the model runs on every batch) vs recording
             the store once + training from it, both with their default optimiser (the same one); tokens/s at equal tokens, held-out FVU, and wall
             time until each one's training FVU (3-step running mean, position 0 left out) reaches
             the FVU that both reach.
4. multi:    several SAEs (one per k in --multi-k) in one pass over the store vs one at a time;
             per-SAE throughput ratio = summed single-run seconds / one-pass seconds.
5. nmf:      actscope.nmf streamed from the store vs the paper's loop on the matrix in memory:
             seconds per iteration at --nmf-tokens, the loss histories' agreement, and peak RSS
             (total and anonymous, of a fresh child process) at each of --rss-tokens for both.
Whole training runs cannot be interleaved, so each pair runs back to back; absolute times move
with the machine's load (reported), and the ratios are the figures to read.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' progress bars would bury the tables
import torch  # noqa: E402

import actscope  # noqa: E402
from actscope.data import TokenBatches
from actscope.nmf import SemiNMF
from actscope.sae import Job, TopKSAE, train
from actscope.sae.data import token_batches
from actscope.sae.kernels import dense_topk, sparse_decode, topk_encode

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.append(sys.path.pop(0))  # bench/sparsify.py must not shadow the sparsify package
from sae_peers import (Recon, in_memory_semi_nmf, machine, nmf_peak_rss, rechunk, saelens_train,  # noqa: E402
                       shared_fvu, smoothed, sparsify_train, time_to)

LAYER = 6
SITE, MLP = f"blocks.{LAYER}.hook_resid_post", f"blocks.{LAYER}.mlp.hook_post"
MD: list[str] = []  # the markdown printed at the end


def out(line: str = "") -> None:
    """Queue a markdown line: the tables print together at the end, after the peers' chatter."""
    MD.append(line)


def note(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def table(header: list[str], rows: list[list[Any]]) -> None:
    out("| " + " | ".join(header) + " |")
    out("|" + "---|" * len(header))
    for r in rows:
        out("| " + " | ".join(str(c) for c in r) + " |")
    out()


# --- 1. one training step ------------------------------------------------------------------
T, Store = torch.Tensor, actscope.ActivationStore


def dense_step(x: T, W_enc: T, b_enc: T, W_dec: T, b_dec: T, k: int) -> T:
    """The plain way: dense pre-activations, dense TopK, dense decoder (and dense backward)."""
    pre = (x - b_dec) @ W_enc.t() + b_enc
    return (dense_topk(pre, k) @ W_dec + b_dec - x).pow(2).sum()


def sparse_step(x: T, W_enc: T, b_enc: T, W_dec: T, b_dec: T, k: int) -> T:
    """actscope's kernels: the backward and the decoder touch only the k chosen latents."""
    values, idx = topk_encode(x - b_dec, W_enc, b_enc, k)
    return (sparse_decode(values, idx, W_dec, b_dec) - x).pow(2).sum()


def step_section(args: argparse.Namespace, store: Store) -> dict:
    """Dense vs sparse TopK step on one batch of real activations, in alternating rounds."""
    rows = store.read(SITE, 0, min(store.num_tokens, args.batch * 2))
    x = rows[torch.arange(rows.shape[0]) % store.seq_len != 0][: args.batch].float()
    x = x * math.sqrt(x.shape[1] / float(x.pow(2).sum(1).mean()))  # the units training works in
    d, n = x.shape[1], x.shape[1] * args.expansion
    W = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    W /= W.norm(dim=1, keepdim=True)
    params = [W.clone().requires_grad_(), torch.zeros(n, requires_grad=True), W.requires_grad_(),
              torch.zeros(d, requires_grad=True)]

    def seconds(step: Callable) -> float:
        t = time.perf_counter()
        for _ in range(args.step_steps):
            torch.autograd.grad(step(x, *params, args.k), params)
        return time.perf_counter() - t

    for step in (dense_step, sparse_step):  # warm-up
        torch.autograd.grad(step(x, *params, args.k), params)
    dense_s, sparse_s = [], []
    for r in range(args.step_rounds):  # alternate which goes first, so a drift of the load cancels
        order = (dense_step, sparse_step) if r % 2 == 0 else (sparse_step, dense_step)
        t = {f: seconds(f) for f in order}
        dense_s.append(t[dense_step])
        sparse_s.append(t[sparse_step])
    ratios = [a / b for a, b in zip(dense_s, sparse_s)]
    tps = lambda s: args.step_steps * x.shape[0] / statistics.median(s)  # noqa: E731
    res = {"dense_tokens_per_s": tps(dense_s), "sparse_tokens_per_s": tps(sparse_s), "ratio": statistics.median(ratios),
           "per_round": ratios}
    out(f"### 1. TopK step (forward + backward): d_in {d}, {n} latents, k {args.k}, batch {x.shape[0]} real "
        f"activations, {args.step_rounds} alternating rounds of {args.step_steps} steps")
    table(["step", "tokens/s (median)", "ratio (median of per-round)", "per-round ratios"],
          [["plain dense TopK", f"{res['dense_tokens_per_s']:,.0f}", "1", ""],
           ["actscope sparse kernels", f"{res['sparse_tokens_per_s']:,.0f}", f"**{res['ratio']:.2f}x**",
            ", ".join(f"{v:.2f}" for v in ratios)]])
    return res


def ours_recon(sae: TopKSAE) -> Recon:
    """actscope's fitted SAE through its public encode/decode, for the shared FVU."""
    def recon(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = sae.encode(x)
        return sae.decode(z), (z != 0).sum(1)
    return recon


def train_ours(store: Store, ks: list[int], args: argparse.Namespace, trace: bool = False,
               optimizer: str = "signum") -> tuple[float, list, list]:
    """actscope.sae.train of one SAE per k in one pass; returns (seconds, fitted, trajectory).

    With ``trace``, every step's training FVU of the first SAE is logged with its time by
    wrapping the trainer's per-run step (instrumentation only: the step itself is unchanged).
    """
    mod = importlib.import_module("actscope.sae.train")
    original, log, clock = mod._Run.step, [], {"start": 0.0}

    def logged(self, *a, **kw):
        original(self, *a, **kw)
        if "fvu" in self.last and self.job is jobs[0]:
            log.append((time.perf_counter() - clock["start"], self.last["fvu"]))

    jobs = [Job(TopKSAE(k=k, expansion=args.expansion, seed=args.seed, optimizer=optimizer), SITE) for k in ks]
    if trace:
        mod._Run.step = logged
    try:
        clock["start"] = time.perf_counter()
        fitted = train(store, jobs, batch_size=args.batch, tokens=args.tokens, progress=False)
    finally:
        mod._Run.step = original
    return time.perf_counter() - clock["start"], fitted, log


# --- 2. vs SAELens; 3. vs sparsify; 4. several SAEs --------------------------------------------
def saelens_section(args: argparse.Namespace, store: Store, X_held: T, ours: dict) -> dict:
    """SAELens's trainer fed the batches actscope trains on (position 0 dropped, re-cut to --batch)."""
    steps = math.ceil(args.tokens / args.batch)
    d, n = X_held.shape[1], X_held.shape[1] * args.expansion

    def provider():
        for b in token_batches(store, [SITE], args.batch, seed=args.seed, epochs=None):
            yield b.rows[SITE][b.positions(store.seq_len) != 0].float()

    adam = TopKSAE(optimizer="adam")
    note(f"actscope.sae.train with Adam (SAELens's recipe): k={args.k}, {args.tokens:,} tokens")
    s_adam, fitted, _ = train_ours(store, [args.k], args, optimizer="adam")
    mine = {"seconds": s_adam, "tokens_per_s": steps * args.batch / s_adam, **shared_fvu(ours_recon(fitted[0]), X_held)}
    note(f"SAELens SAETrainer: {steps} steps of {args.batch}")
    seconds, recon = saelens_train(rechunk(provider(), args.batch), d_in=d, n_latents=n, k=args.k,
                                   batch_size=args.batch, steps=steps, lr=adam.learning_rate(n),
                                   decay_steps=round(steps * adam.decay_share),
                                   norm_batches=max(1, math.ceil(16384 / args.batch)), seed=args.seed)
    theirs = {"seconds": seconds, "tokens_per_s": steps * args.batch / seconds, **shared_fvu(recon, X_held)}
    ratio = mine["tokens_per_s"] / theirs["tokens_per_s"]
    out(f"### 2. Training from the same store activations: {SITE}, TopK k {args.k}, {n} latents, {steps} steps of "
        f"{args.batch} tokens; Adam at lr {adam.learning_rate(n):.2e} with the last 20% decayed for both, SAELens's "
        f"defaults otherwise; held-out FVU/L0 on {X_held.shape[0]:,} tokens (position 0 left out)")
    row = lambda name, r, rat: [name, f"{r['seconds']:.1f}", f"{r['tokens_per_s']:,.0f}", rat,  # noqa: E731
                                f"{r['fvu']:.4f}", f"{r['l0']:.1f}"]
    table(["trainer", "seconds", "tokens/s", "ratio", "held-out FVU", "L0"],
          [row("actscope.sae.train, optimizer=adam (SAELens's recipe)", mine, f"**{ratio:.2f}x**"),
           row("SAELens SAETrainer", theirs, "1"),
           row("actscope.sae.train, default (schedule-free signum)", ours,
               f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x")])
    out(f"FVU difference at the same recipe (actscope - SAELens): {mine['fvu'] - theirs['fvu']:+.4f} "
        "(negative: actscope's is lower)\n")
    return {"saelens": theirs, "actscope_adam": mine, "ratio_tokens_per_s": ratio, "steps": steps}


def sparsify_section(args: argparse.Namespace, model: Any, train_tokens: TokenBatches, X_held: T, ours: dict,
                     record_s: float) -> dict:
    """sparsify on the fly over the store's token sequences; timed to the FVU both runs reach."""
    batch_seqs = max(1, args.batch // train_tokens.seq_len)
    tokens = (train_tokens.num_sequences // batch_seqs) * batch_seqs * train_tokens.seq_len
    folder = tempfile.mkdtemp(prefix="actscope-bench-sparsify-")
    note(f"sparsify on the fly: {tokens:,} tokens, {batch_seqs} sequences per batch")
    try:
        seconds, recon, traj = sparsify_train(model, train_tokens.input_ids, layer=LAYER, k=args.k,
                                              expansion=args.expansion, batch_seqs=batch_seqs, save_dir=folder,
                                              seed=args.seed)
        theirs = {"seconds": seconds, "tokens_per_s": tokens / seconds, **shared_fvu(recon, X_held)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    final = lambda tr: smoothed(tr)[-1][1] if tr else math.nan  # noqa: E731
    target = max(final(ours["trajectory"]), final(traj))
    t_ours, t_theirs = time_to(ours["trajectory"], target), time_to(traj, target)
    from_store = t_theirs / t_ours if t_ours and t_theirs else math.nan
    e2e = t_theirs / (record_s + t_ours) if t_ours and t_theirs else math.nan
    res = {"sparsify": {**theirs, "trajectory": traj}, "record_seconds": record_s, "target_fvu": target,
           "time_to_target": {"actscope": t_ours, "sparsify": t_theirs}, "ratio_from_store": from_store,
           "ratio_end_to_end": e2e, "ratio_tokens_per_s": ours["tokens_per_s"] / theirs["tokens_per_s"]}
    out(f"### 3. On the fly (sparsify) vs store: {SITE} (sparsify's `layers.{LAYER}`), TopK k {args.k}, "
        f"{args.expansion}x, batches of {batch_seqs} x {train_tokens.seq_len} tokens, both with their default "
        "optimiser (schedule-free signum)")
    table(["run", "seconds", "tokens/s", "held-out FVU", "L0", f"seconds to training FVU {target:.4f}"],
          [["actscope: record the store (all train tokens, both sites)", f"{record_s:.1f}", "", "", "", ""],
           ["actscope: train from the store", f"{ours['seconds']:.1f}", f"{ours['tokens_per_s']:,.0f}",
            f"{ours['fvu']:.4f}", f"{ours['l0']:.1f}", f"{t_ours:.1f}" if t_ours else "not reached"],
           ["sparsify Trainer on the fly", f"{seconds:.1f}", f"{theirs['tokens_per_s']:,.0f}", f"{theirs['fvu']:.4f}",
            f"{theirs['l0']:.1f}", f"{t_theirs:.1f}" if t_theirs else "not reached"]])
    out(f"- from an existing store: **{from_store:.2f}x** faster to the same FVU "
        f"({res['ratio_tokens_per_s']:.2f}x the tokens/s)")
    out(f"- end to end (record once + train): **{e2e:.2f}x** (record {record_s:.1f} s + train to target)")
    out()
    return res


def multi_section(args: argparse.Namespace, store: Store, X_held: T, single: dict) -> dict:
    """One pass training one SAE per k vs those SAEs one at a time (the k=--k run is reused)."""
    ks = list(dict.fromkeys(args.multi_k))
    singles: dict[int, dict] = {}
    for k in ks:
        if k == args.k:
            singles[k] = {"seconds": single["seconds"], "sae": single["sae"]}
            continue
        note(f"single SAE k={k}")
        s, fitted, _ = train_ours(store, [k], args)
        singles[k] = {"seconds": s, "sae": fitted[0]}
    note(f"one pass, k = {ks}")
    s_pass, fitted, _ = train_ours(store, ks, args)
    same = all(torch.equal(singles[k]["sae"].W_dec_, f.W_dec_) for k, f in zip(ks, fitted))
    total_single = sum(v["seconds"] for v in singles.values())
    ratio = total_single / s_pass
    rows = [[f"k={k} alone", f"{singles[k]['seconds']:.1f}", f"{args.tokens / singles[k]['seconds']:,.0f}",
             f"{shared_fvu(ours_recon(f), X_held)['fvu']:.4f}"] for k, f in zip(ks, fitted)]
    rows.append([f"{len(ks)} SAEs in one pass", f"{s_pass:.1f}", f"{len(ks) * args.tokens / s_pass:,.0f}", ""])
    out(f"### 4. Several SAEs in one pass: {SITE}, k in {ks}, {args.expansion}x, {args.tokens:,} tokens each")
    table(["run", "seconds", "SAE-tokens/s (SAEs x tokens / s)", "held-out FVU (one-pass SAE)"], rows)
    out(f"- per-SAE throughput, one pass vs one at a time: **{ratio:.2f}x** (summed single runs {total_single:.1f} s "
        f"/ one pass {s_pass:.1f} s); one-pass weights equal the single runs': {same}")
    out()
    return {"ks": ks, "single_seconds": {k: v["seconds"] for k, v in singles.items()}, "pass_seconds": s_pass,
            "ratio": ratio, "identical_to_single_runs": same}


# --- 5. semi-NMF -----------------------------------------------------------------------------
def nmf_section(args: argparse.Namespace, store: Store, store_path: str) -> dict:
    """Streamed semi-NMF vs the in-memory loop from the same start; peak RSS in fresh children."""
    n = min(args.nmf_tokens, store.num_tokens)
    note(f"semi-NMF: {n:,} tokens of {MLP}, rank {args.nmf_rank}, {args.nmf_iters} iterations each")
    nmf = SemiNMF(args.nmf_rank, keep_share=args.nmf_keep, max_iter=args.nmf_iters, tol=0, seed=args.seed)
    t = time.perf_counter()
    nmf.fit(store, MLP, tokens=n)
    ours_s = time.perf_counter() - t
    X = store.read(MLP, 0, n).double()
    losses, mem_s = in_memory_semi_nmf(X, nmf.init_codes(n), args.nmf_iters, args.nmf_keep)
    del X
    agree = max(abs(a - b) / abs(b) for a, b in zip(nmf.loss_history_, losses))
    ratio = (mem_s / args.nmf_iters) / (ours_s / args.nmf_iters)
    rss = {}
    for m in sorted({min(v, store.num_tokens) for v in args.rss_tokens}):
        note(f"peak RSS children at {m:,} tokens")
        rss[m] = {kind: nmf_peak_rss(kind, store_path, MLP, m, args.nmf_rank, args.nmf_keep, args.threads)
                  for kind in ("ours", "memory")}
    out(f"### 5. Semi-NMF: {MLP} (d_ff {store.shape(MLP)[0]}), rank {args.nmf_rank}, keep share {args.nmf_keep}, "
        f"{n:,} tokens, {args.nmf_iters} iterations, float64")
    table(["implementation", "seconds per iteration", "ratio"],
          [["actscope.nmf, streamed from the store (whole fit incl. the first pass, / iterations)",
            f"{ours_s / args.nmf_iters:.3f}", f"**{ratio:.2f}x**"],
           ["in-memory paper loop (matrix loaded beforehand, not timed)", f"{mem_s / args.nmf_iters:.3f}", "1"]])
    out(f"- loss histories agree to a relative {agree:.1e} (same start, same updates)")
    out()
    table(["tokens", "actscope.nmf: peak RSS / peak anonymous (MiB)", "in-memory loop: peak RSS / peak anonymous (MiB)"],
          [[f"{m:,}", *(f"{v[k]['peak_rss_mb']:,.0f} / {v[k]['peak_anon_mb']:,.0f}" for k in ("ours", "memory"))]
           for m, v in rss.items()])
    out("A fresh child process per cell, 2 iterations, its imports included. Peak RSS is VmHWM, which counts "
        "resident pages of the memory-mapped store and codes file; peak anonymous is RssAnon polled every 5 ms.")
    out()
    return {"tokens": n, "ours_s_per_iter": ours_s / args.nmf_iters, "memory_s_per_iter": mem_s / args.nmf_iters,
            "ratio": ratio, "loss_rel_agreement": agree, "losses": {"ours": nmf.loss_history_, "memory": losses},
            "peak_rss_mb": rss}


# --- driver ----------------------------------------------------------------------------------
def split_tokens(args: argparse.Namespace, tok: Any) -> tuple[TokenBatches, TokenBatches]:
    """Train = the first sequences, held-out = the last ones: disjoint by construction."""
    tb = actscope.load_tokens(None, tok, args.seq_len)
    n_held = max(1, args.heldout // args.seq_len)
    n_train = min(args.tokens // args.seq_len, tb.num_sequences - n_held)
    if n_train < args.tokens // args.seq_len:
        note(f"the corpus has {tb.num_tokens:,} tokens: training on {n_train * args.seq_len:,} instead of {args.tokens:,}")
    part = lambda a, b: TokenBatches(tb.input_ids[a:b], tb.doc_ids[a:b], tb.source)  # noqa: E731
    return part(0, n_train), part(tb.num_sequences - n_held, tb.num_sequences)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=98_304, help="training tokens (the store's size)")
    ap.add_argument("--heldout", type=int, default=14_720, help="held-out tokens for the shared FVU")
    for flag, default in (("--seq-len", 128), ("--seed", 0), ("--k", 32), ("--expansion", 16)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--batch", type=int, default=4096, help="training batch in tokens (sparsify: / seq-len sequences)")
    ap.add_argument("--multi-k", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--step-steps", type=int, default=3, help="steps per round in section 1")
    ap.add_argument("--step-rounds", type=int, default=4)
    ap.add_argument("--nmf-tokens", type=int, default=32_768)
    ap.add_argument("--nmf-rank", type=int, default=64)
    ap.add_argument("--nmf-keep", type=float, default=0.05)
    ap.add_argument("--nmf-iters", type=int, default=10)
    ap.add_argument("--rss-tokens", type=int, nargs="+", default=[32_768, 98_304])
    ap.add_argument("--dtype", default="bfloat16", help="store dtype")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sections", nargs="+", default=["step", "saelens", "sparsify", "multi", "nmf"])
    ap.add_argument("--json", default="bench/out/sae.json")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: check that every section runs")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.heldout, args.batch, args.multi_k = 4096, 1024, 1024, [16, 32]
        args.step_steps, args.step_rounds, args.nmf_tokens, args.nmf_iters = 1, 2, 2048, 2
        args.nmf_rank, args.rss_tokens = 16, [2048, 4096]
    return args


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    info = machine()
    note(f"{info['cpu']}, {args.threads} threads, torch {info['torch']}")
    model, tok = actscope.load_model("default")
    train_tokens, held_tokens = split_tokens(args, tok)
    args.tokens = train_tokens.num_tokens
    folder = tempfile.mkdtemp(prefix="actscope-bench-sae-")
    results: dict[str, Any] = {"machine": info, "args": vars(args)}
    try:
        note(f"recording {train_tokens.num_tokens:,} train tokens of {SITE} and {MLP}")
        t = time.perf_counter()
        store = actscope.record(model, tok, f"{folder}/train", [SITE, MLP], tokens=train_tokens, dtype=args.dtype,
                                progress=False)
        record_s = time.perf_counter() - t
        held = actscope.record(model, tok, f"{folder}/held", [SITE], tokens=held_tokens, dtype=args.dtype,
                               progress=False)
        X_held = held.read(SITE)[torch.arange(held.num_tokens) % held.seq_len != 0].float()
        results["record"] = {"seconds": record_s, "tokens": store.num_tokens}
        if "step" in args.sections:
            results["step"] = step_section(args, store)
        single: dict[str, Any] = {}
        if {"saelens", "sparsify", "multi"} & set(args.sections):
            note(f"actscope.sae.train: k={args.k}, {args.tokens:,} tokens")
            seconds, fitted, traj = train_ours(store, [args.k], args, trace=True)
            steps = math.ceil(args.tokens / args.batch)
            single = {"seconds": seconds, "tokens_per_s": steps * args.batch / seconds, "trajectory": traj,
                      "sae": fitted[0], **shared_fvu(ours_recon(fitted[0]), X_held)}
            results["actscope"] = {k: v for k, v in single.items() if k != "sae"}
        have = {name: info[peer] != "not installed" for name, peer in (("saelens", "sae_lens"), ("sparsify", "sparsify"))}
        for name in (n for n, ok in have.items() if not ok and n in args.sections):  # no fake numbers
            out(f"### {name}: not measured: the peer is not installed (pip install -e '.[bench]')\n")
        if "saelens" in args.sections and have["saelens"]:
            results["saelens"] = saelens_section(args, store, X_held, single)
        if "sparsify" in args.sections and have["sparsify"]:
            results["sparsify"] = sparsify_section(args, model, train_tokens, X_held, single, record_s)
        if "multi" in args.sections:
            results["multi"] = multi_section(args, store, X_held, single)
        if "nmf" in args.sections:
            results["nmf"] = nmf_section(args, store, f"{folder}/train")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    info["load_end"] = os.getloadavg()[0]
    print(f"\n## SAE benchmark ({info['date']})\n")
    print(f"{info['cpu']} ({info['cores']} cores), {args.threads} threads, torch {info['torch']}, SAELens "
          f"{info['sae_lens']}, sparsify {info['sparsify']}; load average {info['load_start']:.1f} at start, "
          f"{info['load_end']:.1f} at end. Store: {args.tokens:,} train tokens recorded in {record_s:.1f} s "
          f"({args.dtype}), {X_held.shape[0]:,} held-out tokens (disjoint sequences).\n\n`{info['command']}`\n")
    print("\n".join(MD))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    note(f"wrote {args.json}")


if __name__ == "__main__":
    main()
