"""Helpers of the fault tests: a real small filesystem (tmpfs), CLI runs in child processes, and
comparisons of stores and result folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")
CLI = "import sys; from object2brain.cli import main; main(sys.argv[1:])"


def cli_env() -> dict[str, str]:
    env = os.environ.copy()
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(args: Sequence[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``object2brain <args>`` in a child process (stderr and the exit status as a user sees)."""
    return subprocess.run(
        [sys.executable, "-c", CLI, *map(str, args)],
        capture_output=True, text=True, env=cli_env(), timeout=timeout, check=False,
    )  # fmt: skip


def start_cli(args: Sequence[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CLI, *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
    )  # fmt: skip


def error_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` (tqdm and warnings are off with ``--quiet``)."""
    return [line for line in stderr.splitlines() if line.strip()]


@contextmanager
def tmpfs(folder: Path, size: int) -> Iterator[Path]:
    """A real filesystem of ``size`` bytes mounted at ``folder`` (a tmpfs); skips the test where
    mounting is not permitted (not root, a container without CAP_SYS_ADMIN)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("a real full filesystem needs a tmpfs mount, which needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def resize(folder: Path, size: int) -> None:
    """Free space on the tmpfs at ``folder``: grow it to ``size`` bytes."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)


def store_content(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every dataset and attribute of an HDF5 file (attributes as text)."""
    datasets: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as handle:
        handle.visititems(
            lambda name, node: (
                datasets.__setitem__(name, node[()]) if isinstance(node, h5py.Dataset) else None
            )
        )
        attrs = {key: str(value) for key, value in handle.attrs.items()}
    return datasets, attrs


def assert_same_store(a: Path, b: Path) -> None:
    data_a, attrs_a = store_content(a)
    data_b, attrs_b = store_content(b)
    assert data_a.keys() == data_b.keys()
    for key in data_a:
        np.testing.assert_array_equal(data_a[key], data_b[key], err_msg=key)
    assert attrs_a == attrs_b


def folder_files(folder: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``folder``."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def result_tables(folder: Path) -> dict[str, pd.DataFrame]:
    return {p.stem: pd.read_csv(p) for p in sorted(folder.glob("*.csv"))}


def manifest_outputs(folder: Path) -> list[str]:
    return list(json.loads((folder / "manifest.json").read_text())["outputs"])


def stimulus_table(photo_dir: Path, folder: Path, copies: int) -> Path:
    """A stimulus table of ``copies`` x the test photos (absolute paths)."""
    photos = sorted(photo_dir.glob("*.jpg"))
    rows = [
        {"stimulus_id": f"c{copy}_{p.stem}", "path": str(p)}
        for copy in range(copies)
        for p in photos
    ]
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / "stimuli.csv", index=False)
    return folder / "stimuli.csv"
