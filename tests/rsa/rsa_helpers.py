"""Helpers of the RSA tests: write an activation store with h5py; an executor that runs chunks
out of order."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np


def write_store(
    path: Path,
    layers: dict[str, np.ndarray],
    ids: list[str],
    model: str = "tiny",
) -> Path:
    """Write an activation store: ``/stimulus_ids``, ``/layers/<name>`` ``(n, ...)`` and the
    attributes ``model``, ``arch``, ``weights``, ``order`` (JSON list of layers), ``complete``."""
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


class ReverseExecutor:
    """Runs the chunks last to first (results in chunk order, as the protocol asks)."""

    name = "reverse"
    workers = 2

    def __init__(self) -> None:
        self.calls = 0

    def map_chunks(
        self, fn: Callable[..., Any], chunks: Sequence[Any], *, stage: str, shared: Any = None
    ) -> list[Any]:
        self.calls += len(chunks)
        done = {i: fn(shared, chunks[i]) for i in reversed(range(len(chunks)))}
        return [done[i] for i in range(len(chunks))]
