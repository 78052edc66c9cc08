"""actscope: record, measure and steer the internal activations of HF transformer models."""

__version__ = "0.1.0"  # before the imports: submodules read it

import sys
import types

from .errors import ActscopeError, DataError, ModelLoadError, SiteError, SiteNotFiredError, StoreError
from .intervene.ablate import ablate, site_mean
from .intervene.attribution import AttributionResult, attribution_patch
from .intervene.causal import causal_trace
from .data import TokenBatches, load_tokens
from .hooks import edit
from .inspect import site_shapes
from .models import load_model
from .intervene.patch import PatchResult, patch
from .record import record
from .scan import ScanConfig, scan
from .intervene.results import SteeringEffect, SubspaceResult
from .intervene.subspace import subspace_patch
from .intervene.steer import SteeringVector, ablate_direction, steer, steering_vector
from .intervene.experts import route_experts
from .families import Family, register_family
from .sites import Site, SiteMap, resolve_sites
from .store.reader import ActivationStore, open_store
from .trace import ActivationCache, trace


class _Package(types.ModuleType):
    """Keeps ``actscope.patch``, ``actscope.steer`` and ``actscope.ablate`` the functions.

    Importing a submodule sets it as an attribute of its package, so importing an old module
    path such as ``from actscope.patch import make_metric`` (a shim since the interventions moved
    to ``actscope.intervene``) would replace the function ``actscope.patch`` by that shim module.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and callable(self.__dict__.get(name)):
            return  # a shim module arriving under a function's name: the function stays
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "ActivationCache",
    "edit",
    "ActivationStore",
    "TokenBatches",
    "load_tokens",
    "open_store",
    "record",
    "patch",
    "PatchResult",
    "scan",
    "SteeringVector",
    "ablate_direction",
    "steer",
    "steering_vector",
    "subspace_patch",
    "ScanConfig",
    "site_shapes",
    "ActscopeError",
    "ablate",
    "site_mean",
    "AttributionResult",
    "SteeringEffect",
    "SubspaceResult",
    "attribution_patch",
    "causal_trace",
    "compare",
    "DataError",
    "Family",
    "ModelLoadError",
    "Site",
    "SiteError",
    "SiteMap",
    "SiteNotFiredError",
    "StoreError",
    "load_model",
    "register_family",
    "resolve_sites",
    "route_experts",
    "trace",
]

_LAZY_SUBPACKAGES = ("compare", "sae", "nmf")  # not needed to record or scan: imported on first use


def __getattr__(name: str):
    """``actscope.compare``, ``actscope.sae`` and ``actscope.nmf`` import on first use, so
    ``import actscope`` stays fast."""
    if name in _LAZY_SUBPACKAGES:
        import importlib

        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'actscope' has no attribute {name!r}")
