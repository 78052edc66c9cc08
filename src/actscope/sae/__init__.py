"""Sparse autoencoders and transcoders trained from an activation store.

    from actscope.sae import TopKSAE, evaluate, load
    sae = TopKSAE(k=32, expansion=16).fit(store, "blocks.6.hook_resid_post", out="runs/sae")
    metrics = evaluate(sae, heldout_store)

Architectures: ``TopKSAE``, ``BatchTopKSAE``, ``JumpReLUSAE``, ``ReLUSAE``. Any of them becomes a
transcoder by fitting it with a ``target`` site (input at one site, reconstruction of another).
Several SAEs train in one pass over the store with ``train(store, [Job(...), ...])``.
Saved folders are SAELens v6 folders; ``load`` also reads EleutherAI sparsify and
dictionary_learning folders.
"""

from .base import ARCHITECTURES, SAEError, SparseAutoencoder
from .batchtopk import BatchTopKSAE
from .evaluate import evaluate
from .io import load, save_pretrained
from .jumprelu import JumpReLUSAE
from .relu import ReLUSAE
from .topk import TopKSAE
from .train import Job, train

__all__ = ["ARCHITECTURES", "BatchTopKSAE", "Job", "JumpReLUSAE", "ReLUSAE", "SAEError", "SparseAutoencoder",
           "TopKSAE", "evaluate", "load", "save_pretrained", "train", "make"]


def make(architecture: str, **hyperparameters) -> SparseAutoencoder:
    """An unfitted SAE of the named architecture (topk, batchtopk, jumprelu, relu)."""
    if architecture not in ARCHITECTURES:
        raise SAEError(f"unknown architecture {architecture!r}; choose from {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[architecture](**hyperparameters)
