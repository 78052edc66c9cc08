"""Moved to ``actscope.intervene.ablate``; this old path re-exports it with a DeprecationWarning."""

from ._moved import moved

moved(__name__, "actscope.intervene.ablate", globals())
