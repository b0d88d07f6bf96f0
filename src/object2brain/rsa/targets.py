"""The shared analysis set: which stimuli, which conditions, which target RDMs, which group rule.

Every stage that compares model RDMs with human data (the alignment in :mod:`.align`, the
Object2Brain lesions in :mod:`object2brain.lesion`, lesions inside the forward pass) works on one
:class:`AnalysisSet`, built once by :func:`build_analysis_set` from the loaded inputs:

- ``ids``: the analysed stimulus ids, in stimulus-table order (those the brain data cover);
- ``conditions``: ``all`` (every analysed stimulus) and each value of the stimulus table's
  ``condition`` column with at least :data:`MIN_CONDITION_STIMULI` stimuli, in order of
  appearance (stimuli with an empty condition enter ``all`` only);
- ``held_out``: a ``(n,)`` boolean mask of the stimuli of the direct correlation of predicted
  with rated valence (``behavior_ids``, looked up in a set; default: every stimulus);
- ``targets``: the target RDMs, one :class:`Target` per brain ROI and one for behaviour, each a
  stack of per-subject RDMs ``(S, n, n)`` with its descriptors (target name, kind, subjects);
- :meth:`AnalysisSet.columns`: those RDMs stacked as the columns of every comparison, each column
  with its descriptor ``(target, kind, subject)``, and **the one rule that combines subjects into
  group rows**: a ``(Q, G)`` matrix whose column ``g`` averages the subjects of one target; the
  ``group`` value is the mean over the subjects whose coefficient is defined
  (:func:`~object2brain.rsa.inference.combine_finite`). Descriptors travel with the data, as in
  rsatoolbox's ``RDMs.rdm_descriptors``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from object2brain.data import ALL_CONDITION, GROUP_RDM_SUBJECT, GROUP_SUBJECT
from object2brain.data.brain import BrainData, OnMissing
from object2brain.data.ratings import Ratings
from object2brain.data.stimuli import StimulusSet
from object2brain.errors import DataError, listing
from object2brain.rsa.inference import combine_finite, combine_matrix, pool_rdms
from object2brain.rsa.rdm import behavior_rdm, upper_triangle

log = logging.getLogger(__name__)

#: Fewest stimuli of a condition (and of the whole set) analysed by RSA. An RDM of ``m``
#: stimuli has ``m (m - 1) / 2`` dissimilarities: with 3 stimuli a rank correlation of its 3
#: values takes only 4 values and the permutation null has 3! = 6 orderings (p >= 1/6); with 4
#: there are 6 dissimilarities and 24 orderings. Smaller conditions are skipped with a warning.
MIN_CONDITION_STIMULI = 4
#: Fewest stimuli of a direct correlation of two value vectors (predicted vs rated valence);
#: fewer give NaN.
MIN_CORRELATION_VALUES = 3
#: Name of the behaviour target (valence ratings).
BEHAVIOR_TARGET = "behavior"


@dataclass
class Target:
    """One target: per-subject RDMs ``rdms`` ``(S, n, n)`` and their descriptors.

    ``kind`` is ``roi`` or ``behavior``; ``subjects`` the ``S`` subject (or rater) ids;
    ``group_rdm`` ``(n, n)`` the subjects' RDMs pooled on the comparison's scale (None for
    group-level data); ``group_only``: the single RDM is itself group-level data (subject
    ``group``, no per-subject rows).
    """

    name: str
    kind: str
    subjects: list[str]
    rdms: torch.Tensor
    group_rdm: torch.Tensor | None = None
    group_only: bool = False


class Condition(NamedTuple):
    """One condition: its name and its rows ``(n_c,)`` (ascending) in the analysis set's ids."""

    name: str
    rows: np.ndarray

    @property
    def size(self) -> int:
        """Number of stimuli in the condition."""
        return len(self.rows)


@dataclass(frozen=True)
class TargetColumns:
    """The target RDMs as the ``Q`` columns of a comparison, plus ``G`` derived group columns.

    Attributes:
        rdms: ``(Q, n, n)``, the targets' RDMs stacked in target order.
        labels: ``(target, kind, subject)`` of each of the ``Q + G`` columns; the ``G`` group
            columns (subject ``group``) come last, one per target with per-subject data.
        combine: ``(Q, G)``: column ``g`` averages the subject columns of one target (None when
            no target has per-subject data).
        owner: index into the analysis set's targets of each of the ``Q + G`` columns.
    """

    rdms: torch.Tensor
    labels: list[tuple[str, str, str]]
    combine: torch.Tensor | None
    owner: list[int]

    def vectors(self) -> torch.Tensor:
        """Upper triangles ``(Q, n (n - 1) / 2)`` of the column RDMs (condensed order)."""
        return upper_triangle(self.rdms).reshape(self.rdms.shape[0], -1)

    def with_group(self, r: np.ndarray) -> np.ndarray:
        """Coefficients ``r`` ``(N, Q)`` with the ``G`` group columns appended, ``(N, Q + G)``:
        per target the mean over its subjects whose coefficient is defined."""
        if self.combine is None:
            return r
        group = combine_finite(torch.from_numpy(r), self.combine).numpy()
        return np.concatenate([r, group], axis=1)


