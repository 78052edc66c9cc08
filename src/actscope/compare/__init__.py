"""Compare representations: CKA, RSA, ridge encoding models and linear probes, from arrays or stores.

Everything is computed in float64 and checked against the reference packages (rsatoolbox,
himalaya, scikit-learn) in the tests. Conventions are stated in each module and in
``docs/compare.md``.
"""

from .cka import (OutlierReport, OutlierWarning, cka, cka_angle, cka_distance, cka_gram, center_gram,
                  gram_linear, gram_rbf, minibatch_cka, minibatch_cka_matrix, outlier_report)
from .cka_matrix import CKAResult, stream_cka
from .encoding import RidgeEncoder, contiguous_folds, group_folds, pearson_r
from .encode_layers import EncodingResult, encode_layers
from .features import (ceiling_r, delay_features, doc_units, explainable_variance, normalize_by_ceiling,
                       pool_features, tr_units, word_units, zscore_runs)
from .synthetic import SyntheticFMRI, double_gamma_hrf, synthetic_fmri
from .probe import LinearProbe, control_labels, kfold_score, online_codelength
from .probe_layers import Labels, ProbeResult, load_labels, probe_layers
from .rsa import RSAComparison, bootstrap_compare, compare_rdms, noise_ceiling, rdm

__all__ = [
    "CKAResult", "OutlierReport", "OutlierWarning", "center_gram", "cka", "cka_angle", "cka_distance",
    "cka_gram", "gram_linear", "gram_rbf", "minibatch_cka", "minibatch_cka_matrix", "outlier_report", "stream_cka",
    "RSAComparison", "bootstrap_compare", "compare_rdms", "noise_ceiling", "rdm",
    "RidgeEncoder", "contiguous_folds", "group_folds", "pearson_r", "EncodingResult", "encode_layers",
    "ceiling_r", "delay_features", "doc_units", "explainable_variance", "normalize_by_ceiling", "pool_features",
    "tr_units", "word_units", "zscore_runs", "SyntheticFMRI", "double_gamma_hrf", "synthetic_fmri",
    "LinearProbe", "control_labels", "kfold_score", "online_codelength", "Labels", "ProbeResult", "load_labels",
    "probe_layers",
]
