"""Natural Scenes Dataset (NSD) single-trial betas as brain patterns (brain source ``kind: nsd``).

Layout read, under ``root`` (a local copy of the NSD data release, as published on the
``natural-scenes-dataset`` bucket and described in the NSD Data Manual, cvnlab.slite.page):

- ``nsddata/experiments/nsd/nsd_expdesign.mat`` (MATLAB; read with ``scipy.io.loadmat``):
  ``masterordering`` ``(1, 30000)``: for each of the 30,000 stimulus trials of the 40 sessions
  (750 trials per session, in chronological order) the 1-based index into the subject's 10,000
  images; ``subjectim`` ``(8, 10000)``: for subject ``k`` (row ``k - 1``) the 1-based 73k index
  (row of ``nsd_stimuli.hdf5``) of each of its 10,000 images. Trial ``t`` (0-based, over all
  sessions) of subject ``k`` showed image ``subjectim[k-1, masterordering[t] - 1]`` (1-based 73k
  id); it belongs to session ``t // 750 + 1``, trial ``t % 750`` of that session's betas.
- ``nsddata_betas/ppdata/subjKK/<space>/<betas>/betas_sessionSS.hdf5`` (default ``space:
  func1pt8mm``, ``betas: betas_fithrf_GLMdenoise_RR``): dataset ``/betas``, int16, percent signal
  change x 300 (divide by 300 after casting to float). The manual describes it as X x Y x Z x 750
  in MATLAB's column-major order; read with h5py (row-major) the same dataset has shape
  ``(750, Z, Y, X)``: trials first, spatial axes reversed.
- ``nsddata/ppdata/subjKK/<space>/roi/<file>.nii.gz``: ROI volumes of shape ``(X, Y, Z)`` on the
  same grid (values: -1 outside the brain mask, 0 outside the ROI, positive integers for the ROI
  or its labelled parts, e.g. ``prf-visualrois``: 1 V1v, 2 V1d, ...). A mask is matched to the
  betas by reversing its axes (``mask.T`` has the betas' ``(Z, Y, X)`` shape).

Manifest entry (paths relative to the brain manifest)::

    - kind: nsd
      root: nsd/                      # the folder holding nsddata/ and nsddata_betas/
      subjects: [1, 2]                # 1..8 or "subj01"; subject ids become "subj01", ...
      sessions: [1, 2, 3]             # optional; default every betas_sessionNN.hdf5 present
      rois: [nsdgeneral, {name: V1, file: prf-visualrois, labels: [1, 2]}]
      repetitions: mean               # or "runs"
      space: func1pt8mm               # optional
      betas: betas_fithrf_GLMdenoise_RR   # optional

An ROI given by name alone uses ``roi/<name>.nii.gz`` with every voxel > 0 inside; a mapping
selects ``labels`` of ``file``. Patterns are per subject x ROI, one row per image the subject saw
in the selected sessions; stimulus id ``nsd-NNNNN``, the image's 1-based 73k index on five digits
(:func:`nsd_stimulus_id`; row ``NNNNN - 1`` of ``nsd_stimuli.hdf5``). ``repetitions: mean``
averages an image's trials (each image has up to three); ``runs`` keeps one row per trial with the
run label = the repetition number (1 for the image's first presentation in the selected sessions,
2 for the second, ...), so each stimulus occurs at most once per run. Betas are in percent signal
change (int16 / 300), float64. Voxels zeroed by NSD's brain mask are constant and are dropped by
the brain loader.

What was verified: the file names, dataset name, int16 x 300 scaling, the 750 trials per session
and the X x Y x Z x 750 (MATLAB) orientation against the NSD Data Manual's pages on functional
data and experiments, and published readers of these files (which transpose ROI masks by
``(2, 1, 0)`` to match the h5py betas). No real NSD file was available here: the tests use tiny
files written in this layout (``scipy.io.savemat``, h5py, nibabel).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from object2brain.errors import DataError, listing
from object2brain.io import open_hdf5

N_IMAGES = 73000
#: What to do about a damaged HDF5 file of the dataset (named in its one-line error).
_REMEDY = "download it again from the dataset's source (the copy here is damaged or truncated)"
TRIALS_PER_SESSION = 750
BETA_SCALE = 300.0
DEFAULT_SPACE = "func1pt8mm"
DEFAULT_BETAS = "betas_fithrf_GLMdenoise_RR"
DESIGN_PATH = ("nsddata", "experiments", "nsd", "nsd_expdesign.mat")
Repetitions = Literal["mean", "runs"]
REPETITIONS: tuple[str, ...] = ("mean", "runs")


@dataclass(frozen=True)
class RoiPatterns:
    """One subject x ROI read from a published data set, before the brain loader's checks.

    Attributes:
        subject, roi: names.
        patterns: ``(n_rows, n_voxels)`` float64 responses.
        stimulus_ids: ``n_rows`` ids (repeated across runs when ``runs`` is given).
        runs: ``(n_rows,)`` int64 run label of each row (repetition number), or ``None`` when the
            rows are means over repetitions (ids unique).
        source: the file(s) read, for messages.
    """

    subject: str
    roi: str
    patterns: np.ndarray
    stimulus_ids: list[str]
    runs: np.ndarray | None
    source: str


@dataclass(frozen=True)
class RoiSpec:
    """An ROI: its name, the ROI file stem and the labels inside (``None``: every value > 0)."""

    name: str
    file: str
    labels: tuple[int, ...] | None = None


@dataclass(frozen=True)
class NsdSource:
    """A parsed ``kind: nsd`` manifest entry (see module docstring)."""

    root: Path
    subjects: tuple[int, ...]
    rois: tuple[RoiSpec, ...]
    repetitions: Repetitions = "mean"
    sessions: tuple[int, ...] | None = None
    space: str = DEFAULT_SPACE
    betas: str = DEFAULT_BETAS


@dataclass(frozen=True)
class Trials:
    """A subject's selected trials in chronological order: ``session`` (1-based),
    ``index`` (0-based trial within the session), ``image`` (1-based 73k id), ``repetition``
    (1-based presentation count of that image within the selection); each ``(n_trials,)``."""

    session: np.ndarray
    index: np.ndarray
    image: np.ndarray
    repetition: np.ndarray


def nsd_stimulus_id(index73k: int) -> str:
    """Stimulus id of the NSD image with 1-based 73k index ``index73k``: ``nsd-00001``..."""
    return f"nsd-{int(index73k):05d}"


# --- manifest -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommonKeys:
    """Manifest keys shared by the published-data sources: the ``root`` folder (resolved against
    the manifest), subject numbers and the ``repetitions`` mode."""

    root: Path
    subjects: tuple[int, ...]
    repetitions: Repetitions


def parse_common(
    spec: dict[str, Any], manifest: Path, where: str, *, prefix: str, what: str
) -> CommonKeys:
    """``root``, ``subjects`` (numbers or ``<prefix>NN``) and ``repetitions`` of a source entry;
    ``what`` names the root folder in messages."""
    root = spec.get("root")
    if not isinstance(root, str) or not root:
        raise DataError(f"{where}: a {spec.get('kind')} source needs 'root' ({what})")
    path = Path(root).expanduser()
    path = path if path.is_absolute() else manifest.parent / path
    if not path.is_dir():
        raise DataError(f"{where}: root folder {path} not found")
    subjects = spec.get("subjects")
    if not isinstance(subjects, list) or not subjects:
        raise DataError(f"{where}: 'subjects' must be a list (1, 2, ... or '{prefix}01')")
    numbers = []
    for value in subjects:
        match = re.fullmatch(rf"(?:{re.escape(prefix)})?0*(\d+)", str(value).strip())
        if match is None or int(match.group(1)) < 1:
            raise DataError(f"{where}: subject {value!r} is not a number or '{prefix}01'")
        numbers.append(int(match.group(1)))
    repetitions = spec.get("repetitions", "mean")
    if repetitions not in REPETITIONS:
        raise DataError(f"{where}: repetitions must be one of {', '.join(REPETITIONS)}")
    return CommonKeys(path, tuple(numbers), repetitions)


def parse_nsd_source(spec: dict[str, Any], manifest: Path, where: str) -> NsdSource:
    """The ``kind: nsd`` entry ``spec`` of ``manifest`` as an :class:`NsdSource`."""
    common = parse_common(spec, manifest, where, prefix="subj", what="the NSD data release folder")
    sessions = spec.get("sessions")
    if sessions is not None and (
        not isinstance(sessions, list)
        or not sessions
        or not all(isinstance(s, int) and s >= 1 for s in sessions)
    ):
        raise DataError(f"{where}: 'sessions' must be a list of session numbers (1, 2, ...)")
    return NsdSource(
        root=common.root,
        subjects=common.subjects,
        rois=_roi_specs(spec.get("rois"), where),
        repetitions=common.repetitions,
        sessions=tuple(sorted(set(sessions))) if sessions else None,
        space=str(spec.get("space", DEFAULT_SPACE)),
        betas=str(spec.get("betas", DEFAULT_BETAS)),
    )


def _roi_specs(rois: object, where: str) -> tuple[RoiSpec, ...]:
    if not isinstance(rois, list) or not rois:
        raise DataError(f"{where}: 'rois' must be a list of ROI file stems or mappings")
    specs = []
    for roi in rois:
        if isinstance(roi, str) and roi:
            specs.append(RoiSpec(roi, roi))
        elif isinstance(roi, dict) and isinstance(roi.get("name"), str) and roi["name"]:
            labels = roi.get("labels")
            if labels is not None and not (
                isinstance(labels, list) and labels and all(isinstance(v, int) for v in labels)
            ):
                raise DataError(f"{where}: ROI {roi['name']!r}: 'labels' must be integers")
            specs.append(
                RoiSpec(
                    roi["name"],
                    str(roi.get("file", roi["name"])),
                    tuple(labels) if labels else None,
                )
            )
        else:
            raise DataError(f"{where}: ROI entry {roi!r} is neither a name nor {{name, file}}")
    return tuple(specs)


# --- design ---------------------------------------------------------------------------------


def read_design(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``masterordering`` ``(n_trials,)`` and ``subjectim`` ``(n_subjects, n_images)`` (both
    1-based int64) from ``nsd_expdesign.mat``, checked to point inside their arrays."""
    from scipy.io import loadmat

    if not path.is_file():
        raise DataError(f"{path}: NSD design file not found")
    try:
        design = loadmat(str(path))
    except Exception as exc:  # scipy raises several types for unreadable files
        raise DataError(f"{path}: not a readable MATLAB file ({exc})") from None
    missing = [k for k in ("masterordering", "subjectim") if k not in design]
    if missing:
        raise DataError(f"{path}: missing variable(s) {', '.join(missing)}")
    order = np.asarray(design["masterordering"]).astype(np.int64).ravel()
    subjectim = np.atleast_2d(np.asarray(design["subjectim"]).astype(np.int64))
    bad = np.flatnonzero((order < 1) | (order > subjectim.shape[1]))
    if bad.size:
        raise DataError(
            f"{path}: masterordering points past subjectim's {subjectim.shape[1]} images (1-based) "
            f"at trial(s) {listing([int(i) + 1 for i in bad])}: values "
            f"{listing([int(order[i]) for i in bad])}"
        )
    return order, subjectim