def target_columns(targets: Sequence[Target], *, group_rdm: bool) -> TargetColumns:
    """Stack ``targets`` as comparison columns (the group rule: :class:`TargetColumns`).

    Per target with per-subject data: its subjects' columns, then (``group_rdm``) a column
    ``group_rdm`` holding the pooled group RDM; a group-level target is one column ``group``.
    The derived ``group`` columns of the targets with subjects follow all of these.
    """
    stacks: list[torch.Tensor] = []
    labels: list[tuple[str, str, str]] = []
    owner: list[int] = []
    groups: list[tuple[int, list[int]]] = []
    q = 0
    for index, target in enumerate(targets):
        if target.group_only:
            stacks.append(target.rdms)
            labels.append((target.name, target.kind, GROUP_SUBJECT))
            owner.append(index)
            q += 1
            continue
        n_subjects = target.rdms.shape[0]
        stacks.append(target.rdms)
        labels += [(target.name, target.kind, subject) for subject in target.subjects]
        groups.append((index, list(range(q, q + n_subjects))))
        q += n_subjects
        owner += [index] * n_subjects
        if group_rdm:
            assert target.group_rdm is not None
            stacks.append(target.group_rdm[None])
            labels.append((target.name, target.kind, GROUP_RDM_SUBJECT))
            owner.append(index)
            q += 1
    combine = combine_matrix([cols for _, cols in groups], q) if groups else None
    for index, _ in groups:
        labels.append((targets[index].name, targets[index].kind, GROUP_SUBJECT))
        owner.append(index)
    return TargetColumns(torch.cat(stacks), labels, combine, owner)


def condition_sets(ids: Sequence[str], labels: np.ndarray | None) -> list[Condition]:
    """``all`` (every row) and one :class:`Condition` per distinct non-empty label, in order of
    appearance, whatever its size; stimuli labelled ``""`` enter ``all`` only."""
    sets = [Condition(ALL_CONDITION, np.arange(len(ids)))]
    if labels is not None:
        for name in dict.fromkeys(labels.tolist()):
            if name != "":
                sets.append(Condition(str(name), np.flatnonzero(labels == name)))
    return sets


@dataclass(frozen=True)
class AnalysisSet:
    """The stimuli, conditions, held-out mask and target RDMs every RSA stage works on.

    Attributes:
        ids: analysed stimulus ids ``(n,)``.
        targets: the target RDMs with their descriptors (:class:`Target`).
        labels: condition label of each stimulus ``(n,)`` (``""``: none), or None without a
            ``condition`` column.
        conditions: ``all`` and every condition with at least :data:`MIN_CONDITION_STIMULI`
            stimuli.
        held_out: ``(n,)`` bool, the stimuli of predicted-vs-rated valence correlations.
        rated: ``(n,)`` group-mean rated valence (ratings, else the stimulus table's
            ``valence``), or None.
        stimuli: the stimulus table restricted to ``ids`` (None when built from targets).
        where: where the stimuli come from, for messages and manifests.
    """

    ids: list[str]
    targets: list[Target]
    labels: np.ndarray | None = None
    conditions: list[Condition] = field(default_factory=list)
    held_out: np.ndarray = field(default_factory=lambda: np.ones(0, dtype=bool))
    rated: np.ndarray | None = None
    stimuli: StimulusSet | None = None
    where: str = "stimulus table"

    @classmethod
    def from_targets(
        cls,
        ids: Sequence[str],
        targets: Sequence[Target],
        labels: np.ndarray | None = None,
        *,
        compare_method: str = "spearman",
        held_out: np.ndarray | None = None,
        rated: np.ndarray | None = None,
        stimuli: StimulusSet | None = None,
        where: str = "stimulus table",
    ) -> AnalysisSet:
        """The analysis set of ready-made ``targets`` for ``ids``: ``all`` and the conditions of
        ``labels`` ``(n,)`` with at least :data:`MIN_CONDITION_STIMULI` stimuli (smaller ones
        skipped with a warning); every stimulus held out unless ``held_out`` ``(n,)`` is given.
        Warns about subjects whose RDM is constant within an analysed condition (their
        ``compare_method`` r is undefined)."""
        conditions = []
        for condition in condition_sets(ids, labels):
            if condition.size < MIN_CONDITION_STIMULI:
                log.warning(
                    "condition %r has %d stimuli (< %d): no RSA within it",
                    condition.name,
                    condition.size,
                    MIN_CONDITION_STIMULI,
                )
                continue
            conditions.append(condition)
        analysis = cls(
            list(ids),
            list(targets),
            labels,
            conditions,
            np.ones(len(ids), dtype=bool) if held_out is None else held_out,
            rated,
            stimuli,
            where,
        )
        analysis.warn_constant_subjects(compare_method)
        return analysis

    @property
    def condition_names(self) -> list[str]:
        """Every non-empty condition label, analysed or not, in order of appearance."""
        if self.labels is None:
            return []
        return [str(c) for c in dict.fromkeys(self.labels.tolist()) if c != ""]

    @property
    def contrasts(self) -> list[tuple[Condition, Condition]]:
        """Every pair of analysed conditions (``all`` excluded), in order of appearance."""
        return list(combinations(self.conditions[1:], 2))

    def columns(self, *, group_rdm: bool) -> TargetColumns:
        """The targets as comparison columns (:func:`target_columns`)."""
        return target_columns(self.targets, group_rdm=group_rdm)

    def warn_constant_subjects(self, method: str) -> None:
        """Warn once per target and analysed condition about constant subject RDMs."""
        for condition in self.conditions:
            rows = torch.as_tensor(condition.rows)
            for target in self.targets:
                sub = target.rdms[:, rows.to(target.rdms.device)][:, :, rows.to(target.rdms.device)]
                warn_constant_subjects(target, upper_triangle(sub), condition.name, method)


