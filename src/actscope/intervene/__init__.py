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

and the parts they share, each in one place:

- ``sites``: the site shorthands (``resid_pre``, ``resid_post``, ``attn_out``, ``mlp_out``);
- ``prompts``: prompt and prompt-pair encoding, with the same-length check;
- ``metrics``: ``logit_diff``, ``prob``, ``kl`` or a callable, the default foil, the normalised effect;
- ``edits``: stock edits for ``actscope.edit`` (``zero``, ``mean``, ``replace_at``, ``add``,
  ``project_out``, ``add_noise``).

The top-level names (``actscope.patch``, ``actscope.steer``, ...) are these modules' functions.
The submodules are not re-exported here as functions, so that ``actscope.intervene.patch`` is
always the module, never the function of the same name.
"""

from __future__ import annotations

from ..hooks import Edit, edit_site
from . import edits  # the stock edits; calling the module is the old edits(model, pairs), with a warning

__all__ = ["Edit", "edit_site", "edits"]
