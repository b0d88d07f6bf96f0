"""The decoded-image cache on the other image paths: the train-head feature pass and lesion's
propagation read cached pixels (a second pass decodes no JPEG) and give the uncached values."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import object2brain as o2b
from object2brain.heads.features import BackboneFeatures
from object2brain.heads.train import prepare_features
from object2brain.lesion.propagate import forward_with_mask
from object2brain.models.image_cache import ImageCache
from object2brain.models.zoo import load_model
from object2brain.options import LesionOptions, Runtime, TrainHeadOptions

inputs_module = importlib.import_module("object2brain.models.inputs")
CPU = torch.device("cpu")


class PillowCounter:
    """Counts the images the Pillow path decodes (its one loading function, patched)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        load_image = inputs_module.load_image

        def counted(*args: object, **kwargs: object) -> Image.Image:
            self.calls += 1
            return load_image(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(inputs_module, "load_image", counted)


def _features(source: BackboneFeatures, n: int) -> np.ndarray:
    rows = np.arange(n)[::-1].copy()  # not in file order: the cache is keyed by content
    parts = {}
    for idx, block in source.batches(rows, 3):
        parts.update(zip(idx.tolist(), block.numpy(), strict=True))
    return np.stack([parts[i] for i in range(n)])


def test_head_feature_pass_reads_the_cache(
    stimulus_table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_model("resnet18", "none", seed=0)
    stimuli = o2b.load_stimuli(stimulus_table)
    n = len(stimuli)
    plain = _features(BackboneFeatures(model, stimuli, device=CPU), n)
    cache = ImageCache(tmp_path / "cache", model.preprocessing)
    first = _features(BackboneFeatures(model, stimuli, device=CPU, cache=cache), n)
    assert len(cache) == len({ImageCache.key(p, "pil") for p in stimuli.paths})  # by content
    counter = PillowCounter(monkeypatch)
    again = ImageCache(tmp_path / "cache", model.preprocessing)  # a new run, the same folder
    second = _features(BackboneFeatures(model, stimuli, device=CPU, cache=again), n)
    assert counter.calls == 0
    np.testing.assert_array_equal(first, plain)
    np.testing.assert_array_equal(second, plain)
    # augmented training images are random crops: never cached, always decoded
    augmented = BackboneFeatures(model, stimuli, device=CPU, augment=True, cache=again)
    _features(augmented, n)
    assert counter.calls == n


def test_prepare_features_uses_the_image_cache_option(
    stimulus_table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_model("resnet18", "none", seed=0)
    stimuli = o2b.load_stimuli(stimulus_table)
    options = TrainHeadOptions(image_cache=tmp_path / "cache", batch_size=4, num_workers=0)
    runtime = Runtime(device="cpu", progress=False)
    first = prepare_features("m", model, stimuli, options, runtime, folder=tmp_path / "a")
    counter = PillowCounter(monkeypatch)
    # another head folder: the feature store misses, the decoded-image cache hits
    second = prepare_features("m", model, stimuli, options, runtime, folder=tmp_path / "b")
    assert counter.calls == 0 and not second.reused
    rows = np.arange(len(stimuli))
    a = torch.cat([f for _, f in first.sources.train.batches(rows, 4)])
    b = torch.cat([f for _, f in second.sources.train.batches(rows, 4)])
    assert torch.equal(a, b)


def test_propagation_reads_the_cache(
    stimulus_table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_model("resnet18", "none", seed=3)
    stimuli = o2b.load_stimuli(stimulus_table)
    mask = np.ones(128)
    mask[::3] = 0
    plain = forward_with_mask(model, stimuli, "layer2", mask, ["layer3", "fc"], batch_size=4)
    cache = ImageCache(tmp_path / "cache", model.preprocessing)
    forward_with_mask(model, stimuli, "layer2", mask, ["layer3"], batch_size=4, cache=cache)
    counter = PillowCounter(monkeypatch)
    again = ImageCache(tmp_path / "cache", model.preprocessing)
    cached = forward_with_mask(model, stimuli, "layer2", mask, ["layer3", "fc"], batch_size=4,
                               cache=again)  # fmt: skip
    assert counter.calls == 0
    for name in ("layer3", "fc"):
        np.testing.assert_array_equal(cached[name], plain[name])
    assert LesionOptions(image_cache=tmp_path / "cache").image_cache == tmp_path / "cache"
