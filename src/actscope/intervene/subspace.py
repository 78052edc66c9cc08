"""Subspace activation patching, with the check from "Is This the Subspace You Are Looking For?".

    res = actscope.subspace_patch(model, tok, clean, corrupted, "blocks.6.mlp.hook_post", U,
                                  target=" Paris", foil=" Rome")
    res.null_fraction      # share of each direction that the next reader cannot see (also res["null_fraction"])

Patching a subspace ``U`` (``[d, k]``, orthonormalised here) replaces only the component of the
activation inside it: ``h <- h_corrupt + U U^T (h_clean - h_corrupt)`` at the chosen positions.
The paper shows such a patch can succeed through an *illusion*: the direction mixes a component
the downstream weights never read (their null space) with a dormant one that patching
activates. So every result carries ``null_fraction``: for each direction, the share of its
squared norm in the null space of the weights that read the site next (the down projection for
``mlp.hook_post``; for residual sites, the next layer's maps that read the residual stream, as
the family's ``readers`` in families.py list them: query, key, value and MLP input projections,
a MoE router and its experts; never an output projection, which reads the heads' z). A large
share is a warning that the effect may not be carried by the direction itself.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import ActscopeError
from ..families import family_of, linear_weight, reader_weight
from ..hooks import edits
from ..sites import Site, SiteMap, site_map
from ..trace import trace
from .edits import bind, replace_at
from .metrics import Metric, measure, normalised
from .prompts import encode_pair
from .results import SubspaceResult


def _readers(model: Any, site: Site, sm: SiteMap) -> torch.Tensor:
    """Rows = the linear maps that read ``site`` next, as one ``[outputs, d]`` matrix."""
    if site.name.endswith("mlp.hook_post"):  # the down projection reads hook_post (Conv1D in GPT-2)
        return linear_weight(model.get_submodule(site.module_path)).detach().float()
    if site.layer is None or "resid" not in site.name:
        raise ActscopeError(f"the null-space check knows mlp.hook_post and residual sites, not {site.name}")
    nxt = site.layer + (0 if site.name.endswith("resid_pre") else 1)
    if nxt >= sm.n_layers:
        raise ActscopeError(f"{site.name} is read by the unembedding only; patch an earlier site")
    family = family_of(model)
    if family is None or not family.readers:
        raise ActscopeError(f"the family table lists no residual readers for model type {sm.model_type!r}; "
                            "give its family `readers` with actscope.register_family")
    d = model.config.hidden_size
    mats = []
    for path in family.readers:
        w = reader_weight(model, f"{sm.layers_path}.{nxt}.{path}")
        if w is None:  # a variant without it: a dense layer in a MoE model, no shared expert
            continue
        if w.shape[1] != d:
            raise ActscopeError(f"reader {path} reads {w.shape[1]} dims, not the residual's {d}: "
                                "fix the family's `readers`")
        mats.append(w.float())
    if not mats:
        raise ActscopeError(f"none of the family's residual readers ({', '.join(family.readers)}) is in layer {nxt}")
    return torch.cat(mats)


def null_fraction(readers: torch.Tensor, directions: torch.Tensor, rtol: float = 1e-4) -> torch.Tensor:
    """Per direction (columns of ``directions``): share of its squared norm outside the row space
    of ``readers`` (the null space of the map they define)."""
    _, s, vh = torch.linalg.svd(readers.double(), full_matrices=False)
    row_space = vh[s > rtol * s.max()]  # orthonormal rows spanning what the readers see
    d = directions.double()
    seen = (row_space @ d).pow(2).sum(0)
    return (1 - seen / d.pow(2).sum(0)).clamp(0, 1).float()


def subspace_patch(
    model: Any,
    tokenizer: Any,
    clean: str,
    corrupted: str,
    site: str,
    directions: torch.Tensor,
    *,
    positions: Sequence[int] | None = None,
    metric: str | Metric = "logit_diff",
    target: str | int | None = None,
    foil: str | int | None = None,
) -> SubspaceResult:
    """Patch the span of ``directions`` (``[d, k]``) at ``site`` and ``positions`` (default all)
    from the clean run into the corrupted run; see the module docstring."""
    sm = site_map(model)
    (s,) = sm.resolve([site])
    if s.view is not None or s.needs_eager_attention:
        raise ActscopeError(f"subspace patching needs a [batch, pos, d] site, not {site}")
    clean_ids, corrupt_ids = encode_pair(tokenizer, clean, corrupted, model.device, what="subspace patching")
    U = directions.reshape(directions.shape[0], -1).float()
    q, _ = torch.linalg.qr(U)
    with torch.inference_mode(), trace(model, [s]) as cache:
        clean_logits = model(input_ids=clean_ids, use_cache=False).logits[:, -1]
        corrupt_logits = model(input_ids=corrupt_ids, use_cache=False).logits[:, -1]
    # "kl" needs the clean logits; logit_diff's default foil is the corrupted run's top token, as in patch()
    m = measure(tokenizer, metric, target=target, foil=foil, clean_logits=clean_logits, corrupt_logits=corrupt_logits)
    m_clean, m_corrupt = float(m(clean_logits)[0]), float(m(corrupt_logits)[0])
    h_clean, h_corrupt = cache.all(s.name)
    if q.shape[0] != h_clean.shape[-1]:
        raise ActscopeError(f"directions have {q.shape[0]} dims; {site} has {h_clean.shape[-1]}")
    pos = list(range(corrupt_ids.shape[1])) if positions is None else list(positions)
    # the corrupted run with its component inside the subspace swapped for the clean run's
    delta = (h_clean - h_corrupt)[:, pos].float() @ q @ q.T
    h_patched = h_corrupt[:, pos] + delta.to(h_corrupt.dtype)
    with torch.inference_mode(), edits(model, [bind(s, replace_at(h_patched, positions=pos))]):
        m_patched = float(m(model(input_ids=corrupt_ids, use_cache=False).logits[:, -1])[0])
    frac = null_fraction(_readers(model, s, sm), q)
    return SubspaceResult(s.name, pos, m_clean, m_corrupt, m_patched,
                          float(normalised(torch.tensor(m_patched), m_clean, m_corrupt)), frac.tolist(), m.foil)
