"""The scan's MLP statistics in one C++ pass (``csrc/mlp_pass.cpp``), when it can be built.

``MlpLayerStats`` calls it for float32 batches on CPU once each neuron's top-k holds k values;
its torch path (the first batch, other dtypes, GPUs, no compiler) gives the same numbers and is
what the C++ pass is tested against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import native

_CSRC = Path(__file__).with_name("csrc")
_state: dict[str, Any] = {}


def mlp_kernel_dir() -> Path:
    """Where the compiled pass lives. Creates nothing."""
    return native.extension_dir("mlp_pass", _CSRC)


def mlp_kernel() -> Any | None:
    """The compiled extension, or ``None`` (with one warning) when it cannot be built."""
    if "mlp" not in _state:
        _state["mlp"] = native.load_extension("mlp_pass", _CSRC, "mlp_pass.cpp",
                                              without="the scan computes the same statistics with torch ops")
    return _state["mlp"]
