"""Old module paths that still work after a move: each old module is a shim that calls ``moved``.

The interventions moved into ``actscope.intervene`` (issue #12); code that imports
``actscope.steer_effects`` or ``from actscope.patch import make_metric`` keeps running, and is
told once, by a ``DeprecationWarning`` naming the new path, where to import from instead.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any


def moved(old: str, new: str, namespace: dict[str, Any]) -> None:
    """Fill the shim module's ``namespace`` with everything ``new`` defines, and warn once.

    ``stacklevel=3`` points the warning at the line that imported the old path (the import
    machinery's own frames are skipped by ``warnings``), so a user sees which import to change.
    """
    warnings.warn(f"{old} moved to {new}; import it from there", DeprecationWarning, stacklevel=3)
    module = importlib.import_module(new)
    namespace.update({k: v for k, v in vars(module).items() if not (k.startswith("__") and k.endswith("__"))})
