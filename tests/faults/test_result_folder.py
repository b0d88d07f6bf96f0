"""Issue 17, item 5: a result folder changes as a whole. A full disk (a real tmpfs) or a SIGKILL
during ``rsa``'s write step leaves the old set, a rerun gives the new one, no temporary is left."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from faults.fault_helpers import (
    cli_env,
    error_lines,
    folder_files,
    result_tables,
    run_cli,
    tmpfs,
)

N = 12


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An activation store of two layers and a ratings table of three subjects."""
    folder = tmp_path_factory.mktemp("rsa_inputs")
    rng = np.random.default_rng(3)
    ids = [f"img{i:02d}" for i in range(N)]
    store = folder / "acts.h5"
    with h5py.File(store, "w") as handle:
        handle.create_dataset("stimulus_ids", data=np.asarray(ids, dtype=object),
                              dtype=h5py.string_dtype())  # fmt: skip
        layers = handle.create_group("layers")
        layers.create_dataset("conv", data=rng.normal(size=(N, 4, 3, 3)).astype(np.float32))
        layers.create_dataset("fc", data=rng.normal(size=(N, 8)).astype(np.float32))
        for key in ("model", "arch", "weights", "weights_sha256"):
            handle.attrs[key] = "tiny"
        handle.attrs["preprocessing"] = "{}"
        handle.attrs["order"] = json.dumps(["conv", "fc"])
        handle.attrs["complete"] = True
    ratings = folder / "ratings.csv"
    pd.DataFrame(
        [
            {"subject": f"s{s}", "stimulus_id": sid, "valence": float(rng.normal())}
            for s in range(3)
            for sid in ids
        ]
    ).to_csv(ratings, index=False)
    return {"store": store, "ratings": ratings}


def rsa_args(inputs: dict[str, Path], out: Path, seed: int) -> list[str]:
    return [
        "rsa", "--activations", inputs["store"], "--ratings", inputs["ratings"], "--out", out,
        "--n-perm", "19", "--n-boot", "5", "--device", "cpu", "--seed", seed, "--quiet",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def new_set(inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The result folder of seed 1 written without a fault."""
    out = tmp_path_factory.mktemp("reference") / "res"
    done = run_cli(rsa_args(inputs, out, seed=1))
    assert done.returncode == 0, done.stderr
    return out


def strays(folder: Path) -> list[str]:
    """Hidden siblings and temporary files left next to or inside a result folder."""
    return sorted(
        p.name for p in [*folder.iterdir(), *folder.rglob(".*")] if p.name.startswith(".")
    )


def fill(disk: Path, leave: int) -> Path:
    """Fill the filesystem at ``disk`` up to ``leave`` free bytes."""
    filler = disk / "filler"
    with filler.open("wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    with filler.open("r+b") as handle:
        handle.truncate(max(0, filler.stat().st_size - leave))
    return filler


def test_full_disk_during_rsa_keeps_the_old_set(
    inputs: dict[str, Path], new_set: Path, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "disk", 8 << 20) as disk:
        out = disk / "res"
        assert run_cli(rsa_args(inputs, out, seed=0)).returncode == 0
        old = folder_files(out)
        filler = fill(disk, leave=16 << 10)
        failed = run_cli(rsa_args(inputs, out, seed=1))
        assert failed.returncode == 2, failed.stderr
        lines = error_lines(failed.stderr)
        assert len(lines) == 1 and "No space left on device" in lines[0], failed.stderr
        assert folder_files(out) == old  # the old set, whole
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "res"]  # nothing stray
        filler.unlink()  # space freed
        done = run_cli(rsa_args(inputs, out, seed=1))
        assert done.returncode == 0, done.stderr
        assert_same_results(out, new_set)
        assert sorted(p.name for p in disk.iterdir()) == ["res"]


def assert_same_results(out: Path, reference: Path) -> None:
    """Same files (the manifest's time stamp aside) and equal tables."""
    assert sorted(folder_files(out)) == sorted(folder_files(reference))
    tables, expected = result_tables(out), result_tables(reference)
    assert tables.keys() == expected.keys()
    for name in tables:
        pd.testing.assert_frame_equal(tables[name], expected[name])
    assert (
        json.loads((out / "manifest.json").read_text())["outputs"]
        == json.loads((reference / "manifest.json").read_text())["outputs"]
    )
    assert strays(out) == []


KILL_AFTER_TWO_TABLES = """
import os, signal, sys
import object2brain.io as api  # every table is written through io.write_table
from object2brain.cli import main
original, calls = api.write_table, []
def killing(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
api.write_table = killing
main(sys.argv[1:])
"""

KILL_BETWEEN_RENAMES = """
import os, signal, sys
import object2brain.io as io
from object2brain.cli import main
io._exchange = lambda a, b: False  # a system without renameat2: two renames
rename = os.rename
def killing(a, b):
    rename(a, b)
    if ".old-" in str(b):
        os.kill(os.getpid(), signal.SIGKILL)
io.os.rename = killing
main(sys.argv[1:])
"""


@pytest.mark.parametrize("script", [KILL_AFTER_TWO_TABLES, KILL_BETWEEN_RENAMES])
def test_sigkill_during_the_write_step_keeps_the_old_set(
    inputs: dict[str, Path], new_set: Path, tmp_path: Path, script: str
) -> None:
    out = tmp_path / "res"
    assert run_cli(rsa_args(inputs, out, seed=0)).returncode == 0
    old = folder_files(out)
    killed = subprocess.run(
        [sys.executable, "-c", script, *map(str, rsa_args(inputs, out, seed=1))],
        capture_output=True, text=True, env=cli_env(), check=False,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if out.exists():  # killed before the swap: the old set, whole
        assert folder_files(out) == old
    else:  # killed between the two renames: the old set waits next to it
        assert any(".old-" in p.name for p in tmp_path.iterdir())
    done = run_cli(rsa_args(inputs, out, seed=1))
    assert done.returncode == 0, done.stderr
    assert_same_results(out, new_set)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]  # temporaries cleaned


def test_files_of_the_old_set_not_written_again_are_dropped_others_kept(
    inputs: dict[str, Path], new_set: Path, tmp_path: Path
) -> None:
    out = tmp_path / "res"
    assert run_cli(rsa_args(inputs, out, seed=0)).returncode == 0
    listed = json.loads((out / "manifest.json").read_text())
    listed["outputs"].append("condition_contrast.csv")  # as if the old run had written it
    (out / "manifest.json").write_text(json.dumps(listed))
    (out / "condition_contrast.csv").write_text("stale\n")
    (out / "notes.txt").write_text("mine\n")  # not an output of rsa: kept
    (out / ".alignment.csv.x1.tmp").write_text("")  # a temporary of a killed old version
    done = run_cli(rsa_args(inputs, out, seed=1))
    assert done.returncode == 0, done.stderr
    assert not (out / "condition_contrast.csv").exists()
    assert (out / "notes.txt").read_text() == "mine\n"
    assert not (out / ".alignment.csv.x1.tmp").exists()
