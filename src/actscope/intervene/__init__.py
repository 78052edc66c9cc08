"""Interventions: everything that changes a forward pass, in one package.

One module per capability, each built on the hook core (``actscope.hooks``):

- ``ablate``: zero, mean or resample units of any site (``actscope.ablate``, ``site_mean``);
- ``steer``: steering vectors, extracted and applied; direction ablation;
- ``steer_effects``: KL-bounded strength and the effect of a steering vector;
- ``patch``: activation patching, the fast sweep that ``causal`` also runs on;
- ``causal``: ROME-style causal tracing;
- ``attribution``: attribution patching (gradient estimate, checked against real patching);
- ``subspace``: subspace patching with the null-space check;
- ``experts``: disabling and forcing routed experts of MoE models.

The top-level names (``actscope.patch``, ``actscope.steer``, ...) are these modules' functions.
The submodules are not re-exported here as functions, so that ``actscope.intervene.patch`` is
always the module, never the function of the same name.
"""

from __future__ import annotations

from ..hooks import Edit, edit_site, edits

__all__ = ["Edit", "edit_site", "edits"]
