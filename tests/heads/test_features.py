"""The penultimate features of head training live in an activation store, reused on a rerun."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch
from heads_helpers import tiny_model

from object2brain.activations.store import ActivationStore
from object2brain.api.train_head import train_head
from object2brain.data.stimuli import load_stimuli
from object2brain.heads.features import (
    FEATURE_LAYER,
    BackboneFeatures,
    feature_fingerprint,
)
from object2brain.heads.io import load_head

COMMON = {
    "epochs": 4,
    "lr": 1e-2,
    "batch_size": 8,
    "seed": 2,
    "num_workers": 0,
    "progress": False,
    "figures": False,
}


def _head(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    linear, _ = load_head(path)
    return linear.weight.detach(), linear.bias.detach()


def test_features_are_an_activation_store_reused_on_rerun(
    small_table: Path, tmp_path: Path
) -> None:
    model = tiny_model()
    out = tmp_path / "heads"
    first = train_head(model, stimuli=small_table, out=out, **COMMON)  # type: ignore[arg-type]
    head = first.models["tinynet"]
    assert head.features_path == out / "tinynet" / "features.h5" and not head.features_reused
    stimuli = load_stimuli(small_table)
    with ActivationStore.open(head.features_path) as store:
        assert store.layers == [FEATURE_LAYER]
        assert store.stimulus_ids == stimuli.ids
        assert store.attrs["fingerprint"] == feature_fingerprint(model, stimuli)
        assert store.attrs["output_layer"] == "4" and store.attrs["arch"] == "tinynet"
        stored = store.read(FEATURE_LAYER)
    assert stored.shape == (35, 8) and stored.dtype == np.float32
    # the stored values are the backbone's input of the output layer, bit for bit
    source = BackboneFeatures(model, stimuli, device=torch.device("cpu"))
    direct = torch.cat([f for _, f in source.batches(np.arange(35), 8)]).numpy()
    np.testing.assert_array_equal(stored, direct)

    again = train_head(model, stimuli=small_table, out=out, **COMMON)  # type: ignore[arg-type]
    assert again.models["tinynet"].features_reused
    for a, b in zip(_head(head.head_path), _head(again.models["tinynet"].head_path), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_stale_feature_file_is_recomputed(small_table: Path, tmp_path: Path) -> None:
    """A file of another format (the former cache layout) or of another backbone is replaced."""
    out = tmp_path / "heads"
    reference = train_head(tiny_model(), stimuli=small_table, out=tmp_path / "ref", **COMMON)  # type: ignore[arg-type]
    (out / "tinynet").mkdir(parents=True)
    with h5py.File(out / "tinynet" / "features.h5", "w") as handle:
        handle.create_dataset("features", data=np.zeros((35, 8), np.float32))
    result = train_head(tiny_model(), stimuli=small_table, out=out, **COMMON)  # type: ignore[arg-type]
    assert not result.models["tinynet"].features_reused
    expected = _head(reference.models["tinynet"].head_path)
    for a, b in zip(expected, _head(result.models["tinynet"].head_path), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = train_head(tiny_model(seed=1), stimuli=small_table, out=out, **COMMON)  # type: ignore[arg-type]
    assert not other.models["tinynet"].features_reused
