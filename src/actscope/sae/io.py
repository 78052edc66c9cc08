"""SAE folders: we write SAELens's v6 layout; we read SAELens, EleutherAI sparsify and
dictionary_learning folders. Nothing here writes or unpickles a pickle.

What we write (``save_pretrained``), so that ``sae_lens.SAE.load_from_disk`` takes it as is:

    cfg.json                 architecture, d_in, d_sae, apply_b_dec_to_input, normalize_activations
                             "none" (our training scales are folded into the weights), k for TopK,
                             metadata.hook_name (our site name), metadata.model_name, and
                             metadata.actscope (our architecture, hyperparameters, outlier policy,
                             training history)
    sae_weights.safetensors  W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_enc, b_dec, threshold
    sparsity.safetensors     sparsity: log10 of each latent's firing rate during training

BatchTopK is saved as a JumpReLU with its learned threshold on every latent, which is how it is
meant to be used after training (a token's latent count then no longer depends on its batch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .. import __version__
from ..tensorfile import load_tensors
from .base import ARCHITECTURES, SAEError, SparseAutoencoder

SAELENS_CFG, SAELENS_WEIGHTS, SAELENS_SPARSITY = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
SAELENS_VERSION = "6.0.0"  # the schema we write; SAELens reads it without its pre-6 conversion


def _saelens_architecture(sae: SparseAutoencoder) -> str:
    arch = sae.saelens_architecture
    if sae.transcoder:
        if arch == "topk":
            if sae.W_dec_.shape[1] != sae.d_in:
                raise SAEError("SAELens has no TopK transcoder whose output size differs from its input size")
            return "topk"  # with apply_b_dec_to_input false, SAELens's TopK SAE is a TopK transcoder
        return {"standard": "transcoder", "jumprelu": "jumprelu_transcoder"}[arch]
    return arch


def save_pretrained(sae: SparseAutoencoder, folder: str | Path) -> Path:
    """Write ``sae`` as a SAELens v6 folder; returns the folder."""
    sae._need_fit()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arch = _saelens_architecture(sae)
    meta = dict(sae.meta_)
    cfg: dict[str, Any] = {
        "architecture": arch, "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": str(sae.W_enc_.dtype).replace("torch.", ""),
        "device": "cpu", "apply_b_dec_to_input": bool(sae.apply_b_dec_to_input_), "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": None,
            "model_name": meta.get("model_name") or "", "hook_name": sae.site_, "hook_head_index": None,
            "actscope": {"version": __version__, "architecture": sae.architecture, "site": sae.site_,
                         "target_site": sae.target_site_, **{k: v for k, v in meta.items() if k != "model_name"},
                         "hyperparameters": sae.get_params()},
        },
    }
    if sae.transcoder:
        cfg["d_out"] = sae.W_dec_.shape[1]
        cfg["metadata"]["hook_name_out"] = sae.target_site_
    if hasattr(sae, "k") and arch == "topk":
        cfg["k"] = sae.k
        cfg["rescale_acts_by_decoder_norm"] = False
    tensors = {"W_enc": sae.W_enc_, "W_dec": sae.W_dec_, "b_enc": sae.b_enc_, "b_dec": sae.b_dec_}
    if "jumprelu" in arch:
        tensors["threshold"] = sae.threshold_.expand(sae.d_sae)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / SAELENS_WEIGHTS))
    density = getattr(sae, "log_density_", None)
    if density is not None:
        save_file({"sparsity": density.contiguous()}, str(folder / SAELENS_SPARSITY))
    (folder / SAELENS_CFG).write_text(json.dumps(cfg, indent=1, default=str))
    return folder


# --- reading -------------------------------------------------------------------------------
def _build(arch: str, params: dict[str, Any]) -> SparseAutoencoder:
    cls = ARCHITECTURES.get(arch)
    if cls is None:
        raise SAEError(f"unknown SAE architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    probe = cls()
    known = probe.get_params()
    return cls(**{k: v for k, v in params.items() if k in known})


def _load_saelens(folder: Path) -> SparseAutoencoder:
    cfg = json.loads((folder / SAELENS_CFG).read_text())
    meta = cfg.get("metadata") or {}
    ours = meta.get("actscope") or {}
    arch = cfg.get("architecture", "standard")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise SAEError(f"{folder}: normalize_activations={cfg['normalize_activations']!r} is not supported; "
                       "fold the normalisation into the weights first")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise SAEError(f"{folder}: rescale_acts_by_decoder_norm SAEs are not supported")
    w = load_tensors(folder / SAELENS_WEIGHTS)
    ours_arch = ours.get("architecture") or {"standard": "relu", "transcoder": "relu", "topk": "topk",
                                              "jumprelu": "jumprelu", "jumprelu_transcoder": "jumprelu"}.get(arch)
    if ours_arch is None:
        raise SAEError(f"{folder}: SAELens architecture {arch!r} is not supported (topk, jumprelu, standard, "
                       "transcoder, jumprelu_transcoder are)")
    params = dict(ours.get("hyperparameters") or {})
    if params:  # saved before the optimiser became a choice: it was Adam
        params.setdefault("optimizer", "adam")
    if "k" in cfg:
        params["k"] = cfg["k"]
    sae = _build(ours_arch, params)
    extra = {"threshold": w["threshold"]} if "threshold" in w else {}
    site = ours.get("site") or meta.get("hook_name") or cfg.get("hook_name")
    target = ours.get("target_site") or meta.get("hook_name_out") or site
    sae_meta = {k: v for k, v in ours.items() if k not in ("architecture", "site", "target_site", "version")}
    sae_meta["model_name"] = meta.get("model_name") or cfg.get("model_name") or ""
    sae.set_fitted(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], site=site, target_site=target,
                   apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), extra=extra, meta=sae_meta)
    if (folder / SAELENS_SPARSITY).exists():
        sae.log_density_ = load_tensors(folder / SAELENS_SPARSITY)["sparsity"]
    return sae


def _load_sparsify(folder: Path) -> SparseAutoencoder:
    """EleutherAI sparsify: ``encoder.weight`` [n, d_in] (transposed for us), ``W_dec`` [n, d_out]."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_tensors(folder / "sae.safetensors")
    if cfg.get("activation", "topk") != "topk" or cfg.get("skip_connection") or "W_skip" in w:
        raise SAEError(f"{folder}: only sparsify TopK coders without a skip connection are supported")
    sae = _build("topk", {"k": cfg["k"], "n_latents": w["encoder.weight"].shape[0]})
    transcode = bool(cfg.get("transcode"))
    return sae.set_fitted(w["encoder.weight"].t(), w["encoder.bias"], w["W_dec"], w["b_dec"], site=folder.name,
                          target_site=f"{folder.name}:target" if transcode else None,
                          apply_b_dec_to_input=not transcode, meta={"source": "sparsify"})


