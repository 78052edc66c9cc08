"""The peers that bench/sae.py measures actscope against, each driven through its own public API.

- SAELens's ``SAETrainer`` on the same activations as actscope (the same store tokens, in the same
  order, the same batch size and token count, the same learning rate and decay), so that the
  ratio isolates the trainer itself: both read through the same store reader.
- EleutherAI sparsify's ``Trainer`` on the fly: it runs the whole model on every batch and trains
  on a forward hook, which is the alternative to recording a store once.
- A direct in-memory semi-NMF: the paper's loop written on the whole activation matrix, the
  reference that ``actscope.nmf`` (streamed from the store) is timed against.

Every trainer hands back a ``Recon`` (activations -> reconstruction and per-row L0) so that all
of them are scored by one FVU computation (``shared_fvu``, below with the other measuring helpers),
independent of every trainer's own metrics. Run as a script, this file is the fresh child process
whose peak memory section 5 reads (``python bench/sae_peers.py ours|memory STORE SITE TOKENS ...``).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator

import torch

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's Triton decoder needs a GPU: use its eager one

Recon = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def saelens_train(batches: Iterator[torch.Tensor], *, d_in: int, n_latents: int, k: int, batch_size: int,
                  steps: int, lr: float, decay_steps: int, norm_batches: int, seed: int) -> tuple[float, Recon]:
    """Train SAELens's TopK SAE with ``SAETrainer.fit``; returns (seconds, recon).

    ``expected_average_only_in`` is SAELens's name for the scaling actscope applies too (mean
    squared norm d_in), so both train in the same units with the same learning rate. SAELens
    estimates that scale from ``norm_batches`` batches of the provider before it trains, as
    actscope does from its 16,384-token initialisation sample.
    """
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=n_latents, k=k,
                                                normalize_activations="expected_average_only_in"))
    cfg = SAETrainerConfig(total_training_samples=steps * batch_size, train_batch_size_samples=batch_size, lr=lr,
                           lr_end=lr, lr_decay_steps=decay_steps, n_batches_for_norm_estimate=norm_batches)
    SAETrainer(cfg, sae, batches).fit()
    seconds = time.perf_counter() - t0
    sae.eval()

    def recon(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = sae.encode(x)
        return sae.decode(z), (z != 0).sum(1)

    return seconds, recon


def rechunk(batches: Iterator[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Batches of exactly ``batch_size`` rows from batches of any size (kept order)."""
    carry = torch.empty(0)
    for b in batches:
        carry = b if carry.numel() == 0 else torch.cat([carry, b])
        while carry.shape[0] >= batch_size:
            yield carry[:batch_size]
            carry = carry[batch_size:]


