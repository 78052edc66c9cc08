"""Site names <-> modules: one naming scheme across model families.

``SiteMap(model)`` reads the family table (families.py) and lists every site the model has,
e.g. ``blocks.3.hook_resid_post``. ``resolve`` turns user patterns (names, globs such as
``blocks.*.hook_resid_post``, or raw module paths such as ``model.layers.3.mlp.down_proj:input``)
into ``Site`` objects. Unknown names raise an error that lists the closest valid names.
"""

from __future__ import annotations

import difflib
import re
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .errors import SiteError
from .families import FAMILIES, LAYER_SITE_ORDER, PATTERN, Family, Tap
from .views import Dims, make_view


@dataclass(frozen=True)
class Site:
    """One activation site: which module, input or output, and how to view the tensor."""

    name: str
    module_path: str
    io: str  # "in" or "out"
    index: int = 0
    view: Callable[[torch.Tensor], torch.Tensor] | None = None
    layer: int | None = None

    @property
    def needs_eager_attention(self) -> bool:
        return self.name.endswith(PATTERN)

    def _raw(self, args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
        """The module's tensor this site reads, before the view."""
        if self.io == "in":
            value = args[0] if args else kwargs.get(_first_tensor_key(kwargs) or "")
        else:
            value = output
            if isinstance(value, (tuple, list)):
                value = value[self.index]
            elif _is_model_output(value):
                value = value.to_tuple()[self.index]
        if not torch.is_tensor(value):
            raise SiteError(
                f"site {self.name} produced {type(value).__name__}, not a tensor"
                + (" (attention weights need eager attention)" if self.needs_eager_attention else "")
            )
        return value

    def extract(self, args: tuple, kwargs: dict, output: Any = None) -> torch.Tensor:
        """Pick the tensor this site means out of a module call's inputs or output."""
        value = self._raw(args, kwargs, output)
        return self.view(value) if self.view is not None else value

    def inject(self, value: torch.Tensor, args: tuple, kwargs: dict, output: Any = None) -> Any:
        """``extract``'s twin: put ``value`` back where ``extract`` found the site's tensor.

        Returns ``(args, kwargs)`` for an input site and the new output for an output site, the
        way torch's pre- and post-hooks replace them: through the same tuple, list,
        ``ModelOutput``, keyword argument and view. A viewed site (one head, the gate half of a
        fused projection) is written into a copy of the whole tensor, so the rest stays as it was.
        """
        raw = self._raw(args, kwargs, output)
        if self.view is not None:
            whole = raw.clone(memory_format=torch.contiguous_format)
            part = self.view(whole)
            if part.untyped_storage().data_ptr() != whole.untyped_storage().data_ptr():
                raise SiteError(f"site {self.name}'s view is a copy, so an edit could not be put back")
            part.copy_(value)
            value = whole
        if self.io == "in":
            if args:
                return (value, *args[1:]), kwargs
            return args, {**kwargs, _first_tensor_key(kwargs): value}
        if isinstance(output, tuple):
            return (*output[: self.index], value, *output[self.index + 1:])
        if isinstance(output, list):
            return [*output[: self.index], value, *output[self.index + 1:]]
        if _is_model_output(output):
            output[list(output.keys())[self.index]] = value  # a fresh object of this call: set in place
            return output
        return value


def _is_model_output(value: Any) -> bool:
    return hasattr(value, "to_tuple") and not torch.is_tensor(value)


def _first_tensor_key(kwargs: dict) -> str | None:
    """The keyword a module got its main input under, when it was not passed positionally."""
    if "hidden_states" in kwargs:
        return "hidden_states"
    return next((k for k, v in kwargs.items() if torch.is_tensor(v)), None)


_RAW = re.compile(r"^(?P<path>[A-Za-z_][\w.]*?)(?::(?P<io>input|output|in|out))?$")


def _find_suffix(names: Sequence[str], suffix: str) -> str | None:
    """The shallowest module name equal to ``suffix`` or ending in ``.suffix``."""
    hits = [n for n in names if n == suffix or n.endswith("." + suffix)]
    return min(hits, key=lambda n: n.count(".")) if hits else None


class SiteMap:
    """Every site of one model, built from its family's entry in the table."""

    def __init__(self, model: nn.Module):
        # no reference to the model is kept: site_map() caches maps in a weak-keyed dict, which a
        # value that pointed back at its key would keep alive forever
        modules = dict(model.named_modules())
        config = getattr(model, "config", None)
        self.module_paths: list[str] = list(modules)
        self.model_type = getattr(config, "model_type", "unknown")
        self.dims = Dims.from_config(config) if config is not None else Dims(1, 1, 0)
        self.family: Family | None = FAMILIES.get(self.model_type)
        self.layers_path, self.n_layers = self._find_layers(modules, config)
        self.sites: dict[str, Site] = {}
        self.missing: dict[str, str] = {}
        self._build(config)

    # --- construction -------------------------------------------------------------------
    def _find_layers(self, modules: dict[str, nn.Module], config: Any) -> tuple[str, int]:
        if self.family is not None:
            path = _find_suffix(self.module_paths, self.family.layers)
            if path is not None and isinstance(modules[path], nn.ModuleList):
                return path, len(modules[path])
        # Fallback for unknown families: the decoder stack is the ModuleList whose length is
        # the configured layer count (or else the longest one).
        want = getattr(config, "num_hidden_layers", None)
        lists = [(n, m) for n, m in modules.items() if isinstance(m, nn.ModuleList) and len(m)]
        if not lists:
            raise SiteError(f"cannot find the layer stack of model type {self.model_type!r}")
        exact = [(n, m) for n, m in lists if len(m) == want]
        name, mod = min(exact or lists, key=lambda nm: (nm[0].count("."), -len(nm[1])))
        return name, len(mod)

    def _add(self, name: str, tap: Tap, base: str, layer: int | None) -> None:
        path = f"{base}.{tap.module}".strip(".") if base else tap.module
        if path not in self._paths:
            self.missing[name] = f"module {path} not found"
            return
        self.sites[name] = Site(name, path, tap.io, tap.index, make_view(tap.view, self.dims), layer)

    def _build(self, config: Any) -> None:
        self._paths = set(self.module_paths)
        fam = self.family
        if fam is None:  # unknown family: only what the layer boundaries give us
            per_layer = {"hook_resid_pre": Tap("", "in"), "hook_resid_post": Tap("")}
            globals_: dict[str, Tap] = {}
        else:
            per_layer, globals_ = dict(fam.per_layer), fam.globals
            for site, (attr, value) in fam.requires.items():
                if getattr(config, attr, None) != value:
                    per_layer.pop(site, None)
            for site, why in fam.missing.items():
                if site not in per_layer and site not in globals_:
                    self.missing[site] = why
        for key, tap in globals_.items():
            path = _find_suffix(self.module_paths, tap.module)
            if path is None:
                self.missing[key] = f"no module named *{tap.module}"
                continue
            self.sites[key] = Site(key, path, tap.io, tap.index, make_view(tap.view, self.dims))
        ordered = [k for k in LAYER_SITE_ORDER if k in per_layer] + [
            k for k in per_layer if k not in LAYER_SITE_ORDER
        ]
        for layer in range(self.n_layers):
            base = f"{self.layers_path}.{layer}"
            for key in ordered:
                self._add(f"blocks.{layer}.{key}", per_layer[key], base, layer)

    # --- lookup -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.sites)

    def _raw(self, spec: str) -> Site | None:
        m = _RAW.match(spec)
        if not m or m.group("path") not in self._paths:
            return None
        io = "in" if (m.group("io") or "out").startswith("in") else "out"
        path = m.group("path")
        layer = _layer_of(path, self.layers_path)
        return Site(f"{path}:{'input' if io == 'in' else 'output'}", path, io, 0, None, layer)

    def suggest(self, spec: str, n: int = 5) -> list[str]:
        pool = self.names + [f"{p}:output" for p in self.module_paths if p]
        close = difflib.get_close_matches(spec, pool, n=n, cutoff=0.55)
        if close:
            return close
        tail = spec.split(".")[-1]
        return [s for s in self.names if s.endswith(tail)][:n] or self.names[:n]

    def resolve(self, specs: str | Iterable[str]) -> list[Site]:
        """Expand names, globs (see ``glob_regex``) and raw paths into sites, in model order, without duplicates."""
        if isinstance(specs, str):
            specs = [specs]
        chosen: dict[str, Site] = {}
        for spec in specs:
            spec = spec.strip()
            if any(ch in spec for ch in "*?["):
                rx = glob_regex(spec)
                hits = [n for n in self.names if rx.fullmatch(n)]
                if not hits:
                    raise SiteError(self._unknown_message(spec, "pattern matches no site"))
                chosen.update((h, self.sites[h]) for h in hits)
            elif spec in self.sites:
                chosen[spec] = self.sites[spec]
            elif (raw := self._raw(spec)) is not None:
                chosen[raw.name] = raw
            else:
                raise SiteError(self._unknown_message(spec, "unknown site"))
        order = {n: i for i, n in enumerate(self.names)}
        return sorted(chosen.values(), key=lambda s: order.get(s.name, len(order)))

    def _unknown_message(self, spec: str, what: str) -> str:
        key = re.sub(r"^blocks\.\d+\.", "", spec)
        if key in self.missing:
            return f"{what}: {spec!r} is not available for {self.model_type}: {self.missing[key]}"
        layer = re.match(r"^blocks\.(\d+)\.", spec)
        if layer and int(layer.group(1)) >= self.n_layers:
            return f"{what}: {spec!r}: this model has layers 0..{self.n_layers - 1}"
        return f"{what}: {spec!r}; closest valid sites: {', '.join(self.suggest(spec))}"


def glob_regex(pattern: str) -> re.Pattern:
    """``*`` matches within one dot-separated part, ``**`` across parts, ``?`` one character.

    So ``blocks.*.hook_*`` means the per-layer top-level hooks, not ``blocks.3.attn.hook_q``.
    """
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        ch = pattern[i]
        out.append("[^.]*" if ch == "*" else "[^.]" if ch == "?" else re.escape(ch))
        i += 1
    return re.compile("".join(out))


def _layer_of(path: str, layers_path: str) -> int | None:
    m = re.match(re.escape(layers_path) + r"\.(\d+)(\.|$)", path)
    return int(m.group(1)) if m else None


_MAPS: "weakref.WeakKeyDictionary[nn.Module, SiteMap]" = weakref.WeakKeyDictionary()


def site_map(model: nn.Module) -> SiteMap:
    """The model's ``SiteMap``, built once per model and kept as long as the model lives.

    Building one walks every module; interventions, traces and the CLI all ask for it, often
    once per call. A site names its module by path, so swapping a module for another at the
    same path (as ``sparsify.apply`` does) leaves the cached map valid.
    """
    sm = _MAPS.get(model)
    model_type = getattr(getattr(model, "config", None), "model_type", "unknown")
    if sm is None or sm.family is not FAMILIES.get(model_type):  # register_family() came after
        sm = _MAPS[model] = SiteMap(model)
    return sm


def resolve_sites(model: nn.Module, specs: str | Iterable[str]) -> list[Site]:
    """Convenience: ``site_map(model).resolve(specs)``."""
    return site_map(model).resolve(specs)