def _load_dictionary_learning(folder: Path) -> SparseAutoencoder:
    """saprmarks/dictionary_learning ``ae.pt`` (a state dict: encoder.weight [n, d], decoder.weight [d, n])."""
    state = torch.load(folder / "ae.pt", map_location="cpu", weights_only=True)  # never unpickles objects
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    trainer = cfg.get("trainer", {})
    k = state.get("k", trainer.get("k"))
    W_enc, b_enc = state["encoder.weight"].t(), state["encoder.bias"]
    W_dec = state["decoder.weight"].t()
    b_dec = state.get("b_dec", state.get("bias"))
    if b_dec is None:
        raise SAEError(f"{folder}/ae.pt: no decoder bias (b_dec or bias) in the state dict")
    extra = {}
    if "threshold" in state and k is not None and int(state["threshold"].numel()) == 1 and float(state["threshold"]) >= 0:
        sae = _build("batchtopk", {"k": int(k), "n_latents": W_enc.shape[1]})
        extra = {"threshold": state["threshold"].reshape(1).expand(W_enc.shape[1]).float()}
    elif k is not None:
        sae = _build("topk", {"k": int(k), "n_latents": W_enc.shape[1]})
    elif "threshold" in state:
        sae = _build("jumprelu", {"n_latents": W_enc.shape[1]})
        extra = {"threshold": state["threshold"]}
    else:
        sae = _build("relu", {"n_latents": W_enc.shape[1]})
    return sae.set_fitted(W_enc, b_enc, W_dec, b_dec, site=trainer.get("submodule_name"), extra=extra,
                          meta={"source": "dictionary_learning"})


def load(folder: str | Path) -> SparseAutoencoder:
    """Load an SAE folder: ours (SAELens layout), SAELens, EleutherAI sparsify or dictionary_learning."""
    folder = Path(folder)
    if (folder / SAELENS_WEIGHTS).exists() and (folder / SAELENS_CFG).exists():
        return _load_saelens(folder)
    if (folder / "sae.safetensors").exists() and (folder / "cfg.json").exists():
        return _load_sparsify(folder)
    if (folder / "ae.pt").exists():
        return _load_dictionary_learning(folder)
    if folder.is_dir():
        subs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        hint = f"; it has subfolders ({', '.join(subs[:5])}): pass one of them" if subs else ""
        raise SAEError(f"{folder}: not an SAE folder (no cfg.json + sae_weights.safetensors, sae.safetensors "
                       f"or ae.pt){hint}")
    raise SAEError(f"{folder}: no such folder")
