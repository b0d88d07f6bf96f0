"""Backbone features of a valence head: the input of the network's output layer.

A valence head replaces the output layer of a frozen backbone, so it is trained on that layer's
input, the penultimate features ``(n, in_features)`` float32 of every image (eval transform).
They come from one of two :class:`FeatureSource` objects:

- :class:`BackboneFeatures`: computed on demand, images -> backbone -> input of the output layer
  (every batch of every epoch when training without the cache, e.g. with augmentation);
- :class:`CachedFeatures`: all of them in memory, computed once.

The cache is an ordinary activation store (:mod:`object2brain.activations.store`), by default
``<out>/<model>/features.h5``::

    /stimulus_ids            (n,) UTF-8 strings, in the rated set's order
    /layers/penultimate      (n, in_features) float32: the input of the replaced output layer
    attributes: model, arch, weights, weights_sha256, preprocessing (JSON), object2brain_version,
                output_layer (whose input the features are), order, complete, fingerprint

so any reader of stores (``ActivationStore.open``, ``rsa``) reads it too. ``fingerprint`` is a
SHA-256 over the architecture, the weights' SHA-256, the output layer, the preprocessing and the
images (:meth:`~object2brain.data.stimuli.StimulusSet.fingerprint`); a rerun with the same
fingerprint and stimulus ids reuses the stored features (bit for bit the values computed).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from object2brain.errors import ModelError, StoreError
from object2brain.models.image_cache import ImageCache
from object2brain.models.inputs import model_inputs, pixel_dataset, remember_pixels

if TYPE_CHECKING:
    from object2brain.data.stimuli import StimulusSet
    from object2brain.models.zoo import LoadedModel

log = logging.getLogger("object2brain.heads")

#: File name of the feature store in a model's output folder.
FEATURES_NAME = "features.h5"
#: Layer of the feature store that holds the penultimate features.
FEATURE_LAYER = "penultimate"
#: Version of what the fingerprint covers (2: the features live in an activation store).
_CACHE_FORMAT = 2


class FeatureSource(Protocol):
    """Anything that yields the penultimate features of stimulus rows, batch by batch."""

    def batches(
        self, rows: np.ndarray, batch_size: int
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield ``(batch rows (b,), features (b, in_features))`` in the order of ``rows``."""
        ...


@dataclass(frozen=True)
class FeatureSources:
    """Where a head's features come from.

    Attributes:
        train: features of the training rows (through the augmentations, if any).
        eval: features for validation and prediction (eval transform); may be ``train``.
        in_features: feature dimension.
    """

    train: FeatureSource
    eval: FeatureSource
    in_features: int


class BackboneFeatures:
    """Features computed on demand: images -> frozen backbone -> input of the output layer.

    A forward pre-hook on ``loaded.output_layer`` captures that layer's input, flattened to
    ``(b, in_features)``; the network itself is not modified.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        stimuli: StimulusSet,
        *,
        device: torch.device,
        augment: bool = False,
        num_workers: int = 0,
        progress: bool = False,
        cache: ImageCache | None = None,
    ) -> None:
        self.loaded = loaded
        self.device = device
        self.num_workers = num_workers
        self.progress = progress
        self.ids = stimuli.ids
        self.dataset = pixel_dataset(
            stimuli.paths, self.ids, loaded.preprocessing, cache=cache, augment=augment
        )
        self.module = loaded.module.to(device).eval()
        self.output = self.module.get_submodule(loaded.output_layer)

    def batches(
        self, rows: np.ndarray, batch_size: int
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        from tqdm.auto import tqdm

        order = [int(r) for r in rows]
        loader = DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=order,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        captured: list[torch.Tensor] = []

        def hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            captured.append(inputs[0].detach())

        handle = self.output.register_forward_pre_hook(hook)
        bar = tqdm(total=len(order), disable=not self.progress, unit="img", desc="features")
        try:
            for batch in loader:
                remember_pixels(self.dataset, batch)  # into the decoded-image cache, if any
                indices, inputs = model_inputs(
                    batch, self.loaded.preprocessing, self.device, self.ids
                )
                captured.clear()
                with torch.no_grad():  # not around the yield: the consumer may need gradients
                    self.module(inputs)
                if not captured:
                    raise ModelError(
                        f"{self.loaded.arch}: output layer {self.loaded.output_layer!r} "
                        "was not called in the forward pass"
                    )
                features = captured[0].reshape(captured[0].shape[0], -1).float()
                bar.update(len(indices))
                yield indices.numpy().astype(np.int64), features
        finally:
            handle.remove()
            bar.close()


class CachedFeatures:
    """Features held in memory, ``features (n, in_features)`` on the training device."""

    def __init__(self, features: torch.Tensor, device: torch.device) -> None:
        self.features = features.to(device)

    def batches(
        self, rows: np.ndarray, batch_size: int
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        for start in range(0, len(rows), batch_size):
            chunk = np.asarray(rows[start : start + batch_size], dtype=np.int64)
            yield chunk, self.features[torch.from_numpy(chunk).to(self.features.device)]


def in_features(loaded: LoadedModel) -> int:
    """Input dimension of ``loaded``'s output layer, which must be a ``Linear`` layer."""
    layer = loaded.module.get_submodule(loaded.output_layer)
    if not isinstance(layer, nn.Linear):
        raise ModelError(
            f"{loaded.arch}: output layer {loaded.output_layer!r} is a "
            f"{type(layer).__name__}, not a Linear layer a valence head can replace"
        )
    return int(layer.in_features)


