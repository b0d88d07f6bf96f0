"""Rated image sets for training valence heads: FindingEmo, or any stimulus table with ``valence``.

FindingEmo (Mertens et al.) ships its annotations in the PyPI package ``findingemo-light`` as
``annotations_single.ann``, a CSV with the columns
``index,user,image_path,tags,age,valence,arousal,emotion,dec_factors,ambiguity,datetime``
(valence an integer -3..3). The images themselves are distributed as URLs, so a local copy is
usually partial: :func:`load_findingemo` keeps the rows whose image exists and decodes under
``image_root`` (``image_root / image_path`` with the leading ``/`` dropped) and reports the others
(:attr:`RatedImages.missing`), never failing on them. Only ``image_path`` and ``valence`` are
required; the other columns are carried along.

Stimulus id of a FindingEmo image: its ``image_path`` without the leading ``/``
(e.g. ``Run_2/Loving toddlers sports/haiti-kids.jpg``). Should a file rate an image several times,
the image's valence is the mean of its ratings (column ``n_ratings`` counts them).

Any other rated set is a stimulus table (``stimulus_id``, ``path`` relative to the table, optional
``condition``; :mod:`object2brain.data.stimuli`) with a numeric ``valence`` column
(:func:`load_rated_stimuli`); there every image must exist, as for every stimulus table.

Valence must lie in the declared range (default ``-3..3``); values outside it, missing values and
non-numeric values are errors that list the offending lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from object2brain.data.images import load_image
from object2brain.data.splits import valence_levels
from object2brain.data.stimuli import StimulusSet, load_stimuli
from object2brain.errors import DataError, listing, require_columns

FINDINGEMO_COLUMNS: tuple[str, ...] = (
    "index",
    "user",
    "image_path",
    "tags",
    "age",
    "valence",
    "arousal",
    "emotion",
    "dec_factors",
    "ambiguity",
    "datetime",
)
REQUIRED_COLUMNS: tuple[str, ...] = ("image_path", "valence")
VALENCE_RANGE: tuple[float, float] = (-3.0, 3.0)
ImageCheck = Literal["full", "exists"]


@dataclass(frozen=True)
class RatedImages:
    """Images with a valence rating, ready to split and train on.

    Attributes:
        stimuli: the available images; ``stimuli.table`` has ``stimulus_id``, ``path`` (absolute),
            ``valence`` (float) and ``level`` (``floor(valence + 0.5)``), plus the source's other
            columns.
        missing: rows of the source whose image is absent or unreadable: ``stimulus_id``,
            ``line`` (1-based line in the file, header = line 1), ``path``, ``reason``.
        source: the annotation file or stimulus table read.
        valence_range: the declared rating scale ``(low, high)``.
    """

    stimuli: StimulusSet
    missing: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=["stimulus_id", "line", "path", "reason"])
    )
    source: Path | None = None
    valence_range: tuple[float, float] = VALENCE_RANGE

    @property
    def valence(self) -> np.ndarray:
        """Ratings ``(n,)`` float64 in stimulus order."""
        return self.stimuli.table["valence"].to_numpy(dtype=np.float64)

    @property
    def levels(self) -> np.ndarray:
        """Integer valence levels ``(n,)`` int64 in stimulus order."""
        return self.stimuli.table["level"].to_numpy(dtype=np.int64)


def default_annotations() -> Path:
    """Path of ``annotations_single.ann`` inside the installed ``findingemo-light`` package."""
    try:
        from importlib.resources import files

        path = Path(str(files("findingemo_light.data").joinpath("annotations_single.ann")))
    except ModuleNotFoundError:
        raise DataError(
            "the FindingEmo annotations come with the package findingemo-light; install it "
            "(pip install 'object2brain[findingemo]') or pass the path of annotations_single.ann"
        ) from None
    if not path.is_file():
        raise DataError(f"{path}: findingemo-light is installed but has no annotations_single.ann")
    return path


def check_valence(
    values: pd.Series, where: str, valence_range: tuple[float, float] = VALENCE_RANGE
) -> np.ndarray:
    """Validate a ``valence`` column; returns it as float64 ``(n,)``.

    Raises:
        DataError: non-numeric or missing values, or values outside ``valence_range``, listing
            the lines (1-based, header = line 1) and values at fault.
    """
    low, high = valence_range
    numeric = pd.to_numeric(values, errors="coerce")
    bad = numeric.isna().to_numpy()
    if bad.any():
        lines = [f"line {i + 2} ({values.iloc[i]!r})" for i in np.flatnonzero(bad)]
        raise DataError(
            f"{where}: {int(bad.sum())} missing or non-numeric valence value(s): {listing(lines)}"
        )
    array = numeric.to_numpy(dtype=np.float64)
    outside = np.flatnonzero((array < low) | (array > high))
    if outside.size:
        lines = [f"line {i + 2} ({array[i]:g})" for i in outside]
        raise DataError(
            f"{where}: {outside.size} valence value(s) outside the declared range "
            f"{low:g}..{high:g}: {listing(lines)}"
        )
    return array


def read_annotations(path: str | Path) -> pd.DataFrame:
    """Read a FindingEmo-format annotation file (CSV) and check its required columns."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        frame = pd.read_csv(path, dtype={"image_path": str})
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the annotation file is empty") from None
    except Exception as exc:  # pandas raises many types for malformed files
        raise DataError(f"{path}: cannot be read as a FindingEmo annotation file ({exc})") from None
    require_columns(
        frame.columns,
        REQUIRED_COLUMNS,
        str(path),
        detail=f" of the FindingEmo format ({','.join(FINDINGEMO_COLUMNS)})",
    )
    if frame.empty:
        raise DataError(f"{path}: the annotation file has no rows")
    return frame


