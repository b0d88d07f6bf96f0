"""The NaN/inf check of a batch before it is stored (``activations.extract._check_storable``)."""

from __future__ import annotations

import re

import numpy as np
import torch

from object2brain.activations.extract import _check_storable, _peak, _to_host
from object2brain.errors import StoreError


def test_float32_batch_check_names_the_same_rows_as_the_row_check() -> None:
    """float32 storage checks each layer's largest |value| over the batch and looks for the rows
    only when it is not finite: the error names exactly the layer and ids the per-row check
    names, for NaN, +inf and -inf planted in random rows; clean batches pass."""
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(6)]
    for trial in range(60):
        blocks = {
            "a": torch.from_numpy(rng.standard_normal((6, 3, 4, 4)).astype(np.float32)),
            "b": torch.from_numpy(rng.standard_normal((6, 5)).astype(np.float32)),
        }
        if trial % 4:  # three trials in four hold bad values
            layer = ["a", "b"][int(rng.integers(2))]
            for row in rng.choice(6, size=int(rng.integers(1, 4)), replace=False):
                flat = blocks[layer][int(row)].view(-1)
                flat[int(rng.integers(flat.numel()))] = [np.nan, np.inf, -np.inf][trial % 3]
        fast = _to_host(blocks, np.dtype(np.float32), 0, ids)
        assert fast.peaks.shape == (2, 1)
        rows = torch.stack([_peak(b) for b in blocks.values()])
        messages = []
        for peaks, given in ((fast.peaks, fast.blocks), (rows, None)):
            try:
                _check_storable(["a", "b"], peaks, np.dtype(np.float32), ids, given)
                messages.append("")
            except StoreError as exc:
                messages.append(str(exc))
        assert messages[0] == messages[1], trial
        assert bool(messages[0]) == bool(trial % 4)
        if messages[0]:
            assert re.match(
                r"layer '[ab]': NaN or infinite activations for stimulus id\(s\) s", messages[0]
            )
