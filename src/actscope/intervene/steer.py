"""Steering vectors: extract them from contrastive prompts, apply them during forward and generate.

    vec = actscope.steering_vector(model, tok, positive, negative, layers=range(8, 21))
    with vec.apply(model, scale=4.0, positions="generated"):
        model.generate(...)

Definitions (docs/methods.md, "Intervene"): difference-in-means ``v_l = mean(h_l | positive) -
mean(h_l | negative)`` (CAA / ActAdd) or the first principal component of the centred paired
differences (a unit vector, sign aligned with the mean difference, as RepE reading vectors);
applied as ``h_l += scale * w_l * v_l`` on ``blocks.l.hook_resid_post``. Extraction streams:
only per-layer sums (and, for PCA, a d x d scatter matrix) are kept, never all hidden states.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from ..errors import ActscopeError
from ..validate import positive_int, text_list
from ..hooks import edits, hook_module, hooks
from ..kvcache import cached_length
from ..sites import site_map
from ..trace import trace
from .edits import add, bind, project_out
from .prompts import encode_batch
from .results import write_files

POSITIONS = ("all", "prompt", "generated")


@dataclass
class SteeringVector:
    """Per-layer directions for ``blocks.{l}.hook_resid_post``."""

    directions: dict[int, torch.Tensor]
    method: str = "mean_diff"
    model_type: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    @classmethod
    def from_sae(cls, sae: Any, latent: int) -> "SteeringVector":
        """One SAE latent as a steering direction: its decoder row, unit norm, at the SAE's layer.

        The decoder row is what the latent adds to the residual stream when it fires, so steering
        along it is "more of this feature". Only SAEs on ``blocks.L.hook_resid_post`` qualify, the
        site that steering writes to; the scale is calibrated by ``steer`` as for any vector.
        """
        import re

        site = getattr(sae, "residual_site_", None) or getattr(sae, "site_", "")  # residual_site_: nmf.NMFLatents
        match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", str(site))
        if match is None or getattr(sae, "transcoder", False):
            raise ActscopeError(f"steering needs an SAE on blocks.L.hook_resid_post (or a semi-NMF saved with "
                                f"--model), not {getattr(sae, 'site_', None)!r}")
        if not 0 <= latent < sae.d_sae:
            raise ActscopeError(f"latent {latent} is out of range: this SAE has {sae.d_sae} latents")
        row = sae.W_dec_[latent].float()
        return cls({int(match.group(1)): row / row.norm().clamp_min(1e-12)}, "sae_latent",
                   meta={"latent": latent, "site": sae.site_})

    # --- saving, HF style -------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Everything but the vectors themselves (they go to safetensors): config and per-layer norms."""
        return {"method": self.method, "model_type": self.model_type, "layers": self.layers, "meta": self.meta,
                "norms": {str(l): float(self.directions[l].float().norm()) for l in self.layers}}

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """``vectors.safetensors`` + ``steering_config.json``, each written atomically."""
        from safetensors.torch import save

        blob = save({f"direction.{l}": v.float().contiguous() for l, v in self.directions.items()})
        config = {"method": self.method, "model_type": self.model_type, "layers": self.layers, "meta": self.meta}
        return write_files(folder, {"vectors.safetensors": blob, "steering_config.json": json.dumps(config, indent=1)})

    save = save_pretrained  # every intervention result has save(folder)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "SteeringVector":
        from ..tensorfile import load_tensors

        folder = Path(folder)
        if str(folder).endswith(".gguf"):
            return cls.from_gguf(folder)
        try:
            tensors = load_tensors(folder / "vectors.safetensors")
            config = json.loads((folder / "steering_config.json").read_text())
        except (OSError, ValueError) as exc:  # ValueError: bad JSON; safetensors raises its own errors too
            raise ActscopeError(f"{folder}: not a saved steering vector ({exc})".splitlines()[0]) from None
        except Exception as exc:  # noqa: BLE001 - safetensors' SafetensorError: a damaged file
            raise ActscopeError(f"{folder}: unreadable vectors.safetensors ({type(exc).__name__})") from None
        if not isinstance(config, dict):
            raise ActscopeError(f"{folder}/steering_config.json is not a JSON object")
        return cls(_directions(tensors, str(folder)), config.get("method", ""), config.get("model_type", ""),
                   config.get("meta", {}))

    # --- llama.cpp control vectors ------------------------------------------------------------
    def to_gguf(self, path: str | os.PathLike) -> Path:
        """Write llama.cpp's control-vector GGUF (``direction.{l}`` tensors, as repeng does), atomically."""
        import gguf

        path = Path(path)
        with tempfile.TemporaryDirectory() as tmp:  # GGUFWriter wants a path; the file is moved in whole
            writer = gguf.GGUFWriter(str(Path(tmp) / "v.gguf"), "controlvector")
            writer.add_string("controlvector.model_hint", self.model_type or "unknown")
            writer.add_uint32("controlvector.layer_count", len(self.directions))  # as repeng writes it
            for l in self.layers:
                writer.add_tensor(f"direction.{l}", self.directions[l].float().numpy())
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            blob = (Path(tmp) / "v.gguf").read_bytes()
        write_files(path.parent, {path.name: blob})
        return path

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "SteeringVector":
        import gguf

        try:
            reader = gguf.GGUFReader(str(path))
        except Exception as exc:
            raise ActscopeError(f"{path}: not a readable GGUF file ({type(exc).__name__})") from None
        dirs = _directions({t.name: torch.tensor(t.data.copy()).reshape(-1).float() for t in reader.tensors}, str(path))
        hint = reader.fields.get("controlvector.model_hint")
        model_type = bytes(hint.parts[-1]).decode() if hint is not None else ""
        return cls(dirs, "gguf", model_type)

    # --- applying -------------------------------------------------------------------------------
    def apply(
        self,
        model: Any,
        scale: float = 1.0,
        layer_weights: dict[int, float] | None = None,
        positions: str = "all",
    ):
        """Context manager adding ``scale * w_l * v_l`` to each steered layer's output.

        ``positions``: "all"; "prompt" (positions of the prompt, i.e. of the first forward pass of
        a generation); or "generated" (positions after the prompt). Positions count in the KV
        cache, so generation with a cache is steered correctly at every step.
        """
        return steer(model, {l: v * (layer_weights or {}).get(l, 1.0) for l, v in self.directions.items()}, scale, positions)


