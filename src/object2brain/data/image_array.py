"""Stimulus images stored as rows of an HDF5 array (e.g. NSD's ``nsd_stimuli.hdf5``).

An image array is an HDF5 dataset of uint8 pixels of shape ``(n_images, H, W, 3)`` (RGB, rows
top to bottom); NSD publishes its 73,000 COCO images this way (``nsd_stimuli.hdf5``, dataset
``imgBrick``, ``(73000, 425, 425, 3)``). Images are read from it by row, one at a time and never
written to disk; the pixels of a row enter every stage exactly as the same pixels decoded from an
image file would (:func:`~object2brain.data.images.load_image` returns the row as an RGB picture).

**Image reference.** Wherever a stimulus table has an image path, a row of an array is written
``FILE#ROW`` (dataset ``imgBrick``) or ``FILE#DATASET#ROW``, where ``FILE`` ends in ``.hdf5``,
``.h5`` or ``.hdf`` (relative to the table's folder, like any path) and ``ROW`` is the 0-based
row, e.g. ``nsd_stimuli.hdf5#0`` is NSD's image ``nsd-00001`` (1-based 73k index 1)::

    stimulus_id,path,condition,valence
    nsd-00003,nsd_stimuli.hdf5#2,indoor,0.4
    nsd-00017,nsd_stimuli.hdf5#16,outdoor,-1.2

**The array as a stimulus source.** ``load_stimuli("nsd_stimuli.hdf5")`` lists every row, with
ids ``nsd-00001``, ``nsd-00002``, ... (``nsd_stimulus_id(row + 1)``, the ids of the ``kind: nsd``
brain source); :func:`array_table` takes a dataset name, an id scheme (a format string with the
fields ``row``, 0-based, and ``index``, 1-based) and a subset of rows.

**Hashing.** An image of an array is identified by the SHA-256 of its pixels (:func:`row_sha256`:
``"{H}x{W}x3\\0"`` then the row's ``H * W * 3`` bytes in C order), so editing a row changes the
stimulus fingerprint and rewriting the file with the same pixels does not.

**Processes.** Open files are cached per process (at most :data:`MAX_OPEN` at a time) and a
process that finds handles opened by its parent (a forked loader worker) opens the file again: an
HDF5 handle must not be used across ``fork``. Datasets hand over the reference text only, so they
pickle to spawned workers too.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from object2brain.errors import StimulusError, listing

ARRAY_SUFFIXES: frozenset[str] = frozenset({".hdf5", ".h5", ".hdf"})
DEFAULT_DATASET = "imgBrick"
MAX_OPEN = 16

_REFERENCE = re.compile(
    r"^(?P<file>.+\.(?:hdf5|h5|hdf))#(?:(?P<dataset>[^#]+)#)?(?P<row>\d+)$", re.IGNORECASE
)


@dataclass(frozen=True)
class ArrayRef:
    """One image of an image array: ``row`` (0-based) of ``dataset`` in the HDF5 ``file``."""

    file: Path
    dataset: str
    row: int

    def __str__(self) -> str:
        if self.dataset == DEFAULT_DATASET:
            return f"{self.file}#{self.row}"
        return f"{self.file}#{self.dataset}#{self.row}"

    @property
    def where(self) -> str:
        """``FILE`` dataset ``DATASET``, for messages."""
        return f"{self.file} dataset {self.dataset!r}"


def parse_array_ref(path: str | Path) -> ArrayRef | None:
    """The :class:`ArrayRef` written as ``FILE#ROW`` or ``FILE#DATASET#ROW``, or ``None`` if
    ``path`` is not such a reference (an image file's path)."""
    match = _REFERENCE.match(str(path))
    if match is None:
        return None
    return ArrayRef(Path(match["file"]), match["dataset"] or DEFAULT_DATASET, int(match["row"]))


def is_array_file(path: str | Path) -> bool:
    """Whether ``path`` names an HDF5 file by its suffix (a candidate image array)."""
    return Path(path).suffix.lower() in ARRAY_SUFFIXES


# --- open files, per process --------------------------------------------------------------------

_LOCK = threading.Lock()
_OPEN: OrderedDict[tuple[str, int, int], Any] = OrderedDict()
_OPEN_PID = os.getpid()
#: handles inherited from a parent process: kept referenced, never used nor closed here
_INHERITED: list[Any] = []


def _file_key(file: Path) -> tuple[str, int, int]:
    stat = os.stat(file)
    return (os.path.abspath(file), stat.st_size, stat.st_mtime_ns)


def _open_file(file: Path, dataset: str) -> Any:
    """The open ``h5py.File`` of ``file`` in this process (opened on first use); ``dataset``
    is named in errors."""
    import h5py

    global _OPEN_PID
    try:
        key = _file_key(file)
    except OSError:
        raise StimulusError(f"{file}: image array file not found (dataset {dataset!r})") from None
    with _LOCK:
        if os.getpid() != _OPEN_PID:  # a forked child: the parent's handles are not ours to use
            _INHERITED.extend(_OPEN.values())
            _OPEN.clear()
            _OPEN_PID = os.getpid()
        handle = _OPEN.get(key)
        if handle is not None:
            _OPEN.move_to_end(key)
            return handle
        try:
            handle = h5py.File(file, "r")
        except OSError as exc:
            message = f"{file}: cannot be opened as an HDF5 image array {dataset!r} ({exc})"
            raise StimulusError(message) from None
        _OPEN[key] = handle
        while len(_OPEN) > MAX_OPEN:
            _OPEN.popitem(last=False)[1].close()
        return handle


def close_image_arrays() -> None:
    """Close every image array this process has open (they reopen on next use)."""
    with _LOCK:
        if os.getpid() == _OPEN_PID:
            for handle in _OPEN.values():
                handle.close()
        _OPEN.clear()


def open_array(file: str | Path, dataset: str = DEFAULT_DATASET) -> Any:
    """The ``h5py.Dataset`` ``dataset`` of ``file``, checked to be uint8 ``(n, H, W, 3)``.

    Raises:
        StimulusError: naming the file and the dataset: no such file, not HDF5, no such dataset,
            or a dataset of another type or shape.
    """
    import h5py

    path = Path(file)
    handle = _open_file(path, dataset)
    where = f"{path} dataset {dataset!r}"
    try:
        node = handle[dataset]
    except KeyError:
        found = sorted(_dataset_names(handle))
        raise StimulusError(
            f"{where}: no such dataset (datasets in the file: {listing(found) or 'none'})"
        ) from None
    if not isinstance(node, h5py.Dataset):
        raise StimulusError(f"{where}: is a group, not a dataset of images")
    if node.dtype != np.uint8 or node.ndim != 4 or node.shape[-1] != 3:
        raise StimulusError(
            f"{where}: an image array must be uint8 of shape (n_images, height, width, 3), "
            f"found {node.dtype} of shape {node.shape}"
        )
    return node


def _dataset_names(handle: Any) -> list[str]:
    import h5py

    names: list[str] = []

    def visit(name: str, node: Any) -> None:
        if isinstance(node, h5py.Dataset):
            names.append(name)

    handle.visititems(visit)
    return names


def array_length(file: str | Path, dataset: str = DEFAULT_DATASET) -> int:
    """Number of images (rows) of a checked image array."""
    return int(open_array(file, dataset).shape[0])


def read_row(ref: ArrayRef) -> np.ndarray:
    """The pixels of one image, ``(H, W, 3)`` uint8, C-contiguous.

    Raises:
        StimulusError: a bad file or dataset (:func:`open_array`) or a row past the end.
    """
    node = open_array(ref.file, ref.dataset)
    if ref.row >= node.shape[0]:
        raise StimulusError(
            f"{ref.where}: row {ref.row} is past the end of the array ({node.shape[0]} images, "
            f"rows 0..{node.shape[0] - 1})"
        )
    return np.ascontiguousarray(node[ref.row])


def row_size(ref: ArrayRef) -> tuple[int, int]:
    """``(width, height)`` of the images of ``ref``'s array, from the dataset's shape."""
    node = open_array(ref.file, ref.dataset)
    return int(node.shape[2]), int(node.shape[1])


#: SHA-256 of rows hashed so far in this process, by (file, size, mtime, dataset, row)
_ROW_HASHES: dict[tuple[str, int, int, str, int], str] = {}


def row_sha256(ref: ArrayRef) -> str:
    """SHA-256 of one image's pixels: ``"{H}x{W}x3\\0"`` then its bytes; once per process while
    the file's size and modification time are unchanged."""
    try:
        key = (*_file_key(ref.file), ref.dataset, ref.row)
    except OSError:
        message = f"{ref.file}: image array file not found (dataset {ref.dataset!r})"
        raise StimulusError(message) from None
    if key not in _ROW_HASHES:
        pixels = read_row(ref)
        height, width = pixels.shape[:2]
        digest = hashlib.sha256(f"{height}x{width}x3\0".encode())
        digest.update(pixels.data)
        _ROW_HASHES[key] = digest.hexdigest()
    return _ROW_HASHES[key]


def array_problems(refs: Sequence[tuple[str, ArrayRef]]) -> list[str]:
    """Problems of the images ``(stimulus_id, reference)`` of a stimulus table, one message part
    per file and dataset (a bad file or dataset, rows past the end), without reading pixels."""
    groups: dict[tuple[Path, str], list[tuple[str, int]]] = {}
    for sid, ref in refs:
        groups.setdefault((ref.file, ref.dataset), []).append((sid, ref.row))
    problems = []
    for (file, dataset), members in groups.items():
        try:
            n_images = array_length(file, dataset)
        except StimulusError as exc:
            problems.append(f"{len(members)} image(s) in {exc}")
            continue
        past = [f"{sid} (row {row})" for sid, row in members if row >= n_images]
        if past:
            problems.append(
                f"{len(past)} row(s) past the end of {file} dataset {dataset!r} "
                f"({n_images} images, rows 0..{n_images - 1}): {listing(past)}"
            )
    return problems


def array_table(
    file: str | Path,
    *,
    dataset: str = DEFAULT_DATASET,
    rows: Sequence[int] | None = None,
    ids: str | Callable[[int], str] | None = None,
) -> tuple[list[str], list[str]]:
    """Stimulus ids and image references of rows of an image array.

    Args:
        file: the HDF5 file.
        dataset: the uint8 ``(n, H, W, 3)`` dataset in it.
        rows: 0-based rows, in the order wanted (default: every row).
        ids: the id of row ``r``: a format string with the fields ``row`` (``r``) and ``index``
            (``r + 1``), e.g. ``"img{row:05d}"``, or a function of ``r``; default
            :func:`~object2brain.data.nsd.nsd_stimulus_id` of ``r + 1`` (``nsd-00001`` for row 0).

    Returns:
        ``(stimulus_ids, paths)``, one per row; paths are ``FILE#ROW`` / ``FILE#DATASET#ROW``.

    Raises:
        StimulusError: a bad file or dataset, or rows outside the array.
    """
    from object2brain.data.nsd import nsd_stimulus_id

    path = Path(file)
    n_images = array_length(path, dataset)
    chosen = list(range(n_images)) if rows is None else [int(r) for r in rows]
    outside = [r for r in chosen if not 0 <= r < n_images]
    if outside:
        raise StimulusError(
            f"{path} dataset {dataset!r}: row(s) {listing(outside)} outside the array "
            f"({n_images} images, rows 0..{n_images - 1})"
        )
    if ids is None:
        names = [nsd_stimulus_id(r + 1) for r in chosen]
    elif isinstance(ids, str):
        names = [ids.format(row=r, index=r + 1) for r in chosen]
    else:
        names = [ids(r) for r in chosen]
    return names, [str(ArrayRef(path, dataset, r)) for r in chosen]
