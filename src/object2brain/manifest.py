"""Run manifests: what was run, on what, with which versions, so any result can be reproduced."""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from object2brain._version import __version__

_PACKAGES = ("torch", "torchvision", "numpy", "scipy", "pandas", "h5py", "pillow")


def package_versions() -> dict[str, str]:
    """Versions of Python, object2brain and the numerical packages it relies on."""
    versions = {"python": sys.version.split()[0], "object2brain": __version__}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: SHA-256 of the files hashed so far in this process, by (absolute path, size, mtime).
_HASHES: dict[tuple[str, int, int], str] = {}


def cached_file_sha256(path: str | Path) -> str:
    """:func:`file_sha256`, read once per process while the file's size and mtime are unchanged
    (images, brain data and checkpoints are fingerprinted by several stages of one run)."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


def output_list(files: Iterable[str | Path], folder: str | Path) -> list[str]:
    """Files written, for a manifest's ``outputs``: relative to ``folder`` (the manifest's own
    folder) where they lie under it, so the record survives moving the folder."""
    root = Path(folder).resolve()
    listed = []
    for file in files:
        path = Path(file).resolve()
        listed.append(str(path.relative_to(root)) if path.is_relative_to(root) else str(path))
    return sorted(listed)


def build_manifest(
    command: str,
    config: dict[str, Any],
    *,
    seeds: dict[str, int] | None = None,
    inputs: dict[str, str] | None = None,
    outputs: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a ``manifest.json`` payload.

    Args:
        command: the subcommand or API function that ran.
        config: every option of the run (JSON-serialisable).
        seeds: named random seeds.
        inputs: input name -> SHA-256 (files) or fingerprint.
        outputs: files written.
        extra: anything else worth keeping (timings, device).
    """
    return {
        "command": command,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": config,
        "seeds": seeds or {},
        "inputs": inputs or {},
        "outputs": outputs or [],
        "versions": package_versions(),
        "platform": platform.platform(),
        **(extra or {}),
    }
