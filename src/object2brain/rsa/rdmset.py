"""The RDMs of one alignment as an :class:`~object2brain.rdm_file.RdmSet` (for ``rdms.h5``).

:func:`analysis_rdms` collects every RDM the alignment compared: each analysed layer of each
model, each subject's ROI RDM and the ROI's group RDM, and the behaviour RDMs (per rater and of
the group-mean ratings), over the analysis set's stimuli in order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from object2brain.data import GROUP_SUBJECT
from object2brain.rdm_file import Attr, Rdm, RdmSet
from object2brain.rsa.group import ModelRdms
from object2brain.rsa.rdm import upper_triangle
from object2brain.rsa.targets import AnalysisSet, Target


def _vectors(rdms: torch.Tensor) -> np.ndarray:
    """``(K, n, n)`` -> condensed ``(K, n (n - 1) / 2)`` float64 on the CPU."""
    return upper_triangle(rdms).reshape(rdms.shape[0], -1).detach().cpu().numpy().astype(np.float64)


def analysis_rdms(
    analysis: AnalysisSet,
    models: Sequence[ModelRdms],
    *,
    rdm_metric: str,
    compare_method: str,
    n_voxels: Mapping[tuple[str, str], int] | None = None,
) -> RdmSet:
    """Every RDM of an alignment over ``analysis.ids``.

    Args:
        analysis: the analysis set (its targets' per-subject and group RDMs).
        models: each model's analysed layers and their RDMs ``(K, n, n)``.
        rdm_metric, compare_method: the analysis' RDM metric and comparison (the group RDMs of
            ROIs are pooled on the comparison's scale).
        n_voxels: ``(subject, roi) -> voxels`` of pattern data (after resampling and masking).
    """
    rdms: list[Rdm] = []
    for model in models:
        for layer, index, vector in zip(
            model.layers, model.layer_index, _vectors(model.rdms), strict=True
        ):
            attrs: dict[str, Attr] = {"model": model.name, "layer": layer, "layer_index": index}
            rdms.append(Rdm("model", model.name, layer, vector, attrs | {"metric": rdm_metric}))
    for target in analysis.targets:
        rdms += _target_rdms(target, rdm_metric, compare_method, n_voxels or {})
    conditions = None if analysis.labels is None else [str(c) for c in analysis.labels]
    return RdmSet(
        list(analysis.ids),
        rdms,
        conditions,
        None if analysis.rated is None else np.asarray(analysis.rated, dtype=np.float64),
        {"rdm_metric": rdm_metric, "compare_method": compare_method},
    )


def _target_rdms(
    target: Target,
    rdm_metric: str,
    compare_method: str,
    n_voxels: Mapping[tuple[str, str], int],
) -> list[Rdm]:
    """A target's subject RDMs, then its group RDM (pooled, or group-level data)."""
    kind = "brain" if target.kind == "roi" else "behaviour"
    metric = rdm_metric if kind == "brain" else "absolute difference"
    out: list[Rdm] = []
    for subject, vector in zip(target.subjects, _vectors(target.rdms), strict=True):
        attrs: dict[str, Attr] = {"target": target.name, "subject": subject, "metric": metric}
        if kind == "brain":
            attrs["roi"] = target.name
            if (subject, target.name) in n_voxels:
                attrs["n_voxels"] = int(n_voxels[(subject, target.name)])
        if target.group_only:
            attrs["given_as"] = "group-level data"
        out.append(Rdm(kind, target.name, subject, vector, attrs))
    if target.group_rdm is not None and not target.group_only:
        pooled = "group-mean ratings" if kind == "behaviour" else compare_method
        attrs = {"target": target.name, "subject": GROUP_SUBJECT, "metric": metric,
                 "pooled_on": pooled, "n_subjects": len(target.subjects)}  # fmt: skip
        if kind == "brain":
            attrs["roi"] = target.name
        out.append(
            Rdm(kind, target.name, GROUP_SUBJECT, _vectors(target.group_rdm[None])[0], attrs)
        )
    return out