def sparsify_train(model: torch.nn.Module, input_ids: torch.Tensor, *, layer: int, k: int, expansion: int,
                   batch_seqs: int, save_dir: str, seed: int) -> tuple[float, Recon, list[tuple[float, float]]]:
    """Train sparsify on the fly on ``model.layers[layer]``'s output; returns (seconds, recon, trajectory).

    The dataset is an in-memory ``datasets.Dataset`` of the same packed sequences actscope
    records (shuffled by sequence, as sparsify expects its input to be). ``trajectory`` holds
    (training seconds, batch FVU) per step, measured by a forward hook on the coder with the
    same definition as actscope's training FVU (position 0 left out, the batch's own mean), its
    own cost taken off the clock. The returned ``recon`` uses the weights sparsify saves, which
    are the schedule-free average (the in-memory ones are the optimiser's gradient point).
    """
    from datasets import Dataset
    from sparsify import SparseCoder, SparseCoderConfig, TrainConfig, Trainer

    seq_len = input_ids.shape[1]
    order = torch.randperm(input_ids.shape[0], generator=torch.Generator().manual_seed(seed))
    ds = Dataset.from_dict({"input_ids": input_ids[order].tolist()}).with_format("torch")
    hook = f"layers.{layer}"
    cfg = TrainConfig(SparseCoderConfig(k=k, expansion_factor=expansion), batch_size=batch_seqs, hookpoints=[hook],
                      log_to_wandb=False, save_dir=save_dir, run_name="bench", save_every=10**9, init_seeds=[seed])
    trajectory: list[tuple[float, float]] = []
    clock = {"start": time.perf_counter(), "paused": 0.0}

    def watch(module: torch.nn.Module, args: tuple, kwargs: dict, out) -> None:
        t = time.perf_counter()
        with torch.no_grad():
            x = kwargs["x"] if "x" in kwargs else args[0]
            keep = torch.arange(x.shape[0]) % seq_len != 0
            y, y_hat = x[keep].double(), out.sae_out[keep].double()
            fvu = float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        trajectory.append((t - clock["start"] - clock["paused"], fvu))
        clock["paused"] += time.perf_counter() - t

    try:
        trainer = Trainer(cfg, ds, model)
        trainer.saes[hook].register_forward_hook(watch, with_kwargs=True)
        trainer.fit()
    finally:
        torch.set_float32_matmul_precision("highest")  # sparsify's fit sets "high" process-wide
    seconds = time.perf_counter() - clock["start"] - clock["paused"]
    coder = SparseCoder.load_from_disk(f"{save_dir}/bench/{hook}")

    def recon(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acts, idx, _ = coder.encode(x)
        return coder.decode(acts, idx), (acts > 0).sum(1)

    return seconds, recon, trajectory


def in_memory_semi_nmf(X: torch.Tensor, G: torch.Tensor, iters: int, keep_share: float) -> tuple[list[float], float]:
    """The semi-NMF loop on the whole matrix in memory; returns (loss per iteration, seconds).

    ``X`` is tokens x d_ff (the paper's A transposed), float64. Per iteration: F by least squares
    through the pseudo-inverse of G^T G, winner-take-all on each feature's neurons, unit-norm
    columns (G absorbs the scale), Ding's multiplicative update of G, and the loss from the
    explicit product. Loading ``X`` is not timed.
    """
    pos = lambda M: (M.abs() + M) / 2  # noqa: E731
    neg = lambda M: (M.abs() - M) / 2  # noqa: E731
    keep = max(1, math.ceil(keep_share * X.shape[1]))
    losses = []
    t0 = time.perf_counter()
    for _ in range(iters):
        F = X.T @ G @ torch.linalg.pinv(G.T @ G)
        idx = F.abs().topk(keep, dim=0).indices
        F = torch.zeros_like(F).scatter_(0, idx, F.gather(0, idx))
        s = F.norm(dim=0).clamp_min(1e-12)
        F, G = F / s, G * s
        XF, FtF = X @ F, F.T @ F
        G = G * torch.sqrt((pos(XF) + G @ neg(FtF)) / (neg(XF) + G @ pos(FtF)).clamp_min(1e-12))
        losses.append(float(torch.sub(X, G @ F.T).pow_(2).sum()))
    return losses, time.perf_counter() - t0


# --- measuring helpers shared by bench/sae.py's sections --------------------------------------
def shared_fvu(recon: Recon, X: torch.Tensor) -> dict:
    """FVU = sum ||x - x_hat||^2 / sum ||x - mean||^2 over all of X (float64, mean of the whole
    set, two passes), and mean L0: one definition for every trainer, none of theirs."""
    X64 = X.double()
    sse = l0 = 0.0
    with torch.no_grad():
        for x in X.split(4096):
            x_hat, active = recon(x)
            sse += float((x.double() - x_hat.double()).pow(2).sum())
            l0 += float(active.sum())
    return {"fvu": sse / float((X64 - X64.mean(0)).pow(2).sum()), "l0": l0 / X.shape[0]}


def smoothed(traj: list[tuple[float, float]], window: int = 3) -> list[tuple[float, float]]:
    """Running mean of the training FVU over ``window`` steps (one batch's FVU is noisy)."""
    return [(t, statistics.fmean(f for _, f in traj[max(0, i - window + 1): i + 1])) for i, (t, _) in enumerate(traj)]


def time_to(traj: list[tuple[float, float]], target: float) -> float | None:
    """Seconds until the smoothed training FVU first reaches ``target`` (None: never)."""
    return next((t for t, f in smoothed(traj) if f <= target), None)


def status_mb(key: str) -> float:
    """A field of /proc/self/status in MiB. VmHWM (peak RSS), not ru_maxrss: ru_maxrss survives
    fork+exec and would report the parent's peak. RssAnon leaves out memory-mapped file pages
    (the store's shards, the codes file), which the kernel can drop and re-read at will."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":")) / 1024


def machine() -> dict:
    """What the figures were measured on (printed above the tables): on a shared machine the load
    average at start and end tells how far to trust the absolute times."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    versions = {}
    for name, dist in (("sae_lens", "sae-lens"), ("sparsify", "eai-sparsify"), ("transformers", "transformers")):
        try:
            versions[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, **versions,
            "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "load_start": os.getloadavg()[0]}


def nmf_peak_rss(kind: str, store: str, site: str, tokens: int, rank: int, keep_share: float, threads: int,
                 iters: int = 2) -> dict[str, float]:
    """Peak RSS and peak anonymous RSS (MiB) of a fresh process fitting semi-NMF (``ours`` or
    ``memory``) on ``tokens`` tokens: a child, so that the parent's model and earlier sections
    are not counted."""
    cmd = [sys.executable, __file__, kind, store, site, str(tokens), str(rank), str(keep_share), str(threads), str(iters)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(res.strip().splitlines()[-1])


def _nmf_child(kind: str, store_url: str, site: str, tokens: str, rank: str, keep: str, threads: str, iters: str) -> None:
    from actscope import open_store
    from actscope.nmf import SemiNMF

    torch.set_num_threads(int(threads))
    peak, done = {"anon": 0.0}, threading.Event()

    def sample() -> None:  # the kernel keeps no peak of RssAnon: poll it (the matmuls release the GIL)
        while not done.is_set():
            peak["anon"] = max(peak["anon"], status_mb("RssAnon"))
            done.wait(0.005)

    threading.Thread(target=sample, daemon=True).start()
    store, n = open_store(store_url), int(tokens)
    nmf = SemiNMF(int(rank), keep_share=float(keep), max_iter=int(iters), tol=0)
    if kind == "ours":
        nmf.fit(store, site, tokens=n)
    else:
        in_memory_semi_nmf(store.read(site, 0, n).double(), nmf.init_codes(n), int(iters), float(keep))
    done.set()
    print(json.dumps({"peak_rss_mb": status_mb("VmHWM"), "peak_anon_mb": max(peak["anon"], status_mb("RssAnon"))}))


if __name__ == "__main__":
    _nmf_child(*sys.argv[1:])
