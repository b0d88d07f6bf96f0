"""Issue 17, items 6 and 15: damaged HDF5 files give one line naming the file and what to do;
the Ctrl-C message says which commands resume; ``extract`` creates its folder (see
``test_full_disk_extract``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from faults.fault_helpers import error_lines, run_cli
from object2brain.activations.store import ActivationStore
from object2brain.cli import interrupted_message
from object2brain.data.brain import load_brain
from object2brain.errors import DataError, StoreError

N = 8


def damage(path: Path, fraction: float = 0.5, length: int = 4096) -> None:
    """Overwrite ``length`` bytes in the middle of ``path`` (a bad sector, a torn copy)."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * fraction)
    data[start : start + length] = b"\xa5" * min(length, len(data) - start)
    path.write_bytes(bytes(data))


def write_store(path: Path) -> Path:
    ids = [f"img{i}" for i in range(N)]
    with h5py.File(path, "w") as handle:
        handle.create_dataset("stimulus_ids", data=np.asarray(ids, dtype=object),
                              dtype=h5py.string_dtype())  # fmt: skip
        layers = handle.create_group("layers")
        rng = np.random.default_rng(0)
        for name in ("a", "b", "c"):
            layers.create_dataset(name, data=rng.normal(size=(N, 64, 32)).astype(np.float32),
                                  chunks=(1, 64, 32))  # fmt: skip
        handle.attrs["order"] = json.dumps(["a", "b", "c"])
        handle.attrs["complete"] = True
    return path


def read_all_of_store(path: Path) -> None:
    with ActivationStore.open(path) as store:
        for layer in store.layers:
            store.read(layer)
            list(store.iter_rows(layer))


def outcomes(
    write: Callable[[Path], Path], read: Callable[[Path], object], folder: Path
) -> list[str]:
    """Damage 2 KiB at each of 64 places of a fresh file and read it whole: ``ok`` (the bytes
    were raw values, which HDF5 does not checksum) or the one-line message. Anything else (a
    traceback of h5py) fails the test."""
    found = []
    for step in range(64):
        path = write(folder / f"damaged{step}.h5")
        damage(path, step / 64, length=2048)
        try:
            read(path)
        except (StoreError, DataError) as exc:
            message = str(exc)
            assert str(path) in message and "\n" not in message
            assert "damaged or truncated" in message
            found.append(message)
        else:
            found.append("ok")
    return found


def test_damaged_store_is_one_line_naming_the_file(tmp_path: Path) -> None:
    found = outcomes(write_store, read_all_of_store, tmp_path)
    assert "delete it and rerun extract" in found[0]  # the superblock
    assert any(m != "ok" for m in found[1:])  # metadata mid-file (heaps, B-tree nodes)


def test_damaged_store_on_the_command_line(tmp_path: Path) -> None:
    path = write_store(tmp_path / "acts.h5")
    damage(path, 0.0)
    ratings = tmp_path / "ratings.csv"
    ratings.write_text("subject,stimulus_id,valence\n" + "".join(
        f"s1,img{i},{i}\n" for i in range(N)
    ))  # fmt: skip
    done = run_cli(["rsa", "--activations", path, "--ratings", ratings, "--out",
                    tmp_path / "res", "--quiet"])  # fmt: skip
    assert done.returncode == 2
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and str(path) in lines[0] and "damaged" in lines[0], done.stderr
    assert not (tmp_path / "res").exists()


def write_patterns(path: Path) -> Path:
    ids = [f"img{i}" for i in range(N)]
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as handle:
        handle.attrs["kind"] = "patterns"
        handle.create_dataset("stimulus_ids", data=np.asarray(ids, dtype=object),
                              dtype=h5py.string_dtype())  # fmt: skip
        for subject in ("s1", "s2"):
            group = handle.create_group(subject)
            for roi in ("v1", "ofc"):
                group.create_dataset(roi, data=rng.normal(size=(N, 2000)), chunks=(1, 2000))
    return path


def test_damaged_brain_file_is_one_line_naming_the_file(tmp_path: Path) -> None:
    found = outcomes(write_patterns, load_brain, tmp_path)
    assert "replace it with an intact copy" in found[0]
    assert any(m != "ok" for m in found[1:])


def test_interrupt_message_says_which_commands_resume() -> None:
    assert "resume" in interrupted_message(["extract", "--out", "x.h5"])
    assert "resume" in interrupted_message(["--debug", "run", "study.yaml"])
    for command in ("rsa", "lesion"):
        message = interrupted_message([command, "--out", "res"])
        assert "does not resume" in message and "start again" in message
    assert "resume" not in interrupted_message(["simulate"])
