"""Shared fixtures of the RSA tests: a small activation store written with h5py directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rsa_helpers import write_store


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