def subject_trials(
    order: np.ndarray,
    subjectim: np.ndarray,
    subject: int,
    sessions: Sequence[int],
    design: Path,
) -> Trials:
    """The trials of ``subject`` in ``sessions`` (see :class:`Trials`)."""
    if subject > subjectim.shape[0]:
        raise DataError(f"{design}: subjectim has {subjectim.shape[0]} subjects, not {subject}")
    images = subjectim[subject - 1]
    bad = np.flatnonzero((images < 1) | (images > N_IMAGES))
    if bad.size:
        raise DataError(
            f"{design}: subjectim row {subject} points past the {N_IMAGES} NSD images (1-based) "
            f"at column(s) {listing([int(i) + 1 for i in bad])}"
        )
    n_sessions = len(order) // TRIALS_PER_SESSION
    beyond = [s for s in sessions if s > n_sessions]
    if beyond:
        raise DataError(
            f"{design}: masterordering covers {n_sessions} sessions of {TRIALS_PER_SESSION} "
            f"trials; session(s) {listing(beyond)} are not in the design"
        )
    session = np.repeat(np.asarray(sessions, dtype=np.int64), TRIALS_PER_SESSION)
    index = np.tile(np.arange(TRIALS_PER_SESSION, dtype=np.int64), len(sessions))
    image = images[order[(session - 1) * TRIALS_PER_SESSION + index] - 1]
    return Trials(session, index, image, _occurrence(image))


