"""Argument checks shared by the Python API and the CLI, each failing with one ``ActscopeError`` line.

Checked at the entry point, before a model runs or a file is written: a bad value caught late
costs a whole pass (``scan --tau nan``), and a bad value caught never is saved into a manifest
(``--batch-size -3``) or turns logits into NaN (``--scale inf``).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from .errors import ActscopeError


def positive_int(name: str, value: Any, *, allow_none: bool = False, error: type[ActscopeError] = ActscopeError) -> Any:
    """``value`` if it is an int > 0 (or None when allowed); else an error naming ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise error(f"{name} must be a positive integer, got {value!r}")
    return value


def finite(name: str, value: Any, *, positive: bool = False, error: type[ActscopeError] = ActscopeError) -> float:
    """``value`` as a float if it is finite (and > 0 when ``positive``); NaN and inf are refused."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise error(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise error(f"{name} must be finite, got {value!r}")
    if positive and number <= 0:
        raise error(f"{name} must be positive, got {value!r}")
    return number


def text_list(name: str, value: Any, *, allow_empty: bool = False) -> list[str]:
    """A list of strings; a bare ``str`` is refused (it would iterate as characters)."""
    if isinstance(value, (str, bytes)):
        raise ActscopeError(f"{name} must be a list of strings, got a single string {value[:40]!r}; "
                            f"wrap it in a list: [{value[:20]!r}]")
    try:
        items = list(value)
    except TypeError:
        raise ActscopeError(f"{name} must be a list of strings, got {type(value).__name__}") from None
    if not items and not allow_empty:
        raise ActscopeError(f"{name} is empty")
    bad = [x for x in items if not isinstance(x, str)]
    if bad:
        raise ActscopeError(f"{name} must hold strings only, got {type(bad[0]).__name__} {bad[0]!r}")
    return items


def site_patterns(value: str | Iterable[str]) -> list[str]:
    """Site names or globs: one string or a non-empty list of non-empty strings."""
    names = [value] if isinstance(value, str) else text_list("sites", value)
    if not names or not all(n.strip() for n in names):
        raise ActscopeError("sites is empty: give at least one site name or glob, e.g. 'blocks.*.hook_resid_post'")
    return names