class _PositionTracker:
    """Absolute position of the first token of the current forward pass, from the KV cache.

    The prompt is the input of the first forward pass in the context. A later pass with an empty
    cache that is longer than everything seen so far continues the same text (generation without
    a cache); one that is not starts a new prompt.
    """

    def __init__(self) -> None:
        self.offset = 0
        self.prompt_len: int | None = None
        self.seen = 0

    def pre_hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        past = cached_length(kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        length = int(ids.shape[1])
        self.offset = int(past)
        if past == 0 and (self.prompt_len is None or length <= self.seen):
            self.prompt_len = length
        self.seen = self.offset + length


@contextmanager
def steer(model: Any, vectors: Mapping[int | str, torch.Tensor], scale: float = 1.0,
          positions: str = "all") -> Iterator[None]:
    """Add ``scale * vectors[key]`` to a site's tensor for the block's duration.

    A key is a layer number (its ``blocks.l.hook_resid_post``) or any one site name, such as
    ``model:output`` or a per-head site (``blocks.3.attn.hook_z``, with a ``[head, d_head]``
    vector). ``positions`` picks the prompt's tokens, the generated ones, or all; it is tracked
    through the KV cache, so cached and uncached generation are steered alike.
    """
    if positions not in POSITIONS:
        raise ActscopeError(f"positions must be one of {', '.join(POSITIONS)}, not {positions!r}")
    if not math.isfinite(scale):
        raise ActscopeError(f"the steering scale must be a finite number, not {scale}")
    sm = site_map(model)
    bad = [l for l in vectors if isinstance(l, int) and not 0 <= l < sm.n_layers]
    if bad:
        raise ActscopeError(f"layers {bad} do not exist: the model has layers 0..{sm.n_layers - 1}")
    d_model = int(getattr(model.config, "hidden_size", 0) or 0)
    targets = {}
    for key, v in vectors.items():
        if isinstance(key, int):
            if d_model and v.numel() != d_model:
                raise ActscopeError(f"the vector for layer {key} has {v.numel()} dims; the model's residual has {d_model}")
            targets[key] = sm.sites[f"blocks.{key}.hook_resid_post"]
        else:
            found = sm.resolve(key)
            if len(found) != 1:
                raise ActscopeError(f"a steering key names one site; {key!r} matches {len(found)}")
            targets[key] = found[0]
        if not bool(torch.isfinite(v).all()):
            raise ActscopeError(f"the vector for {key!r} holds NaN or infinite values")
    tracker = _PositionTracker()

    def in_scope(hidden: torch.Tensor) -> torch.Tensor | None:
        """The steered positions of this forward pass, counted through the KV cache."""
        if positions == "all":
            return None
        pos = torch.arange(tracker.offset, tracker.offset + hidden.shape[1], device=hidden.device)
        limit = tracker.prompt_len or 0
        return (pos < limit) if positions == "prompt" else (pos >= limit)

    where = None if positions == "all" else in_scope
    pairs = [bind(targets[k], add(v, scale=scale, positions=where)) for k, v in vectors.items() if scale != 0]
    with hooks([lambda: hook_module(model, tracker.pre_hook, when="before")]), edits(model, pairs):
        yield


@contextmanager
def ablate_direction(model: Any, direction: torch.Tensor) -> Iterator[None]:
    """Project ``direction`` out of the residual stream at every layer: ``h <- h - (h . r) r``.

    Applied to the embedding output and every layer's output, so no layer reads the direction.
    """
    sm = site_map(model)
    names = (["hook_embed"] if "hook_embed" in sm.sites else []) + [f"blocks.{l}.hook_resid_post" for l in range(sm.n_layers)]
    remove = project_out(direction)
    with edits(model, [bind(sm.sites[n], remove) for n in names]):
        yield


def _batches(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _read(h: torch.Tensor, mask: torch.Tensor, position: str | int) -> torch.Tensor:
    """Pick one vector per prompt: the last real token, the mean over real tokens, or an index."""
    if position == "last":
        idx = mask.sum(1) - 1
        return h[torch.arange(h.shape[0]), idx]
    if position == "mean":
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)
    if isinstance(position, int):
        return h[:, position]
    raise ActscopeError(f"position must be 'last', 'mean' or an int, not {position!r}")


class _TopAxis:
    """Streaming first principal axis of paired differences, signed towards their mean.

    While there are fewer rows than dimensions (the usual case: tens of pairs, hundreds of
    dimensions) the rows are kept and the axis comes from a thin SVD, far cheaper than
    diagonalising a ``d x d`` covariance (docs/benchmarks.md, "Steering"). Past ``d`` rows they
    fold into a scatter matrix, so memory stays bounded however many pairs stream in.
    """

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] | None = []
        self.n = 0
        self.total: torch.Tensor | None = None
        self.scatter: torch.Tensor | None = None

    def add(self, d: torch.Tensor) -> None:
        self.n += d.shape[0]
        self.total = d.sum(0) if self.total is None else self.total + d.sum(0)
        if self.rows is not None:
            self.rows.append(d)
            if self.n > d.shape[1]:
                stacked = torch.cat(self.rows)
                self.scatter, self.rows = stacked.T @ stacked, None
        else:
            self.scatter = self.scatter + d.T @ d

    def direction(self) -> torch.Tensor:
        mean = self.total / self.n
        if self.rows is not None:
            _, _, vh = torch.linalg.svd(torch.cat(self.rows) - mean, full_matrices=False)
            v = vh[0]
        else:
            v = torch.linalg.eigh(self.scatter / self.n - torch.outer(mean, mean)).eigenvectors[:, -1]
        return v if v @ mean >= 0 else -v