def _occurrence(values: np.ndarray) -> np.ndarray:
    """1-based count of each value's occurrences so far: ``[5, 7, 5] -> [1, 1, 2]``."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(values)]))
    counts = np.empty(len(values), dtype=np.int64)
    counts[order] = np.arange(len(values)) - run_start + 1
    return counts


# --- betas and masks ------------------------------------------------------------------------


def _session_files(source: NsdSource, subject: int) -> dict[int, Path]:
    folder = source.root / "nsddata_betas" / "ppdata" / f"subj{subject:02d}" / source.space
    folder = folder / source.betas
    if source.sessions is not None:
        files = {s: folder / f"betas_session{s:02d}.hdf5" for s in source.sessions}
        for session, path in files.items():
            if not path.is_file():
                raise DataError(f"{path}: betas of subject {subject} session {session} not found")
        return files
    found = sorted(folder.glob("betas_session*.hdf5"))
    files = {}
    for path in found:
        match = re.fullmatch(r"betas_session(\d+)\.hdf5", path.name)
        if match:
            files[int(match.group(1))] = path
    if not files:
        raise DataError(f"{folder}: no betas_sessionNN.hdf5 files for subject {subject}")
    return files


def _grid_shape(path: Path) -> tuple[int, ...]:
    """The ``(Z, Y, X)`` shape of a session file's ``/betas``, checked to be 750 trials."""

    with open_hdf5(path, _REMEDY) as handle:  # damaged bytes: one line naming the file
        if "betas" not in handle:
            raise DataError(f"{path}: missing dataset /betas")
        shape = tuple(int(n) for n in handle["betas"].shape)
    if len(shape) != 4 or shape[0] != TRIALS_PER_SESSION:
        raise DataError(
            f"{path}: /betas has shape {shape}; expected ({TRIALS_PER_SESSION}, Z, Y, X) as "
            "published (750 trials first when read with h5py)"
        )
    return shape[1:]


