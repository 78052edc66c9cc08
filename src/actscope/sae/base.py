"""The estimator shape every SAE architecture shares.

    sae = TopKSAE(k=32, expansion=16).fit(store, "blocks.6.hook_resid_post", out="runs/sae")
    z = sae.encode(x); x_hat = sae.decode(z)
    sae.save_pretrained("runs/sae"); sae = actscope.sae.load("runs/sae")

Hyperparameters live in the constructor and are never changed by ``fit``; what ``fit`` learns
ends in ``_``. Fitted weights are kept in SAELens's orientation and in the *raw* activation
space: training works on activations scaled to a mean squared norm of ``d_in`` (so that one
learning rate fits every layer), and that scale is folded into the weights when training ends,
so a saved SAE needs no normalisation step from whoever loads it.

An architecture subclass supplies three things: ``activate`` (inference), ``train_loss`` (one
batch, in the scaled space, on training parameters), and optionally ``init_extra`` for
parameters beyond the four shared ones.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import ActscopeError
from .optim import OPTIMIZERS, base_rate

ARCHITECTURES: dict[str, type["SparseAutoencoder"]] = {}


class SAEError(ActscopeError):
    """Bad SAE input: an unknown architecture, an unfitted SAE, an unreadable folder."""


def register(cls: type["SparseAutoencoder"]) -> type["SparseAutoencoder"]:
    ARCHITECTURES[cls.architecture] = cls
    return cls


class SparseAutoencoder:
    """Base class: shared hyperparameters, encode/decode from the fitted weights, fit, save."""

    architecture: ClassVar[str] = ""
    saelens_architecture: ClassVar[str] = ""
    unit_norm_decoder: ClassVar[bool] = True

    def __init__(self, *, expansion: int = 16, n_latents: int | None = None, lr: float | None = None,
                 batch_size: int = 4096, tokens: int | None = None, b_dec_init: str = "geometric_median",
                 skip_first: bool = True, max_norm_ratio: float | None = 10.0, dead_tokens: int = 10_000_000,
                 aux_coef: float = 1 / 32, k_aux: int | None = None, decay_share: float = 0.2,
                 optimizer: str = "signum", seed: int = 0):
        """``optimizer``: ``"signum"`` (schedule-free sign descent, sparsify's default, much
        faster per token) or ``"adam"`` (SAELens's recipe; see ``sae.optim``); ``lr=None`` scales
        the learning rate with 1/sqrt(latents) (at 16,384 latents: 5e-3 signum, 2e-4 Adam);
        ``tokens=None`` trains one epoch of the store; ``dead_tokens``: a latent that has not
        fired for this many tokens is dead and gets the AuxK loss; ``k_aux=None`` is d_in/2."""
        if b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise SAEError(f"b_dec_init must be geometric_median, mean or zeros, not {b_dec_init!r}")
        if optimizer not in OPTIMIZERS:
            raise SAEError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {optimizer!r}")
        self.expansion = expansion
        self.n_latents = n_latents
        self.lr = lr
        self.batch_size = batch_size
        self.tokens = tokens
        self.b_dec_init = b_dec_init
        self.skip_first = skip_first
        self.max_norm_ratio = max_norm_ratio
        self.dead_tokens = dead_tokens
        self.aux_coef = aux_coef
        self.k_aux = k_aux
        self.decay_share = decay_share
        self.optimizer = optimizer
        self.seed = seed

    # --- hyperparameters -----------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """Constructor arguments of this class and its bases (the estimator's hyperparameters)."""
        names: list[str] = []
        for klass in type(self).__mro__:
            if klass is object or "__init__" not in klass.__dict__:
                continue
            for name, p in inspect.signature(klass.__init__).parameters.items():
                if name != "self" and p.kind == p.KEYWORD_ONLY and name not in names:
                    names.append(name)
        return {n: getattr(self, n) for n in names}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

    def latents_for(self, d_in: int) -> int:
        return self.n_latents or self.expansion * d_in

    def learning_rate(self, n_latents: int) -> float:
        return self.lr if self.lr is not None else base_rate(self.optimizer) / math.sqrt(n_latents / 2**14)

    # --- architecture hooks (overridden) ---------------------------------------------------
    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Latent activations from pre-activations, with the fitted weights (inference)."""
        raise NotImplementedError

    def init_extra(self, p: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
        """Add architecture-specific parameters (``p``) or buffers (``state``) at initialisation."""

    def train_loss(self, p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                   state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss on one batch, in the scaled space; returns ``(loss, info)`` where ``info`` holds
        ``counts`` (tokens each latent fired on), ``l0`` and ``fvu`` (floats)."""
        raise NotImplementedError

    def after_step(self, p: dict[str, torch.Tensor], state: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        """Update non-gradient state after an optimiser step (e.g. BatchTopK's threshold)."""

    def export_extra(self, p: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Architecture tensors to keep in the fitted SAE (e.g. ``threshold``), in raw units."""
        return {}

    # --- fitted state --------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "W_enc_")

    def _need_fit(self) -> None:
        if not self.is_fitted:
            raise SAEError(f"this {type(self).__name__} is not fitted: call fit(store, site) or actscope.sae.load(dir)")

    @property
    def transcoder(self) -> bool:
        return getattr(self, "target_site_", None) not in (None, getattr(self, "site_", None))

    @property
    def d_in(self) -> int:
        self._need_fit()
        return self.W_enc_.shape[0]

    @property
    def d_sae(self) -> int:
        self._need_fit()
        return self.W_enc_.shape[1]

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - b_dec) @ W_enc + b_enc`` (no ``b_dec`` subtraction for a transcoder)."""
        self._need_fit()
        x = x.to(self.W_enc_.dtype)
        if self.apply_b_dec_to_input_:
            x = x - self.b_dec_
        return x @ self.W_enc_ + self.b_enc_

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations ``[..., d_sae]`` of activations ``[..., d_in]``."""
        return self.activate(self.pre_activations(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``z @ W_dec + b_dec`` (of the target site, for a transcoder)."""
        self._need_fit()
        return z.to(self.W_dec_.dtype) @ self.W_dec_ + self.b_dec_

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def set_fitted(self, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, *,
                   site: str | None, target_site: str | None = None, apply_b_dec_to_input: bool = True,
                   extra: dict[str, torch.Tensor] | None = None, meta: dict[str, Any] | None = None) -> "SparseAutoencoder":
        """Install fitted weights (``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_out]) and metadata."""
        d_in, d_sae = W_enc.shape
        if W_dec.shape[0] != d_sae or b_enc.shape != (d_sae,) or b_dec.shape != (W_dec.shape[1],):
            raise SAEError(f"inconsistent SAE shapes: W_enc {tuple(W_enc.shape)}, b_enc {tuple(b_enc.shape)}, "
                           f"W_dec {tuple(W_dec.shape)}, b_dec {tuple(b_dec.shape)}")
        self.W_enc_, self.b_enc_, self.W_dec_, self.b_dec_ = (t.detach().contiguous() for t in (W_enc, b_enc, W_dec, b_dec))
        for name, t in (extra or {}).items():
            setattr(self, f"{name}_", t.detach().contiguous())
        self.site_ = site
        self.target_site_ = target_site or site
        self.apply_b_dec_to_input_ = apply_b_dec_to_input
        self.meta_ = dict(meta or {})
        return self

    # --- fit / save ------------------------------------------------------------------------
    def fit(self, store: Any, site: str, target: str | None = None, *, out: str | Path | None = None,
            progress: bool = True, device: str | None = None, autocast: bool | None = None) -> "SparseAutoencoder":
        """Train on ``site`` of ``store`` (a store or its folder); ``target`` makes a transcoder.

        With ``out``, the run checkpoints there and resumes from it; the fitted SAE is saved there.
        ``device`` and ``autocast``: as in ``actscope.sae.train`` (CUDA and bf16 autocast when present).
        """
        from .train import Job, train

        train(store, [Job(self, site, target)], out=out, progress=progress, device=device, autocast=autocast)
        return self

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a SAELens v6 folder (cfg.json, sae_weights.safetensors, sparsity.safetensors)."""
        from .io import save_pretrained

        return save_pretrained(self, folder)
