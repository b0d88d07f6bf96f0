"""Brain data: per subject x ROI activity patterns or RDMs, keyed by stimulus id.

Sources, declared in a YAML manifest (``sources:`` list, paths relative to the
manifest) or given directly as a patterns/RDMs HDF5 file (root attribute ``kind``):

- ``patterns`` HDF5: ``/stimulus_ids`` (n,), ``/<subject>/<roi>`` ``(n, n_voxels)`` (more
  trailing dimensions are flattened). Run-wise patterns add ``/runs`` (n,), the run of each row;
  ids then repeat, once per run.
- ``rdms`` HDF5: ``/stimulus_ids`` (n,), ``/<subject>/<roi>`` square ``(n, n)``.
- ``nifti``: one subject's 4D beta image (volume i <-> row i of the sidecar TSV's ``stimulus_id``;
  an optional ``run`` column makes the betas run-wise: ids repeat, once per run),
  ROIs as 3D masks (``rois:``, file stem = ROI name, nonzero = inside) or a label image with a TSV
  of ``index``/``name`` (``labels:`` + ``labels_tsv:``). Masks and label images on another grid
  than the betas are resampled to the beta grid with nearest-neighbour interpolation (nilearn;
  logged at INFO). An ROI with no voxel on the beta grid is an error.
- ``nsd``: a local copy of the Natural Scenes Dataset release (session betas in HDF5, the
  experimental design file, ROI volumes); see :mod:`object2brain.data.nsd` for the layout and the
  manifest keys (``root``, ``subjects``, ``sessions``, ``rois``, ``repetitions``).
- ``things_fmri``: THINGS-fMRI single-trial responses in their published table format (response
  HDF5, voxel metadata with ROI columns, stimulus metadata); see
  :mod:`object2brain.data.things_fmri`.

Patterns may keep repetitions as runs (``repetitions: runs`` of the two sources above): the item's
``runs`` holds each row's run label and its ids repeat, one row per stimulus x run; matching by id
keeps every run of a stimulus, and the RDM is computed from the mean pattern of each stimulus.

Handling of problem values (each logged or raised with the file, subject, ROI and ids at fault):

- Voxels with any NaN/inf across stimuli are dropped from that subject x ROI (logged at WARNING);
  an ROI left with no voxels is an error. So are voxels with the same value for every stimulus
  (e.g. zeros outside the brain): they carry no stimulus information but would shift every
  pattern's correlation distance.
- NIfTI masks: NaN counts as outside; values other than 0/1 (probabilistic maps: every nonzero
  voxel is inside) and ROI voxels outside the betas' field of view are warned about, as is a mask
  with the betas' shape but another affine (resampled by world coordinates). Label images: row
  ``index`` 0 (background) is ignored with a warning; an index absent from the image is an error.
- Constant (zero-variance) patterns make the correlation distance undefined: computing the RDM
  raises :class:`DataError` naming the stimulus ids (euclidean RDMs accept them).
- RDMs must be square, finite and symmetric, with a zero diagonal and no negative entry (each to
  1e-6 of the largest magnitude; :func:`check_rdm`): a similarity matrix given as an RDM is
  refused, naming the file, subject, ROI and stimulus ids.
- A manifest key that no source kind reads (a typo such as ``pth:``) is an error naming the
  source and the keys the kind accepts, as in the study config.
- Stimulus ids are matched by value, never by position (:meth:`BrainData.aligned`); ids the brain
  data lack are listed in an error (or, with ``on_missing="intersect"``, logged and the analysis
  restricted to the common ids), each distinct set of missing ids once with the items lacking it;
  brain ids not in the stimulus set are reported in one warning for the whole data set and
  ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from object2brain.data import GROUP_RDM_SUBJECT, GROUP_SUBJECT
from object2brain.errors import (
    DataError,
    StimulusError,
    listing,
    require_columns,
    require_unique_ids,
)
from object2brain.io import open_hdf5

log = logging.getLogger(__name__)

SOURCE_KINDS = ("patterns", "rdms", "nifti", "nsd", "things_fmri")
OnMissing = Literal["error", "intersect"]


@dataclass(frozen=True)
class VoxelGrid:
    """The voxel grid of a NIfTI beta image: ``shape`` (3 ints) and ``affine`` ``(4, 4)``
    (voxel indices -> world coordinates in mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray


@dataclass(frozen=True)
class BrainItem:
    """One subject x ROI: patterns ``(n, n_voxels)`` or an RDM ``(n, n)`` over ``stimulus_ids``.

    With ``runs`` (int64 ``(n,)``, patterns only) the rows are single repetitions: row ``i`` is
    stimulus ``stimulus_ids[i]`` in run ``runs[i]``, and ids repeat across runs.

    NIfTI sources also keep where each voxel lies: ``coords`` (int64 ``(n_voxels, 3)``, the
    indices i, j, k of column ``c`` of ``data`` on the betas' grid) and ``grid`` (that grid's
    shape and affine), so voxel-wise results can be written back as images.
    """

    subject: str
    roi: str
    kind: Literal["patterns", "rdm"]
    data: np.ndarray
    stimulus_ids: list[str]
    source: str
    runs: np.ndarray | None = None
    coords: np.ndarray | None = None
    grid: VoxelGrid | None = None

    @property
    def label(self) -> str:
        return f"{self.source}: subject {self.subject!r}, ROI {self.roi!r}"

    def take(self, ids: Sequence[str]) -> BrainItem:
        """The item restricted and reordered to ``ids`` (all must be present; with ``runs``,
        every run of each id, in stored order)."""
        index: dict[str, list[int]] = {}
        for i, sid in enumerate(self.stimulus_ids):
            index.setdefault(sid, []).append(i)
        missing = [sid for sid in ids if sid not in index]
        if missing:
            raise DataError(
                f"{self.label}: {len(missing)} stimulus id(s) missing: {listing(missing)}"
            )
        rows = np.asarray([i for sid in ids for i in index[sid]], dtype=np.int64)
        data = self.data[rows] if self.kind == "patterns" else self.data[np.ix_(rows, rows)]
        runs = None if self.runs is None else self.runs[rows]
        kept = [self.stimulus_ids[i] for i in rows]
        return replace(self, data=data, stimulus_ids=kept, runs=runs)

    def mean_patterns(self) -> tuple[list[str], np.ndarray]:
        """Distinct ids (order of first appearance) and their patterns ``(n_ids, n_voxels)``:
        the mean over runs with ``runs``, else the patterns themselves."""
        if self.runs is None:
            return list(self.stimulus_ids), self.data
        ids = list(dict.fromkeys(self.stimulus_ids))
        position = {sid: i for i, sid in enumerate(ids)}
        rows = np.asarray([position[sid] for sid in self.stimulus_ids], dtype=np.int64)
        sums = np.zeros((len(ids), self.data.shape[1]), dtype=np.float64)
        np.add.at(sums, rows, self.data)
        return ids, sums / np.bincount(rows, minlength=len(ids))[:, None]

    def rdm(
        self,
        metric: str = "correlation",
        device: str | torch.device | None = "auto",
        brain_rdm: str | None = None,
    ) -> torch.Tensor:
        """The RDM ``(n, n)`` (float64): given, or computed from the patterns with ``metric``
        (of each stimulus' mean pattern over runs), or with ``brain_rdm`` (``crossnobis``,
        ``crossvalidated_euclidean``) cross-validated over the runs
        (:func:`~object2brain.rsa.rdm.crossvalidated_rdm`); always rounded by
        :func:`~object2brain.rsa.rdm.snap_ties`.

        Raises:
            DataError: ``brain_rdm`` for an item without runs (an RDM, or one pattern per
                stimulus).
        """
        from object2brain.devices import resolve_device
        from object2brain.rsa.rdm import as_tensor, crossvalidated_rdm, rdm_from_features, snap_ties

        if brain_rdm is not None:
            if self.kind == "rdm" or self.runs is None:
                given = "an RDM" if self.kind == "rdm" else "one pattern per stimulus"
                raise DataError(
                    f"{self.label}: --brain-rdm {brain_rdm} needs run-wise patterns (a 'run' "
                    "column in the NIfTI betas TSV, a /runs dataset in a patterns HDF5, or "
                    f"'repetitions: runs' of an NSD / THINGS source); this item has {given}"
                )
            order = list(dict.fromkeys(self.stimulus_ids))
            rdm = crossvalidated_rdm(
                self.data, self.stimulus_ids, self.runs, order, brain_rdm, device, self.label
            )
            return snap_ties(rdm)
        if self.kind == "rdm":
            return snap_ties(as_tensor(self.data, resolve_device(device)))
        ids, patterns = self.mean_patterns()
        return rdm_from_features(patterns, metric, device=device, ids=ids, what=self.label)


def run_labels(values: Any, where: str) -> np.ndarray:
    """Run labels ``(N,)`` as int64: integers as they are, any other labels (e.g. ``run-01``)
    numbered in sorted order.

    Raises:
        DataError: a blank label.
    """
    array = np.asarray(values)
    if array.dtype.kind in "SO":
        array = np.asarray([v.decode() if isinstance(v, bytes) else v for v in array.tolist()])
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise DataError(f"{where}: empty or non-finite run label(s)")
        if (array == np.round(array)).all():
            return array.astype(np.int64)
    if array.dtype.kind in "iu":
        return array.astype(np.int64)
    text = np.asarray(["" if _blank(v) else str(v).strip() for v in array.tolist()])
    if (text == "").any():
        rows = [i + 1 for i in np.flatnonzero(text == "")]
        raise DataError(f"{where}: empty run label in row(s) {listing(rows)}")
    return np.unique(text, return_inverse=True)[1].astype(np.int64)


def require_unique_runs(ids: Sequence[str], runs: np.ndarray, where: str) -> None:
    """Raise :class:`DataError` when a stimulus id appears twice within one run."""
    seen: set[tuple[str, int]] = set()
    twice = []
    for sid, run in zip(ids, runs.tolist(), strict=True):
        if (sid, run) in seen:
            twice.append(f"{sid!r} (run {run})")
        seen.add((sid, run))
    if twice:
        raise DataError(f"{where}: stimulus id(s) repeated within a run: {listing(twice)}")


@dataclass(frozen=True)
class BrainData:
    """All subject x ROI items of a brain data set (rsatoolbox-style: descriptors travel along)."""

    items: list[BrainItem]
    source: Path | None = None
    _keys: set[tuple[str, str]] = field(default_factory=set, repr=False, compare=False)

    def __post_init__(self) -> None:
        seen: set[tuple[str, str]] = set()
        for item in self.items:
            key = (item.subject, item.roi)
            if key in seen:
                raise DataError(
                    f"{item.source}: subject {item.subject!r} ROI {item.roi!r} is defined twice "
                    "in the brain data"
                )
            seen.add(key)
        self._keys.update(seen)
        for roi in self.rois:
            subjects = [item.subject for item in self.for_roi(roi)]
            if GROUP_RDM_SUBJECT in subjects or (GROUP_SUBJECT in subjects and len(subjects) > 1):
                raise DataError(
                    f"{self.for_roi(roi)[0].source}: ROI {roi!r} has subject(s) "
                    f"{', '.join(subjects)}: {GROUP_SUBJECT!r} and {GROUP_RDM_SUBJECT!r} are "
                    f"reserved for group-level rows ({GROUP_SUBJECT!r} is allowed only as an "
                    "ROI's single subject, a group-level RDM): rename the subject"
                )

    @property
    def rois(self) -> list[str]:
        """ROI names in order of first appearance."""
        return list(dict.fromkeys(item.roi for item in self.items))

    @property
    def subjects(self) -> list[str]:
        """Subject ids in order of first appearance."""
        return list(dict.fromkeys(item.subject for item in self.items))

    def for_roi(self, roi: str) -> list[BrainItem]:
        """Items of one ROI, one per subject."""
        return [item for item in self.items if item.roi == roi]

    def common_ids(self, ids: Sequence[str], on_missing: OnMissing = "error") -> list[str]:
        """Stimulus ids of ``ids`` present in every item (order of ``ids``).

        With ``on_missing="error"`` any id missing from an item raises one :class:`DataError`
        listing each distinct set of missing ids once, with the items that lack it; with
        ``"intersect"`` the same text is logged as a warning and those ids are left out. Brain ids
        outside ``ids`` are reported in one warning for the whole data set and ignored.
        """
        wanted = set(ids)
        missing_by: dict[tuple[str, ...], list[BrainItem]] = {}
        extra_by: dict[tuple[str, ...], list[BrainItem]] = {}
        for item in self.items:
            have = set(item.stimulus_ids)
            missing = tuple(sid for sid in ids if sid not in have)
            if missing:
                missing_by.setdefault(missing, []).append(item)
            extra = tuple(sid for sid in item.stimulus_ids if sid not in wanted)
            if extra:
                extra_by.setdefault(extra, []).append(item)
        where = str(self.source) if self.source is not None else "brain data"
        if extra_by:
            log.warning(
                "%s: brain stimulus id(s) not in the stimulus set are ignored: %s",
                where,
                "; ".join(
                    f"{listing(extra)} (in {self.describe(items)})"
                    for extra, items in extra_by.items()
                ),
            )
        keep = wanted.difference(*missing_by)
        if missing_by:
            message = f"{where}: the brain data do not cover the stimulus set: " + "; ".join(
                f"{self.describe(items, each=True)} lacks {len(missing)} id(s): {listing(missing)}"
                for missing, items in missing_by.items()
            )
            if on_missing == "error":
                raise DataError(message)
            log.warning("%s; analysing the %d common stimuli", message, len(keep))
        common = [sid for sid in ids if sid in keep]
        if len(common) < 3:
            raise DataError(
                f"only {len(common)} stimulus id(s) are shared by the brain data and the stimulus "
                "set; RSA needs at least 3"
            )
        return common

    def describe(self, items: Sequence[BrainItem], *, each: bool = False) -> str:
        """Compact one-line description of some of this data set's items, for messages.

        ``subject 'sub-01', ROI 'EVC'`` for one item, ``all 6 subject x ROI items`` for every
        item, else per ROI: ``ROI 'EVC' (all 8 subjects), ROI 'FFA' (sub-01, sub-03)``. With
        ``each``, several items read as the subject of a singular verb (``each of the 6 subject x
        ROI items``, ``each of ROI 'EVC' (...)``).
        """
        if len(items) == 1:
            return f"subject {items[0].subject!r}, ROI {items[0].roi!r}"
        keys = {(item.subject, item.roi) for item in items}
        if keys == self._keys:
            return f"{'each of the' if each else 'all'} {len(keys)} subject x ROI items"
        parts = []
        for roi in self.rois:
            subjects = [item.subject for item in self.for_roi(roi) if (item.subject, roi) in keys]
            if not subjects:
                continue
            if len(subjects) == len(self.for_roi(roi)) > 1:
                parts.append(f"ROI {roi!r} (all {len(subjects)} subjects)")
            else:
                parts.append(f"ROI {roi!r} ({listing(subjects)})")
        return ("each of " if each else "") + ", ".join(parts)

    def aligned(self, ids: Sequence[str]) -> BrainData:
        """Every item restricted and reordered to ``ids`` (matched by value)."""
        return BrainData([item.take(ids) for item in self.items], self.source)


# --- loading --------------------------------------------------------------------------------


def load_brain(source: str | Path | BrainData) -> BrainData:
    """Load brain data from a YAML manifest or a patterns/RDMs HDF5 file.

    Raises :class:`DataError` naming the file (and subject, ROI, ids) at fault.
    """
    if isinstance(source, BrainData):
        return source
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: brain data file not found")
    if path.suffix.lower() in {".h5", ".hdf5", ".hdf"}:
        return BrainData(_load_h5(path, kind=None), path)
    return BrainData(_load_manifest(path), path)


def brain_files(source: str | Path) -> list[Path]:
    """Every file that brain data ``source`` is read from: the file itself and, for a YAML
    manifest, each file its sources name (HDF5 ``path``; NIfTI ``betas``, ``stimuli``, ``rois``,
    ``labels``, ``labels_tsv``; for ``nsd`` and ``things_fmri`` the data files read under
    ``root``), resolved relative to the manifest. For fingerprints: a cache
    keyed on these files notices edited data behind an unchanged manifest. Entries that would not
    load are left out here; :func:`load_brain` reports them."""
    import yaml

    from object2brain.yaml_io import load_yaml

    path = Path(source).expanduser()
    files = [path]
    if path.suffix.lower() in {".h5", ".hdf5", ".hdf"} or not path.is_file():
        return files
    try:
        manifest = load_yaml(path)
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return files
    sources = manifest.get("sources") if isinstance(manifest, dict) else None
    for spec in sources if isinstance(sources, list) else []:
        if not isinstance(spec, dict):
            continue
        if spec.get("kind") in ("nsd", "things_fmri"):
            files += _published_files(path, spec)
            continue
        named = [spec.get(key) for key in ("path", "betas", "stimuli", "labels", "labels_tsv")]
        rois = spec.get("rois")
        named += rois if isinstance(rois, list) else []
        named += list(rois.values()) if isinstance(rois, dict) else []
        for value in named:
            if isinstance(value, str) and value:
                file = Path(value).expanduser()
                file = file if file.is_absolute() else path.parent / file
                if file.is_file():
                    files.append(file)
    return files


def _load_manifest(path: Path) -> list[BrainItem]:
    items: list[BrainItem] = []
    for number, spec in enumerate(read_manifest(path)["sources"], start=1):
        items += load_source(path, spec, number)
    if not items:
        raise DataError(f"{path}: the brain manifest declares no data")
    return items


def read_manifest(path: Path) -> dict[str, Any]:
    """The brain manifest at ``path``, its keys checked (:func:`check_manifest_keys`); no data
    read. Raises :class:`DataError` naming the file."""
    import yaml

    from object2brain.yaml_io import describe_yaml_error, load_yaml

    try:
        manifest = load_yaml(path)
    except yaml.YAMLError as exc:
        raise DataError(
            f"{path}: not a readable YAML manifest: {describe_yaml_error(exc)}"
        ) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a readable YAML manifest ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sources"), list):
        raise DataError(f"{path}: a brain manifest needs a 'sources:' list")
    check_manifest_keys(manifest, str(path))
    return manifest


def load_source(path: Path, spec: dict[str, Any], number: int) -> list[BrainItem]:
    """The items of source ``number`` (1-based, ``spec``) of the brain manifest at ``path``, with
    every check :func:`load_brain` makes (shapes, stimulus ids, ROI masks on the betas' grid).
    Raises :class:`DataError` naming ``<path>: source <number>`` and the file at fault."""
    where = f"{path}: source {number}"
    kind = spec.get("kind")
    if kind in ("patterns", "rdms"):
        return _load_h5(_resolve(path, spec, "path", where), kind=str(kind))
    if kind == "nifti":
        return _load_nifti_source(path, spec, where)
    return _load_published(path, spec, str(kind), where)


#: The keys each source kind of a brain manifest reads (``kind`` included).
SOURCE_KEYS: dict[str, frozenset[str]] = {
    "patterns": frozenset({"kind", "path"}),
    "rdms": frozenset({"kind", "path"}),
    "nifti": frozenset({"kind", "subject", "betas", "stimuli", "rois", "labels", "labels_tsv"}),
    "nsd": frozenset(
        {"kind", "root", "subjects", "repetitions", "sessions", "rois", "space", "betas"}
    ),
    "things_fmri": frozenset(
        {"kind", "root", "subjects", "repetitions", "trial_types", "dataset", "rois"}
    ),
}
#: The top-level keys of a brain manifest.
MANIFEST_KEYS = frozenset({"sources"})


def check_manifest_keys(manifest: dict[str, Any], where: str) -> None:
    """Refuse keys that nothing reads: at the top level (only ``sources``) and in each source
    (:data:`SOURCE_KEYS` of its kind); also a source that is no mapping or has an unknown kind.

    Raises:
        DataError: ``<where>: source N: unknown key(s) pth (a patterns source reads: kind, path)``.
    """
    unknown = sorted(str(k) for k in manifest if k not in MANIFEST_KEYS)
    if unknown:
        raise DataError(
            f"{where}: unknown top-level key(s) {', '.join(unknown)} (a brain manifest has "
            "only 'sources:')"
        )
    for number, spec in enumerate(manifest["sources"], start=1):
        at = f"{where}: source {number}"
        if not isinstance(spec, dict):
            raise DataError(f"{at}: expected a mapping with 'kind' and paths")
        kind = spec.get("kind")
        if kind not in SOURCE_KINDS:
            raise DataError(f"{at}: unknown kind {kind!r} (use {', '.join(SOURCE_KINDS)})")
        allowed = SOURCE_KEYS[str(kind)]
        extra = sorted(str(k) for k in spec if k not in allowed)
        if extra:
            raise DataError(
                f"{at}: unknown key(s) {', '.join(extra)} (a {kind} source reads: "
                f"{', '.join(sorted(allowed))})"
            )


def _published_files(manifest: Path, spec: dict[str, Any]) -> list[Path]:
    """The files an ``nsd`` or ``things_fmri`` source reads; none if it would not load."""
    try:
        if spec.get("kind") == "nsd":
            from object2brain.data.nsd import nsd_files, parse_nsd_source

            return nsd_files(parse_nsd_source(spec, manifest, str(manifest)))
        from object2brain.data.things_fmri import parse_things_source, things_files

        return things_files(parse_things_source(spec, manifest, str(manifest)))
    except DataError:
        return []


def _load_published(manifest: Path, spec: dict[str, Any], kind: str, where: str) -> list[BrainItem]:
    """Items of an ``nsd`` or ``things_fmri`` source, through the same checks as HDF5 patterns."""
    if kind == "nsd":
        from object2brain.data.nsd import parse_nsd_source, read_nsd

        read = read_nsd(parse_nsd_source(spec, manifest, where))
    else:
        from object2brain.data.things_fmri import parse_things_source, read_things_fmri

        read = read_things_fmri(parse_things_source(spec, manifest, where))
    items = []
    for roi in read:
        item_where = f"{roi.source}: subject {roi.subject!r}, ROI {roi.roi!r}"
        item = _make_item(
            roi.subject, roi.roi, "patterns", roi.patterns, roi.stimulus_ids, roi.source, item_where
        )
        items.append(replace(item, runs=roi.runs))
    return items


def _resolve(manifest: Path, spec: dict[str, Any], key: str, where: str) -> Path:
    value = spec.get(key)
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: missing '{key}'")
    p = Path(value).expanduser()
    p = p if p.is_absolute() else manifest.parent / p
    if not p.exists():
        raise DataError(f"{where}: {key} file {p} not found")
    return p


def _decode_ids(values: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _load_h5(path: Path, kind: str | None) -> list[BrainItem]:
    remedy = "replace it with an intact copy (or export it again from its source)"
    with open_hdf5(path, remedy) as handle:  # damaged bytes: one line naming the file
        items = _read_h5(handle, path, kind)
    if not items:
        raise DataError(f"{path}: no /<subject>/<roi> datasets found")
    return items


def _read_h5(handle: Any, path: Path, kind: str | None) -> list[BrainItem]:
    """The items of an open patterns/RDMs file (:func:`_load_h5`)."""
    import h5py

    with handle:
        declared = handle.attrs.get("kind")
        declared = declared.decode() if isinstance(declared, bytes) else declared
        if kind is None:
            if declared not in ("patterns", "rdms"):
                raise DataError(
                    f"{path}: root attribute 'kind' must be 'patterns' or 'rdms' "
                    f"(found {declared!r}); or list the file in a brain manifest"
                )
            kind = str(declared)
        elif declared is not None and declared != kind:
            raise DataError(
                f"{path}: declared as {kind!r} in the manifest but its kind is {declared!r}"
            )
        if "stimulus_ids" not in handle:
            raise DataError(f"{path}: missing dataset /stimulus_ids")
        ids = _decode_ids(handle["stimulus_ids"][()])
        runs = None
        if "runs" in handle:
            if kind != "patterns":
                raise DataError(f"{path}: /runs is for run-wise patterns, not {kind}")
            runs = run_labels(handle["runs"][()], f"{path}: /runs")
            if runs.shape != (len(ids),):
                raise DataError(
                    f"{path}: /runs has {runs.shape[0]} values, /stimulus_ids {len(ids)}"
                )
            require_unique_runs(ids, runs, str(path))
        else:
            require_unique_ids(ids, str(path))
        items: list[BrainItem] = []
        for subject in handle:
            if subject in ("stimulus_ids", "runs"):
                continue
            group = handle[subject]
            if not isinstance(group, h5py.Group):
                raise DataError(f"{path}: /{subject} should be a group of ROI datasets")
            for roi in group:
                node = group[roi]
                if not isinstance(node, h5py.Dataset):
                    inside = (
                        ", ".join(str(name) for name in node)
                        if isinstance(node, h5py.Group)
                        else ""
                    )
                    raise DataError(
                        f"{path}: /{subject}/{roi} is a group"
                        + (f" (containing {inside})" if inside else "")
                        + ", not a dataset: the layout must be /<subject>/<roi> datasets "
                        "(no deeper groups; ROI names cannot contain '/')"
                    )
                where = f"{path}: /{subject}/{roi}"
                try:
                    data = np.asarray(node[()], dtype=np.float64)
                except (TypeError, ValueError):
                    raise DataError(
                        f"{where}: dataset of type {node.dtype} is not numeric"
                    ) from None
                item = _make_item(subject, roi, kind, data, ids, str(path), where)
                items.append(item if runs is None else replace(item, runs=runs))
    if not items:
        raise DataError(f"{path}: no /<subject>/<roi> datasets found")
    return items


def _make_item(
    subject: str,
    roi: str,
    kind: str,
    data: np.ndarray,
    ids: list[str],
    source: str,
    where: str,
    coords: np.ndarray | None = None,
) -> BrainItem:
    """A checked item; ``coords`` ``(n_voxels, 3)`` (NIfTI) lose the rows of dropped voxels."""
    n = len(ids)
    if data.ndim == 0 or data.shape[0] != n:
        raise DataError(f"{where}: has {data.shape[:1]} rows, expected {n} (one per stimulus id)")
    if kind == "rdms":
        if data.shape != (n, n):
            raise DataError(f"{where}: an RDM must be square ({n}, {n}), got {data.shape}")
        if not np.isfinite(data).all():
            bad = sorted({ids[i] for i in np.argwhere(~np.isfinite(data))[:, 0]})
            raise DataError(
                f"{where}: NaN or infinite dissimilarities for stimulus id(s) {listing(bad)}"
            )
        check_rdm(data, ids, where)
        return BrainItem(subject, roi, "rdm", data, ids, source)
    patterns = data.reshape(n, -1)
    if patterns.shape[1] == 0:
        raise DataError(f"{where}: has no voxels (shape {data.shape})")
    finite = np.isfinite(patterns)
    bad_voxels = ~finite.all(axis=0)
    if bad_voxels.all():
        if not finite.any():
            raise DataError(f"{where}: every voxel has NaN or infinite values for every stimulus")
        empty_rows = [ids[i] for i in np.flatnonzero(~finite.any(axis=1))]
        if empty_rows:
            raise DataError(
                f"{where}: stimulus id(s) {listing(empty_rows)} have no finite voxel (all "
                "their values are NaN or infinite); remove them from the data or fix their patterns"
            )
        partial = [ids[i] for i in np.flatnonzero(~finite.all(axis=1))]
        raise DataError(
            f"{where}: every voxel has NaN or infinite values (for stimulus id(s) "
            f"{listing(partial)}), so dropping them leaves none"
        )
    if bad_voxels.any():
        log.warning(
            "%s: dropped %d of %d voxel(s) with NaN/inf values",
            where,
            int(bad_voxels.sum()),
            bad_voxels.size,
        )
        patterns = patterns[:, ~bad_voxels]
        coords = None if coords is None else coords[~bad_voxels]
    constant = (patterns == patterns[:1]).all(axis=0)
    if n > 1 and constant.all():
        raise DataError(
            f"{where}: every voxel has the same value for every stimulus, so the patterns carry "
            "no information about the stimuli"
        )
    if n > 1 and constant.any():
        log.warning(
            "%s: dropped %d of %d voxel(s) whose value is the same for every stimulus (e.g. "
            "outside the brain): they carry no information about the stimuli but would shift "
            "every pattern's correlation",
            where,
            int(constant.sum()),
            constant.size,
        )
        patterns = patterns[:, ~constant]
        coords = None if coords is None else coords[~constant]
    return BrainItem(subject, roi, "patterns", patterns, ids, source, coords=coords)


def check_rdm(data: np.ndarray, ids: Sequence[str], where: str) -> None:
    """Refuse a square, finite ``(n, n)`` matrix that is not a dissimilarity matrix.

    With ``tol = 1e-6 * max|d|`` (rounding of a computed RDM passes): the matrix must be symmetric
    (``|d_ij - d_ji| <= tol``), its diagonal zero (``|d_ii| <= tol``: a stimulus is not
    dissimilar to itself; a diagonal of ones is a *similarity* matrix, whose comparison with the
    model's RDMs would flip the sign of every correlation) and no entry negative
    (``d_ij >= -tol``). Each error names ``where`` (file, subject, ROI) and the stimulus ids.

    Raises:
        DataError: naming the first violated rule.
    """
    scale = max(float(np.abs(data).max()), 1e-300)
    tol = 1e-6 * scale
    if not np.allclose(data, data.T, rtol=0, atol=tol):
        raise DataError(f"{where}: RDM is not symmetric")
    diagonal = np.diagonal(data)
    off = np.flatnonzero(np.abs(diagonal) > tol)
    if off.size:
        hint = (
            " (a diagonal of ones: this looks like a similarity matrix; give 1 - similarity)"
            if np.allclose(diagonal, 1.0)
            else ""
        )
        raise DataError(
            f"{where}: the RDM's diagonal must be zero, but {off.size} of {len(ids)} entries are "
            f"not (stimulus id(s) {listing([ids[int(i)] for i in off])}: "
            f"{listing([f'{diagonal[i]:g}' for i in off[:3]], limit=3)}){hint}"
        )
    negative = np.argwhere(data < -tol)
    if negative.size:
        pairs = [f"({ids[i]}, {ids[j]}) = {data[i, j]:g}" for i, j in negative if i < j]
        raise DataError(
            f"{where}: an RDM holds dissimilarities >= 0, but {len(pairs)} pair(s) are negative: "
            f"{listing(pairs, limit=5)}"
        )


def _roi_name(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".mgz", ".img"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _load_nifti_source(manifest: Path, spec: dict[str, Any], where: str) -> list[BrainItem]:
    import nibabel as nib

    from object2brain.data.stimuli import read_table

    subject = spec.get("subject")
    if not isinstance(subject, str | int) or str(subject) == "":
        raise DataError(f"{where}: a nifti source needs 'subject'")
    subject = str(subject)
    betas_path = _resolve(manifest, spec, "betas", where)
    table_path = _resolve(manifest, spec, "stimuli", where)
    betas = _load_image(betas_path)
    if len(betas.shape) != 4:
        raise DataError(f"{betas_path}: expected a 4D beta image, got shape {betas.shape}")
    try:
        table = read_table(table_path)
    except StimulusError as exc:
        raise DataError(str(exc)) from None
    require_columns(table.columns, ["stimulus_id"], str(table_path))
    ids = ["" if _blank(s) else str(s).strip() for s in table["stimulus_id"]]
    blank = [i + 1 for i, s in enumerate(ids) if not s]
    if blank:
        raise DataError(
            f"{table_path}: empty stimulus_id in row(s) {listing(blank)} (row i = volume i, "
            "counting from 1)"
        )
    if len(ids) != betas.shape[3]:
        raise DataError(
            f"{table_path}: {len(ids)} rows but {betas_path.name} has {betas.shape[3]} volumes "
            "(one row per volume)"
        )
    runs = None
    if "run" in table.columns:
        runs = run_labels(table["run"].to_numpy(), f"{table_path}: column 'run'")
        require_unique_runs(ids, runs, str(table_path))
    else:
        require_unique_ids(ids, str(table_path))
    data = _voxels(betas, betas_path, np.float32)
    nifti1: Any = nib.Nifti1Image
    grid = nifti1(np.zeros(betas.shape[:3], dtype=np.int8), betas.affine)

    if spec.get("rois") is not None and spec.get("labels") is not None:
        raise DataError(f"{where}: give either 'rois' or 'labels' + 'labels_tsv', not both")
    masks: Iterable[tuple[str, np.ndarray, str]]
    if spec.get("rois") is not None:
        masks = [
            _mask(_resolve(manifest, {"roi": value}, "roi", where), grid, betas_path, name)
            for name, value in _named_rois(spec["rois"], where)
        ]
    elif spec.get("labels") is not None:
        masks = _label_masks(
            _resolve(manifest, spec, "labels", where),
            _resolve(manifest, spec, "labels_tsv", where),
            grid,
            betas_path,
        )
    else:
        raise DataError(f"{where}: a nifti source needs 'rois' or 'labels' + 'labels_tsv'")

    items = []
    for roi, mask, mask_source in masks:
        if not mask.any():
            raise DataError(
                f"{mask_source}: ROI {roi!r} of subject {subject!r} has no voxels on the beta "
                f"grid of {betas_path} (empty mask, or it does not overlap the betas)"
            )
        patterns = data[mask].T.astype(np.float64)  # (n_stimuli, n_voxels)
        item_where = f"{betas_path}: subject {subject!r}, ROI {roi!r}"
        coords = np.argwhere(mask).astype(np.int64)  # C order, as data[mask]
        item = _make_item(
            subject, roi, "patterns", patterns, ids, str(betas_path), item_where, coords
        )
        item = replace(item, grid=VoxelGrid(tuple(betas.shape[:3]), betas.affine))
        items.append(item if runs is None else replace(item, runs=runs))
    return items


def _blank(value: Any) -> bool:
    """A missing cell: None, NaN or an empty string (integer ids, e.g. from Parquet, are ids)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return True
    return isinstance(value, str) and not value.strip()


def _load_image(path: Path) -> Any:
    import nibabel as nib

    try:
        return nib.load(path)
    except Exception as exc:  # nibabel raises several types for unreadable images
        raise DataError(f"{path}: not a readable NIfTI image ({exc})") from None


def _voxels(image: Any, path: Path, dtype: Any = None) -> np.ndarray:
    """An image's voxel array; nibabel reads it only now, so a truncated file fails here."""
    try:
        return np.asarray(image.dataobj, dtype=dtype)
    except Exception as exc:  # e.g. EOFError of a truncated .nii.gz, OSError of a short .nii
        raise DataError(
            f"{path}: cannot read the image data, the file is damaged ({exc})"
        ) from None


def _named_rois(rois: Any, where: str) -> list[tuple[str | None, Any]]:
    """``rois:`` as ``(name, mask file)`` pairs: a list of files (name None: the file stem) or
    a mapping ``{name: file}`` (the name is the ROI's target name)."""
    if isinstance(rois, dict) and rois:
        bad = [str(k) for k in rois if not isinstance(k, str) or not k.strip()]
        if bad:
            raise DataError(f"{where}: 'rois' names must be non-empty text: {', '.join(bad)}")
        return [(str(name).strip(), value) for name, value in rois.items()]
    if isinstance(rois, list) and rois:
        return [(None, value) for value in rois]
    raise DataError(f"{where}: 'rois' must be a list of mask files or a mapping {{name: file}}")


def _mask(
    path: Path, grid: Any, betas_path: Path, name: str | None = None
) -> tuple[str, np.ndarray, str]:
    """ROI name (``name``, else the file's stem), boolean mask on the beta grid and source of
    a 3D mask: nonzero = inside.

    NaN counts as outside. Values other than 0 and 1 (a probabilistic map) and a mask partly
    outside the betas' field of view are warned about."""
    values, original, affine = _on_grid(path, grid, betas_path)
    name = name or _roi_name(path)
    finite = np.isfinite(original)
    inside = finite & (original != 0)
    levels = np.unique(original[inside])
    if levels.size > 1 or (levels.size == 1 and levels[0] != 1):
        log.warning(
            "%s: mask values other than 0 and 1 (%g to %g): every nonzero voxel counts as inside "
            "ROI %r; threshold a probabilistic map first",
            path,
            float(levels.min()),
            float(levels.max()),
            name,
        )
    _warn_outside(path, name, np.argwhere(inside), affine, grid, betas_path)
    return name, np.isfinite(values) & (values != 0), str(path)


def _label_masks(
    label_path: Path, tsv_path: Path, grid: Any, betas_path: Path
) -> Iterator[tuple[str, np.ndarray, str]]:
    """One boolean mask on the beta grid per row (``index``, ``name``) of a label TSV, made
    when needed (an atlas of hundreds of labels never holds all its masks at once)."""
    from object2brain.data.stimuli import read_table

    try:
        names = read_table(tsv_path)
    except StimulusError as exc:
        raise DataError(str(exc)) from None
    require_columns(names.columns, ["index", "name"], str(tsv_path))
    indices = _numeric(names["index"])
    bad = [
        str(v)
        for v, i in zip(names["index"], indices, strict=True)
        if not (float(i).is_integer() and 0 <= i < 2**31)
    ]
    if bad:
        raise DataError(f"{tsv_path}: column 'index' must hold integer labels, got {listing(bad)}")
    on_grid, on_own_grid, affine = _on_grid(label_path, grid, betas_path)
    values, original = _as_labels(on_grid), _as_labels(on_own_grid)
    for index, name in zip(indices.astype(np.int64), names["name"], strict=True):
        source = f"{label_path} (label {index})"
        if index == 0:
            log.warning("%s: label 0 is the background of a label image; row ignored", tsv_path)
            continue
        voxels = np.argwhere(original == index)
        if not len(voxels):
            raise DataError(f"{tsv_path}: label {index} ({name!r}) does not occur in {label_path}")
        _warn_outside(label_path, str(name), voxels, affine, grid, betas_path)
        yield str(name), values == index, source


def _as_labels(values: np.ndarray) -> np.ndarray:
    """A label image's values as integers where they are within 1e-3 of one (an int16 atlas
    saved with a scale factor reads back as 1.00000001); others, and NaN, become -1."""
    as_float = np.asarray(values, dtype=np.float64)
    nearest = np.rint(np.nan_to_num(as_float, nan=-1.0))
    labels: np.ndarray = np.where(np.abs(as_float - nearest) <= 1e-3, nearest, -1).astype(np.int64)
    return labels


def _numeric(column: Any) -> np.ndarray:
    """A column as float64 ``(n,)``, NaN where a value is not a number."""
    import pandas as pd

    values: np.ndarray = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
    return values


def _warn_outside(
    path: Path, roi: str, voxels: np.ndarray, affine: np.ndarray, grid: Any, betas_path: Path
) -> None:
    """Warn when some of an ROI's voxels ``(m, 3)`` (indices in ``affine``'s image) lie outside
    the field of view of the beta grid: the ROI is cut to the part inside."""
    if voxels.size == 0:
        return
    world = np.c_[voxels, np.ones(len(voxels))] @ affine.T
    index = world @ np.linalg.inv(grid.affine).T
    shape = np.asarray(grid.shape[:3])
    outside = int((~((index[:, :3] >= -0.5) & (index[:, :3] < shape - 0.5)).all(axis=1)).sum())
    if outside:
        log.warning(
            "%s: %d of %d voxels of ROI %r (%.0f%%) lie outside the field of view of %s; the "
            "ROI is cut to the part inside",
            path,
            outside,
            len(voxels),
            roi,
            100 * outside / len(voxels),
            betas_path,
        )


def _on_grid(path: Path, grid: Any, betas_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 3D mask or label image: its values on the beta grid (nearest resampling if needed),
    its values on its own grid and its affine."""
    import nibabel as nib

    image = _load_image(path)
    shape = tuple(image.shape)
    if len(shape) == 4 and shape[3] == 1:
        nifti1: Any = nib.Nifti1Image
        image = nifti1(_voxels(image, path)[..., 0], image.affine)
    elif len(shape) != 3:
        raise DataError(f"{path}: a mask or label image must be 3D, got shape {shape}")
    original = _voxels(image, path)
    if image.shape[:3] == grid.shape and np.allclose(image.affine, grid.affine, atol=1e-5):
        return original, original, image.affine
    from nilearn.image import resample_to_img

    if image.shape[:3] == grid.shape:
        log.warning(
            "%s: same shape as %s but another affine, so it is resampled by world coordinates, "
            "not voxel by voxel; if the mask was saved with a wrong affine, fix its header",
            path,
            betas_path,
        )
    else:
        log.info(
            "%s: on another grid than %s (shape %s vs %s); resampled with nearest interpolation",
            path,
            betas_path,
            image.shape[:3],
            grid.shape,
        )
    nifti1 = nib.Nifti1Image
    image = nifti1(np.nan_to_num(original, nan=0.0), image.affine)  # NaN = outside
    resampled = resample_to_img(
        image, grid, interpolation="nearest", force_resample=True, copy_header=True
    )
    return np.asarray(resampled.dataobj), original, image.affine
