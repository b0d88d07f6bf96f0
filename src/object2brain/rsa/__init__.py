"""Representational similarity analysis: RDMs, comparisons, inference and the alignment run.

- :mod:`object2brain.rsa.rdm`: RDMs from features (streamed from activation stores in feature
  chunks), ratings, export to rsatoolbox.
- :mod:`object2brain.rsa.compare`: Spearman, Pearson, Kendall tau-a, vectorised over many RDMs.
- :mod:`object2brain.rsa.inference`: Mantel permutation test, stimulus bootstrap, noise ceiling,
  Benjamini-Hochberg FDR, condition contrasts.
- :mod:`object2brain.rsa.targets`: the shared analysis set (stimuli, conditions, held-out mask,
  target RDMs with their descriptors, the rule combining subjects into group rows).
- :mod:`object2brain.rsa.align`: :func:`compute_alignment`, the computation behind
  ``object2brain rsa`` (its edge: :mod:`object2brain.api.rsa`).
"""

from __future__ import annotations

from object2brain.rsa.align import AlignmentResult, compute_alignment
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
from object2brain.rsa.targets import AnalysisSet, build_analysis_set

__all__ = [
    "AlignmentResult",
    "AnalysisSet",
    "behavior_rdm",
    "bootstrap_ci",
    "build_analysis_set",
    "compare",
    "compute_alignment",
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
    "spearman",
    "squareform",
    "to_rsatoolbox",
    "upper_triangle",
]
