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


# --- attributes of stores from other tools: order, complete -----------------------------------


def _store_with(
    path: Path, layers: list[str], *, track_order: bool = False, **attrs: object
) -> Path:
    """A foreign store with layers created in the order given and the attributes given."""
    with h5py.File(path, "w") as handle:
        handle["stimulus_ids"] = np.array(["s1", "s2", "s3"], dtype=h5py.string_dtype())
        group = handle.create_group("layers", track_order=track_order)
        for k, name in enumerate(layers):
            group[name] = np.full((3, 2), k, dtype=np.float32)
        handle.attrs["complete"] = True
        for key, value in attrs.items():
            handle.attrs[key] = value
    return path


def test_order_as_json_string_or_hdf5_string_array(tmp_path: Path) -> None:
    as_json = _store_with(tmp_path / "j.h5", ["b", "a", "c"], order='["c", "a", "b"]')
    as_array = _store_with(tmp_path / "s.h5", ["b", "a", "c"], order=["c", "a", "b"])
    with h5py.File(as_array, "r") as handle:  # h5py writes a list of str as a string array
        assert isinstance(handle.attrs["order"], np.ndarray)
    for path in (as_json, as_array):
        with ActivationStore.open(path) as store:
            assert store.layers == ["c", "a", "b"]
            assert store.layer_order == "attribute order"
            assert store.attrs["order"] == ["c", "a", "b"]
    # layers present but not named follow the named ones
    partial = _store_with(tmp_path / "p.h5", ["b", "a", "c"], order=["c"])
    with ActivationStore.open(partial) as store:
        assert store.layers == ["c", "a", "b"]


def test_absent_order_is_the_files_layer_order(tmp_path: Path) -> None:
    tracked = _store_with(tmp_path / "t.h5", ["conv2", "conv10", "fc"], track_order=True)
    with ActivationStore.open(tracked) as store:
        assert store.layers == ["conv2", "conv10", "fc"]
        assert store.layer_order == "creation order"
    untracked = _store_with(tmp_path / "u.h5", ["fc", "conv2", "conv10"])
    with ActivationStore.open(untracked) as store:
        assert store.layers == ["conv10", "conv2", "fc"]  # sorted by name
        assert store.layer_order == "names"


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"order": "conv, fc"}, r"attribute 'order' must be a list of layer names"),
        ({"order": '{"a": 1}'}, r"attribute 'order' must be a list of layer names, got JSON"),
        ({"order": "[1, 2]"}, r"attribute 'order' must be a list of layer names; not a string"),
        ({"order": 3}, r"attribute 'order' must be a list of layer names"),
        ({"order": np.zeros((2, 2))}, r"attribute 'order' must be a list of layer names"),
        ({"order": ["a", "nosuch"]}, r"attribute 'order' names layer\(s\) not in /layers: nosuch"),
        ({"order": ["a", "b", "a"]}, r"attribute 'order' names a twice"),
        ({"complete": "yes"}, r"attribute 'complete' must be a boolean, got 'yes'"),
        ({"complete": 2}, r"attribute 'complete' must be a boolean"),
        ({"complete": 1.0}, r"attribute 'complete' must be a boolean"),
    ],
)
def test_malformed_attributes_are_one_line_errors(
    tmp_path: Path, attrs: dict[str, object], message: str
) -> None:
    path = _store_with(tmp_path / "bad.h5", ["a", "b"], **attrs)
    with pytest.raises(StoreError, match=message) as caught:
        ActivationStore.open(path)
    text = str(caught.value)
    assert text.startswith(str(path)) and "\n" not in text


def test_complete_as_integer_is_accepted(tmp_path: Path) -> None:
    with ActivationStore.open(_store_with(tmp_path / "i.h5", ["a"], complete=1)) as store:
        assert store.attrs["complete"] is True
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore.open(_store_with(tmp_path / "z.h5", ["a"], complete=np.int8(0)))


