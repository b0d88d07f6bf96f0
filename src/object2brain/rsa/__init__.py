"""Representational similarity analysis: RDMs, comparisons, inference and the alignment run.

- :mod:`object2brain.rsa.rdm`: RDMs from features (streamed from activation stores in feature
  chunks), ratings, export to rsatoolbox.
- :mod:`object2brain.rsa.compare`: Spearman, Pearson, Kendall tau-a, vectorised over many RDMs.
- :mod:`object2brain.rsa.inference`: Mantel permutation test, stimulus bootstrap, noise ceiling,
  Benjamini-Hochberg FDR, condition contrasts.
- :mod:`object2brain.rsa.align`: :func:`run_alignment`, the ``object2brain rsa`` command.
"""

from __future__ import annotations

from object2brain.rsa.align import AlignmentResult, run_alignment
from object2brain.rsa.compare import compare, kendall_tau_a, pearson, rankdata, spearman
from object2brain.rsa.inference import (
    bootstrap_ci,
    condition_difference_test,
    correlation_test,
    fdr_bh,
    mantel_test,
    noise_ceiling,
    permutations,
    pool_rdms,
)
from object2brain.rsa.rdm import (
    behavior_rdm,
    rdm_from_features,
    rdm_from_store,
    squareform,
    to_rsatoolbox,
    upper_triangle,
)

__all__ = [
    "AlignmentResult",
    "behavior_rdm",
    "bootstrap_ci",
    "compare",
    "condition_difference_test",
    "correlation_test",
    "fdr_bh",
    "kendall_tau_a",
    "mantel_test",
    "noise_ceiling",
    "pearson",
    "permutations",
    "pool_rdms",
    "rankdata",
    "rdm_from_features",
    "rdm_from_store",
    "run_alignment",
    "spearman",
    "squareform",
    "to_rsatoolbox",
    "upper_triangle",
]