def _roi_mask(source: NsdSource, subject: int, roi: RoiSpec, grid: tuple[int, ...]) -> np.ndarray:
    """Boolean ``(Z, Y, X)`` mask of ``roi`` on the betas' grid."""
    import nibabel as nib

    folder = source.root / "nsddata" / "ppdata" / f"subj{subject:02d}" / source.space / "roi"
    path = folder / f"{roi.file}.nii.gz"
    if not path.is_file():
        raise DataError(f"{path}: ROI file of {roi.name!r} (subject {subject}) not found")
    try:
        image: Any = nib.load(path)
        values = np.asarray(image.dataobj)
    except Exception as exc:  # nibabel raises several types for unreadable images
        raise DataError(f"{path}: not a readable NIfTI image ({exc})") from None
    if values.ndim == 4 and values.shape[3] == 1:
        values = values[..., 0]
    if values.shape[::-1] != grid:
        raise DataError(
            f"{path}: ROI volume of shape {values.shape} does not match the betas' grid: "
            f"expected {grid[::-1]} (the h5py betas are (750, {', '.join(map(str, grid))}))"
        )
    volume = np.nan_to_num(values.astype(np.float64), nan=0.0).T
    mask = volume > 0 if roi.labels is None else np.isin(np.rint(volume), roi.labels)
    if not mask.any():
        what = "voxel > 0" if roi.labels is None else f"voxel with label(s) {list(roi.labels)}"
        raise DataError(f"{path}: ROI {roi.name!r} (subject {subject}) has no {what}")
    return mask