def warn_constant_subjects(target: Target, vectors: torch.Tensor, cond: str, method: str) -> None:
    """Name the subjects of ``target`` whose RDM ``vectors`` ``(S, n_pairs)`` is constant within
    ``cond`` (e.g. a rater who gave every stimulus of a condition the same rating): their
    Spearman/Pearson r is undefined, so their rows are NaN and the ``group`` mean leaves them out.
    """
    flags = (vectors == vectors[:, :1]).all(dim=1).tolist()
    constant = [subject for subject, flag in zip(target.subjects, flags, strict=True) if flag]
    if not constant:
        return
    if method in ("kendall_tau_a", "rho_a"):
        consequence = f"their {method} is 0 and enters the mean over subjects"
    else:
        consequence = (
            f"their {method} r is undefined (NaN rows); the mean over subjects (group row) and "
            "the noise ceiling leave them out"
        )
    log.warning(
        "%s, condition %r: the RDM of %s is constant (all dissimilarities equal): %s",
        target.name,
        cond,
        listing(constant),
        consequence,
    )


def build_targets(
    brain: BrainData | None,
    ratings: Ratings | None,
    stimulus_valence: np.ndarray | None,
    ids: list[str],
    metric: str,
    device: torch.device,
    method: str,
    brain_rdm: str | None = None,
) -> list[Target]:
    """Target RDMs for ``ids``: every ROI of ``brain`` and behaviour (per rater, or group-level).

    ``metric``: the RDM metric of brain patterns (``brain_rdm``, when given: a cross-validated
    distance of run-wise patterns instead, :meth:`~object2brain.data.brain.BrainItem.rdm`);
    ``method``: the comparison, whose scale the
    ROIs' group RDMs are pooled on (:func:`~object2brain.rsa.inference.pool_rdms`). Behaviour
    RDMs are ``|v_i - v_j|``: from ``ratings`` when given (raters who rated every stimulus get
    their own RDM, the group RDM is that of the group-mean ratings), else from the stimulus
    table's valence (``stimulus_valence`` ``(n,)``, group level).
    """
    targets: list[Target] = []
    if brain is not None:
        aligned = brain.aligned(ids)
        for roi in aligned.rois:
            items = aligned.for_roi(roi)
            rdms = torch.stack([item.rdm(metric, device, brain_rdm) for item in items])
            subjects = [item.subject for item in items]
            group_only = subjects == [GROUP_SUBJECT]
            pooled = None if group_only else pool_rdms(rdms, method)
            targets.append(Target(roi, "roi", subjects, rdms, pooled, group_only))
    if ratings is not None:
        targets.append(_rating_target(ratings, ids, device))
    elif stimulus_valence is not None:
        group = behavior_rdm(stimulus_valence, device)
        targets.append(
            Target(BEHAVIOR_TARGET, "behavior", [GROUP_SUBJECT], group[None], None, True)
        )
    if not targets:
        raise DataError(
            "nothing to align to: give brain data (--brain), ratings (--ratings) or a stimulus "
            "table with a valence column"
        )
    return targets


