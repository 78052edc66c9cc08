"""Moved to ``actscope.intervene.steer_effects``; this old path re-exports it with a DeprecationWarning."""

from ._moved import moved

moved(__name__, "actscope.intervene.steer_effects", globals())