def _read_box(path: Path, box: tuple[slice, ...]) -> np.ndarray:
    """``/betas[:, box]`` as float64 percent signal change ``(750, *box shape)``."""

    with open_hdf5(path, _REMEDY) as handle:
        raw = handle["betas"][(slice(None), *box)]
    return np.asarray(raw, dtype=np.float64) / BETA_SCALE


# --- the reader -----------------------------------------------------------------------------


def nsd_files(source: NsdSource) -> list[Path]:
    """Every file :func:`read_nsd` reads for ``source`` (design, session betas, ROI volumes)."""
    files = [source.root.joinpath(*DESIGN_PATH)]
    for subject in source.subjects:
        files += list(_session_files(source, subject).values())
        folder = source.root / "nsddata" / "ppdata" / f"subj{subject:02d}" / source.space / "roi"
        files += [folder / f"{roi}.nii.gz" for roi in dict.fromkeys(r.file for r in source.rois)]
    return [f for f in files if f.is_file()]


def read_nsd(source: NsdSource) -> list[RoiPatterns]:
    """Patterns per subject x ROI of an NSD data release (see module docstring)."""
    design_path = source.root.joinpath(*DESIGN_PATH)
    order, subjectim = read_design(design_path)
    result: list[RoiPatterns] = []
    for subject in source.subjects:
        files = _session_files(source, subject)
        trials = subject_trials(order, subjectim, subject, sorted(files), design_path)
        result += _read_subject(source, subject, files, trials)
    return result


@dataclass(frozen=True)
class RowLayout:
    """Where each trial goes: ``row_of_trial`` ``(n_trials,)`` into ``n_rows`` output rows, the
    rows' ids, their ``runs`` (``None`` for means) and the trial count per row ``(n_rows,)``."""

    row_of_trial: np.ndarray
    ids: list[str]
    runs: np.ndarray | None
    counts: np.ndarray


def row_layout(trials: Trials, repetitions: str) -> RowLayout:
    """Rows of the output: one per image (sorted by 73k id) to average, or with ``runs`` one per
    trial, ordered by image then repetition."""
    images, rows = np.unique(trials.image, return_inverse=True)
    if repetitions == "mean":
        counts = np.bincount(rows, minlength=len(images)).astype(np.float64)
        return RowLayout(rows, [nsd_stimulus_id(i) for i in images], None, counts)
    order = np.lexsort((trials.repetition, trials.image))
    row_of_trial = np.empty(len(order), dtype=np.int64)
    row_of_trial[order] = np.arange(len(order))
    ids = [nsd_stimulus_id(i) for i in trials.image[order]]
    return RowLayout(row_of_trial, ids, trials.repetition[order], np.ones(len(order)))


def _read_subject(
    source: NsdSource, subject: int, files: dict[int, Path], trials: Trials
) -> list[RoiPatterns]:
    """Every ROI of one subject: betas read once per session, within the ROIs' bounding box."""
    grids = {path: _grid_shape(path) for path in files.values()}
    first = next(iter(files.values()))
    for path, grid in grids.items():
        if grid != grids[first]:
            raise DataError(f"{path}: /betas grid {grid} differs from {first}'s {grids[first]}")
    masks = [_roi_mask(source, subject, roi, grids[first]) for roi in source.rois]
    corners = np.argwhere(np.logical_or.reduce(masks))
    box = tuple(
        slice(int(lo), int(hi) + 1) for lo, hi in zip(corners.min(0), corners.max(0), strict=True)
    )
    in_box = [mask[box] for mask in masks]
    layout = row_layout(trials, source.repetitions)
    sums = [np.zeros((len(layout.ids), int(m.sum()))) for m in in_box]
    for session, path in files.items():
        selected = np.flatnonzero(trials.session == session)
        betas = _read_box(path, box)[trials.index[selected]]
        for total, mask in zip(sums, in_box, strict=True):
            np.add.at(total, layout.row_of_trial[selected], betas[:, mask])
    return [
        RoiPatterns(
            f"subj{subject:02d}",
            roi.name,
            total / layout.counts[:, None],
            layout.ids,
            layout.runs,
            str(first.parent),
        )
        for roi, total in zip(source.rois, sums, strict=True)
    ]
