"""Issue 17, items 1-3: a full disk during ``extract`` (a real tmpfs), a resume after it, and two
runs into the same ``--out`` (real processes)."""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from faults.fault_helpers import (
    assert_same_store,
    error_lines,
    resize,
    run_cli,
    start_cli,
    stimulus_table,
    tmpfs,
)
from object2brain.activations.store import DIGESTS, partial_path

LAYERS = "features.0,features.3,classifier.6"


def extract_args(table: Path, out: Path, batch_size: int = 4) -> list[str]:
    return [
        "extract", "--model", "alexnet", "--weights", "none", "--stimuli", table,
        "--out", out, "--layers", LAYERS, "--batch-size", batch_size, "--workers", "0",
        "--quiet",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A stimulus table of 24 images and the store of a run that never failed."""
    tmp_path = tmp_path_factory.mktemp("reference")
    table = stimulus_table(photo_dir, tmp_path / "table", copies=3)
    done = run_cli(extract_args(table, tmp_path / "ref" / "acts.h5"))
    assert done.returncode == 0, done.stderr
    return table, tmp_path / "ref" / "acts.h5"


def test_full_disk_stops_with_one_line_and_resumes_to_an_identical_store(
    reference: tuple[Path, Path], tmp_path: Path
) -> None:
    table, ref = reference
    size = ref.stat().st_size
    with tmpfs(tmp_path / "disk", size // 2) as disk:
        out = disk / "sub" / "acts.h5"  # the parent folder is created by extract
        failed = run_cli(extract_args(table, out))
        assert failed.returncode == 2, failed.stderr
        lines = error_lines(failed.stderr)
        assert len(lines) == 1 and "No space left on device" in lines[0], failed.stderr
        assert str(partial_path(out)) in lines[0]
        assert not out.exists()
        with h5py.File(partial_path(out), "r") as handle:
            n_done = int(handle.attrs["n_done"])
            written = {name: handle["layers"][name][:n_done] for name in handle["layers"]}
        assert 0 < n_done < 24  # progress only for batches written whole
        with h5py.File(ref, "r") as handle:  # and those rows are the right ones
            for name, rows in written.items():
                np.testing.assert_array_equal(rows, handle["layers"][name][:n_done])

        resize(disk, 4 * size)  # space freed
        done = run_cli(extract_args(table, out))
        assert done.returncode == 0, done.stderr
        assert out.is_file() and not partial_path(out).exists()
        assert_same_store(out, ref)
        assert sorted(p.name for p in out.parent.iterdir()) == ["acts.h5", "acts.manifest.json"]


def test_resume_recomputes_rows_recorded_but_not_written(
    reference: tuple[Path, Path], tmp_path: Path
) -> None:
    """The state a full disk used to leave: ``n_done`` says 8 rows, but they read back as zeros
    (lost chunks). The rerun finds them by their digests and writes them again."""
    table, ref = reference
    out = tmp_path / "resumed" / "acts.h5"
    with tmpfs(tmp_path / "disk", ref.stat().st_size // 2) as disk:
        failed = run_cli(extract_args(table, disk / "acts.h5"))
        assert failed.returncode == 2
        out.parent.mkdir()
        partial_path(out).write_bytes(partial_path(disk / "acts.h5").read_bytes())
    with h5py.File(partial_path(out), "r+") as handle:
        n_done = int(handle.attrs["n_done"])
        assert n_done >= 4
        first = sorted(handle["layers"])[0]
        handle["layers"][first][: n_done // 2] = 0  # rows said done, read back as zeros
    done = run_cli(extract_args(table, out))
    assert done.returncode == 0, done.stderr
    assert_same_store(out, ref)


def test_partial_store_records_digests_and_final_store_drops_them(
    reference: tuple[Path, Path],
) -> None:
    with h5py.File(reference[1], "r") as handle:
        assert DIGESTS not in handle and "n_done" not in handle.attrs
        assert bool(handle.attrs["complete"])


def test_second_run_into_the_same_out_is_refused_and_touches_nothing(
    photo_dir: Path, tmp_path: Path
) -> None:
    # enough images that the first run still holds its lock while the second one starts (the
    # second needs a few seconds to import); with 40 images it could finish first on an idle
    # machine, and 240 did once the CPU lanes came
    table = stimulus_table(photo_dir, tmp_path / "table", copies=80)
    out = tmp_path / "acts.h5"
    first = start_cli(extract_args(table, out, batch_size=1))
    deadline = time.time() + 120
    while not partial_path(out).exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.02)
    assert first.poll() is None, "the first run ended before the second could start"
    before = partial_path(out).stat().st_ino
    second = run_cli(extract_args(table, out, batch_size=1))
    assert second.returncode == 2, second.stderr
    lines = error_lines(second.stderr)
    assert len(lines) == 1 and "is writing it" in lines[0] and str(first.pid) in lines[0]
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert partial_path(out).exists() is False and out.is_file()
    assert before != 0
    reference = tmp_path / "ref.h5"
    assert run_cli(extract_args(table, reference, batch_size=1)).returncode == 0
    assert_same_store(out, reference)  # complete and readable: the second run touched nothing


def test_extract_creates_the_parent_folder(photo_dir: Path, tmp_path: Path) -> None:
    table = stimulus_table(photo_dir, tmp_path / "table", copies=1)
    out = tmp_path / "new" / "deeper" / "acts.h5"
    done = run_cli([*extract_args(table, out)[:-5], "--layers", "classifier.6", "--quiet"])
    assert done.returncode == 0, done.stderr
    assert out.is_file()
