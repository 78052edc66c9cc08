"""Training SAEs from a store: several at once, resumable bit for bit after ``kill -9``.

    actscope.sae.train(store, [Job(TopKSAE(k=16), "blocks.6.hook_resid_post"),
                               Job(TopKSAE(k=64), "blocks.6.hook_resid_post")], out="runs/sweep")

One pass over the store feeds every job: each batch of tokens is read once (all the jobs'
sites together) and every SAE takes a step on it, so a sweep over k, width or layers costs the
reading once. The recipe is the one that the field's bug reports converged on: encoder = decoder
transpose at init, unit-norm decoder rows with the gradient component parallel to each row
removed, ``b_dec`` at the geometric median, lr proportional to 1/sqrt(latents), AuxK on latents
dead for ``dead_tokens`` tokens; the optimiser is schedule-free sign descent by default, or Adam
with a linear decay of the lr over the last ``decay_share`` (``sae.optim`` says why).

Resume: the whole training state (weights, optimiser buffers, dead counters, the data position) is
one safetensors file, written atomically with its JSON description in the file's metadata, so a
kill at any instant leaves either the previous checkpoint or the new one, never a mixture. The
batches are a pure function of (seed, step), so a resumed run continues on exactly the batches the
uninterrupted run would have seen, and its weights come out bit-identical.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..store.reader import ActivationStore, open_store
from ..tensorfile import load_tensors
from .base import SAEError, SparseAutoencoder
from .data import Batch, OutlierPolicy, _gather, epoch_order
from .distributed import Group, Part, combine, my_slices
from .optim import adam_step, init_buffers, signum_step

CHECKPOINT = ".actscope-train"
INIT_TOKENS = 16384


@dataclass
class Job:
    """One SAE to train: on ``site``, reconstructing ``target`` (a transcoder) or ``site`` itself."""

    sae: SparseAutoencoder
    site: str
    target: str | None = None

    @property
    def name(self) -> str:
        p = self.sae.get_params()
        tag = f"{self.sae.architecture}" + (f"-k{p['k']}" if "k" in p else "")
        tag += f"-n{p['n_latents']}" if p["n_latents"] else f"-x{p['expansion']}"
        sites = self.site + (f"-to-{self.target}" if self.target else "")
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{sites}-{tag}")


def geometric_median(x: torch.Tensor, iters: int = 50) -> torch.Tensor:
    """The point minimising the summed distances to the rows of ``x`` (Weiszfeld, float64)."""
    x = x.double()
    m = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - m).norm(dim=1).clamp_min(1e-8)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() < 1e-7 * max(float(m.norm()), 1.0):
            m = new
            break
        m = new
    return m.float()


class _Run:
    """Training state of one job: parameters, optimiser buffers, state, scales, outlier policy."""

    def __init__(self, job: Job, device: torch.device | str = "cpu", amp: bool = False):
        self.job = job
        self.sae = job.sae
        self.device = torch.device(device)
        self.amp = amp  # bf16 autocast around the loss; parameters and optimiser buffers stay float32
        self.p: dict[str, torch.Tensor] = {}
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.state: dict[str, torch.Tensor] = {}
        self.meta: dict[str, Any] = {}
        self.last: dict[str, float] = {}

    # --- initialisation -----------------------------------------------------------------
    def init(self, x: torch.Tensor, y: torch.Tensor, positions: torch.Tensor, transcoder: bool) -> None:
        sae = self.sae
        norms = x.float().norm(dim=1)
        ref = norms[positions != 0] if sae.skip_first and bool((positions != 0).any()) else norms
        policy = OutlierPolicy(sae.skip_first, sae.max_norm_ratio, float(ref.median()))
        keep = policy.keep(x, positions)
        if not bool(keep.any()):
            raise SAEError("every token of the initialisation sample is an outlier; loosen max_norm_ratio")
        x, y = x[keep].float(), y[keep].float()
        scale_in = math.sqrt(x.shape[1] / float(x.pow(2).sum(1).mean().clamp_min(1e-12)))
        scale_out = math.sqrt(y.shape[1] / float(y.pow(2).sum(1).mean().clamp_min(1e-12))) if transcoder else scale_in
        d_in, d_out, n = x.shape[1], y.shape[1], sae.latents_for(x.shape[1])
        gen = torch.Generator().manual_seed(sae.seed)
        W_dec = torch.randn(n, d_out, generator=gen)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        if d_in == d_out:
            W_enc = W_dec.clone()  # the encoder starts as the decoder's transpose
        else:
            W_enc = torch.randn(n, d_in, generator=gen)
            W_enc /= W_enc.norm(dim=1, keepdim=True)
        ys = y * scale_out
        b_dec = {"geometric_median": geometric_median, "mean": lambda t: t.mean(0),
                 "zeros": lambda t: torch.zeros(t.shape[1])}[sae.b_dec_init](ys)
        self.p = {"W_enc": W_enc, "b_enc": torch.zeros(n), "W_dec": W_dec, "b_dec": b_dec}
        self.state = {"since_fired": torch.zeros(n, dtype=torch.long), "fires": torch.zeros(n, dtype=torch.long),
                      "tokens": torch.zeros((), dtype=torch.long), "transcoder": torch.tensor(transcoder)}
        sae.init_extra(self.p, self.state)
        self.to_device()
        self.m, self.v = init_buffers(sae.optimizer, self.p)
        self.meta = {"scale_in": scale_in, "scale_out": scale_out, "outliers": policy.to_dict(),
                     "lr": sae.learning_rate(n), "history": []}

    def to_device(self) -> None:
        for d in (self.p, self.m, self.v, self.state):
            d.update({k: t.to(self.device) for k, t in d.items()})

    # --- one step -------------------------------------------------------------------------
    def forward(self, batch: Batch, seq_len: int) -> Part | None:
        """Loss and gradients on one batch (or one slice of it); None if under 2 tokens are kept."""
        sae, job = self.sae, self.job
        x_raw = batch.rows[job.site]
        keep = OutlierPolicy.from_dict(self.meta["outliers"]).keep(x_raw, batch.positions(seq_len))
        x = x_raw[keep].to(self.device).float() * self.meta["scale_in"]
        y = batch.rows[job.target][keep].to(self.device).float() * self.meta["scale_out"] if job.target else x
        if x.shape[0] < 2:
            return None
        for t in self.p.values():
            t.requires_grad_(True)
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                loss, info = sae.train_loss(self.p, x, y, self.state)
            grads = torch.autograd.grad(loss.float(), list(self.p.values()), allow_unused=True)
        finally:
            for t in self.p.values():
                t.requires_grad_(False)
        return Part(list(grads), info, x.shape[0], float(loss.detach()))

    def update(self, part: Part, lr_factor: float, step: int) -> None:
        """One optimiser step from the (combined) gradients, then the dead-latent bookkeeping."""
        sae, info = self.sae, part.info
        with torch.no_grad():
            signum = sae.optimizer == "signum"
            lr = self.meta["lr"] * (1.0 if signum else lr_factor)  # signum's average is its schedule
            for (name, w), g in zip(self.p.items(), part.grads):
                if g is None:
                    continue
                g = g.to(w.dtype)
                unit_rows = name == "W_dec" and sae.unit_norm_decoder
                if unit_rows:
                    g = g - (g * w).sum(1, keepdim=True) * w  # keep the rows' norm: drop the parallel part
                if signum:
                    signum_step(w, g, self.m[name], self.v[name], lr, step, unit_rows)
                else:
                    adam_step(w, g, self.m[name], self.v[name], lr, step)
            if sae.unit_norm_decoder:
                self.p["W_dec"] /= self.p["W_dec"].norm(dim=1, keepdim=True).clamp_min(1e-12)
            sae.after_step(self.p, self.state, info)
            counts = info["counts"]
            self.state["since_fired"] += part.n
            self.state["since_fired"][counts > 0] = 0
            self.state["fires"] += counts
            self.state["tokens"] += part.n
        dead = float((self.state["since_fired"] >= sae.dead_tokens).float().mean())
        self.last = {"fvu": info["fvu"], "l0": info["l0"], "dead": dead, "loss": part.loss}

    def step(self, slices: list[Batch], seq_len: int, lr_factor: float, step: int, group: Group | None = None) -> None:
        """Forward every slice of this process, combine over slices and ranks, update."""
        group = group or Group(device=self.device)
        parts = [self.forward(b, seq_len) for b in slices]
        part = combine(parts, group, [t.shape for t in self.p.values()], self.p["b_enc"].shape[0], self.device)
        if part is not None:
            self.update(part, lr_factor, step)

    # --- export ---------------------------------------------------------------------------
    def finish(self, store: ActivationStore) -> SparseAutoencoder:
        """Fold the training scales into the weights and install them on the estimator."""
        s_in, s_out = self.meta["scale_in"], self.meta["scale_out"]
        p = {k: t.cpu() for k, t in self.p.items()}
        state = {k: t.cpu() for k, t in self.state.items()}
        transcoder = bool(state["transcoder"])
        extra = self.sae.export_extra(p, state)
        density = state["fires"].double() / max(int(state["tokens"]), 1)
        meta = {"model_name": store.manifest.get("model", {}).get("name", ""), "outliers": self.meta["outliers"], "scale_in": s_in,
                "scale_out": s_out, "training_tokens": int(state["tokens"]), "history": self.meta["history"],
                "hyperparameters": self.sae.get_params()}
        self.sae.set_fitted(p["W_enc"].t() * s_in, p["b_enc"].clone(), p["W_dec"] / s_out, p["b_dec"] / s_out,
                            site=self.job.site, target_site=self.job.target, apply_b_dec_to_input=not transcoder,
                            extra=extra, meta=meta)
        self.sae.log_density_ = torch.log10(density + 1e-10).float()
        return self.sae

    # --- checkpoint -----------------------------------------------------------------------
    def tensors(self, i: int) -> dict[str, torch.Tensor]:
        out = {}
        for group, d in (("p", self.p), ("m", self.m), ("v", self.v), ("s", self.state)):
            out.update({f"{i}.{group}.{k}": t.detach().cpu().contiguous() for k, t in d.items()})
        return out

    def restore(self, i: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        for group, d in (("p", self.p), ("m", self.m), ("v", self.v), ("s", self.state)):
            prefix = f"{i}.{group}."
            d.update({k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)})
        self.meta = meta
        self.to_device()


def _params(sae: SparseAutoencoder) -> dict[str, Any]:
    """Hyperparameters for the fingerprint; ``optimizer="adam"`` is left out, so a checkpoint
    written before the optimiser became a choice (Adam was the only one) still resumes."""
    return {k: v for k, v in sae.get_params().items() if not (k == "optimizer" and v == "adam")}


def _fingerprint(store: ActivationStore, jobs: Sequence[Job], settings: dict[str, Any]) -> str:
    spec = {"store": [store.num_tokens, store.manifest.get("data"), store.manifest.get("model"), store.sites],
            "settings": settings,
            "jobs": [[type(j.sae).__name__, _params(j.sae), j.site, j.target] for j in jobs]}
    return json.dumps(spec, sort_keys=True, default=str)


def _save_checkpoint(folder: Path, runs: list[_Run], step: int, fingerprint: str) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for i, r in enumerate(runs):
        tensors.update(r.tensors(i))
    meta = {"step": step, "fingerprint": fingerprint, "runs": [r.meta for r in runs]}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"state.safetensors.tmp-{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"actscope": json.dumps(meta)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, folder / "state.safetensors")


def _load_checkpoint(folder: Path, runs: list[_Run], fingerprint: str) -> int:
    """Restore the runs from the checkpoint in ``folder``; returns the step to continue from (0: none)."""
    path = folder / "state.safetensors"
    if not path.exists():
        return 0
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["actscope"])
    if meta["fingerprint"] != fingerprint:
        raise SAEError(f"{folder.parent} holds a checkpoint of a different training run (other store, sites or "
                       "hyperparameters): use another --out, or delete it to start over")
    tensors = load_tensors(path)
    for i, r in enumerate(runs):
        r.restore(i, tensors, meta["runs"][i])
    return int(meta["step"])


def _use_autocast(requested: bool | None, device: torch.device) -> bool:
    """bf16 autocast: on by default on CUDA, never on CPU (float32 matmuls are what CPUs do well)."""
    if requested is None:
        return device.type == "cuda"
    if requested and device.type != "cuda":
        raise SAEError(f"autocast=True is for CUDA (bf16 matmuls); training on {device.type} runs in float32: "
                       "leave autocast unset or pass False")
    return bool(requested)


def train(store: ActivationStore | str, jobs: Sequence[Job], *, out: str | Path | None = None,
          batch_size: int | None = None, tokens: int | None = None, seed: int | None = None,
          window_shards: int = 64, checkpoint_seconds: float = 60.0, checkpoint_steps: int | None = None,
          progress: bool = True, device: str | torch.device | None = None, autocast: bool | None = None,
          micro_batches: int = 1) -> list[SparseAutoencoder]:
    """Train every job in one pass over ``store``; returns the fitted estimators.

    ``batch_size``, ``tokens`` and ``seed`` default to the first job's SAE. With ``out``, the
    run checkpoints into ``out`` (every ``checkpoint_seconds`` or ``checkpoint_steps``), resumes
    from it, and saves the SAE there (one job) or in one subfolder per job, named after it.

    ``device=None`` is CUDA when there is one. ``autocast=None`` runs the loss under bf16
    autocast on CUDA (weights and optimiser state stay float32), not on CPU. Under ``torchrun`` each
    rank trains on its slice of every batch and only rank 0 writes (see ``sae.distributed``);
    ``micro_batches`` cuts each rank's share further, to save memory or to reproduce an N-rank
    run in fewer processes (N ranks = 1 process with ``micro_batches=N``).
    """
    store = open_store(str(store)) if not isinstance(store, ActivationStore) else store
    if not jobs:
        raise SAEError("nothing to train: give at least one Job(sae, site)")
    if micro_batches < 1:
        raise SAEError(f"micro_batches must be at least 1, not {micro_batches}")
    first = jobs[0].sae
    batch_size = batch_size or first.batch_size
    seed = first.seed if seed is None else seed
    total_tokens = tokens or first.tokens or store.num_tokens
    total_steps = max(1, math.ceil(total_tokens / batch_size))
    sites = sorted({s for j in jobs for s in (j.site, j.target) if s})
    for s in sites:
        store.shape(s)  # an unknown site fails here, with the closest names
    group = Group.from_env(device)
    try:
        amp = _use_autocast(autocast, group.device)
        return _train(store, jobs, group, amp, micro_batches, out, batch_size, seed, total_steps, sites,
                      window_shards, checkpoint_seconds, checkpoint_steps, progress)
    finally:
        group.close()


def _train(store: ActivationStore, jobs: Sequence[Job], group: Group, amp: bool, micro_batches: int,
           out: str | Path | None, batch_size: int, seed: int, total_steps: int, sites: list[str],
           window_shards: int, checkpoint_seconds: float, checkpoint_steps: int | None,
           progress: bool) -> list[SparseAutoencoder]:
    first = jobs[0].sae
    runs = [_Run(j, group.device, amp) for j in jobs]
    parts = group.world * micro_batches
    settings = {"batch_size": batch_size, "seed": seed, "total_steps": total_steps, "window_shards": window_shards}
    if parts > 1:  # the trajectory depends on the slicing (sae.distributed), not on which process runs a slice
        settings["slices"] = parts
    fingerprint = _fingerprint(store, jobs, settings)
    ckpt = Path(out) / CHECKPOINT if out is not None else None
    writer = group.rank == 0
    start = _load_checkpoint(ckpt, runs, fingerprint) if ckpt else 0
    if start == 0:
        index = next(epoch_order(store, min(INIT_TOKENS, store.num_tokens), seed + 7919, 0, window_shards))
        per_shard = store.sequences_per_shard * store.seq_len
        sample = {s: _gather(store, s, index, per_shard) for s in sites}
        for r in runs:
            r.init(sample[r.job.site], sample[r.job.target or r.job.site], index % store.seq_len, r.job.target is not None)
    decay_from = total_steps * (1 - first.decay_share)
    bar = tqdm(total=total_steps * batch_size, initial=start * batch_size, unit="tok", unit_scale=True,
               disable=not (progress and writer), desc="sae train", smoothing=0.1)
    last_save, every = time.monotonic(), max(1, total_steps // 200)
    step = start
    mine = range(group.rank * micro_batches, (group.rank + 1) * micro_batches)
    for slices in my_slices(store, sites, batch_size, parts, mine, seed=seed, window_shards=window_shards, skip=start):
        if step >= total_steps:
            break
        factor = 1.0 if step < decay_from else max(0.0, (total_steps - step) / max(total_steps - decay_from, 1))
        for r in runs:
            r.step(slices, store.seq_len, factor, step, group)
        step += 1
        bar.update(batch_size)
        if step % every == 0 or step == total_steps:
            for r in runs:
                r.meta["history"].append({"step": step, **{k: round(v, 6) for k, v in r.last.items()}})
            bar.set_postfix(fvu=f"{runs[0].last.get('fvu', float('nan')):.3f}", l0=f"{runs[0].last.get('l0', 0):.1f}")
        due = (checkpoint_steps and step % checkpoint_steps == 0) or time.monotonic() - last_save > checkpoint_seconds
        if ckpt and writer and due and step < total_steps:
            _save_checkpoint(ckpt, runs, step, fingerprint)
            last_save = time.monotonic()
    bar.close()
    fitted = [r.finish(store) for r in runs]
    if out is not None and writer:
        folders = [Path(out)] if len(jobs) == 1 else [Path(out) / j.name for j in jobs]
        for sae, folder in zip(fitted, folders):
            sae.save_pretrained(folder)
        if ckpt:
            _save_checkpoint(ckpt, runs, step, fingerprint)  # a re-run finds the work done
    return fitted
