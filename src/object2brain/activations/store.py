"""The activation store (HDF5) and its writers.

Layout of an activation store, stable so that other tools can write one::

    /stimulus_ids          (n,) UTF-8 strings, unique
    /layers/<layer name>   (n, ...) activations in the layer's original shape
    /layers/valence        (n,) predicted valence, when the model carries a valence head
    attributes: model, arch, weights, weights_sha256, preprocessing (JSON), object2brain_version,
                complete (bool), order (layer names in network order)

Attributes as read from stores of other tools (:class:`ActivationStore`):

- ``order``: a JSON list of strings (what object2brain writes), or an HDF5 array of strings (what
  ``h5py`` writes for a Python list of ``str``: variable-length strings), or absent. Absent, the
  layers come in the file's order of ``/layers`` members: their creation order where the group
  tracks it (``h5py``'s ``track_order=True``), else sorted by name (HDF5's default index);
  :attr:`ActivationStore.layer_order` says which. Layers present but not named in ``order`` follow
  the named ones.
- ``complete``: a boolean (``h5py`` writes ``True``/``False`` as an enum read back as
  ``numpy.bool_``) or the integers 0 / 1.

Any other value (``order`` not a list of strings, naming a layer that is not in ``/layers`` or a
name twice; ``complete`` neither boolean nor 0/1) is refused with a one-line :class:`StoreError`
naming the file and the attribute.

A store is written to ``<path>.partial`` and renamed to ``<path>`` once complete. The partial file
records how many rows are fully written (attribute ``n_done``), a CRC-32 of every written row
(dataset ``/_row_digests``, removed when the store is complete) and a fingerprint of the run, so an
interrupted extraction resumes where it stopped.

Faults (:class:`StoreWriter`): a batch is committed by one flush and one ``fsync`` of its rows,
their digests and the raised ``n_done`` together. The three reach the disk in no guaranteed order,
so after a crash of the machine ``n_done`` may cover rows (or digests) that never reached it; that
is why a resumed run trusts no row on ``n_done``'s word but checks every row below it against its
digest (below): a row not written reads back as zeros or as the bytes of this run's earlier write
of it (other runs' partial files are replaced, not reused), a digest not written as 0, and the
CRC-32 of a row of zeros is never 0. (A killed process loses nothing that reached the kernel: the
order of flushes only matters to a crash of the machine.) A write that fails (``No space left on
device``) is caught below HDF5 (:class:`_GuardedFile`): from then on nothing more reaches the disk,
HDF5's own state stays consistent, the file closes cleanly and the run stops with one
:class:`StoreError` line. A resumed run first checks the digests of rows ``0 .. n_done-1`` against
the rows as they read back and continues from the first row that does not match (a partial file
that cannot be read at all is started afresh), so a resumed store equals one written without a
fault. A damaged file read by :class:`ActivationStore` gives one :class:`StoreError` line naming
the file.
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, suppress
from pathlib import Path
from typing import Any, Generic, TypeVar

import h5py
import numpy as np

from object2brain.errors import StoreError, require_unique_ids
from object2brain.io import (
    HDF5_ERRORS,
    STORE_REMEDY,
    damaged_message,
    disk_error_reason,
    hdf5_reading,
)

log = logging.getLogger("object2brain.activations.store")

PARTIAL_SUFFIX = ".partial"
_STRING = h5py.string_dtype(encoding="utf-8")
#: Dataset of a partial store: CRC-32 of each written row over every layer ``(n_stimuli,)``.
DIGESTS = "_row_digests"
#: Bytes read at a time when a resumed run checks the rows already written.
_CHECK_BYTES = 256 << 20
#: Page size of the in-memory writes after a failed write (:class:`_GuardedFile`).
_PAGE = 1 << 16
#: What h5py raises on a file whose bytes are damaged (checksums, heaps, B-trees).
_H5_ERRORS = HDF5_ERRORS


def _readable(path: Path) -> AbstractContextManager[None]:
    """Reads of a store: h5py's errors on damaged bytes -> one :class:`StoreError` line."""
    return hdf5_reading(path, STORE_REMEDY, StoreError)


def partial_path(path: Path) -> Path:
    """The temporary name a file is written under before it is complete."""
    return path.with_name(path.name + PARTIAL_SUFFIX)


