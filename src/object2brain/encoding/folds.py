r"""Seeded cross-validation folds over stimuli for encoding models.

Outer folds split the :math:`n` stimuli into :math:`K` test sets; each stimulus is predicted once,
by a model fitted on the other :math:`K - 1` folds. Inner folds split one outer *training* set
again, to choose the ridge penalty there: the test fold never takes part in that choice.

Assignment: the stimuli (of each condition, when conditions are given, taken in sorted order) are
shuffled with a generator seeded by ``(seed, 0)`` and dealt to folds round robin, continuing the
deal from one condition to the next, so fold sizes differ by at most one and each condition is
spread over the folds as evenly as its size allows (stratified). Inner folds of outer fold
:math:`k` are dealt the same way (not stratified) from a generator seeded by ``(seed, 1, k)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from object2brain.errors import DataError

_OUTER_STREAM = 0
_INNER_STREAM = 1


def _deal(order: np.ndarray, k: int, start: int) -> tuple[np.ndarray, int]:
    """Folds ``(len(order),)`` of the stimuli in ``order``, dealt round robin from ``start``."""
    folds = (start + np.arange(order.size)) % k
    return folds, (start + order.size) % k


def outer_folds(
    n_stimuli: int, k: int, *, seed: int, conditions: Sequence[str] | np.ndarray | None = None
) -> np.ndarray:
    """Fold index ``(n_stimuli,)`` in ``0..k-1`` of every stimulus, stratified by ``conditions``.

    Raises:
        DataError: ``k < 2``, fewer stimuli than folds, or a condition with fewer stimuli than
            folds (it could not appear in every test fold).
    """
    if k < 2:
        raise DataError(f"encoding: need at least 2 folds, got {k}")
    if n_stimuli < k:
        raise DataError(f"encoding: {n_stimuli} stimuli cannot be split into {k} folds")
    rng = np.random.default_rng([seed, _OUTER_STREAM])
    folds = np.empty(n_stimuli, dtype=np.int64)
    if conditions is None:
        order = rng.permutation(n_stimuli)
        folds[order] = _deal(order, k, 0)[0]
        return folds
    labels = np.asarray(conditions, dtype=object)
    if labels.shape != (n_stimuli,):
        raise DataError(f"encoding: {labels.size} condition labels for {n_stimuli} stimuli")
    counts = pd.Series(labels).value_counts()
    small = sorted(str(c) for c, size in counts.items() if size < k)
    if small:
        raise DataError(
            f"encoding: condition(s) {', '.join(small)} have fewer stimuli than the {k} folds "
            f"({', '.join(f'{c}: {counts[c]}' for c in small)}); use fewer folds"
        )
    start = 0
    for condition in sorted(counts.index, key=str):
        members = np.flatnonzero(labels == condition)
        order = members[rng.permutation(members.size)]
        dealt, start = _deal(order, k, start)
        folds[order] = dealt
    return folds


def fold_splits(folds: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(train, test), ...]`` index arrays (sorted) of each fold in ``0..K-1``."""
    k = int(folds.max()) + 1
    return [(np.flatnonzero(folds != f), np.flatnonzero(folds == f)) for f in range(k)]


def inner_splits(
    n_train: int, k: int, *, seed: int, outer_fold: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Inner folds of one outer training set: ``[(train, validation), ...]`` positions in
    ``0..n_train-1`` (indices into the training set, not into all stimuli).

    Raises:
        DataError: fewer training stimuli than inner folds.
    """
    if n_train < k:
        raise DataError(
            f"encoding: {n_train} training stimuli cannot be split into {k} inner folds"
        )
    rng = np.random.default_rng([seed, _INNER_STREAM, outer_fold])
    order = rng.permutation(n_train)
    folds = np.empty(n_train, dtype=np.int64)
    folds[order] = _deal(order, k, 0)[0]
    return fold_splits(folds)


def folds_table(stimulus_ids: Sequence[str], folds: np.ndarray) -> pd.DataFrame:
    """The ``folds.csv`` table: one row per stimulus, columns ``stimulus_id`` and ``fold``."""
    if len(stimulus_ids) != folds.size:
        raise DataError(f"encoding: {len(stimulus_ids)} stimulus ids for {folds.size} folds")
    return pd.DataFrame({"stimulus_id": list(stimulus_ids), "fold": folds.astype(np.int64)})
