"""``SparsityConfig``: what calibration produced, saved like a Hugging Face artifact.

A folder holds ``sparsity_config.json`` (method, targets, per-module targeted sparsity) and
``thresholds.safetensors`` (one tensor per module: a scalar threshold, or one per channel).
``save_pretrained`` writes both atomically; ``from_pretrained`` checks they belong together.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import SparsifyError
from ..store.fs import Location

METHODS = ("teal", "cats", "chess", "wina", "topk", "coreinfer")
CONFIG_FILE = "sparsity_config.json"
TENSOR_FILE = "thresholds.safetensors"


@dataclass
class SparsityConfig:
    """Thresholds per module path, plus what they were calibrated for.

    - ``thresholds``: linear module path -> threshold on ``|x|`` (``|x| * ||W[:, i]||`` for WINA),
      or, for CATS and CHESS, MLP activation path -> threshold on ``|act(gate)|``;
    - ``targets``: module path -> targeted sparsity (Top-k and CoreInfer need nothing else);
    - ``params``: method options (``allocation``, ``attention`` for CHESS, ``token_fraction`` for CoreInfer).
    """

    method: str
    sparsity: float
    thresholds: dict[str, torch.Tensor] = field(default_factory=dict)
    targets: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    model_type: str = ""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SparsifyError(f"unknown sparsity method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 0.0 <= self.sparsity < 1.0:
            raise SparsifyError(f"sparsity must be in [0, 1), got {self.sparsity}")

    @property
    def is_dense(self) -> bool:
        """Nothing would be zeroed: ``apply`` then installs nothing, so outputs stay bit-identical."""
        return all(v <= 0.0 for v in self.targets.values())

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        from safetensors.torch import save

        loc = Location(str(folder))
        loc.makedirs()
        blob = save({k: v.float().contiguous() for k, v in self.thresholds.items()})
        loc.write_atomic(TENSOR_FILE, lambda f: f.write(blob))
        meta = {
            "format": "actscope-sparsity", "version": 1, "method": self.method, "sparsity": self.sparsity,
            "model_type": self.model_type, "params": self.params, "targets": self.targets,
            "threshold_keys": sorted(self.thresholds),
        }
        text = json.dumps(meta, indent=1).encode()
        loc.write_atomic(CONFIG_FILE, lambda f: f.write(text))
        return Path(folder)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "SparsityConfig":
        from ..tensorfile import load_tensor_bytes

        folder = Path(folder)
        try:
            meta = json.loads((folder / CONFIG_FILE).read_text())
            tensors = load_tensor_bytes((folder / TENSOR_FILE).read_bytes()) if (folder / TENSOR_FILE).exists() else {}
        except FileNotFoundError:
            raise SparsifyError(f"{folder}: no {CONFIG_FILE}; make one with `actscope sparsify calibrate`") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SparsifyError(f"{folder / CONFIG_FILE}: not valid JSON ({exc})") from None
        except Exception as exc:  # safetensors raises its own error type for a damaged file
            raise SparsifyError(f"{folder / TENSOR_FILE}: unreadable ({exc})") from None
        if meta.get("format") != "actscope-sparsity":
            raise SparsifyError(f"{folder / CONFIG_FILE}: not an actscope sparsity config")
        if sorted(tensors) != meta.get("threshold_keys", []):
            raise SparsifyError(f"{folder}: {TENSOR_FILE} does not match {CONFIG_FILE} (files from different runs?)")
        return cls(meta["method"], meta["sparsity"], tensors, meta["targets"], meta["params"], meta["model_type"])

    def __repr__(self) -> str:
        return (f"SparsityConfig(method={self.method!r}, sparsity={self.sparsity}, "
                f"modules={len(self.targets)}, model_type={self.model_type!r})")
