"""Compare representations: CKA, RSA, ridge encoding models and linear probes, from arrays or stores.

Everything is computed in float64 and checked against the reference packages (rsatoolbox,
himalaya, scikit-learn) in the tests. Conventions are stated in each module and in
``docs/compare.md``.
"""

from .cka import (OutlierReport, OutlierWarning, cka, cka_angle, cka_distance, cka_gram, center_gram,
                  gram_linear, gram_rbf, minibatch_cka, outlier_report)
from .cka_matrix import CKAResult, stream_cka
from .rsa import RSAComparison, bootstrap_compare, compare_rdms, noise_ceiling, rdm

__all__ = [
    "CKAResult", "OutlierReport", "OutlierWarning", "center_gram", "cka", "cka_angle", "cka_distance",
    "cka_gram", "gram_linear", "gram_rbf", "minibatch_cka", "outlier_report", "stream_cka",
    "RSAComparison", "bootstrap_compare", "compare_rdms", "noise_ceiling", "rdm",
]
