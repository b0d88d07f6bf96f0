"""``rdms.h5``: every RDM an RSA analysis used, with the stimulus ids and descriptors.

The file format is shared by the ``rsa`` stage (which writes it), the report (which draws RDM and
MDS panels from it) and the export to rsatoolbox; this module needs numpy and h5py only.

Layout (HDF5)::

    /stimulus_ids           (n,) str       the analysed stimuli, in the order of every RDM
    /conditions             (n,) str       condition label of each stimulus ("" none; optional)
    /valence                (n,) float64   group-mean rated valence (optional; NaN unknown)
    /model/<model>/<layer>  (m,) float64   layer RDM
    /brain/<roi>/<subject>  (m,) float64   a subject's ROI RDM
    /brain/<roi>/group      (m,) float64   the subjects' RDMs pooled (see ``pooled_on``)
    /behaviour/<target>/<rater or group>   (m,) float64   ``|v_i - v_j|`` of ratings

Every RDM is the condensed upper triangle, ``m = n (n - 1) / 2`` values, row-major over
``i < j`` (the order of ``scipy.spatial.distance.squareform`` and of rsatoolbox's
``dissimilarities``). Root attributes: ``format`` (``object2brain-rdms``), ``version``,
``rdm_metric``, ``compare_method``. Dataset attributes: ``kind`` (``model`` | ``brain`` |
``behaviour``), ``name`` (model or target), ``label`` (layer or subject), ``order`` (position
in the set), ``metric``; model RDMs
add ``layer_index`` (0-based position in the network); brain RDMs ``roi``, ``subject`` and
``n_voxels`` (the pattern's voxels after resampling and masking; absent for given RDMs); group
RDMs ``pooled_on``: the comparison on whose scale the subjects' RDMs were averaged (ranks for
``spearman``, z-scores for ``pearson``, ...), or ``group-mean ratings`` for behaviour. A name
holding ``/`` is stored with ``%2F`` in its place (the attributes keep the name).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "object2brain-rdms"
VERSION = 1
#: The file name the rsa stage writes in its output folder.
RDM_FILE = "rdms.h5"
#: The top-level groups, one per kind of RDM.
KINDS = ("model", "brain", "behaviour")

Attr = str | int | float


class RdmFileError(ValueError):
    """An ``rdms.h5`` that cannot be read (missing, not this format, inconsistent)."""


@dataclass(frozen=True)
class Rdm:
    """One RDM: ``kind`` (:data:`KINDS`), ``name`` (model or target), ``label`` (layer or
    subject), ``vector`` the condensed upper triangle ``(n (n - 1) / 2,)`` float64, and its
    descriptors ``attrs``."""

    kind: str
    name: str
    label: str
    vector: np.ndarray
    attrs: Mapping[str, Attr] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The dataset path in the file: ``<kind>/<name>/<label>``."""
        return "/".join([self.kind, _escape(self.name), _escape(self.label)])

    def square(self) -> np.ndarray:
        """The RDM as a symmetric ``(n, n)`` matrix with a zero diagonal."""
        return squareform(self.vector)


@dataclass(frozen=True)
class RdmSet:
    """Every RDM of one analysis over ``stimulus_ids`` ``(n,)``.

    ``conditions`` ``(n,)`` (``""``: none) and ``valence`` ``(n,)`` (group-mean rated valence)
    are optional stimulus descriptors; ``attrs`` the analysis settings (``rdm_metric``,
    ``compare_method``).
    """

    stimulus_ids: list[str]
    rdms: list[Rdm]
    conditions: list[str] | None = None
    valence: np.ndarray | None = None
    attrs: Mapping[str, Attr] = field(default_factory=dict)

    def select(self, kind: str | None = None, name: str | None = None) -> list[Rdm]:
        """The RDMs of one kind and/or name, in file order."""
        return [
            r
            for r in self.rdms
            if (kind is None or r.kind == kind) and (name is None or r.name == name)
        ]

    def get(self, kind: str, name: str, label: str) -> Rdm:
        """One RDM by kind, name and label (KeyError when absent)."""
        for rdm in self.rdms:
            if (rdm.kind, rdm.name, rdm.label) == (kind, name, label):
                return rdm
        raise KeyError(f"no RDM {kind}/{name}/{label}")


def squareform(vector: np.ndarray) -> np.ndarray:
    """Condensed upper triangle ``(m,)`` -> symmetric ``(n, n)``, ``m = n (n - 1) / 2``."""
    vector = np.asarray(vector, dtype=np.float64)
    n = round(float((1 + np.sqrt(1 + 8 * vector.size)) / 2))
    if n * (n - 1) // 2 != vector.size:
        raise RdmFileError(f"{vector.size} values are not the upper triangle of a square RDM")
    square = np.zeros((n, n))
    rows, cols = np.triu_indices(n, 1)
    square[rows, cols] = vector
    square[cols, rows] = vector
    return square


