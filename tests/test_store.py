"""Activation stores brought in from other tools: what is accepted and what is refused."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from object2brain.activations.store import ActivationStore, BackgroundWriter
from object2brain.errors import StoreError


def _foreign_store(
    path: Path, ids: list[str], rows: int | None = None, complete: bool = True
) -> Path:
    """A store as another tool would write it: ids, one layer, the ``complete`` attribute."""
    with h5py.File(path, "w") as handle:
        handle["stimulus_ids"] = np.array(ids, dtype=h5py.string_dtype())
        handle.create_group("layers")["conv"] = np.arange(
            (rows or len(ids)) * 3, dtype=np.float32
        ).reshape(-1, 3)
        handle.attrs["complete"] = complete
    return path


def test_foreign_store_reads_by_id(tmp_path: Path) -> None:
    path = _foreign_store(tmp_path / "a.h5", ["s1", "s2", "s3"])
    with ActivationStore.open(path) as store:
        assert store.rows(["s3", "s1"]) == [2, 0]
        np.testing.assert_array_equal(store.read("conv", ["s2"]), [[3, 4, 5]])


def test_duplicate_stimulus_ids_are_refused(tmp_path: Path) -> None:
    """A duplicated id would silently resolve to one of its rows."""
    path = _foreign_store(tmp_path / "dup.h5", ["a", "b", "c", "b", "a"])
    with pytest.raises(
        StoreError, match=r"dup.h5: /stimulus_ids: duplicate stimulus id\(s\): a, b"
    ):
        ActivationStore.open(path)


@pytest.mark.parametrize(
    ("rows", "complete", "message"),
    [(4, True, "layer 'conv' has 4 rows, expected 3"), (None, False, "incomplete")],
)
def test_inconsistent_or_incomplete_store(
    tmp_path: Path, rows: int | None, complete: bool, message: str
) -> None:
    path = _foreign_store(tmp_path / "bad.h5", ["a", "b", "c"], rows=rows, complete=complete)
    with pytest.raises(StoreError, match=message):
        ActivationStore.open(path)


def test_not_a_store(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "other.h5", "w") as handle:
        handle["data"] = np.zeros(3)
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStore.open(tmp_path / "other.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(StoreError, match="not a readable HDF5 file"):
        ActivationStore.open(tmp_path / "text.h5")


def test_background_writer_keeps_order_and_bounds_the_queue() -> None:
    import threading

    release = threading.Event()
    written: list[int] = []

    def write(item: int) -> None:
        release.wait(timeout=10)
        written.append(item)

    writer: BackgroundWriter[int] = BackgroundWriter(write, depth=2)
    for item in range(3):  # one being written, two waiting: the queue is full
        writer.put(item)
    blocked = threading.Thread(target=writer.put, args=(3,))
    blocked.start()
    blocked.join(timeout=0.2)
    assert blocked.is_alive(), "put must block while `depth` items wait"
    release.set()
    blocked.join(timeout=10)
    writer.close()
    assert written == [0, 1, 2, 3]


def test_background_writer_error_reaches_the_caller_and_stops_writing() -> None:
    written: list[int] = []

    def write(item: int) -> None:
        if item == 1:
            raise StoreError(f"bad item {item}")
        written.append(item)

    writer: BackgroundWriter[int] = BackgroundWriter(write)

    def put_all() -> None:
        for item in range(50):
            writer.put(item)

    with pytest.raises(StoreError, match="bad item 1"):  # the error surfaces at a later put ...
        put_all()
    with pytest.raises(StoreError, match="bad item 1"):  # ... and again at close
        writer.close()
    assert written == [0]  # nothing after the failed item
    quiet: BackgroundWriter[int] = BackgroundWriter(write)
    quiet.put(1)
    quiet.close(raise_error=False)  # the caller is failing already: no second error
