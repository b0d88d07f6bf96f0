"""THINGS-fMRI single-trial responses as brain patterns (brain source ``kind: things_fmri``).

Layout read: the table format of the THINGS-data fMRI single-trial responses (Hebart, Contier,
Teichmann et al. 2023, eLife; figshare+ ``betas_csv.zip``, one set of three files per subject):

- ``sub-XX_ResponseData.h5``: a pandas DataFrame saved with ``DataFrame.to_hdf`` (PyTables
  "fixed" format): one row per voxel, a ``voxel_id`` column and one column per trial, the trial
  column labelled ``i`` holding the responses of row ``i`` of the stimulus metadata;
- ``sub-XX_VoxelMetadata.csv``: one row per voxel (``voxel_id``, coordinates, noise ceilings, ...)
  with one 0/1 column per ROI (``V1``, ``V2``, ``hV4``, ``lFFA``, ``rFFA``, ``lLOC``, ...);
- ``sub-XX_StimulusMetadata.csv``: one row per trial with ``stimulus`` (image file name, e.g.
  ``aardvark_01b.jpg``), ``concept``, ``session``, ``run``, ``trial_type``
  (``train``/``test``/``catch``).

Manifest entry (paths relative to the brain manifest)::

    - kind: things_fmri
      root: betas_csv/               # folder with the three files per subject
      subjects: [1, 2]               # 1..3 or "sub-01"; subject ids become "sub-01", ...
      rois: [V1, {name: FFA, columns: [lFFA, rFFA]}]
      repetitions: runs              # or "mean" (default)
      trial_types: [train, test]     # optional; default: every trial type except catch

An ROI given by name is the voxels whose column of that name is nonzero; a mapping takes the
union of several columns. Stimulus id: the ``stimulus`` file name without its extension
(``aardvark_01b``, the id a stimulus folder gives the image). ``repetitions: runs`` keeps one row
per trial with the run label = the repetition number (1 for the image's first trial, 2 for the
second, ... in metadata order; test images are shown once per session, so this is their session
order); ``mean`` averages an image's trials. Responses are float64 as stored.

The response file is read with pandas (needs PyTables) when PyTables is installed, else directly
with h5py from pandas' fixed-format layout (group ``/<key>``: ``blockN_items`` column labels,
``blockN_values`` values, stored ``(n_rows, n_columns)`` when its attribute ``transposed`` is set,
else ``(n_columns, n_rows)``). A plain HDF5 dataset ``(n_voxels, n_trials)`` (name given by
``dataset:``, default the file's only 2D dataset) is read as well.

What was verified: the three file names, the voxels x trials orientation with a ``voxel_id``
column, trial columns matching stimulus-metadata rows, the ROI columns of the voxel metadata and
the ``stimulus``/``session``/``trial_type`` columns against the THINGS-data documentation and
published readers of these files. No real THINGS-fMRI file was available here: the tests use
small files built from that description and from pandas' own fixed-format writer code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from object2brain.data.nsd import Repetitions, RoiPatterns, parse_common
from object2brain.errors import DataError, listing, require_columns
from object2brain.io import open_hdf5

DEFAULT_TRIAL_TYPES_EXCLUDED = ("catch",)
#: What to do about a damaged HDF5 file of the dataset (named in its one-line error).
_REMEDY = "download it again from the dataset's source (the copy here is damaged or truncated)"


@dataclass(frozen=True)
class ThingsRoi:
    """An ROI: its name and the voxel-metadata columns whose union it is."""

    name: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class ThingsSource:
    """A parsed ``kind: things_fmri`` manifest entry (see module docstring)."""

    root: Path
    subjects: tuple[int, ...]
    rois: tuple[ThingsRoi, ...]
    repetitions: Repetitions = "mean"
    trial_types: tuple[str, ...] | None = None
    dataset: str | None = None


def parse_things_source(spec: dict[str, Any], manifest: Path, where: str) -> ThingsSource:
    """The ``kind: things_fmri`` entry ``spec`` of ``manifest`` as a :class:`ThingsSource`."""
    common = parse_common(
        spec, manifest, where, prefix="sub-", what="the betas_csv folder of the table format"
    )
    types = spec.get("trial_types")
    if types is not None and not (isinstance(types, list) and types):
        raise DataError(f"{where}: 'trial_types' must be a list such as [train, test]")
    dataset = spec.get("dataset")
    return ThingsSource(
        root=common.root,
        subjects=common.subjects,
        rois=_rois(spec.get("rois"), where),
        repetitions=common.repetitions,
        trial_types=tuple(str(t) for t in types) if types else None,
        dataset=str(dataset) if dataset else None,
    )


def _rois(rois: object, where: str) -> tuple[ThingsRoi, ...]:
    if not isinstance(rois, list) or not rois:
        raise DataError(f"{where}: 'rois' must be a list of voxel-metadata columns or mappings")
    result = []
    for roi in rois:
        if isinstance(roi, str) and roi:
            result.append(ThingsRoi(roi, (roi,)))
        elif (
            isinstance(roi, dict)
            and isinstance(roi.get("name"), str)
            and isinstance(roi.get("columns"), list)
            and roi["columns"]
        ):
            result.append(ThingsRoi(roi["name"], tuple(str(c) for c in roi["columns"])))
        else:
            raise DataError(f"{where}: ROI entry {roi!r} is neither a column nor {{name, columns}}")
    return tuple(result)


# --- files ----------------------------------------------------------------------------------


def subject_files(root: Path, subject: int) -> tuple[Path, Path, Path]:
    """Response HDF5, voxel metadata and stimulus metadata of ``subject`` (each must exist)."""
    stem = f"sub-{subject:02d}"
    files = (
        root / f"{stem}_ResponseData.h5",
        root / f"{stem}_VoxelMetadata.csv",
        root / f"{stem}_StimulusMetadata.csv",
    )
    for path in files:
        if not path.is_file():
            raise DataError(f"{path}: THINGS-fMRI file of subject {stem} not found")
    return files


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep=None, engine="python")  # CSV or TSV
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, ValueError) as exc:
        raise DataError(f"{path}: not a readable table ({exc})") from None


def read_responses(path: Path, dataset: str | None = None) -> tuple[np.ndarray, list[str] | None]:
    """Responses ``(n_voxels, n_trials)`` float64 and the voxel ids (``None`` if the file has
    none) of a response file (see module docstring for the formats read)."""
    with open_hdf5(path, _REMEDY) as handle:  # damaged bytes: one line naming the file
        if dataset is not None or not _pandas_groups(handle):
            return _plain_dataset(handle, path, dataset), None
        key = _pandas_groups(handle)[0]
    try:
        import tables  # noqa: F401  (pandas reads its HDF files through PyTables)
    except ImportError:
        return _fixed_frame(path, key)
    frame = pd.read_hdf(path, key=key)
    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"{path}: /{key} is not a table (pandas DataFrame)")
    return _split_frame(frame, path)


def _pandas_groups(handle: Any) -> list[str]:
    import h5py

    return [
        name
        for name, node in handle.items()
        if isinstance(node, h5py.Group) and node.attrs.get("pandas_type") is not None
    ]


def _plain_dataset(handle: Any, path: Path, name: str | None) -> np.ndarray:
    import h5py

    if name is None:
        found = [
            key
            for key, node in handle.items()
            if isinstance(node, h5py.Dataset) and len(node.shape) == 2
        ]
        if len(found) != 1:
            raise DataError(
                f"{path}: expected one 2D dataset (voxels x trials) or a pandas table, found "
                f"{listing(found) or 'none'}; name it with 'dataset:'"
            )
        name = found[0]
    if name not in handle or not isinstance(handle[name], h5py.Dataset):
        raise DataError(f"{path}: no dataset {name!r}")
    return np.asarray(handle[name][()], dtype=np.float64)


def _label(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fixed_frame(path: Path, key: str) -> tuple[np.ndarray, list[str] | None]:
    """Read a pandas fixed-format DataFrame with h5py (no PyTables)."""
    import h5py

    columns: dict[str, np.ndarray] = {}
    with open_hdf5(path, _REMEDY) as handle:
        group = handle[key]
        for i in range(int(group.attrs.get("nblocks", 0))):
            items_node, values_node = group.get(f"block{i}_items"), group.get(f"block{i}_values")
            if not isinstance(items_node, h5py.Dataset) or not isinstance(
                values_node, h5py.Dataset
            ):
                raise DataError(
                    f"{path}: /{key}/block{i} cannot be read without PyTables (pip install tables)"
                )
            items = [_label(v) for v in items_node[()]]
            values = np.asarray(values_node[()])
            stored_by_row = bool(values_node.attrs.get("transposed", False))
            values = values if stored_by_row else values.T  # -> (n_rows, n_items)
            for j, item in enumerate(items):
                columns[item] = values[:, j]
    if not columns:
        raise DataError(f"{path}: /{key} holds no columns")
    return _split_frame(pd.DataFrame(columns), path)


def _split_frame(frame: pd.DataFrame, path: Path) -> tuple[np.ndarray, list[str] | None]:
    """``voxel_id`` column (if any) and the trial columns ``(n_voxels, n_trials)`` in the order
    of their integer labels (label ``i`` = stimulus-metadata row ``i``)."""
    frame.columns = [str(c) for c in frame.columns]
    voxel_ids = [str(v) for v in frame["voxel_id"]] if "voxel_id" in frame else None
    trials = [c for c in frame.columns if c != "voxel_id"]
    bad = [c for c in trials if not re.fullmatch(r"\d+", c)]
    if bad:
        raise DataError(f"{path}: trial columns must be labelled 0, 1, ...; found {listing(bad)}")
    labels = sorted(int(c) for c in trials)
    if labels != list(range(len(labels))):
        raise DataError(f"{path}: trial columns are not 0..{len(labels) - 1} (gaps or repeats)")
    ordered = [str(i) for i in labels]
    return frame[ordered].to_numpy(dtype=np.float64), voxel_ids


# --- the reader -----------------------------------------------------------------------------


def things_files(source: ThingsSource) -> list[Path]:
    """Every file :func:`read_things_fmri` reads for ``source`` (three per subject)."""
    return [f for subject in source.subjects for f in subject_files(source.root, subject)]


def read_things_fmri(source: ThingsSource) -> list[RoiPatterns]:
    """Patterns per subject x ROI of THINGS-fMRI single-trial tables (see module docstring)."""
    result: list[RoiPatterns] = []
    for subject in source.subjects:
        result += _read_subject(source, subject)
    return result


def _read_subject(source: ThingsSource, subject: int) -> list[RoiPatterns]:
    response_path, voxel_path, stimulus_path = subject_files(source.root, subject)
    responses, voxel_ids = read_responses(response_path, source.dataset)
    voxels = _read_csv(voxel_path)
    stimuli = _read_csv(stimulus_path)
    require_columns(stimuli.columns, ["stimulus"], str(stimulus_path))
    if len(stimuli) != responses.shape[1]:
        raise DataError(
            f"{stimulus_path}: {len(stimuli)} trials but {response_path} has "
            f"{responses.shape[1]} trial columns (row i = trial column i)"
        )
    if len(voxels) != responses.shape[0]:
        raise DataError(
            f"{voxel_path}: {len(voxels)} voxels but {response_path} has {responses.shape[0]}"
        )
    if (
        voxel_ids is not None
        and "voxel_id" in voxels
        and [str(v) for v in voxels["voxel_id"]] != voxel_ids
    ):
        raise DataError(f"{voxel_path}: voxel_id order differs from {response_path}")
    trials = _selected_trials(stimuli, source.trial_types, stimulus_path)
    ids = [Path(str(s)).stem for s in stimuli["stimulus"].iloc[trials]]
    name = f"sub-{subject:02d}"
    where = str(response_path)
    result = []
    for roi in source.rois:
        require_columns(
            voxels.columns,
            list(roi.columns),
            str(voxel_path),
            label="ROI column(s)",
            detail=f" asked for ROI {roi.name!r}",
        )
        inside = np.zeros(len(voxels), dtype=bool)
        for column in roi.columns:
            inside |= pd.to_numeric(voxels[column], errors="coerce").fillna(0).to_numpy() != 0
        if not inside.any():
            raise DataError(f"{voxel_path}: ROI {roi.name!r} has no voxel (columns all 0)")
        patterns = responses[np.ix_(inside, trials)].T  # (n_trials, n_voxels)
        result.append(_repetitions(name, roi.name, patterns, ids, source.repetitions, where))
    return result


def _selected_trials(
    stimuli: pd.DataFrame, types: tuple[str, ...] | None, path: Path
) -> np.ndarray:
    """Row indices of the trials kept: ``types`` given, else all but catch trials."""
    if "trial_type" not in stimuli:
        if types is not None:
            require_columns(stimuli.columns, ["trial_type"], str(path))
        return np.arange(len(stimuli))
    kind = stimuli["trial_type"].astype(str)
    keep = kind.isin(types) if types is not None else ~kind.isin(DEFAULT_TRIAL_TYPES_EXCLUDED)
    if not keep.any():
        raise DataError(f"{path}: no trial of type(s) {listing(list(types or ()))}")
    return np.flatnonzero(keep.to_numpy())


def _repetitions(
    subject: str, roi: str, patterns: np.ndarray, ids: list[str], mode: str, where: str
) -> RoiPatterns:
    """Rows per trial -> mean per image (ids sorted) or runs (image, then repetition)."""
    images, rows = np.unique(np.asarray(ids, dtype=object), return_inverse=True)
    if mode == "mean":
        sums = np.zeros((len(images), patterns.shape[1]))
        np.add.at(sums, rows, patterns)
        counts = np.bincount(rows, minlength=len(images))[:, None]
        return RoiPatterns(subject, roi, sums / counts, [str(i) for i in images], None, where)
    repetition = np.zeros(len(ids), dtype=np.int64)
    seen: dict[int, int] = {}
    for i, row in enumerate(rows):
        seen[int(row)] = seen.get(int(row), 0) + 1
        repetition[i] = seen[int(row)]
    order = np.lexsort((repetition, rows))
    return RoiPatterns(
        subject, roi, patterns[order], [ids[i] for i in order], repetition[order], where
    )
