"""Writing result files safely: output-folder checks and atomic writes (temporary name, then
rename), shared by every stage."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from object2brain.errors import StoreError


def check_output_folder(folder: str | Path) -> None:
    """Raise :class:`StoreError` unless ``folder`` is, or can be created as, a writable folder.

    Creates nothing: called before any work so that a run does not fail at its very end.
    """
    folder = Path(folder).expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "exists" if existing == folder else f"cannot be created: {existing} exists"
        raise StoreError(f"{folder}: the output folder {where} and is not a folder")
    _probe_writable(existing, folder)


def check_writable(path: Path) -> None:
    """Raise :class:`StoreError` unless a file can be created at ``path``."""
    parent = path.expanduser().resolve().parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise StoreError(f"{path}: output folder {parent} {what}")
    if path.is_dir():
        raise StoreError(f"{path}: is a folder, expected a file name")
    _probe_writable(parent, path)


def _probe_writable(folder: Path, named: Path) -> None:
    try:  # a real probe: permission bits say nothing for root or read-only mounts
        handle, probe = tempfile.mkstemp(prefix=".o2b-probe-", dir=folder)
    except OSError as exc:
        reason = exc.strerror
        raise StoreError(f"{named}: output folder {folder} is not writable ({reason})") from None
    os.close(handle)
    os.unlink(probe)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    check_writable(path)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temp = Path(temp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp, 0o666 & ~umask)  # mkstemp creates 0600; give results the usual permissions
    try:
        yield temp
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write a JSON file atomically."""
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    return Path(path)


def write_table(frame: pd.DataFrame, out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Write a result table as ``<out_dir>/<name>.csv`` and ``.parquet``, each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, parquet_path = out / f"{name}.csv", out / f"{name}.parquet"
    with atomic_path(csv_path) as temp:
        frame.to_csv(temp, index=False)
    with atomic_path(parquet_path) as temp:
        frame.to_parquet(temp, index=False)
    return csv_path, parquet_path