def load_findingemo(
    annotations: str | Path | None,
    image_root: str | Path | None,
    *,
    valence_range: tuple[float, float] = VALENCE_RANGE,
    check: ImageCheck = "full",
    workers: int = 8,
) -> RatedImages:
    """Read FindingEmo annotations and keep the images present under ``image_root``.

    Args:
        annotations: ``annotations_single.ann`` or any file of that format; ``None`` or
            ``"default"`` uses the copy in the installed ``findingemo-light`` package.
        image_root: folder the ``image_path`` values are relative to.
        valence_range: the declared scale; any rating outside it is an error.
        check: ``full`` decodes each image (JPEGs at reduced scale) so that truncated downloads
            count as missing; ``exists`` checks only that the file exists.
        workers: threads used for the check.

    Returns:
        :class:`RatedImages` of the images found, in file order, with the rest in ``missing``.

    Raises:
        DataError: missing file or columns, bad valence values, no image root, or no image found.
    """
    path = (
        default_annotations()
        if annotations is None or str(annotations) == "default"
        else Path(annotations).expanduser()
    )
    frame = read_annotations(path)
    where = str(path)
    valence = check_valence(frame["valence"], where, valence_range)
    if image_root is None:
        raise DataError(
            f"{where}: FindingEmo is distributed as image URLs; pass the folder holding the "
            "downloaded images (--image-root)"
        )
    root = Path(image_root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: image root is not a folder")
    root = root.resolve()

    raw = frame["image_path"]
    blank = raw.isna() | (raw.astype(str).str.strip() == "")
    if blank.any():
        lines = [int(i) + 2 for i in np.flatnonzero(blank.to_numpy())]
        raise DataError(f"{where}: empty image_path on line(s) {listing(lines)}")
    rel = raw.astype(str).str.strip().str.lstrip("/\\")
    frame = frame.assign(
        stimulus_id=rel.to_numpy(),
        valence=valence,
        path=[str(root / r) for r in rel],
        line=np.arange(len(frame)) + 2,
    )
    if frame["stimulus_id"].duplicated().any():
        frame = _average_repeats(frame)
    else:
        frame["n_ratings"] = 1

    problems = _image_problems([Path(p) for p in frame["path"]], check, workers)
    ok = np.array([p is None for p in problems])
    missing = pd.DataFrame(
        {
            "stimulus_id": frame["stimulus_id"].to_numpy()[~ok],
            "line": frame["line"].to_numpy()[~ok],
            "path": frame["path"].to_numpy()[~ok],
            "reason": [p for p in problems if p is not None],
        }
    )
    if not ok.any():
        examples = listing([str(p) for p in frame["path"].head(3)])
        raise DataError(
            f"{where}: none of its {len(frame)} images were found under {root} "
            f"(looked for e.g. {examples})"
        )
    kept = frame[ok].drop(columns=["line"]).reset_index(drop=True)
    kept["level"] = valence_levels(kept["valence"].to_numpy())
    stimuli = load_stimuli(kept, check="none")
    return RatedImages(stimuli=stimuli, missing=missing, source=path, valence_range=valence_range)


def load_rated_stimuli(
    source: str | Path | pd.DataFrame | StimulusSet,
    *,
    valence_range: tuple[float, float] = VALENCE_RANGE,
) -> RatedImages:
    """A stimulus table with a ``valence`` column as a rated image set (all images must exist)."""
    stimuli = source if isinstance(source, StimulusSet) else load_stimuli(source)
    where = str(stimuli.source) if stimuli.source is not None else "stimulus table"
    if "valence" not in stimuli.table.columns:
        raise DataError(
            f"{where}: no 'valence' column; a rated image set needs one rating per stimulus "
            f"(found: {', '.join(map(str, stimuli.table.columns))})"
        )
    valence = check_valence(stimuli.table["valence"], where, valence_range)
    table = stimuli.table.assign(valence=valence, level=valence_levels(valence))
    return RatedImages(
        stimuli=StimulusSet(table, stimuli.source),
        source=stimuli.source,
        valence_range=valence_range,
    )


def _average_repeats(frame: pd.DataFrame) -> pd.DataFrame:
    grouped = frame.groupby("stimulus_id", sort=False)
    first = grouped.first()
    first["valence"] = grouped["valence"].mean()
    first["n_ratings"] = grouped.size()
    return first.reset_index()


def _image_problems(paths: Sequence[Path], check: ImageCheck, workers: int) -> list[str | None]:
    def problem(path: Path) -> str | None:
        if not path.is_file():
            return "missing"
        if check == "full":
            try:
                load_image(path, draft_size=64)
            except Exception as exc:  # any decoder failure makes the download unusable
                return f"unreadable: {type(exc).__name__}: {exc}"
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(problem, paths))
