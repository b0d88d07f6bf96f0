"""Seeded train/val/test splits stratified by integer valence level, saved as CSV and reusable.

Valence level of a rating ``v``: ``level = floor(v + 0.5)`` (round half up, so a group mean of
``0.5`` is level 1); FindingEmo's integer ratings are their own level.

Stratification: the stimuli of each level are shuffled with ``numpy.random.default_rng(seed)``,
the levels are laid end to end (lowest level first), and position ``k`` of that sequence goes to
the split ``s`` with the largest deficit ``f_s * (k + 1) - c_s`` (``f_s`` the requested fraction,
``c_s`` the count already given to ``s``; ties go to train, then val, then test). Every split thus
receives its exact global share (to one stimulus) and each level its share to within two stimuli
(measured: at most 1.34 over 3,000 random splits).

Split file (CSV): ``stimulus_id, valence, level, split`` with ``split`` in ``train|val|test``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from object2brain.data.stimuli import id_problems
from object2brain.errors import DataError, require_columns

log = logging.getLogger(__name__)

SPLITS: tuple[str, str, str] = ("train", "val", "test")
SPLIT_COLUMNS = ("stimulus_id", "split")
_MAX_LISTED = 20


def _listing(items: Sequence[object]) -> str:
    shown = ", ".join(str(i) for i in items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f", ... and {more} more" if more > 0 else "")


def valence_levels(valence: Sequence[float] | np.ndarray) -> np.ndarray:
    """Integer valence level of each rating, ``floor(v + 0.5)``: ``(n,)`` -> ``(n,)`` int64."""
    values = np.asarray(valence, dtype=np.float64)
    return np.floor(values + 0.5).astype(np.int64)


def make_split(
    ids: Sequence[str],
    valence: Sequence[float] | np.ndarray,
    *,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> pd.DataFrame:
    """Assign each stimulus to train/val/test, stratified by valence level (module docstring).

    Args:
        ids: stimulus ids ``(n,)``, unique.
        valence: ratings ``(n,)``.
        fractions: train, val and test shares (non-negative, summing to 1).
        seed: seed of the within-level shuffles.

    Returns:
        DataFrame ``stimulus_id, valence, level, split`` in the order of ``ids``.

    Raises:
        DataError: bad fractions, or too few stimuli for a non-empty val and test split.
    """
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (3,) or np.any(f < 0) or not np.isclose(f.sum(), 1.0):
        raise DataError(f"split fractions {fractions}: need three shares >= 0 that sum to 1")
    values = np.asarray(valence, dtype=np.float64)
    if len(ids) != len(values):
        raise DataError(f"{len(ids)} stimulus ids but {len(values)} valence values")
    levels = valence_levels(values)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    for level in np.unique(levels):
        members = np.flatnonzero(levels == level)
        order.extend(int(i) for i in rng.permutation(members))
    counts = np.zeros(3)
    assigned = np.empty(len(values), dtype=object)
    for k, row in enumerate(order):
        deficit = f * (k + 1) - counts
        choice = int(np.argmax(deficit))  # first maximum: train, then val, then test
        counts[choice] += 1
        assigned[row] = SPLITS[choice]
    for name, share, count in zip(SPLITS, f, counts, strict=True):
        if share > 0 and count == 0:
            raise DataError(
                f"{len(values)} rated images are too few for a {name} split of "
                f"{share:.0%}; add images or change the fractions"
            )
    return pd.DataFrame(
        {
            "stimulus_id": [str(i) for i in ids],
            "valence": values,
            "level": levels,
            "split": assigned.astype(str),
        }
    )


def condition_folds(
    labels: Sequence[str] | np.ndarray | None, n: int, k: int, *, seed: int
) -> np.ndarray:
    """Selection folds of ``n`` stimuli (in their order), stratified by condition: fold
    ``(n,)`` int64 in ``0 .. k - 1``, :func:`make_folds` with one valence level and ``within`` =
    the condition labels ``(n,)`` (``None``: one condition). The dissection (which assigns
    filters without each fold's stimuli) and the lesion (which tests the groups so chosen on
    that fold) both call this with the same stimuli, labels, ``k`` and ``seed``, so they agree.

    Raises:
        DataError: ``k`` out of ``2 .. n``.
    """
    within = np.full(n, "") if labels is None else np.asarray(labels, dtype=str)
    return make_folds(np.zeros(n), k, seed=seed, within=within)


def make_folds(
    valence: Sequence[float] | np.ndarray,
    k: int,
    *,
    seed: int = 0,
    within: Sequence[str] | np.ndarray | None = None,
) -> np.ndarray:
    """Assign each stimulus to one of ``k`` cross-fitting folds, stratified by valence level.

    The stimuli of each level (of each ``within`` label, then each level, when given) are
    shuffled with ``numpy.random.default_rng([seed, k])``, the blocks are laid end to end and
    position ``i`` of that sequence goes to fold ``i mod k``: fold sizes differ by at most one
    and each block is spread over the folds as evenly. With ``within`` = the train/val/test split,
    every fold gets its share of validation stimuli, so each fold head can stop early.

    Args:
        valence: ratings ``(n,)``.
        k: number of folds, ``2 <= k <= n`` (``n``: leave-one-out).
        seed: seed of the within-block shuffles (a stream of its own: not the split's shuffles).
        within: optional labels ``(n,)`` to stratify by first (e.g. the split of each stimulus).

    Returns:
        Fold index of every stimulus ``(n,)`` int64 in ``0 .. k - 1``.

    Raises:
        DataError: ``k`` out of range.
    """
    levels = valence_levels(valence)
    n = len(levels)
    if k < 2 or k > n:
        raise DataError(f"cross-fitting with {k} folds needs 2 to {n} folds ({n} rated stimuli)")
    labels = (
        np.zeros(n, dtype=np.int64) if within is None else np.unique(within, return_inverse=True)[1]
    )
    rng = np.random.default_rng([seed, k])
    blocks = [
        rng.permutation(np.flatnonzero((labels == label) & (levels == level)))
        for label in np.unique(labels)
        for level in np.unique(levels)
    ]
    order = np.concatenate(blocks)
    folds = np.empty(n, dtype=np.int64)
    folds[order] = np.arange(n) % k
    return folds


def held_out_ids(path: str | Path) -> list[str]:
    """The stimulus ids of the ``test`` split of a split file (e.g. ``train-head``'s
    ``split.csv``): the stimuli its heads were not fitted on."""
    split = load_split(path)
    ids: list[str] = split.loc[split["split"] == "test", "stimulus_id"].tolist()
    if not ids:
        raise DataError(f"{path}: no 'test' rows: no held-out stimuli to compare on")
    return ids


def save_split(split: pd.DataFrame, path: str | Path) -> Path:
    """Write a split table as CSV, atomically."""
    from object2brain.io import atomic_path

    path = Path(path)
    with atomic_path(path) as temp:
        split.to_csv(temp, index=False)
    return path


def load_split(path: str | Path, ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Read a split file and match it to the stimulus ids at hand.

    Args:
        path: CSV with at least ``stimulus_id`` and ``split`` (``train|val|test``).
        ids: the stimuli to train on. Ids of the file that are not in ``ids`` (e.g. images missing
            here) are dropped with a warning; ids not in the file are an error.

    Returns:
        The split rows in the order of ``ids`` (file order when ``ids`` is ``None``).

    Raises:
        DataError: unreadable file, missing columns, unknown split names, duplicate ids, or
            stimuli the split does not cover.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    try:
        frame = pd.read_csv(path, dtype={"stimulus_id": str, "split": str})
        if "stimulus_id" in frame.columns:  # ids exactly as written: "NA" is an id
            text = pd.read_csv(path, dtype=str, keep_default_na=False, usecols=["stimulus_id"])
            frame["stimulus_id"] = text["stimulus_id"].astype(object)
    except Exception as exc:  # pandas raises many types for malformed files
        raise DataError(f"{path}: cannot be read as a CSV split file ({exc})") from None
    require_columns(frame.columns, SPLIT_COLUMNS, str(path))
    written, problems = id_problems(frame["stimulus_id"], "stimulus_id")
    if problems:
        raise DataError(f"{path}: " + "; ".join(problems))
    frame["stimulus_id"] = written
    frame["split"] = frame["split"].astype(str).str.strip().str.lower()
    bad = sorted(set(frame["split"]) - set(SPLITS))
    if bad:
        raise DataError(f"{path}: unknown split name(s) {_listing(bad)} (use train, val, test)")
    duplicated = sorted(set(frame["stimulus_id"][frame["stimulus_id"].duplicated()]))
    if duplicated:
        raise DataError(f"{path}: duplicate stimulus_id(s) {_listing(duplicated)}")
    if ids is None:
        return frame.reset_index(drop=True)
    wanted = [str(i) for i in ids]
    known = set(frame["stimulus_id"])
    uncovered = [i for i in wanted if i not in known]
    if uncovered:
        raise DataError(
            f"{path}: {len(uncovered)} stimulus id(s) are not in the split file: "
            f"{_listing(uncovered)}"
        )
    extra = len(known - set(wanted))
    if extra:
        log.warning("%s: %d stimulus id(s) of the split are not available; dropped", path, extra)
    indexed = frame.set_index("stimulus_id")
    return indexed.loc[wanted].reset_index()
