"""The train-head feature pass on a local Ray cluster: the feature store equals a local run's
(ids, attributes, fingerprint, values bit for bit on the CPU) with 1 and 2 workers, and the
head trained from it is the local head."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from object2brain.activations.store import ActivationStore
from object2brain.api.train_head import train_head
from object2brain.data.stimuli import load_stimuli
from object2brain.executors.features import features_on_ray
from object2brain.executors.pool import PoolSettings
from object2brain.heads.features import FEATURES_NAME, cached_features
from object2brain.heads.io import load_head
from object2brain.models.zoo import load_model

LEVELS = (-3, -2, -1, 0, 1, 2, 3)


@pytest.fixture(scope="module")
def rated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """14 images (2 per valence level), the colour coding the level, plus noise."""
    folder = tmp_path_factory.mktemp("rated")
    rng = np.random.default_rng(0)
    rows = []
    for level in LEVELS:
        for k in range(2):
            sid = f"v{level:+d}_{k}"
            colour = np.array([30 + 200 * (level + 3) / 6, 40, 230 - 200 * (level + 3) / 6])
            pixels = np.clip(colour + rng.normal(0, 12, (48, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{sid}.png")
            rows.append({"stimulus_id": sid, "path": f"{sid}.png", "valence": level})
    pd.DataFrame(rows).to_csv(folder / "stimuli.csv", index=False)
    return folder / "stimuli.csv"


def _model() -> Any:
    return load_model("resnet18", "none", seed=3)


def _store(path: Path) -> tuple[list[str], dict[str, Any], np.ndarray]:
    with ActivationStore.open(path) as store:
        return list(store.stimulus_ids), dict(store.attrs), store.read("penultimate")


@pytest.mark.parametrize("workers", [1, 2])
def test_feature_store_on_ray_equals_local(
    ray_cluster: ModuleType, rated: Path, tmp_path: Path, workers: int
) -> None:
    stimuli = load_stimuli(rated)
    cpu = torch.device("cpu")
    local = tmp_path / "local" / FEATURES_NAME
    cached_features(_model(), stimuli, local, device=cpu, batch_size=4, num_workers=0)
    on_ray = tmp_path / "ray" / FEATURES_NAME
    settings = PoolSettings(workers=workers)
    assert features_on_ray(_model(), stimuli, on_ray, device=cpu, batch_size=4, num_workers=0,
                           settings=settings, shard_size=4)  # 4 shards of one batch  # fmt: skip
    ids, attrs, values = _store(on_ray)
    ids_l, attrs_l, values_l = _store(local)
    assert ids == ids_l == list(stimuli.ids)
    assert attrs == attrs_l  # fingerprint, model, weights, output layer, preprocessing ...
    assert values.dtype == values_l.dtype and values.tobytes() == values_l.tobytes()
    assert not on_ray.with_name(on_ray.name + ".shards").exists()
    # a matching store is reused: nothing computed
    assert not features_on_ray(_model(), stimuli, on_ray, device=cpu, batch_size=4,
                               num_workers=0, settings=settings)  # fmt: skip


def test_train_head_on_ray_trains_the_local_head(
    ray_cluster: ModuleType, rated: Path, tmp_path: Path
) -> None:
    common: dict[str, Any] = {"stimuli": rated, "epochs": 3, "batch_size": 4, "num_workers": 0,
                              "seed": 3, "progress": False, "figures": False}  # fmt: skip
    local = train_head(_model(), out=tmp_path / "local", **common)
    on_ray = train_head(_model(), out=tmp_path / "ray", executor="ray", **common)
    name = next(iter(local.models))
    assert not on_ray.models[name].features_reused  # computed on Ray, not found
    a, _ = load_head(local.models[name].head_path)
    b, _ = load_head(on_ray.models[name].head_path)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert local.models[name].metrics["test"] == on_ray.models[name].metrics["test"]
