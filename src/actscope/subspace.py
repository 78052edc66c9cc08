"""Moved to ``actscope.intervene.subspace``; this old path re-exports it with a DeprecationWarning."""

from ._moved import moved

moved(__name__, "actscope.intervene.subspace", globals())
