"""Our C++ extensions: compiled once, cached, loaded; or ``None`` with one warning.

Two live in the tree: the sparse decode kernel (``sparsify/csrc``) and the scan's one-pass
statistics (``stats/csrc``). Each is built by ``torch.utils.cpp_extension`` into
``<cache>/kernels/<name>-<digest>`` (the cache root of ``models.cache_dir``, which honours
``ACTSCOPE_CACHE`` and ``XDG_CACHE_HOME``), the digest covering every source file and torch's
version, so a change of either rebuilds. ``make install`` runs ``python -m actscope.build``, so a
fresh machine pays the compile at install, not at first use. Without a compiler, or with
``ACTSCOPE_NO_KERNEL`` set, callers take their torch path, which gives the same numbers.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .models import cache_dir


def extension_dir(name: str, csrc: Path) -> Path:
    """Where extension ``name`` built from folder ``csrc`` lives. Creates nothing."""
    sources = b"".join(p.read_bytes() for p in sorted(csrc.iterdir()) if p.suffix in (".cpp", ".h"))
    digest = hashlib.sha256(sources + torch.__version__.encode()).hexdigest()[:12]
    return cache_dir() / "kernels" / f"{name}-{digest}"


def load_extension(name: str, csrc: Path, main: str, without: str, verbose: bool = False) -> Any | None:
    """Extension ``name`` compiled from ``csrc / main`` (which includes the headers beside it), or
    ``None`` with one warning saying what the caller does ``without`` it. Callers keep the result:
    each call loads again."""
    if os.environ.get("ACTSCOPE_NO_KERNEL"):
        return None
    try:
        from torch.utils.cpp_extension import load

        build = extension_dir(name, csrc)
        build.mkdir(parents=True, exist_ok=True)
        # no -march: one build runs on every CPU of its architecture; vector code is compiled
        # per instruction set inside the sources and picked at run time
        return load(
            name=f"actscope_{name}", sources=[str(csrc / main)], extra_cflags=["-O3", "-fopenmp", "-ffp-contract=fast"],
            extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=verbose,
        )
    except Exception as exc:  # a missing compiler must not stop the user: same numbers, less speed
        warnings.warn(f"actscope: the C++ extension {name} could not be built ({type(exc).__name__}: "
                      f"{str(exc)[:300]}); {without}", RuntimeWarning, stacklevel=3)
        return None