class ActivationStore:
    """Read access to a complete activation store.

    Use as a context manager or call :meth:`close`::

        with ActivationStore.open("acts.h5") as store:
            X = store.read("layer4")          # (n_stimuli, 512, 7, 7)
    """

    def __init__(self, handle: h5py.File, path: Path) -> None:
        self._file = handle
        self.path = path
        self._order: list[str] = []
        self._order_source = "names"

    @classmethod
    def open(cls, path: str | Path, *, require_complete: bool = True) -> ActivationStore:
        """Open a store for reading; refuses incomplete stores unless told otherwise."""
        path = Path(path)
        if not path.exists():
            hint = (
                f" (an unfinished run left {partial_path(path).name}; rerun extraction to resume)"
                if partial_path(path).exists()
                else ""
            )
            raise StoreError(f"{path}: activation store not found{hint}")
        try:
            handle = h5py.File(path, "r")
        except OSError as exc:
            raise StoreError(damaged_message(path, exc, STORE_REMEDY)) from None
        store = cls(handle, path)
        try:
            with _readable(path):
                store._validate(require_complete)
        except StoreError:
            with suppress(*_H5_ERRORS):
                handle.close()
            raise
        return store

    def _validate(self, require_complete: bool) -> None:
        if "stimulus_ids" not in self._file or "layers" not in self._file:
            raise StoreError(
                f"{self.path}: not an activation store (needs /stimulus_ids and /layers)"
            )
        complete = _flag(self._file.attrs.get("complete", False), self.path, "complete")
        if require_complete and not complete:
            raise StoreError(f"{self.path}: activation store is incomplete (attribute complete)")
        self._order, self._order_source = _layer_order(self._file, self.path)
        n = len(self._file["stimulus_ids"])
        require_unique_ids(self.stimulus_ids, f"{self.path}: /stimulus_ids", error=StoreError)
        for name in self.layers:
            if self._file["layers"][name].shape[0] != n:
                raise StoreError(
                    f"{self.path}: layer {name!r} has {self._file['layers'][name].shape[0]} rows, "
                    f"expected {n} (one per stimulus id)"
                )

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @property
    def stimulus_ids(self) -> list[str]:
        """Stimulus ids, ``(n_stimuli,)``, in row order."""
        with _readable(self.path):  # one read (iterating the dataset reads row by row)
            raw = self._file["stimulus_ids"][()]
        return [s.decode() if isinstance(s, bytes) else str(s) for s in raw]

    @property
    def layers(self) -> list[str]:
        """Layer names in network order (attribute ``order``; else the file's order, see the
        module docstring)."""
        return list(self._order)

    @property
    def layer_order(self) -> str:
        """Where :attr:`layers`' order comes from: ``attribute order``, ``creation order`` (no
        attribute; the file tracks the creation order of ``/layers`` members) or ``names`` (no
        attribute, no creation order: sorted by name)."""
        return self._order_source

    @property
    def attrs(self) -> dict[str, Any]:
        """File attributes; JSON-valued ones (``preprocessing``, ``order``, ...) decoded."""
        out: dict[str, Any] = {}
        for key, value in self._file.attrs.items():
            if isinstance(value, bytes):
                value = value.decode()
            if isinstance(value, np.generic):
                value = value.item()
            if isinstance(value, str) and value[:1] in "[{":
                with suppress(json.JSONDecodeError):
                    value = json.loads(value)
            out[key] = value
        if "order" in out:
            out["order"] = self.layers
        if "complete" in out:
            out["complete"] = _flag(out["complete"], self.path, "complete")
        return out

    @property
    def projected_layers(self) -> list[str]:
        """Layers stored as a sparse random projection ``(n, dim)`` (``--srp``): their columns
        are projection dimensions, not filters."""
        srp = self.attrs.get("srp")
        return list(srp.get("projected_layers", [])) if isinstance(srp, dict) else []

    def shape(self, layer: str) -> tuple[int, ...]:
        """Shape of one layer, ``(n_stimuli, ...)``."""
        return tuple(self._dataset(layer).shape)

    def read(self, layer: str, ids: Sequence[str] | None = None) -> np.ndarray:
        """Activations of ``layer``, ``(n_stimuli, ...)``; rows in ``ids`` order if given."""
        dataset = self._dataset(layer)
        if ids is None:
            with _readable(self.path):
                return np.asarray(dataset[()])
        rows = self.rows(ids)
        order = np.argsort(rows)
        with _readable(self.path):
            values = dataset[np.asarray(rows)[order]]
        return np.asarray(values)[np.argsort(order)]

    def iter_rows(self, layer: str, batch_size: int = 256) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield ``(row slice, block (rows, ...))`` so a large layer never sits in memory whole."""
        dataset = self._dataset(layer)
        for start in range(0, dataset.shape[0], batch_size):
            rows = slice(start, min(start + batch_size, dataset.shape[0]))
            with _readable(self.path):
                block = np.asarray(dataset[rows])
            yield rows, block

    def rows(self, ids: Sequence[str]) -> list[int]:
        """Row index of each stimulus id; every unknown id is listed in the error."""
        index = {sid: i for i, sid in enumerate(self.stimulus_ids)}
        missing = [sid for sid in ids if sid not in index]
        if missing:
            shown = ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
            raise StoreError(f"{self.path}: {len(missing)} stimulus id(s) not in store: {shown}")
        return [index[sid] for sid in ids]

    def _dataset(self, layer: str) -> h5py.Dataset:
        if layer not in self._file["layers"]:
            raise StoreError(
                f"{self.path}: no layer {layer!r}; layers: {', '.join(self.layers) or 'none'}"
            )
        return self._file["layers"][layer]


def _flag(value: Any, path: Path, name: str) -> bool:
    """A boolean attribute: ``bool``/``numpy.bool_`` or the integers 0 / 1."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer) and int(value) in (0, 1):
        return bool(value)
    raise StoreError(f"{path}: attribute {name!r} must be a boolean, got {_shown(value)}")