def condensed(square: np.ndarray) -> np.ndarray:
    """Symmetric ``(n, n)`` -> its upper triangle ``(n (n - 1) / 2,)`` float64 (row-major)."""
    square = np.asarray(square, dtype=np.float64)
    rows, cols = np.triu_indices(square.shape[0], 1)
    return square[rows, cols]


def _escape(name: str) -> str:
    return name.replace("%", "%25").replace("/", "%2F")


def write_rdm_file(path: str | Path, rdms: RdmSet) -> Path:
    """Write ``rdms`` to ``path`` (HDF5; the layout of the module docstring); returns ``path``.

    The caller writes into a staging folder (or a temporary name) for atomicity.

    Raises:
        RdmFileError: an RDM whose length does not match the stimuli, or a repeated key.
    """
    import h5py

    path = Path(path)
    n = len(rdms.stimulus_ids)
    m = n * (n - 1) // 2
    seen: set[str] = set()
    text = h5py.string_dtype()
    with h5py.File(path, "w") as handle:
        handle.attrs["format"] = FORMAT
        handle.attrs["version"] = VERSION
        for key, value in rdms.attrs.items():
            handle.attrs[key] = value
        handle.create_dataset("stimulus_ids", data=np.array(rdms.stimulus_ids, dtype=object),
                              dtype=text)  # fmt: skip
        if rdms.conditions is not None:
            handle.create_dataset("conditions", data=np.array(rdms.conditions, dtype=object),
                                  dtype=text)  # fmt: skip
        if rdms.valence is not None:
            handle.create_dataset("valence", data=np.asarray(rdms.valence, dtype=np.float64))
        for order, rdm in enumerate(rdms.rdms):
            if rdm.kind not in KINDS:
                raise RdmFileError(f"RDM {rdm.key}: kind must be one of {', '.join(KINDS)}")
            if rdm.vector.shape != (m,):
                raise RdmFileError(
                    f"RDM {rdm.key}: {rdm.vector.shape} values for {n} stimuli (need {m})"
                )
            if rdm.key in seen:
                raise RdmFileError(f"RDM {rdm.key} given twice")
            seen.add(rdm.key)
            dataset = handle.create_dataset(rdm.key, data=rdm.vector.astype(np.float64))
            dataset.attrs.update(
                {
                    "kind": rdm.kind,
                    "name": rdm.name,
                    "label": rdm.label,
                    "order": order,
                    **rdm.attrs,
                }
            )
    return path


def read_rdm_file(path: str | Path) -> RdmSet:
    """Read an ``rdms.h5`` written by :func:`write_rdm_file` (RDMs in file order).

    Raises:
        RdmFileError: naming the file, when it is missing or not an object2brain RDM file.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise RdmFileError(f"{path}: RDM file not found")
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise RdmFileError(f"{path}: not an HDF5 file ({exc})") from None
    with handle:
        if handle.attrs.get("format") != FORMAT:
            raise RdmFileError(f"{path}: not an object2brain RDM file (no format={FORMAT!r})")
        ids = [_text(v) for v in handle["stimulus_ids"][()]]
        conditions = (
            [_text(v) for v in handle["conditions"][()]] if "conditions" in handle else None
        )
        valence = np.asarray(handle["valence"][()]) if "valence" in handle else None
        found: list[Rdm] = []
        for kind in KINDS:
            if kind not in handle:
                continue
            for name_key in handle[kind]:
                for label_key in handle[kind][name_key]:
                    dataset = handle[kind][name_key][label_key]
                    attrs = {k: _attr(v) for k, v in dataset.attrs.items()}
                    name, label = str(attrs.pop("name")), str(attrs.pop("label"))
                    attrs.pop("kind", None)
                    found.append(Rdm(kind, name, label, np.asarray(dataset[()]), attrs))
        root = {k: _attr(v) for k, v in handle.attrs.items() if k not in ("format", "version")}
    found.sort(key=lambda r: int(r.attrs.get("order", 0)))
    found = [Rdm(r.kind, r.name, r.label, r.vector, _without(r.attrs, "order")) for r in found]
    return RdmSet(ids, found, conditions, valence, root)


def _without(attrs: Mapping[str, Attr], key: str) -> dict[str, Attr]:
    return {k: v for k, v in attrs.items() if k != key}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _attr(value: Any) -> Attr:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value if isinstance(value, str | int | float) else str(value)


def descriptor_table(rdms: Sequence[Rdm]) -> dict[str, list[Attr]]:
    """The RDMs' descriptors as columns (``kind``, ``name``, ``label`` and every attribute;
    ``""`` where an RDM lacks one), for tables and rsatoolbox's ``rdm_descriptors``."""
    keys = list(dict.fromkeys(k for r in rdms for k in r.attrs))
    columns: dict[str, list[Attr]] = {
        "kind": [r.kind for r in rdms],
        "name": [r.name for r in rdms],
        "label": [r.label for r in rdms],
    }
    for key in keys:
        columns[key] = [r.attrs.get(key, "") for r in rdms]
    return columns
