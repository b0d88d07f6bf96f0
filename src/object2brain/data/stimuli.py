"""Stimulus sets: the table of images every analysis is keyed on.

A stimulus table (CSV, TSV or Parquet) has the columns ``stimulus_id`` (unique) and ``path``
(relative paths are relative to the table's folder), optionally ``condition`` and ``valence``
(group-mean rating), and any other columns, which are carried along unchanged. A folder of images
is also accepted: ``stimulus_id`` is then each file's stem.

Images may also be rows of an HDF5 image array (uint8 ``(n, H, W, 3)``, e.g. NSD's
``nsd_stimuli.hdf5``; :mod:`object2brain.data.image_array`), never written to disk as files:

- in a table, ``path`` ``FILE#ROW`` (dataset ``imgBrick``) or ``FILE#DATASET#ROW``, ``ROW``
  0-based, ``FILE`` relative to the table's folder like any path: ``nsd_stimuli.hdf5#12``;
- as the source itself, an ``.hdf5``/``.h5``/``.hdf`` file: every row (or ``rows``) of
  ``dataset``, ids ``nsd-00001``, ``nsd-00002``, ... (row + 1 on five digits, the ids of the
  ``kind: nsd`` brain source) or ``id_scheme`` (a format string with ``row`` and
  ``index`` = row + 1).

Validation checks an array's file, dataset, type, shape and rows without reading its pixels.

Validation reports every problem at once (all missing files, all unreadable images, all
duplicate ids) in one :class:`~object2brain.errors.StimulusError`.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from object2brain.data import ALL_CONDITION
from object2brain.data.image_array import (
    DEFAULT_DATASET,
    ArrayRef,
    array_problems,
    array_table,
    is_array_file,
    parse_array_ref,
)
from object2brain.data.images import image_sha256, load_image
from object2brain.errors import StimulusError, listing, require_columns

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
REQUIRED_COLUMNS = ("stimulus_id", "path")
CheckLevel = Literal["full", "header", "none", "table"]


@dataclass(frozen=True)
class StimulusSet:
    """An ordered, validated set of stimulus images.

    Attributes:
        table: one row per stimulus, in the order of the source; ``stimulus_id`` (str),
            ``path`` (absolute), plus every other column of the source table.
        source: the table file, image folder or image array the set was read from (``None`` if
            built in memory).
    """

    table: pd.DataFrame
    source: Path | None = None
    _index: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index.update({sid: i for i, sid in enumerate(self.table["stimulus_id"])})

    def __len__(self) -> int:
        return len(self.table)

    @property
    def ids(self) -> list[str]:
        """Stimulus ids in table order, ``(n_stimuli,)``."""
        return [str(s) for s in self.table["stimulus_id"]]

    @property
    def paths(self) -> list[Path]:
        """Absolute image paths in table order, ``(n_stimuli,)``: files, or rows of an image
        array written ``FILE#ROW`` / ``FILE#DATASET#ROW``
        (:func:`~object2brain.data.image_array.parse_array_ref`)."""
        return [Path(p) for p in self.table["path"]]

    @property
    def conditions(self) -> list[str] | None:
        """The ``condition`` column as strings (``""`` where empty: in no condition), or ``None``
        if the table has none."""
        if "condition" not in self.table.columns:
            return None
        return ["" if pd.isna(c) else str(c).strip() for c in self.table["condition"]]

    def position(self, stimulus_id: str) -> int:
        """Row of ``stimulus_id`` in the table."""
        try:
            return self._index[stimulus_id]
        except KeyError:
            raise StimulusError(f"unknown stimulus id {stimulus_id!r}") from None

    def subset(self, ids: Iterable[str]) -> StimulusSet:
        """The stimuli with the given ids, in the given order."""
        rows = [self.position(i) for i in ids]
        return StimulusSet(self.table.iloc[rows].reset_index(drop=True), self.source)

    def fingerprint(self) -> str:
        """SHA-256 over the ids and the bytes of every image.

        Stores, feature caches and run stages are keyed on it: touching, copying or moving the
        images keeps it, any edit of an image changes it. Images are hashed on a thread pool, each
        once per process (:func:`~object2brain.data.images.image_sha256`: a file's bytes, or an
        array row's shape and pixels).
        """
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            hashes = list(pool.map(image_sha256, self.paths))
        digest = hashlib.sha256()
        for sid, image_hash in zip(self.ids, hashes, strict=True):
            digest.update(sid.encode() + b"\0" + image_hash.encode())
        return digest.hexdigest()


#: Columns read as text exactly as written (no ``NA``/``null``/``NaN`` -> missing conversion).
ID_COLUMNS: tuple[str, ...] = ("stimulus_id", "subject")


def read_table(path: Path, *, ids: Sequence[str] = ID_COLUMNS) -> pd.DataFrame:
    """Read a CSV, TSV or Parquet table; the ``ids`` columns of a CSV/TSV are strings exactly as
    written: ``NA``, ``null`` or ``NaN`` stay ids, an empty cell is ``""``, spaces are kept (the
    loaders refuse ids with surrounding spaces). Other columns are parsed by pandas."""
    suffix = path.suffix.lower()
    try:
        if suffix in {".parquet", ".pq"}:
            frame = pd.read_parquet(path)
        elif suffix in {".tsv", ".tab", ".csv"}:
            sep = "," if suffix == ".csv" else "\t"
            frame = pd.read_csv(path, sep=sep, dtype={c: str for c in ids})
            present = [c for c in ids if c in frame.columns]
            if present:
                text = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, usecols=present)
                frame[present] = text[present].astype(object)
        else:
            raise StimulusError(
                f"{path}: unsupported table format {suffix!r} (use .csv, .tsv or .parquet)"
            )
    except StimulusError:
        raise
    except FileNotFoundError:
        raise StimulusError(f"{path}: file not found") from None
    except pd.errors.EmptyDataError:
        raise StimulusError(f"{path}: the table is empty (no header, no rows)") from None
    except Exception as exc:  # pandas/pyarrow raise many types for malformed files
        raise StimulusError(f"{path}: cannot be read as a table ({exc})") from None
    return frame


def id_problems(values: pd.Series, column: str) -> tuple[list[str], list[str]]:
    """The ids of ``values`` as strings, and their problems as message parts (lines: 1-based
    file lines, the header being line 1): empty cells, and ids with leading or trailing
    whitespace (refused rather than stripped: ``" a"`` and ``"a"`` would otherwise silently be
    one stimulus, or a mismatch against another table)."""
    lines = [int(i) + 2 for i in values.index]
    text = ["" if _missing(v) else str(v) for v in values]
    problems: list[str] = []
    blank = [ln for ln, v in zip(lines, text, strict=True) if not v.strip()]
    if blank:
        problems.append(f"empty {column} on line(s) {listing(blank)}")
    padded = [
        f"{ln} ({v!r})" for ln, v in zip(lines, text, strict=True) if v.strip() and v != v.strip()
    ]
    if padded:
        problems.append(
            f"{column} with leading or trailing spaces on line(s) {listing(padded)} "
            "(ids are taken exactly as written: remove the spaces)"
        )
    return text, problems


TRUE_WORDS = frozenset({"true", "1"})
FALSE_WORDS = frozenset({"false", "0"})


def parse_booleans(values: pd.Series, where: str, column: str) -> pd.Series:
    """``values`` as booleans, accepting only booleans, the numbers 1 and 0 and the words
    ``true``/``false``/``1``/``0`` (any case, surrounding spaces ignored). Anything else (``yes``,
    ``2``, an empty cell) would otherwise be read as *true* by ``astype(bool)``.

    Raises:
        DataError: ``<where>: column 'assigned' must hold true/false/1/0, not 'yes' (line 2), ...``
            naming every offending file line (the header being line 1).
    """
    from object2brain.errors import DataError

    parsed: list[bool] = []
    bad: list[str] = []
    for index, value in values.items():
        flag = _boolean(value)
        if flag is None:
            bad.append(f"{value!r} (line {int(index) + 2})")  # type: ignore[call-overload]
        parsed.append(bool(flag))
    if bad:
        raise DataError(
            f"{where}: column {column!r} must hold true/false/1/0, not {listing(bad, limit=5)}"
        )
    return pd.Series(parsed, index=values.index, dtype=bool)


def _boolean(value: object) -> bool | None:
    """A strict boolean reading of one cell, ``None`` if it is not one."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer | float | np.floating) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
    return None


def _missing(value: object) -> bool:
    """A missing cell of a non-text column (None or NaN); the string ``"NA"`` is an id."""
    return value is None or (isinstance(value, float) and value != value)


def load_stimuli(
    source: str | Path | pd.DataFrame,
    *,
    check: CheckLevel = "full",
    workers: int = 4,
    dataset: str = DEFAULT_DATASET,
    rows: Sequence[int] | None = None,
    id_scheme: str | Callable[[int], str] | None = None,
) -> StimulusSet:
    """Load and validate a stimulus set.

    Args:
        source: a stimulus table (.csv, .tsv, .parquet), a folder of images, an HDF5 image array
            (.hdf5, .h5, .hdf), or a DataFrame with ``stimulus_id`` and ``path`` columns
            (relative paths are then relative to the cwd).
        check: ``full`` decodes every image (JPEGs at reduced scale, which is fast) and so finds
            truncated files; ``header`` only identifies each file; ``none`` checks existence only;
            ``table`` validates the table alone (for analyses that never open the images:
            ``path`` is then optional).
        workers: threads used to check images.
        dataset, rows, id_scheme: for an image array source only: the dataset, the 0-based rows in
            the order wanted (default all) and the id scheme (format string with ``row`` and
            ``index`` = row + 1, or a function of the row; default ``nsd-{index:05d}``); see
            :func:`~object2brain.data.image_array.array_table`.

    Returns:
        The validated :class:`StimulusSet`, rows in source order.

    Raises:
        StimulusError: listing every problem found (missing or unreadable files, duplicate ids,
            empty table, missing columns; for arrays: a missing file or dataset, a dataset that
            is not uint8 ``(n, H, W, 3)``, rows past its end, each named with file and dataset).
    """
    frame, base, origin = _read_source(source, ArraySelection(dataset, rows, id_scheme))
    where = str(origin) if origin is not None else "stimulus table"
    required = ("stimulus_id",) if check == "table" else REQUIRED_COLUMNS
    require_columns(frame.columns, required, where, error=StimulusError, label="required column(s)")
    if frame.empty:
        raise StimulusError(f"{where}: the stimulus table has no rows")

    ids, problems = _id_problems(frame)
    frame = frame.assign(stimulus_id=ids)
    if "path" in frame.columns:
        frame["path"] = [_resolve(base, p) for p in frame["path"]]
    if check != "table":
        problems.extend(_file_problems(ids, [Path(p) for p in frame["path"]], check, workers))

    if problems:
        raise StimulusError(f"{where}: " + "; ".join(problems))
    return StimulusSet(frame.reset_index(drop=True), origin)


@dataclass(frozen=True)
class ArraySelection:
    """What to take of an image array source: ``dataset``, ``rows`` (``None``: all) and the id
    scheme (``None``: NSD ids); see :func:`~object2brain.data.image_array.array_table`."""

    dataset: str = DEFAULT_DATASET
    rows: Sequence[int] | None = None
    id_scheme: str | Callable[[int], str] | None = None


def _read_source(
    source: str | Path | pd.DataFrame, selection: ArraySelection
) -> tuple[pd.DataFrame, Path, Path | None]:
    """The raw table of ``source``, the folder its relative paths start from, and its path."""
    origin = None if isinstance(source, pd.DataFrame) else Path(source).expanduser()
    if origin is not None and origin.is_file() and is_array_file(origin):
        names, paths = array_table(
            origin.resolve(),
            dataset=selection.dataset,
            rows=selection.rows,
            ids=selection.id_scheme,
        )
        return pd.DataFrame({"stimulus_id": names, "path": paths}), origin.parent, origin
    if selection != ArraySelection():
        raise StimulusError(
            f"{origin or 'stimulus table'}: dataset, rows and id_scheme apply to an image "
            "array source (.hdf5, .h5, .hdf) only"
        )
    if origin is None:
        assert isinstance(source, pd.DataFrame)
        return source.copy(), Path.cwd(), None
    if origin.is_dir():
        return _table_from_folder(origin), origin, origin
    if origin.exists():
        return read_table(origin), origin.parent, origin
    raise StimulusError(f"{origin}: no such stimulus table, image folder or image array")


def _id_problems(frame: pd.DataFrame) -> tuple[list[str], list[str]]:
    """The ids as written, and empty, padded or duplicate ids and reserved conditions as
    message parts."""
    ids, problems = id_problems(frame["stimulus_id"], "stimulus_id")
    counts = Counter(ids)
    duplicated = sorted(i for i, n in counts.items() if n > 1 and i.strip())
    if duplicated:
        problems.append(f"duplicate stimulus_id(s): {listing(duplicated)}")

    if "condition" in frame.columns:
        reserved = frame["condition"].astype(str).str.strip() == ALL_CONDITION
        if reserved.any():
            lines = [int(i) + 2 for i in frame.index[reserved]]
            problems.append(
                f"condition {ALL_CONDITION!r} (line(s) {listing(lines)}) is reserved for the whole "
                "stimulus set in the result tables: rename it"
            )
    return ids, problems


def _file_problems(
    ids: Sequence[str], paths: list[Path], check: CheckLevel, workers: int
) -> list[str]:
    """Problems of the images as message parts: rows of image arrays (bad files, datasets, rows:
    :func:`~object2brain.data.image_array.array_problems`), then image files."""
    refs = [parse_array_ref(p) for p in paths]
    problems = array_problems([(sid, r) for sid, r in zip(ids, refs, strict=True) if r])
    files = [(str(sid), p) for sid, p, r in zip(ids, paths, refs, strict=True) if r is None]
    return problems + _image_file_problems(files, check, workers)


def _image_file_problems(
    files: list[tuple[str, Path]], check: CheckLevel, workers: int
) -> list[str]:
    """Missing files, and (``full``/``header``) unreadable images, as message parts."""
    problems = []
    exists = [p.is_file() for _, p in files]
    missing = [f"{sid} ({p})" for (sid, p), ok in zip(files, exists, strict=True) if not ok]
    if missing:
        problems.append(f"{len(missing)} missing image file(s): {listing(missing)}")
    if check != "none":
        present = [item for item, ok in zip(files, exists, strict=True) if ok]
        unreadable = _unreadable([s for s, _ in present], [p for _, p in present], check, workers)
        if unreadable:
            problems.append(f"{len(unreadable)} unreadable image(s): {listing(unreadable)}")
    return problems


def _resolve(base: Path, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        return str(base / "<empty path>")
    ref = parse_array_ref(value.strip())
    if ref is not None:
        return str(ArrayRef(Path(_resolve(base, str(ref.file))), ref.dataset, ref.row))
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _table_from_folder(folder: Path) -> pd.DataFrame:
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise StimulusError(
            f"{folder}: no image files found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    # absolute paths: _resolve would join relative ones to the folder a second time
    paths = [str(p.resolve()) for p in files]
    return pd.DataFrame({"stimulus_id": [p.stem for p in files], "path": paths})


def _unreadable(
    ids: Sequence[str], paths: Sequence[Path], check: CheckLevel, workers: int
) -> list[str]:
    def problem(item: tuple[str, Path]) -> str | None:
        sid, path = item
        try:
            if check == "full":
                load_image(path, draft_size=64, stimulus_id=sid)
            else:
                from PIL import Image

                with Image.open(path) as image:
                    image.verify()
        except Exception as exc:  # any decoder failure means the file is unusable
            return f"{sid} ({path}: {type(exc).__name__}: {exc})"
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(problem, zip(ids, paths, strict=True)))
    return [r for r in results if r is not None]
