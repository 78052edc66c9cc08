"""Exceptions with one-line, actionable messages.

Every error a user can cause by passing bad input is an ``ActscopeError``: the CLI prints its
message on one line and exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations


class ActscopeError(Exception):
    """Base class: a problem with the user's input or environment, explained in one line."""


class ModelLoadError(ActscopeError):
    """The model spec could not be resolved or loaded."""


class SiteError(ActscopeError, KeyError):
    """An unknown site name, or a site the model family does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SiteNotFiredError(ActscopeError):
    """A requested site was hooked but never produced an activation during the run."""


class DataError(ActscopeError):
    """A data source is missing, empty, not UTF-8 or malformed."""


class StoreError(ActscopeError):
    """The activation store is inconsistent with the request, corrupted, or could not be written."""


class SparsifyError(ActscopeError):
    """The model or the activation-sparsity settings cannot be used as asked."""
