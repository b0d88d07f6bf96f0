"""``o2b.to_rsatoolbox`` and ``object2brain export-rsatoolbox``: an RSA run's RDMs to rsatoolbox.

The ``rsa`` stage writes every RDM of its analysis to ``rdms.h5`` (:mod:`object2brain.rdm_file`);
these functions turn such a file (or a loaded :class:`~object2brain.rdm_file.RdmSet`) into one
``rsatoolbox.rdm.RDMs`` and write it in rsatoolbox's own HDF5 format, which
``rsatoolbox.rdm.load_rdm(path)`` reads back. rsatoolbox is an optional dependency.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from object2brain.errors import DataError
from object2brain.io import atomic_path, check_writable
from object2brain.rdm_file import (
    KINDS,
    RDM_FILE,
    Attr,
    RdmFileError,
    RdmSet,
    descriptor_table,
    read_rdm_file,
)

RdmSource = str | Path | RdmSet

#: Descriptors whose missing values are -1 (integers), not "" (text).
_INTEGER_DESCRIPTORS = frozenset({"layer_index", "n_voxels", "n_subjects"})


def load_rdms(source: RdmSource) -> RdmSet:
    """The :class:`RdmSet` of an rsa output folder (its ``rdms.h5``), of an ``rdms.h5`` file,
    or ``source`` itself.

    Raises:
        DataError: naming the folder or file, when there is no readable ``rdms.h5``.
    """
    if isinstance(source, RdmSet):
        return source
    path = Path(source)
    if path.is_dir():
        if not (path / RDM_FILE).is_file():
            raise DataError(
                f"{path}: no {RDM_FILE} (an rsa output folder written with --save-rdms, the "
                "default)"
            )
        path = path / RDM_FILE
    try:
        return read_rdm_file(path)
    except RdmFileError as exc:
        raise DataError(str(exc)) from None


def _rsatoolbox_rdms() -> Any:
    try:
        return importlib.import_module("rsatoolbox.rdm")
    except ImportError:
        raise DataError(
            "exporting to rsatoolbox needs the rsatoolbox package: pip install rsatoolbox"
        ) from None


def to_rsatoolbox(source: RdmSource, *, kind: str | None = None) -> Any:
    """An analysis' RDMs as one ``rsatoolbox.rdm.RDMs``.

    Args:
        source: an rsa output folder, its ``rdms.h5``, or an :class:`RdmSet`.
        kind: ``model`` | ``brain`` | ``behaviour`` to export only those RDMs (default: all).
    Returns:
        ``RDMs`` with ``dissimilarities`` ``(k, n (n - 1) / 2)`` in the file's order; pattern
        descriptor ``stimulus_id`` (and ``condition``, ``valence`` when known); RDM
        descriptors ``kind``, ``name`` (model or target), ``label`` (layer or subject),
        ``model``, ``layer``, ``layer_index``, ``target``, ``roi``, ``subject``, ``n_voxels``,
        ``metric``, ... (``""`` or -1 where an RDM lacks one); ``dissimilarity_measure`` the
        analysis' RDM metric (each RDM's own in the descriptor ``metric``).
    Raises:
        DataError: rsatoolbox not installed, no RDMs, an unknown ``kind``.
    """
    rdms = load_rdms(source)
    if kind is not None and kind not in KINDS:
        raise DataError(f"kind {kind!r}: use one of {', '.join(KINDS)}")
    chosen = rdms.select(kind)
    if not chosen:
        raise DataError(f"no {kind or ''} RDMs to export".replace("  ", " "))
    module = _rsatoolbox_rdms()
    descriptors = {key: _column(key, values) for key, values in descriptor_table(chosen).items()}
    patterns: dict[str, Any] = {"stimulus_id": list(rdms.stimulus_ids)}
    if rdms.conditions is not None:
        patterns["condition"] = list(rdms.conditions)
    if rdms.valence is not None:
        patterns["valence"] = np.asarray(rdms.valence, dtype=np.float64)
    return module.RDMs(
        dissimilarities=np.stack([r.vector for r in chosen]).astype(np.float64),
        dissimilarity_measure=str(rdms.attrs.get("rdm_metric", "")),
        rdm_descriptors=descriptors,
        pattern_descriptors=patterns,
    )


def _column(key: str, values: list[Attr]) -> list[Any]:
    if key in _INTEGER_DESCRIPTORS:
        return [int(v) if v != "" else -1 for v in values]
    return [str(v) for v in values]


def export_rsatoolbox(source: RdmSource, out: str | Path, *, kind: str | None = None) -> Path:
    """Write :func:`to_rsatoolbox` of ``source`` to ``out`` in rsatoolbox's HDF5 format
    (``RDMs.save(..., file_type='hdf5')``), atomically, replacing ``out``; returns ``out``."""
    out = Path(out)
    if out.is_dir():
        raise DataError(f"{out}: is a folder; give the file to write (e.g. rdms_rsatoolbox.hdf5)")
    check_writable(out)
    exported = to_rsatoolbox(source, kind=kind)
    with atomic_path(out) as temp:
        temp.unlink()  # rsatoolbox refuses to write over an existing file
        exported.save(str(temp), file_type="hdf5", overwrite=True)
    return out