def feature_fingerprint(loaded: LoadedModel, stimuli: StimulusSet) -> str:
    """SHA-256 over what the features depend on: model, weights, layer, transform, images."""
    payload = {
        "format": _CACHE_FORMAT,
        "arch": loaded.arch,
        "weights_sha256": loaded.weights_sha256,
        "output_layer": loaded.output_layer,
        "preprocessing": loaded.preprocessing.to_dict(),
        "stimuli": stimuli.fingerprint(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def read_feature_store(path: Path, fingerprint: str, ids: list[str]) -> torch.Tensor | None:
    """The features ``(n, in_features)`` float32 stored at ``path`` for exactly these stimulus
    ``ids`` and this ``fingerprint``; ``None`` when absent, stale or unreadable."""
    from object2brain.activations.store import ActivationStore

    if not path.is_file():
        return None
    try:
        with ActivationStore.open(path) as store:
            if store.attrs.get("fingerprint") != fingerprint or store.stimulus_ids != ids:
                return None
            if FEATURE_LAYER not in store.layers:
                return None
            values = store.read(FEATURE_LAYER)
    except StoreError as exc:
        log.warning("%s: not a usable feature store (%s); recomputing", path, exc)
        return None
    return torch.from_numpy(np.asarray(values, dtype=np.float32))


def _store_attrs(loaded: LoadedModel) -> dict[str, Any]:
    from object2brain._version import __version__

    return {
        "model": loaded.name,
        "arch": loaded.arch,
        "weights": loaded.weights,
        "weights_sha256": loaded.weights_sha256,
        "preprocessing": loaded.preprocessing.to_dict(),
        "object2brain_version": __version__,
        "output_layer": loaded.output_layer,
        "order": [FEATURE_LAYER],
        "dtype": "float32",
    }


def write_feature_store(
    path: Path,
    loaded: LoadedModel,
    stimuli: StimulusSet,
    source: FeatureSource,
    *,
    batch_size: int,
) -> torch.Tensor:
    """Run ``source`` over every stimulus, writing the features into a new store at ``path``.

    The store is written under ``<path>.partial`` and renamed once complete.

    Returns:
        The features ``(n, in_features)`` float32 on the CPU, as stored.
    """
    from object2brain.activations.store import StoreWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(stimuli)
    writer = StoreWriter.create(
        path, stimuli.ids, _store_attrs(loaded), feature_fingerprint(loaded, stimuli)
    )
    blocks: list[torch.Tensor] = []
    try:
        for rows, features in source.batches(np.arange(n), batch_size):
            block = features.cpu()
            if not blocks:
                writer.ensure_layer(FEATURE_LAYER, n, tuple(block.shape[1:]), np.dtype(np.float32))
            writer.write_rows(int(rows[0]), {FEATURE_LAYER: block.numpy()})
            blocks.append(block)
        writer.finish()
    finally:
        writer.close()
    return torch.cat(blocks, dim=0)


def cached_features(
    loaded: LoadedModel,
    stimuli: StimulusSet,
    path: Path,
    *,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    progress: bool = False,
    cache: ImageCache | None = None,
) -> tuple[torch.Tensor, bool]:
    """Features from the feature store at ``path`` if it matches, else computed and stored.

    Returns:
        ``(features (n, in_features) float32 CPU, reused)``.
    """
    stored = read_feature_store(path, feature_fingerprint(loaded, stimuli), stimuli.ids)
    if stored is not None:
        log.info("%s: reusing stored features %s", path, tuple(stored.shape))
        return stored, True
    source = BackboneFeatures(
        loaded, stimuli, device=device, num_workers=num_workers, progress=progress, cache=cache
    )
    return write_feature_store(path, loaded, stimuli, source, batch_size=batch_size), False
