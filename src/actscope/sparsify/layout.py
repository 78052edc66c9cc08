"""The sparsifiable linear layers of a model, from its family's ``linears`` in families.py.

Per decoder layer, linear layers are grouped by the input they share (q/k/v read the same
normed hidden state, gate/up read the same MLP input). ``act`` is the MLP activation module,
whose output CATS, Top-k and CoreInfer sparsify; the down projection then reads only the
channels that stayed non-zero. The table itself lives in families.py, so that one entry (or
``actscope.register_family``) teaches actscope a whole architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import SparsifyError
from ..families import FAMILIES, LINEAR_TYPES, family_of
from ..sites import site_map


@dataclass(frozen=True)
class LayerModules:
    """One layer's sparsifiable modules as full paths: what calibrate and apply hook or swap."""

    layer: int
    groups: dict[str, tuple[str, ...]]  # group -> full module paths
    act: str
    query: str
    up: str | None


def layer_modules(model: nn.Module) -> list[LayerModules]:
    """The sparsifiable modules of every layer, checked to exist and to be linear layers
    (``nn.Linear``, or transformers' ``Conv1D`` whose weight is stored ``[in, out]``)."""
    model_type = getattr(model.config, "model_type", "unknown")
    family = family_of(model)
    layout = family.linears if family is not None else None
    if layout is None:
        supported = sorted(t for t, f in FAMILIES.items() if f.linears is not None)
        raise SparsifyError(
            f"activation sparsity has no layout for model type {model_type!r}; supported: "
            f"{', '.join(supported)} (give its family `linears` with actscope.register_family)"
        )
    sm = site_map(model)
    modules = dict(model.named_modules())
    out = []
    for layer in range(sm.n_layers):
        base = f"{sm.layers_path}.{layer}"
        groups = {g: tuple(f"{base}.{p}" for p in paths) for g, paths in layout.groups.items()}
        for path in (p for paths in groups.values() for p in paths):
            if not isinstance(modules.get(path), LINEAR_TYPES):
                raise SparsifyError(f"{path} is {type(modules.get(path)).__name__}, expected nn.Linear or Conv1D")
        act = f"{base}.{layout.act}"
        if act not in modules:
            raise SparsifyError(f"MLP activation module {act} not found")
        up = f"{base}.{layout.up}" if layout.up else None
        out.append(LayerModules(layer, groups, act, f"{base}.{layout.query}", up))
    acts = [modules[lm.act] for lm in out]
    if len({id(a) for a in acts}) != len(acts):
        raise SparsifyError("the MLP activation module is shared between layers; per-layer hooks cannot tell them apart")
    return out