def _directions(tensors: Mapping[str, torch.Tensor], source: str) -> dict[int, torch.Tensor]:
    """``{layer: vector}`` from ``direction.N`` tensors; any other name, or a non-finite value, is refused
    (a NaN in a control vector turns every logit into NaN)."""
    dirs: dict[int, torch.Tensor] = {}
    for name, v in tensors.items():
        layer = name[len("direction."):] if name.startswith("direction.") else ""
        if not layer.isdigit():
            raise ActscopeError(f"{source}: unknown tensor {name!r}; a steering vector holds direction.N tensors only")
        if not bool(torch.isfinite(v).all()):
            raise ActscopeError(f"{source}: {name} holds NaN or infinite values")
        dirs[int(layer)] = v.reshape(-1).float()
    if not dirs:
        raise ActscopeError(f"{source}: no direction.N tensors (not a steering vector or control-vector GGUF)")
    return dirs


def steering_vector(
    model: Any,
    tokenizer: Any,
    positive: Sequence[str],
    negative: Sequence[str],
    layers: Iterable[int] | None = None,
    method: str = "mean_diff",
    position: str | int = "last",
    batch_size: int = 8,
) -> SteeringVector:
    """Compute a steering vector from paired contrastive prompts, streaming over batches."""
    positive = text_list("positive", positive)  # a bare str would be read character by character
    negative = text_list("negative", negative)
    positive_int("batch_size", batch_size)
    if any(not t.strip() for t in [*positive, *negative]):
        raise ActscopeError("a steering prompt is empty; every positive and negative prompt needs text")
    if method not in ("mean_diff", "pca"):
        raise ActscopeError(f"method must be 'mean_diff' or 'pca', not {method!r}")
    if not positive or not negative:
        raise ActscopeError("steering needs at least one positive and one negative prompt")
    if method == "pca" and len(positive) != len(negative):
        raise ActscopeError(f"pca needs paired prompts: {len(positive)} positive vs {len(negative)} negative")
    sm = site_map(model)
    layer_ids = list(range(sm.n_layers) if layers is None else layers)
    sites = [f"blocks.{l}.hook_resid_post" for l in layer_ids]
    sums = {"pos": {}, "neg": {}}
    counts = {"pos": 0, "neg": 0}
    axes = {l: _TopAxis() for l in layer_ids}

    def read_batch(texts: Sequence[str]) -> dict[int, torch.Tensor]:
        enc = encode_batch(tokenizer, texts, model.device)
        with torch.inference_mode(), trace(model, sites, stop=True) as cache:  # later layers are not needed
            model(**enc, use_cache=False)
        return {l: _read(cache[s], enc["attention_mask"], position).double().cpu() for l, s in zip(layer_ids, sites)}

    for side, texts in (("pos", positive), ("neg", negative)):
        if method == "pca":
            continue
        for batch in _batches(texts, batch_size):
            for l, h in read_batch(batch).items():
                sums[side][l] = sums[side].get(l, 0) + h.sum(0)
            counts[side] += len(batch)
    if method == "pca":
        for pb, nb in zip(_batches(positive, batch_size), _batches(negative, batch_size)):
            hp, hn = read_batch(pb), read_batch(nb)
            for l in layer_ids:
                axes[l].add(hp[l] - hn[l])
    directions = {}
    for l in layer_ids:
        if method == "mean_diff":
            directions[l] = (sums["pos"][l] / counts["pos"] - sums["neg"][l] / counts["neg"]).float()
        else:
            directions[l] = axes[l].direction().float()
    meta = {"n_positive": len(positive), "n_negative": len(negative), "position": str(position)}
    return SteeringVector(directions, method, sm.model_type, meta)
