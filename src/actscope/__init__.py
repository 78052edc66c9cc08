"""actscope: record, measure and steer the internal activations of HF transformer models."""

__version__ = "0.1.0"  # before the imports: submodules read it

from .errors import ActscopeError, DataError, ModelLoadError, SiteError, SiteNotFiredError, StoreError
from .ablate import ablate, site_mean
from .attribution import AttributionResult, attribution_patch
from .causal import causal_trace
from .data import TokenBatches, load_tokens
from .hooks import edit
from .inspect import site_shapes
from .models import load_model
from .patch import PatchResult, patch
from .record import record
from .scan import ScanConfig, scan
from .subspace import subspace_patch
from .steer import SteeringVector, ablate_direction, steer, steering_vector
from .experts import route_experts
from .families import Family, register_family
from .sites import Site, SiteMap, resolve_sites
from .store.reader import ActivationStore, open_store
from .trace import ActivationCache, trace


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
    "attribution_patch",
    "causal_trace",
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

_LAZY_SUBPACKAGES = ("sae", "nmf")  # heavier, or optional: imported on first attribute access


def __getattr__(name: str):
    """``actscope.sae`` and ``actscope.nmf`` import on first use, so ``import actscope`` stays fast."""
    if name in _LAZY_SUBPACKAGES:
        import importlib

        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'actscope' has no attribute {name!r}")
