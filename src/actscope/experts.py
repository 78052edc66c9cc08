"""Moved to ``actscope.intervene.experts``; this old path re-exports it with a DeprecationWarning."""

from ._moved import moved

moved(__name__, "actscope.intervene.experts", globals())
