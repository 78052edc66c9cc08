"""The scan's per-batch statistics in single C++ passes (``csrc/scan_pass.cpp``), when it can be built.

``MlpLayerStats`` calls ``mlp_pass`` for float32 batches on CPU once each neuron's top-k holds k
values; ``LayerUse`` and ``MassiveTracker`` call ``layer_use`` and ``above`` for float32 on CPU.
Their torch paths (other dtypes, GPUs, no compiler, or ``USE_FAST = False``) give the same
numbers (``layer_use`` sums in float64, so its means can differ from the float32 ops in the last
digits) and are what the passes are tested against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import native

_CSRC = Path(__file__).with_name("csrc")
_state: dict[str, Any] = {}


USE_FAST = True
"""Take the C++ passes where they apply (float32 on CPU); False: the torch ops only."""


def scan_kernel_dir() -> Path:
    """Where the compiled passes live. Creates nothing."""
    return native.extension_dir("scan_pass", _CSRC)


def scan_kernel() -> Any | None:
    """The compiled extension, or ``None`` (with one warning) when it cannot be built."""
    if "scan" not in _state:
        _state["scan"] = native.load_extension("scan_pass", _CSRC, "scan_pass.cpp",
                                               without="the scan computes the same statistics with torch ops")
    return _state["scan"]


def kernel_for(*tensors: Any) -> Any | None:
    """The extension when every given tensor is float32 on CPU and the fast paths are on, else ``None``."""
    if not USE_FAST or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors if t is not None):
        return None
    return scan_kernel()
