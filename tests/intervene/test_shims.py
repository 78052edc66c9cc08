"""The old module paths (before actscope.intervene) still import, warn once, and re-export."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

import actscope

MOVED = ["steer", "steer_effects", "ablate", "patch", "causal", "attribution", "subspace", "experts"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", MOVED)
def test_old_module_path_warns_and_reexports(name):
    sys.modules.pop(f"actscope.{name}", None)  # import it afresh, so its warning fires here
    with pytest.warns(DeprecationWarning, match=f"actscope.{name} moved to actscope.intervene.{name}"):
        old = importlib.import_module(f"actscope.{name}")
    new = importlib.import_module(f"actscope.intervene.{name}")
    public = [k for k in vars(new) if not k.startswith("_")]
    assert public and all(getattr(old, k) is getattr(new, k) for k in public)


def test_top_level_functions_survive_the_old_module_paths():
    """Importing ``actscope.patch`` the module must not replace ``actscope.patch`` the function."""
    before = {n: getattr(actscope, n) for n in ("patch", "steer", "ablate")}
    with pytest.warns(DeprecationWarning):
        for name in before:
            sys.modules.pop(f"actscope.{name}", None)
            importlib.import_module(f"actscope.{name}")
        from actscope.patch import make_metric  # noqa: F401  (a spelling users have)
    for name, fn in before.items():
        assert getattr(actscope, name) is fn and callable(fn)
    assert actscope.patch is importlib.import_module("actscope.intervene.patch").patch


def test_nothing_in_the_project_imports_an_old_path():
    """src/, tests/ and bench/ use the new paths, so they never trigger the warnings above."""
    old = "|".join(MOVED)
    absolute = re.compile(rf"^\s*(from actscope\.({old}) import|import actscope\.({old})\b)", re.M)
    relative = re.compile(rf"^\s*from \.({old}) import", re.M)  # in src/actscope/*.py: the old siblings
    files = [p for d in ("src/actscope", "tests", "bench") for p in (ROOT / d).rglob("*.py")]
    offenders = [str(p.relative_to(ROOT)) for p in files if p.name != "test_shims.py" and (
        absolute.search(p.read_text()) or (p.parent.name == "actscope" and relative.search(p.read_text())))]
    assert offenders == []
