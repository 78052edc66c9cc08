"""Training-free activation sparsity: calibrate thresholds, apply them, measure the speed-up.

    config = actscope.sparsify.calibrate(model, tokenizer, method="wina", sparsity=0.5)
    config.save_pretrained("wina-50")
    with actscope.sparsify.apply(model, "wina-50") as handle:
        model.generate(...)
        handle.achieved()          # measured share of zeroed inputs
"""

from .swap import SparseAct, SparseLinear, SparsityHandle, apply
from .calibrate import calibrate
from .choice import ChoiceItem, choice_accuracy, continuation_items, load_choice_file
from .config import METHODS, SparsityConfig
from .decode import StaticDecoder, greedy_decode
from .evaluate import SparsityEval, evaluate, perplexity
from .kernel import kernel_status

__all__ = [
    "METHODS", "ChoiceItem", "SparseAct", "SparseLinear", "SparsityConfig", "SparsityEval", "SparsityHandle",
    "StaticDecoder", "greedy_decode",
    "apply", "calibrate", "choice_accuracy", "continuation_items", "evaluate", "kernel_status",
    "load_choice_file", "perplexity",
]