def _rating_target(ratings: Ratings, ids: list[str], device: torch.device) -> Target:
    group = behavior_rdm(ratings.group_mean(ids), device)
    subjects = ratings.complete_subjects(ids)
    if not subjects:
        log.warning("no rater rated every analysed stimulus: behaviour uses group ratings only")
        return Target(BEHAVIOR_TARGET, "behavior", [GROUP_SUBJECT], group[None], None, True)
    values = ratings.table.pivot(index="subject", columns="stimulus_id", values="valence")
    matrix = values.reindex(index=subjects, columns=ids).to_numpy(dtype=np.float64)
    rdms = torch.stack([behavior_rdm(row, device) for row in matrix])
    return Target(BEHAVIOR_TARGET, "behavior", subjects, rdms, group)


def build_analysis_set(
    stimuli: StimulusSet | None,
    store_ids: Sequence[str],
    *,
    brain: BrainData | None,
    ratings: Ratings | None,
    rdm_metric: str,
    compare_method: str,
    device: torch.device,
    on_missing: OnMissing,
    behavior_ids: Sequence[str] | None,
    brain_rdm: str | None = None,
) -> AnalysisSet:
    """The analysis set of loaded inputs (see the module docstring).

    Args:
        stimuli: the stimulus table (``stimulus_id``, optional ``condition`` and ``valence``);
            None: the activation store's ids ``store_ids``, no conditions.
        brain: brain data; the analysed ids are those it covers (``on_missing``).
        ratings: ratings validated against the stimulus table's ids; else behaviour is the
            stimulus table's ``valence`` (every analysed stimulus must have one).
        rdm_metric, compare_method: RDM metric of brain patterns and the comparison.
        behavior_ids: stimuli of predicted-vs-rated valence correlations (default: all).
        brain_rdm: ``crossnobis`` or ``crossvalidated_euclidean``: ROI RDMs cross-validated over
            the runs of run-wise patterns (None: ``rdm_metric`` of the mean patterns).
    Raises:
        DataError: fewer than :data:`MIN_CONDITION_STIMULI` stimuli, held-out ids outside the
            stimulus set, missing or non-numeric valence, nothing to align to.
    """
    if stimuli is None:
        table, where = pd.DataFrame({"stimulus_id": list(store_ids)}), "store ids"
    else:
        table, where = stimuli.table, str(stimuli.source or "stimulus table")
    table_ids = [str(s) for s in table["stimulus_id"]]
    ids = brain.common_ids(table_ids, on_missing) if brain is not None else table_ids
    if len(ids) < MIN_CONDITION_STIMULI:
        raise DataError(
            f"{where}: RSA needs at least {MIN_CONDITION_STIMULI} stimuli, found {len(ids)}"
        )
    row_of = {sid: i for i, sid in enumerate(table_ids)}
    rows = [row_of[sid] for sid in ids]
    valence = None if ratings is not None else _stimulus_valence(table, rows, ids, where)
    labels = None
    if "condition" in table.columns:
        every = StimulusSet(table).conditions or []  # "" where empty: in no condition
        labels = np.asarray([every[r] for r in rows])
    targets = build_targets(
        brain, ratings, valence, ids, rdm_metric, device, compare_method, brain_rdm
    )
    rated = ratings.group_mean(ids) if ratings is not None else valence
    return AnalysisSet.from_targets(
        ids,
        targets,
        labels,
        compare_method=compare_method,
        held_out=held_out_mask(ids, table_ids, behavior_ids, where),
        rated=rated,
        stimuli=None if stimuli is None else stimuli.subset(ids),
        where=where,
    )


def held_out_mask(
    ids: Sequence[str], known: Sequence[str], behavior_ids: Sequence[str] | None, where: str
) -> np.ndarray:
    """``(n,)`` bool: which of ``ids`` are in ``behavior_ids`` (all when None).

    A set lookup, not ``np.isin``: on object arrays ``isin`` compares every id with every
    held-out id (quadratic at corpus scale).

    Raises:
        DataError: held-out ids outside ``known`` (the stimulus set).
    """
    if behavior_ids is None:
        return np.ones(len(ids), dtype=bool)
    unknown = sorted(set(behavior_ids) - set(known))
    if unknown:
        raise DataError(f"{where}: held-out stimuli not in the stimulus set: {listing(unknown)}")
    held = set(behavior_ids)
    return np.fromiter((sid in held for sid in ids), dtype=bool, count=len(ids))


def _stimulus_valence(
    table: pd.DataFrame, rows: list[int], ids: list[str], where: str
) -> np.ndarray | None:
    if "valence" not in table.columns:
        return None
    values = pd.to_numeric(table["valence"].iloc[rows], errors="coerce").to_numpy(np.float64)
    if np.isnan(values).any():
        bad = [sid for sid, v in zip(ids, values, strict=True) if np.isnan(v)]
        raise DataError(f"{where}: missing or non-numeric valence for {', '.join(bad[:20])}")
    return values
