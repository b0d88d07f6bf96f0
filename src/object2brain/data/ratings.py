"""Behavioural valence ratings: the long table ``subject, stimulus_id, valence``.

Read from CSV, TSV or Parquet (or a DataFrame). Validation reports, each in one
:class:`~object2brain.errors.DataError` naming the file and the rows at fault: missing columns,
empty subject or stimulus ids, missing (NaN) or non-numeric valence values, and stimulus ids that
are not in the stimulus set (all listed).

Ids (``subject``, ``stimulus_id``) are strings exactly as written: ``NA``, ``null`` or ``NaN`` are
ids, not missing values; an empty id or one with leading or trailing spaces is an error naming the
lines. Repeated ratings of one stimulus by one subject are an error listing the pairs and lines,
unless ``duplicates="mean"`` asks to average them (logged at INFO level). Group ratings are the
mean over subjects.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pandas as pd

from object2brain.data import GROUP_RDM_SUBJECT, GROUP_SUBJECT
from object2brain.data.stimuli import id_problems
from object2brain.errors import DataError, StimulusError, listing, require_columns

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("subject", "stimulus_id", "valence")
Duplicates = Literal["error", "mean"]
DUPLICATES: tuple[str, ...] = get_args(Duplicates)


@dataclass(frozen=True)
class Ratings:
    """Validated long ratings, one row per (subject, stimulus_id) after averaging repeats.

    Attributes:
        table: columns ``subject`` (str), ``stimulus_id`` (str), ``valence`` (float).
        source: the file read, if any.
    """

    table: pd.DataFrame
    source: Path | None = None

    @property
    def subjects(self) -> list[str]:
        """Subject ids in order of first appearance."""
        return [str(s) for s in pd.unique(self.table["subject"])]

    @property
    def stimulus_ids(self) -> list[str]:
        """Rated stimulus ids in order of first appearance."""
        return [str(s) for s in pd.unique(self.table["stimulus_id"])]

    def matrix(self, ids: Sequence[str]) -> np.ndarray:
        """Ratings ``(n_subjects, n_ids)``, subjects in :attr:`subjects` order; NaN if unrated."""
        wide = self.table.pivot(index="subject", columns="stimulus_id", values="valence")
        wide = wide.reindex(index=self.subjects, columns=list(ids))
        return wide.to_numpy(dtype=np.float64)

    def group_mean(self, ids: Sequence[str] | None = None) -> np.ndarray:
        """Group rating per stimulus ``(n_ids,)``: mean over the subjects who rated it.

        Raises :class:`DataError` listing the ids nobody rated.
        """
        ids = list(ids) if ids is not None else self.stimulus_ids
        means = self.table.groupby("stimulus_id", sort=False)["valence"].mean()
        missing = [sid for sid in ids if sid not in means.index]
        if missing:
            raise DataError(
                f"{self._where()}: {len(missing)} stimulus id(s) have no rating: {listing(missing)}"
            )
        return means.reindex(list(ids)).to_numpy(dtype=np.float64)

    def complete_subjects(self, ids: Sequence[str]) -> list[str]:
        """Subjects who rated every one of ``ids`` (others are logged and left out)."""
        values = self.matrix(ids)
        complete = ~np.isnan(values).any(axis=1)
        subjects = self.subjects
        dropped = [s for s, ok in zip(subjects, complete, strict=True) if not ok]
        if dropped:
            log.info(
                "%s: %d subject(s) did not rate every analysed stimulus and get no per-subject "
                "behavioural RDM (they still count in the group mean): %s",
                self._where(),
                len(dropped),
                listing(dropped),
            )
        return [s for s, ok in zip(subjects, complete, strict=True) if ok]

    def _where(self) -> str:
        return str(self.source) if self.source is not None else "ratings table"


def _read(path: Path) -> pd.DataFrame:
    from object2brain.data.stimuli import read_table

    try:
        frame = read_table(path)
    except StimulusError as exc:
        raise DataError(str(exc)) from None
    return frame


def load_ratings(
    source: str | Path | pd.DataFrame | Ratings,
    stimulus_ids: Sequence[str] | None = None,
    *,
    duplicates: Duplicates = "error",
) -> Ratings:
    """Load and validate a long ratings table.

    Args:
        source: a .csv, .tsv or .parquet file, a DataFrame, or :class:`Ratings` (re-validated
            against ``stimulus_ids``).
        stimulus_ids: the stimulus set; every rated id must be in it (all strays are listed).
        duplicates: rows repeating a ``(subject, stimulus_id)`` pair: ``error`` (default: a
            repeated row is usually a merge or export mistake) or ``mean`` (average them,
            logged at INFO level).
    Returns:
        :class:`Ratings`.
    Raises:
        DataError: missing columns, empty ids or ids with surrounding spaces, NaN or non-numeric
            valence, unknown stimulus ids, repeated pairs (with ``duplicates="error"``).
    """
    if duplicates not in DUPLICATES:
        raise DataError(f"duplicates={duplicates!r}: use one of {', '.join(DUPLICATES)}")
    if isinstance(source, Ratings):
        frame, origin = source.table.copy(), source.source
    elif isinstance(source, pd.DataFrame):
        frame, origin = source.copy(), None
    else:
        origin = Path(source).expanduser()
        if not origin.is_file():
            raise DataError(f"{origin}: ratings table not found")
        frame = _read(origin)
    where = str(origin) if origin is not None else "ratings table"

    require_columns(frame.columns, REQUIRED_COLUMNS, where, label="required column(s)")
    if frame.empty:
        raise DataError(f"{where}: the ratings table has no rows")

    problems: list[str] = []
    line = frame.index.to_numpy() + 2  # header line, 1-based
    text: dict[str, list[str]] = {}
    for column in ("subject", "stimulus_id"):
        text[column], found = id_problems(frame[column], column)
        problems += found
    subjects = pd.Series(text["subject"], index=frame.index)
    reserved = subjects.isin([GROUP_SUBJECT, GROUP_RDM_SUBJECT])
    if reserved.any():
        names = ", ".join(sorted(set(subjects[reserved])))
        problems.append(
            f"subject name(s) {names} (line(s) {listing(list(line[reserved.to_numpy()]))}) are "
            "reserved for the group-level rows of the result tables: rename the rater(s)"
        )
    raw = frame["valence"]
    numeric = pd.to_numeric(raw, errors="coerce")
    nan = raw.isna().to_numpy()
    bad = (numeric.isna().to_numpy()) & ~nan
    if nan.any():
        problems.append(f"missing (NaN) valence on line(s) {listing(list(line[nan]))}")
    if bad.any():
        shown = [f"{ln} ({v!r})" for ln, v in zip(line[bad], raw[bad], strict=True)]
        problems.append(f"non-numeric valence on line(s) {listing(shown)}")
    infinite = np.isinf(numeric.to_numpy(float))
    if infinite.any():
        problems.append(f"infinite valence on line(s) {listing(list(line[infinite]))}")
    if problems:
        raise DataError(f"{where}: " + "; ".join(problems))

    table = pd.DataFrame(
        {
            "subject": text["subject"],
            "stimulus_id": text["stimulus_id"],
            "valence": numeric.astype(np.float64).to_numpy(),
        }
    )
    if stimulus_ids is not None:
        known = set(stimulus_ids)
        unknown = [s for s in pd.unique(table["stimulus_id"]) if s not in known]
        if unknown:
            raise DataError(
                f"{where}: {len(unknown)} stimulus id(s) not in the stimulus set: "
                f"{listing(unknown)}"
            )
    return Ratings(_merge_repeats(table, where, line, duplicates), origin)


def _merge_repeats(
    table: pd.DataFrame, where: str, line: np.ndarray, duplicates: Duplicates
) -> pd.DataFrame:
    """``table`` with one row per ``(subject, stimulus_id)``: repeats refused (``error``, naming
    the pairs and their file lines ``line``) or averaged (``mean``)."""
    repeated = table.duplicated(["subject", "stimulus_id"], keep=False)
    if not repeated.any():
        return table.reset_index(drop=True)
    if duplicates == "error":
        pairs = table.loc[repeated, ["subject", "stimulus_id"]].drop_duplicates()
        shown = [f"({s}, {i}) on line(s) {_lines_of(table, s, i, line)}" for s, i in pairs.values]
        raise DataError(
            f"{where}: {len(pairs)} (subject, stimulus_id) pair(s) are rated more than once: "
            f"{listing(shown, limit=5)}; remove the repeats, or average them explicitly "
            "(--duplicate-ratings mean; duplicate_ratings: mean in a study's rsa section)"
        )
    log.info(
        "%s: %d rows repeat a (subject, stimulus_id) pair; repeated ratings are averaged",
        where,
        int(repeated.sum()),
    )
    averaged = table.groupby(["subject", "stimulus_id"], sort=False)["valence"].mean()
    return averaged.reset_index().reset_index(drop=True)


def _lines_of(table: pd.DataFrame, subject: str, sid: str, line: np.ndarray) -> str:
    """The file lines of the rows of ``table`` rating ``sid`` by ``subject``."""
    rows = np.flatnonzero(
        (table["subject"].to_numpy() == subject) & (table["stimulus_id"].to_numpy() == sid)
    )
    return ", ".join(str(int(line[r])) for r in rows)


def load_predicted_valence(
    source: str | Path | pd.Series | Mapping[str, float], stimulus_ids: Sequence[str]
) -> np.ndarray:
    """Predicted valence of each of ``stimulus_ids`` ``(n,)`` float64, matched by id.

    Args:
        source: a table (CSV, TSV or Parquet) with columns ``stimulus_id`` and ``predicted``,
            such as ``train-head``'s ``out_of_fold.csv`` or ``predictions.csv``; or a Series /
            mapping ``stimulus_id -> predicted``.
        stimulus_ids: the stimuli that need a value (extra ids in ``source`` are ignored).

    Raises:
        DataError: missing columns, duplicate ids, ids without a value, non-finite values.
    """
    where = "predicted valence"
    if isinstance(source, pd.Series | Mapping):
        given = pd.Series(source)  # a new object: the caller's keeps its index
        ids, raw = given.index.astype(str), given.to_numpy()
    else:
        path = Path(source).expanduser()
        where = str(path)
        if not path.is_file():
            raise DataError(f"{path}: predicted-valence table not found")
        frame = _read(path)
        require_columns(frame.columns, ("stimulus_id", "predicted"), where)
        ids, raw = pd.Index(frame["stimulus_id"].astype(str)), frame["predicted"].to_numpy()
    repeated = sorted(set(ids[ids.duplicated()]))
    if repeated:
        raise DataError(f"{where}: duplicate stimulus_id(s) {listing(repeated)}")
    series = pd.Series(pd.to_numeric(pd.Series(raw), errors="coerce").to_numpy(), index=ids)
    wanted = [str(i) for i in stimulus_ids]
    missing = [i for i in wanted if i not in series.index]
    if missing:
        raise DataError(
            f"{where}: {len(missing)} stimulus id(s) have no predicted valence: {listing(missing)}"
        )
    values = series.reindex(wanted).to_numpy(dtype=np.float64)
    bad = [i for i, v in zip(wanted, values, strict=True) if not np.isfinite(v)]
    if bad:
        raise DataError(f"{where}: predicted valence missing or not numeric for {listing(bad)}")
    return values
