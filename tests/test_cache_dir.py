"""Every actscope cache (converted models, compiled kernels) sits under one root chosen by the
same variables: ACTSCOPE_CACHE, then XDG_CACHE_HOME, then ~/.cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from actscope.models import cache_dir
from actscope.sparsify.kernel import kernel_dir


def _kernel_root(path: Path) -> Path:
    """The cache root above ``<root>/kernels/sparse_linear-<digest>``."""
    assert path.parent.name == "kernels" and path.name.startswith("sparse_linear-")
    return path.parent.parent


def test_kernel_and_model_caches_follow_the_same_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ACTSCOPE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "actscope"
    assert _kernel_root(kernel_dir()) == tmp_path / "xdg" / "actscope"

    monkeypatch.setenv("ACTSCOPE_CACHE", str(tmp_path / "mine"))  # wins over XDG_CACHE_HOME
    assert cache_dir() == tmp_path / "mine"
    assert _kernel_root(kernel_dir()) == tmp_path / "mine"

    monkeypatch.delenv("ACTSCOPE_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "actscope"
    assert _kernel_root(kernel_dir()) == tmp_path / "home" / ".cache" / "actscope"
    assert not (tmp_path / "home").exists()  # computing the path builds nothing