def _shown(value: Any) -> str:
    """A short one-line rendering of an attribute value for messages."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _order_names(raw: Any, path: Path) -> list[str]:
    """The names of attribute ``order``: a JSON list of strings or an HDF5 string array."""
    problem = f"{path}: attribute 'order' must be a list of layer names"
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise StoreError(
                f"{problem} (a JSON list or a string array), got {_shown(raw)}"
            ) from None
        if not isinstance(raw, list):
            raise StoreError(f"{problem}, got JSON {_shown(raw)}")
    elif isinstance(raw, np.ndarray) and raw.ndim == 1:
        raw = [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v for v in raw]
    else:
        raise StoreError(f"{problem} (a JSON list or a string array), got {_shown(raw)}")
    odd = [v for v in raw if not isinstance(v, str)]
    if odd:
        raise StoreError(f"{problem}; not a string: {_shown(odd[0])}")
    return [str(v) for v in raw]


def _layer_order(handle: h5py.File, path: Path) -> tuple[list[str], str]:
    """The layers in network order and where the order comes from (:attr:`ActivationStore.
    layer_order`), with attribute ``order`` checked against ``/layers``."""
    group = handle["layers"]
    present = list(group.keys())  # creation order where tracked, else by name
    if "order" not in handle.attrs:
        tracked = bool(group.id.get_create_plist().get_link_creation_order())
        return present, "creation order" if tracked else "names"
    names = _order_names(handle.attrs["order"], path)
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise StoreError(f"{path}: attribute 'order' names {', '.join(duplicated)} twice")
    unknown = [n for n in names if n not in group]
    if unknown:
        raise StoreError(
            f"{path}: attribute 'order' names layer(s) not in /layers: {', '.join(unknown[:10])}"
        )
    return names + [n for n in present if n not in names], "attribute order"


class _GuardedFile(io.FileIO):
    """The partial file as HDF5 writes it (h5py's ``fileobj`` driver), with write faults caught.

    HDF5 cannot recover from a failed write: its metadata cache stays half-flushed, and closing
    the file retries the write, fails again and may crash the process. So the first failed write
    (or ``truncate``, ``fsync``) is recorded in :attr:`failure` and reported to HDF5 as done;
    from then on nothing more reaches the disk: HDF5's writes are kept in memory pages (reads see
    them), so HDF5 stays consistent and closes cleanly, and :class:`StoreWriter` raises after the
    flush that failed. The file on disk then holds what was written before the fault; ``n_done``
    on disk never covers the failed batch.
    """

    failure: OSError | None = None

    def __init__(self, path: Path, mode: str) -> None:
        super().__init__(path, mode)
        self._pages: dict[int, bytearray] = {}
        self._pos = 0
        self._size = 0

    def _fail(self, exc: OSError) -> None:
        if self.failure is None:
            self.failure = exc
            self._pos = super().tell()
            self._size = os.fstat(self.fileno()).st_size

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.failure is None:
            start, done = super().tell(), 0
            try:
                while done < len(view):
                    done += super().write(view[done:]) or 0
                return len(view)
            except OSError as exc:
                self._fail(exc)
                self._pos = start
        self._keep(view)
        return len(view)

    def _keep(self, view: memoryview) -> None:
        """After a failure: ``view`` written at the current position, in memory."""
        start, end = self._pos, self._pos + len(view)
        for page in range(start // _PAGE, (end - 1) // _PAGE + 1) if len(view) else ():
            buffer = self._page(page)
            low, high = max(start, page * _PAGE), min(end, (page + 1) * _PAGE)
            buffer[low - page * _PAGE : high - page * _PAGE] = view[low - start : high - start]
        self._pos, self._size = end, max(self._size, end)

    def _page(self, page: int) -> bytearray:
        if page not in self._pages:
            data = os.pread(self.fileno(), _PAGE, page * _PAGE)
            self._pages[page] = bytearray(data) + bytearray(_PAGE - len(data))
        return self._pages[page]

    def readinto(self, buffer: Any) -> int:
        if self.failure is None:
            return super().readinto(buffer)
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        start = self._pos
        for page in range(start // _PAGE, (start + n - 1) // _PAGE + 1) if n else ():
            low, high = max(start, page * _PAGE), min(start + n, (page + 1) * _PAGE)
            view[low - start : high - start] = self._page(page)[
                low - page * _PAGE : high - page * _PAGE
            ]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        if self.failure is None:
            return super().seek(offset, whence)
        self._pos = {0: 0, 1: self._pos, 2: self._size}[whence] + offset
        return self._pos

    def tell(self) -> int:
        return super().tell() if self.failure is None else self._pos

    def truncate(self, size: int | None = None) -> int:
        if self.failure is None:
            try:
                return super().truncate(size)
            except OSError as exc:
                self._fail(exc)
        self._size = self._pos if size is None else size
        return self._size

    def sync(self) -> None:
        """``fsync``: the rows flushed so far survive a crash of the machine too."""
        if self.failure is None:
            try:
                os.fsync(self.fileno())
            except OSError as exc:
                self._fail(exc)


def row_digests(blocks: Mapping[str, np.ndarray]) -> np.ndarray:
    """CRC-32 of each row over every layer (in name order): ``{layer: (rows, ...)}`` ->
    ``(rows,)`` uint32. A row never written reads back as zeros, whose CRC-32 is not 0 (the fill
    value of the digests), so it never passes as written."""
    names = sorted(blocks)
    n_rows = {blocks[name].shape[0] for name in names}
    if len(n_rows) != 1:
        raise StoreError(f"batch blocks differ in size: {sorted(n_rows)}")
    contiguous = [np.ascontiguousarray(blocks[name]) for name in names]
    out = np.empty(n_rows.pop(), dtype=np.uint32)
    for row in range(len(out)):
        crc = 0
        for block in contiguous:
            crc = zlib.crc32(block[row : row + 1].data, crc)
        out[row] = crc
    return out


#: Largest chunk of a layer dataset, bytes (before the batch alignment of :func:`chunk_rows`).
CHUNK_BYTES = 4 << 20


def chunk_rows(
    n_rows: int, row_shape: tuple[int, ...], dtype: np.dtype[Any], batch_rows: int | None = None
) -> int:
    """Rows per chunk of a layer dataset ``(n_rows, *row_shape)``: as many as fit in
    :data:`CHUNK_BYTES` (at least one, at most ``n_rows``); with ``batch_rows`` (the rows written
    at a time) at most ``batch_rows`` and a divisor of it, so that every chunk lies inside one
    batch: HDF5 then writes each chunk once, whole, and never reads a half-written chunk back to
    add the next batch's rows (re-checking and recomputing its Fletcher-32 each time).

    resnet18 at 32 images per batch: ``maxpool`` (802,816 bytes a row) 4 rows, ``layer2`` 8,
    ``layer3`` 16, ``layer4`` 32, ``fc`` 32 (without ``batch_rows``: 5, 10, 20, 41, 1,048).
    """
    row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize)
    rows = int(max(1, min(n_rows, CHUNK_BYTES // row_bytes)))
    if batch_rows is None or batch_rows < 1:
        return rows
    rows = min(rows, batch_rows)
    while batch_rows % rows:
        rows -= 1
    return rows


def verified_rows(temp: Path, n_done: int) -> int:
    """How many leading rows of the partial file ``temp`` read back as written: the first row
    whose CRC-32 differs from ``/_row_digests`` (or ``n_done``). Reads ``_CHECK_BYTES`` at a time.

    Raises:
        OSError, RuntimeError, KeyError, ValueError: the file cannot be read (h5py's errors).
    """
    with h5py.File(temp, "r") as handle:
        digests = np.asarray(handle[DIGESTS][:n_done])
        layers = {name: handle["layers"][name] for name in handle["layers"]}
        if n_done and not layers:
            return 0
        row_bytes = sum(
            max(1, int(np.prod(d.shape[1:], dtype=np.int64))) * d.dtype.itemsize
            for d in layers.values()
        )
        step = max(1, _CHECK_BYTES // max(1, row_bytes))
        for start in range(0, n_done, step):
            stop = min(n_done, start + step)
            found = row_digests({name: d[start:stop] for name, d in layers.items()})
            bad = np.nonzero(found != digests[start:stop])[0]
            if bad.size:
                return start + int(bad[0])
    return n_done


class StoreWriter:
    """Writes an activation store batch by batch under its temporary name.

    The partial file keeps ``n_done`` (rows written: raised in the one flush and ``fsync`` that
    commits a batch's rows and digests), ``/_row_digests`` and ``fingerprint``; :meth:`resume`
    checks the rows below ``n_done`` against their digests and continues from the first that
    does not match. A failed write raises
    :class:`StoreError` (one line: the file and ``No space left on device``) and leaves the
    batches before it resumable (module docstring).
    """

    def __init__(self, path: Path, handle: h5py.File, raw: _GuardedFile) -> None:
        self.path = path
        self._file = handle
        self._raw = raw

    @classmethod
    def create(
        cls,
        path: Path,
        stimulus_ids: Sequence[str],
        attrs: Mapping[str, Any],
        fingerprint: str,
    ) -> StoreWriter:
        """Start a new partial store (any stale partial file is replaced)."""
        temp = partial_path(path)
        try:
            raw = _GuardedFile(temp, "w+")
            handle = h5py.File(raw, "w")
        except OSError as exc:
            raise StoreError(f"{path}: cannot create {temp.name} ({exc})") from None
        writer = cls(path, handle, raw)
        handle.create_dataset(
            "stimulus_ids", data=np.asarray(stimulus_ids, dtype=object), dtype=_STRING
        )
        handle.create_dataset(DIGESTS, shape=(len(stimulus_ids),), dtype=np.uint32)
        handle.create_group("layers")
        for key, value in attrs.items():
            handle.attrs[key] = _attr_value(value)
        handle.attrs["complete"] = False
        handle.attrs["n_done"] = 0
        handle.attrs["fingerprint"] = fingerprint
        try:
            writer._commit()
        except StoreError:
            writer.close()
            temp.unlink(missing_ok=True)  # holds no row yet
            raise
        return writer

    @classmethod
    def resume(cls, path: Path, fingerprint: str) -> StoreWriter | None:
        """Reopen ``<path>.partial`` if it belongs to the same run, else ``None``; rows that do
        not read back as written (a write that failed, a killed run) are written again."""
        temp = partial_path(path)
        if not temp.exists():
            return None
        try:
            with h5py.File(temp, "r") as handle:
                if handle.attrs.get("fingerprint") != fingerprint or DIGESTS not in handle:
                    return None
                n_done = int(handle.attrs["n_done"])
            good = verified_rows(temp, n_done)
        except _H5_ERRORS as exc:
            log.warning("%s", damaged_message(temp, exc, "starting the extraction afresh"))
            return None  # killed mid-write beyond repair: start again
        raw = _GuardedFile(temp, "r+")
        writer = cls(path, h5py.File(raw, "r+"), raw)
        if good < n_done:
            log.warning(
                "%s: rows %d-%d do not read back as written (an interrupted or failed write); "
                "computing them again", temp, good, n_done - 1,
            )  # fmt: skip
            writer._file.attrs["n_done"] = good
            writer._commit()
        return writer

    @property
    def n_done(self) -> int:
        return int(self._file.attrs["n_done"])

    @property
    def layer_names(self) -> list[str]:
        return list(self._file["layers"].keys())

    def ensure_layer(
        self,
        name: str,
        n_rows: int,
        row_shape: tuple[int, ...],
        dtype: np.dtype[Any],
        batch_rows: int | None = None,
    ) -> None:
        """Create dataset ``/layers/<name>`` of shape ``(n_rows, *row_shape)`` unless it exists,
        chunked by :func:`chunk_rows` (``batch_rows``: the rows :meth:`write_rows` gets at a
        time)."""
        group = self._file["layers"]
        if name in group:
            existing = group[name]
            if existing.shape[1:] != row_shape or existing.dtype != dtype:
                raise StoreError(
                    f"{self.path}: layer {name!r} changed shape/dtype between runs "
                    f"({existing.shape[1:]}/{existing.dtype} vs {row_shape}/{dtype})"
                )
            return
        rows_per_chunk = chunk_rows(n_rows, row_shape, dtype, batch_rows)
        group.create_dataset(  # Fletcher-32 per chunk: damaged bytes are an error, not values
            name,
            shape=(n_rows, *row_shape),
            dtype=dtype,
            chunks=(rows_per_chunk, *row_shape),
            fletcher32=True,
        )

    def write_rows(self, start: int, blocks: Mapping[str, np.ndarray]) -> None:
        """Write one batch ``{layer: (batch, ...)}`` at rows ``start:start+batch`` and commit it:
        rows, digests and ``n_done`` raised to ``start+batch`` in one flush and ``fsync`` (module
        docstring: why one is enough)."""
        digests = row_digests(blocks)
        stop = start + len(digests)
        layers = self._file["layers"]
        for name, block in blocks.items():
            layers[name][start:stop] = block
        self._file[DIGESTS][start:stop] = digests
        self._file.attrs["n_done"] = stop
        self._commit()

    def _commit(self) -> None:
        """Flush HDF5's buffers to the file and ``fsync`` it; a failed write -> StoreError."""
        self._file.flush()
        self._raw.sync()
        self._check()

    def _check(self) -> None:
        failure = self._raw.failure
        if failure is not None:
            reason = disk_error_reason(failure) or failure.strerror or str(failure)
            raise StoreError(
                f"{partial_path(self.path)}: cannot write: {reason}; the batches written before "
                "are kept: free space and rerun the same command to resume"
            )

    def set_attr(self, key: str, value: Any) -> None:
        self._file.attrs[key] = _attr_value(value)

    def finish(self) -> Path:
        """Mark the store complete, close it and move it to its final name."""
        self._file.attrs["complete"] = True
        del self._file.attrs["n_done"]
        del self._file[DIGESTS]
        self._commit()
        self.close()
        self._check()
        os.replace(partial_path(self.path), self.path)
        return self.path

    def close(self) -> None:
        """Close the file; never raises for a failed write (see :class:`_GuardedFile`)."""
        if self._file.id.valid:
            self._file.close()
        self._raw.close()


Item = TypeVar("Item")
_DONE = object()


class BackgroundWriter(Generic[Item]):
    """Runs ``write(item)`` on a thread of its own for every item ``put``, in order.

    The caller (e.g. the extraction loop) computes batch ``b + 1`` on the device while batch ``b``
    is copied to the host and written; h5py is only touched from this thread while it runs. At
    most ``depth`` items wait (``put`` blocks beyond that, bounding memory). The first error of
    ``write`` stops the writing (later items are dropped) and is raised in the caller's thread by
    the next ``put`` or by ``close``.
    """

    def __init__(self, write: Callable[[Item], None], *, depth: int = 2) -> None:
        self._write = write
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._raised = False  # the error was raised in the caller's thread (not logged again)
        self._thread = threading.Thread(target=self._drain, name="o2b-writer", daemon=True)
        self._thread.start()

    def _get(self) -> Any:
        # polls: a KeyboardInterrupt in the caller between the queue's append and its notify
        # would otherwise leave this thread asleep with an item queued, and close() hung
        while True:
            with suppress(queue.Empty):
                return self._queue.get(timeout=0.1)

    def _drain(self) -> None:
        while (item := self._get()) is not _DONE:
            if self._error is None:
                try:
                    self._write(item)
                except BaseException as exc:  # handed to the caller's thread
                    self._error = exc

    def put(self, item: Item) -> None:
        """Queue ``item``; raises the writer's error if one occurred."""
        self._raise()
        self._queue.put(item)

    def close(self, *, raise_error: bool = True) -> None:
        """Wait until every queued item is written (or dropped after an error); then raise the
        writer's error unless ``raise_error`` is false (the caller is failing already)."""
        if self._thread.is_alive():
            self._queue.put(_DONE)
            self._thread.join()
        if raise_error:
            self._raise()
        elif self._error is not None and not self._raised:  # not lost behind the caller's
            log.error("the writer thread had failed too: %s: %s", type(self._error).__name__,
                      self._error)  # fmt: skip

    def _raise(self) -> None:
        if self._error is not None:
            self._raised = True
            raise self._error


def _attr_value(value: Any) -> Any:
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, sort_keys=isinstance(value, dict))
    if value is None:
        return "none"
    return value