def test_store_with_string_array_order_runs_through_rsa(tmp_path: Path) -> None:
    """A store written by h5py with ``order`` as a string array: ``o2b.rsa`` reads it end to
    end, layers in that order (it used to end in a JSONDecodeError traceback)."""
    import pandas as pd

    import object2brain as o2b

    rng = np.random.default_rng(0)
    ids = [f"img{i:02d}" for i in range(12)]
    store = tmp_path / "foreign.h5"
    with h5py.File(store, "w") as handle:
        handle["stimulus_ids"] = np.array(ids, dtype=h5py.string_dtype())
        group = handle.create_group("layers")
        for name in ("fc", "conv1", "conv2"):
            group[name] = rng.normal(size=(12, 5)).astype(np.float32)
        handle.attrs["model"] = "othertool"
        handle.attrs["order"] = ["conv1", "conv2", "fc"]
        handle.attrs["complete"] = True
    ratings = tmp_path / "ratings.csv"
    pd.DataFrame(
        [{"subject": f"r{s}", "stimulus_id": sid, "valence": float(rng.normal())}
         for s in range(3) for sid in ids]
    ).to_csv(ratings, index=False)  # fmt: skip
    result = o2b.rsa([store], ratings=ratings, out=tmp_path / "rsa", n_perm=9, n_boot=0,
                     device="cpu", progress=False, figures=False)  # fmt: skip
    rows = result.alignment.drop_duplicates("layer").sort_values("layer_index")
    assert rows["layer"].tolist() == ["conv1", "conv2", "fc"]
    assert (tmp_path / "rsa" / "alignment.csv").is_file()


def test_chunk_rows_is_the_largest_divisor_of_the_batch_that_fits() -> None:
    """Brute force: the largest ``r`` dividing the batch with ``r`` rows within CHUNK_BYTES and
    the dataset (1 when even one row is larger)."""
    from object2brain.activations.store import CHUNK_BYTES, chunk_rows

    f32 = np.dtype(np.float32)
    for row_floats in (1, 250, 1000, 25_088, 50_176, 200_704, 2_000_000):
        row_bytes = row_floats * 4
        for n_rows in (1, 7, 8, 100, 10_000):
            for batch in (1, 2, 7, 12, 30, 32, 64):
                got = chunk_rows(n_rows, (row_floats,), f32, batch)
                fits = [
                    r
                    for r in range(1, batch + 1)
                    if batch % r == 0 and r <= n_rows and r * row_bytes <= CHUNK_BYTES
                ]
                assert got == max(fits, default=1), (row_floats, n_rows, batch)
            # without a batch: as many rows as fit, within the dataset
            expected = max(1, min(n_rows, CHUNK_BYTES // row_bytes))
            assert chunk_rows(n_rows, (row_floats,), f32) == expected


def test_batch_aligned_chunks_are_written_without_reading_them_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With chunks inside one batch, HDF5 writes each chunk whole; with chunks straddling two
    batches (the previous layout) it reads the half-written chunk back to add the next rows. The
    stored values are the same either way."""
    from object2brain.activations import store as S

    read = [0]
    readinto = S._GuardedFile.readinto

    def counted(self: S._GuardedFile, buffer: object) -> int:
        n = readinto(self, buffer)
        read[0] += n
        return n

    monkeypatch.setattr(S._GuardedFile, "readinto", counted)
    batch, n = 8, 40
    rng = np.random.default_rng(0)
    values = rng.standard_normal((n, 3, 100, 100)).astype(np.float32)  # 120 KB a row
    bytes_read = {}
    for aligned in (True, False):
        out = tmp_path / f"aligned_{aligned}.h5"
        writer = S.StoreWriter.create(out, [f"s{i}" for i in range(n)], {}, "fp")
        writer.ensure_layer("conv", n, (3, 100, 100), np.dtype(np.float32),
                            batch if aligned else None)  # fmt: skip
        read[0] = 0
        for start in range(0, n, batch):
            writer.write_rows(start, {"conv": values[start : start + batch]})
        bytes_read[aligned] = read[0]
        path = writer.finish()
        with h5py.File(path, "r") as handle:
            chunk = handle["layers/conv"].chunks[0]
            assert (batch % chunk == 0) if aligned else (chunk == 34)  # 4 MB / 120 KB
            np.testing.assert_array_equal(handle["layers/conv"][()], values)
    chunk_bytes = 34 * values[0].nbytes
    assert bytes_read[True] < 0.1 * chunk_bytes  # metadata only
    assert bytes_read[False] > chunk_bytes  # the straddling chunk read back
