"""Issue 17, item 6 (remaining paths): every HDF5 read goes through one helper that turns the
HDF5 library's errors into one line naming the file; values written by object2brain carry a
Fletcher-32 checksum per chunk, so bytes overwritten inside them are an error, not data."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from object2brain.activations.store import ActivationStore
from object2brain.cli import main
from object2brain.errors import DataError, StoreError
from object2brain.io import hdf5_reading, open_hdf5
from object2brain.rsa.rdm import rdm_from_store

N = 10


def write_store(path: Path, *, fletcher32: bool) -> int:
    """A complete store of one layer; returns the byte offset of the layer's first chunk."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("stimulus_ids", data=np.asarray([f"i{k}" for k in range(N)],
                              dtype=object), dtype=h5py.string_dtype())  # fmt: skip
        layer = handle.create_group("layers").create_dataset(
            "fc", data=rng.normal(size=(N, 64)).astype(np.float32), chunks=(N, 64),
            fletcher32=fletcher32,
        )  # fmt: skip
        handle.attrs["order"] = json.dumps(["fc"])
        handle.attrs["complete"] = True
        offset = int(layer.id.get_chunk_info(0).byte_offset)
    return offset


def overwrite(path: Path, offset: int, length: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[offset + 100 : offset + 100 + length] = b"\xa5" * length
    path.write_bytes(bytes(data))


def test_open_hdf5_names_the_file_and_the_remedy(tmp_path: Path) -> None:
    path = tmp_path / "x.h5"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError) as info, open_hdf5(path, "export it again"):
        pass
    message = str(info.value)
    assert message.startswith(f"{path}: not a readable HDF5 file") and "export it again" in message
    assert "\n" not in message


def test_hdf5_reading_passes_the_projects_errors_and_converts_the_librarys(
    tmp_path: Path,
) -> None:
    with pytest.raises(StoreError, match="mine"), hdf5_reading(tmp_path, "r", StoreError):
        raise StoreError("mine")
    damaged = hdf5_reading(tmp_path / "s.h5", "r", StoreError)
    with pytest.raises(StoreError, match="damaged or truncated"), damaged:
        raise OSError("Can't read data (data error detected by Fletcher32 checksum)")


def test_damaged_values_of_a_checksummed_store_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "acts.h5"
    overwrite(path, write_store(path, fletcher32=True))
    with ActivationStore.open(path) as store:
        with pytest.raises(StoreError, match=r"acts\.h5: not a readable HDF5 file, damaged"):
            store.read("fc")
        # rsa streams a layer's columns itself: the same one line
        with pytest.raises(StoreError, match=r"acts\.h5: not a readable HDF5 file, damaged"):
            rdm_from_store(store, "fc", device="cpu")


def test_without_checksums_damaged_values_read_as_values(tmp_path: Path) -> None:
    """The documented limit: files written without checksums (older stores, other tools)."""
    path = tmp_path / "acts.h5"
    overwrite(path, write_store(path, fletcher32=False))
    with ActivationStore.open(path) as store:
        assert np.isfinite(store.read("fc")).any()


def test_rsa_on_a_damaged_store_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "acts.h5"
    overwrite(path, write_store(path, fletcher32=True))
    ratings = tmp_path / "ratings.csv"
    rng = np.random.default_rng(1)
    ratings.write_text("subject,stimulus_id,valence\n" + "".join(
        f"s{s},i{k},{rng.normal():.3f}\n" for s in range(2) for k in range(N)))  # fmt: skip
    with pytest.raises(SystemExit) as info:
        main(["rsa", "--activations", str(path), "--ratings", str(ratings), "--out",
              str(tmp_path / "res"), "--n-perm", "5", "--n-boot", "2", "--device", "cpu",
              "--quiet"])  # fmt: skip
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and str(path) in lines[0] and "extract" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts.h5", "ratings.csv"]


def test_stores_are_written_with_checksums(tmp_path: Path) -> None:
    from object2brain.activations.store import StoreWriter, partial_path

    path = tmp_path / "acts.h5"
    writer = StoreWriter.create(path, [f"i{k}" for k in range(N)], {}, "f")
    writer.ensure_layer("fc", N, (8,), np.dtype(np.float32))
    writer.write_rows(0, {"fc": np.ones((N, 8), dtype=np.float32)})
    with h5py.File(partial_path(path), "r") as handle:
        assert handle["layers/fc"].fletcher32
    writer.close()
