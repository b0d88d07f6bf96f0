"""Shared fixtures of the RSA tests: a small activation store written with h5py directly."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest


def write_store(
    path: Path,
    layers: dict[str, np.ndarray],
    ids: list[str],
    model: str = "tiny",
) -> Path:
    """Write an activation store in the layout of DESIGN.md section 3."""
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "stimulus_ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype()
        )
        group = f.create_group("layers")
        for name, values in layers.items():
            group.create_dataset(name, data=values)
        f.attrs["model"] = model
        f.attrs["arch"] = model
        f.attrs["weights"] = "none"
        f.attrs["weights_sha256"] = "none"
        f.attrs["preprocessing"] = json.dumps({})
        f.attrs["object2brain_version"] = "0.1.0"
        f.attrs["order"] = json.dumps(list(layers))
        f.attrs["complete"] = True
    return path


@pytest.fixture
def activation_store(tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    rng = np.random.default_rng(0)
    n = 10
    ids = [f"img{i:02d}" for i in range(n)]
    layers = {
        "conv1": rng.normal(size=(n, 4, 3, 3)).astype(np.float32),
        "fc": rng.normal(size=(n, 16)).astype(np.float32),
        "valence": rng.normal(size=(n,)).astype(np.float32),
    }
    path = write_store(tmp_path / "acts.h5", layers, ids)
    return path, list(layers), ids
