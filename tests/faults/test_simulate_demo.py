"""Issue 17: ``simulate`` and ``demo`` write as the other stages do: under the output lock, into a
temporary folder swapped in whole. A full disk (a real tmpfs), a SIGKILL mid-write or a second run
leaves the old set or the new one, never a mix, and no temporary behind."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from faults.fault_helpers import cli_env, error_lines, folder_files, run_cli, tmpfs
from object2brain import demo
from object2brain.errors import StoreError

N = 12


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete activation store of one layer."""
    path = tmp_path_factory.mktemp("sim_inputs") / "acts.h5"
    rng = np.random.default_rng(5)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("stimulus_ids", data=np.asarray([f"img{i:02d}" for i in range(N)],
                              dtype=object), dtype=h5py.string_dtype())  # fmt: skip
        handle.create_group("layers").create_dataset(
            "conv", data=rng.normal(size=(N, 4, 3, 3)).astype(np.float32)
        )
        for key in ("model", "arch", "weights", "weights_sha256"):
            handle.attrs[key] = "tiny"
        handle.attrs["preprocessing"] = "{}"
        handle.attrs["order"] = json.dumps(["conv"])
        handle.attrs["complete"] = True
    return path


def fill(disk: Path, leave: int) -> Path:
    """Fill the filesystem at ``disk`` up to ``leave`` free bytes (unbuffered writes: nothing
    is left to flush when the disk is full)."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError:
            pass
    with filler.open("r+b") as handle:
        handle.truncate(max(0, filler.stat().st_size - leave))
    return filler


def sim_args(store: Path, out: Path, seed: int) -> list[object]:
    return ["simulate", "--activations", store, "--out", out, "--roi",
            "EVC=layer:conv;voxels=400", "--roi", "VAL=valence;voxels=400", "--subjects", "6",
            "--seed", seed, "--quiet"]  # fmt: skip


def data_files(folder: Path) -> dict[str, bytes]:
    """The simulated data (the manifest's time stamp aside)."""
    return {k: v for k, v in folder_files(folder).items() if k != "manifest.json"}


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


@pytest.fixture(scope="module")
def new_set(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim_reference") / "sim"
    done = run_cli(sim_args(store, out, seed=1))
    assert done.returncode == 0, done.stderr
    return out


def test_full_disk_during_simulate_keeps_the_old_set(
    store: Path, new_set: Path, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "disk", 4 << 20) as disk:
        out = disk / "sim"
        assert run_cli(sim_args(store, out, seed=0)).returncode == 0
        old = folder_files(out)
        filler = fill(disk, leave=8 << 10)
        failed = run_cli(sim_args(store, out, seed=1))
        assert failed.returncode == 2, failed.stderr
        lines = error_lines(failed.stderr)
        assert len(lines) == 1 and "No space left on device" in lines[0], failed.stderr
        assert str(out) in lines[0]
        assert folder_files(out) == old  # the old set, whole
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "sim"]  # nothing stray
        filler.unlink()
        done = run_cli(sim_args(store, out, seed=1))
        assert done.returncode == 0, done.stderr
        assert data_files(out) == data_files(new_set)  # as a run that never failed
        assert sorted(p.name for p in disk.iterdir()) == ["sim"]


KILL_AFTER_PATTERNS = """
import importlib, os, signal, sys
from object2brain.cli import main
sim = importlib.import_module("object2brain.simulate")  # the package exports a function of it
def killing(path, payload):
    os.kill(os.getpid(), signal.SIGKILL)  # patterns, manifest and ratings written, not truth.json
sim.write_json = killing
main(sys.argv[1:])
"""


def test_sigkill_mid_write_leaves_the_old_set_and_the_rerun_cleans(
    store: Path, new_set: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sim"
    assert run_cli(sim_args(store, out, seed=0)).returncode == 0
    old = folder_files(out)
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_PATTERNS, *map(str, sim_args(store, out, seed=1))],
        capture_output=True, text=True, env=cli_env(), check=False,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert folder_files(out) == old  # before: the new patterns were written over the old set
    assert any(".stage-" in p.name for p in tmp_path.iterdir())  # the killed run's folder
    done = run_cli(sim_args(store, out, seed=1))
    assert done.returncode == 0, done.stderr
    assert data_files(out) == data_files(new_set)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim"]  # temporaries cleaned
    assert hidden(out) == []


def test_a_second_simulate_is_refused_and_touches_nothing(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "sim"
    assert run_cli(sim_args(store, out, seed=0)).returncode == 0
    old = folder_files(out)
    lock = tmp_path / ".sim.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a run in progress holds it
        refused = run_cli(sim_args(store, out, seed=1))
    finally:
        os.close(fd)
    assert refused.returncode == 2
    lines = error_lines(refused.stderr)
    assert len(lines) == 1 and "is writing it" in lines[0], refused.stderr
    assert folder_files(out) == old


def test_simulate_result_paths_name_the_final_folder(store: Path, tmp_path: Path) -> None:
    from object2brain.simulate import simulate

    result = simulate(store, ["EVC=layer:conv;voxels=10"], out=tmp_path / "sim", n_subjects=2)
    for path in (result.patterns, result.brain_manifest, result.ratings, result.truth):
        assert path.parent == tmp_path / "sim" and path.is_file()
    manifest = json.loads((tmp_path / "sim" / "manifest.json").read_text())
    assert all(".stage-" not in str(entry) for entry in manifest["outputs"])


def test_demo_stimuli_change_as_a_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    size = demo.SIZES["quick"]
    folder = tmp_path / "stimuli"
    demo.build_demo_stimuli(folder, size, seed=0)
    old = folder_files(folder)
    calls = []
    original = demo._write_demo_stimuli

    def failing(target: Path, chosen: demo.DemoSize, seed: int) -> None:
        original(target, chosen, seed)
        calls.append(target)
        raise OSError(28, "No space left on device")  # the disk filled at the last file

    monkeypatch.setattr(demo, "_write_demo_stimuli", failing)
    with pytest.raises(StoreError, match="No space left on device"):
        demo.build_demo_stimuli(folder, size, seed=1)
    assert calls and folder_files(folder) == old  # the old images and tables, whole
    assert [p.name for p in tmp_path.iterdir()] == ["stimuli"]
    monkeypatch.undo()
    stimuli = demo.build_demo_stimuli(folder, size, seed=1)
    assert folder_files(folder) != old
    assert all(Path(p).parent == folder for p in stimuli.paths)


def test_a_second_demo_in_the_same_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    lock = tmp_path / ".demo.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused = run_cli(["demo", "--out", out, "--size", "quick", "--quiet"], timeout=120)
    finally:
        os.close(fd)
    assert refused.returncode == 2
    lines = error_lines(refused.stderr)
    assert len(lines) == 1 and "is writing it" in lines[0], refused.stderr
    assert not out.exists()
