"""Kept for imports from before the hook core: the edit mechanism lives in ``actscope.hooks``."""

from __future__ import annotations

from .hooks import Edit, edit_site, edits

__all__ = ["Edit", "edit_site", "edits"]
