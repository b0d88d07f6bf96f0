"""Valence heads: the one-unit linear layer that replaces a network's classifier output.

A head is stored as ``head.safetensors`` (tensors ``weight`` ``(1, in_features)`` and ``bias``
``(1,)``) with a JSON sidecar ``head.json`` beside it describing what it fits::

    {"arch": "resnet18", "replaced_layer": "fc", "in_features": 512,
     "backbone_weights": "...", "backbone_weights_sha256": "...", ...}

:func:`attach_head` puts a head in place of the output layer of a :class:`LoadedModel`; the model's
output is then the predicted valence ``(batch, 1)``, which extraction stores as layer ``valence``.

Training (:func:`train_head`) keeps the backbone frozen and fits only the head:

1. the backbone runs ONCE over every image (eval transform) and the input of its output layer,
   the penultimate features ``(n, in_features)``, is cached to ``<out>/<model>/features.h5`` with a
   fingerprint of model, weights, preprocessing and images, so a rerun reuses it;
2. the head ``in_features -> 1`` starts at ``weight = 0``, ``bias`` = (weighted) mean training
   rating, and trains with Adam on shuffled mini-batches (order from ``torch.Generator`` seeded by
   ``seed``), early stopping on the validation loss (the best epoch's weights are kept);
3. the loss is the mean squared error, or the weighted MSE (default)::

       n_l  = number of training images of integer valence level l (level = floor(v + 0.5))
       w_l  = N / (L * n_l)        N training images, L levels present in training
       loss = mean_i  w_{l(i)} * (yhat_i - y_i)^2      (over the images of a batch)

   so the weights are the inverse level frequencies normalised to mean 1 over the training
   images (sum_i w_{l(i)} = N); validation loss uses the same ``w_l`` (weight 1 for a level
   absent from training).

"Uncached" training (``cache=False``, forced by ``augment=True``) recomputes the features through
the frozen backbone for every batch of every epoch (training and validation), with the same batch
order; without augmentation it gives the same head as the cached path up to float rounding.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from object2brain.errors import DataError, ModelError
from object2brain.heads.io import save_head, sidecar_path
from object2brain.models.inputs import ImageDataset, default_workers, model_inputs

if TYPE_CHECKING:
    from object2brain.data.findingemo import RatedImages
    from object2brain.data.stimuli import StimulusSet
    from object2brain.models.zoo import LoadedModel

log = logging.getLogger("object2brain.heads")

LossName = Literal["mse", "weighted_mse"]
LOSSES: tuple[str, ...] = ("mse", "weighted_mse")
FEATURE_CACHE_NAME = "features.h5"
OUT_OF_FOLD_NAME = "out_of_fold.csv"
_CACHE_FORMAT = 1


# --------------------------------------------------------------------------------------------
# Loss


def level_weights(train_levels: Sequence[int] | np.ndarray) -> dict[int, float]:
    """Inverse-frequency weight of each integer valence level, normalised to mean 1.

    ``w_l = N / (L * n_l)`` with ``n_l`` the training images of level ``l``, ``N`` all training
    images and ``L`` the number of levels present, so that ``mean_i w_{l(i)} = 1``.

    Args:
        train_levels: levels of the training images ``(N,)``.

    Returns:
        ``{level: weight}`` for every level present in training.
    """
    levels = np.asarray(train_levels, dtype=np.int64)
    if levels.size == 0:
        raise DataError("no training images: cannot compute valence level weights")
    values, counts = np.unique(levels, return_counts=True)
    n, n_levels = levels.size, values.size
    return {int(v): float(n / (n_levels * c)) for v, c in zip(values, counts, strict=True)}


def sample_weights(
    levels: Sequence[int] | np.ndarray, weights: dict[int, float] | None
) -> np.ndarray:
    """Per-image loss weights ``(n,)`` float32: ``weights[level]`` (1 for unseen levels or MSE)."""
    levels = np.asarray(levels, dtype=np.int64)
    if weights is None:
        return np.ones(levels.shape, dtype=np.float32)
    return np.asarray([weights.get(int(v), 1.0) for v in levels], dtype=np.float32)


def weighted_mse(
    predicted: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``mean_i w_i * (predicted_i - target_i)^2`` over ``(b,)`` tensors (MSE if no weights)."""
    squared = (predicted.reshape(-1) - target.reshape(-1)) ** 2
    if weight is None:
        return squared.mean()
    return (weight.reshape(-1) * squared).mean()


# --------------------------------------------------------------------------------------------
# Penultimate features


class FeatureSource(Protocol):
    """Anything that yields the penultimate features of stimulus rows, batch by batch."""

    def batches(
        self, rows: np.ndarray, batch_size: int
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield ``(batch rows (b,), features (b, in_features))`` in the order of ``rows``."""
        ...


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
    ) -> None:
        self.loaded = loaded
        self.device = device
        self.num_workers = num_workers
        self.progress = progress
        self.ids = stimuli.ids
        self.dataset = ImageDataset(
            stimuli.paths, self.ids, loaded.preprocessing, augment=augment, pixels=True
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


def feature_fingerprint(loaded: LoadedModel, stimuli: StimulusSet) -> str:
    """SHA-256 over what the cached features depend on: model, weights, layer, transform, images."""
    payload = {
        "format": _CACHE_FORMAT,
        "arch": loaded.arch,
        "weights_sha256": loaded.weights_sha256,
        "output_layer": loaded.output_layer,
        "preprocessing": loaded.preprocessing.to_dict(),
        "stimuli": stimuli.fingerprint(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def compute_features(
    loaded: LoadedModel,
    stimuli: StimulusSet,
    *,
    device: torch.device,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Penultimate features of every stimulus (eval transform), ``(n, in_features)`` float32 CPU."""
    source = BackboneFeatures(
        loaded, stimuli, device=device, num_workers=num_workers, progress=progress
    )
    blocks = [features.cpu() for _, features in source.batches(np.arange(len(stimuli)), batch_size)]
    return torch.cat(blocks, dim=0)


def cached_features(
    loaded: LoadedModel,
    stimuli: StimulusSet,
    path: Path,
    *,
    device: torch.device,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[torch.Tensor, bool]:
    """Features from the cache file ``path`` if its fingerprint matches, else computed and cached.

    Cache file (HDF5): ``/stimulus_ids`` (n,), ``/features`` (n, in_features) float32, attributes
    ``fingerprint``, ``arch``, ``weights_sha256``, ``output_layer``; written atomically.

    Returns:
        ``(features (n, in_features) float32 CPU, reused)``.
    """
    import h5py

    from object2brain.io import atomic_path

    fingerprint = feature_fingerprint(loaded, stimuli)
    if path.is_file():
        try:
            with h5py.File(path, "r") as handle:
                if handle.attrs.get("fingerprint") == fingerprint:
                    features = torch.from_numpy(np.asarray(handle["features"][()], np.float32))
                    if features.shape[0] == len(stimuli):
                        log.info("%s: reusing cached features %s", path, tuple(features.shape))
                        return features, True
        except OSError:
            log.warning("%s: unreadable feature cache; recomputing", path)
    features = compute_features(
        loaded,
        stimuli,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temp, h5py.File(temp, "w") as handle:
        handle.create_dataset(
            "stimulus_ids",
            data=np.asarray(stimuli.ids, dtype=object),
            dtype=h5py.string_dtype(encoding="utf-8"),
        )
        handle.create_dataset("features", data=features.numpy())
        handle.attrs["fingerprint"] = fingerprint
        handle.attrs["arch"] = loaded.arch
        handle.attrs["weights_sha256"] = loaded.weights_sha256
        handle.attrs["output_layer"] = loaded.output_layer
    return features, False


# --------------------------------------------------------------------------------------------
# Fitting


@dataclass
class FitResult:
    """A trained head and its training history.

    Attributes:
        head: ``nn.Linear(in_features, 1)`` on the CPU, weights of the best validation epoch.
        history: one ``{"epoch", "train_loss", "val_loss"}`` per epoch run.
        best_epoch: 1-based epoch whose weights were kept (0: the initial head).
        best_val_loss: its validation loss (training loss when there is no validation split).
    """

    head: nn.Linear
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = math.inf


def _mean_loss(
    head: nn.Linear,
    source: FeatureSource,
    rows: np.ndarray,
    targets: torch.Tensor,
    weights: torch.Tensor,
    batch_size: int,
) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for batch_rows, features in source.batches(rows, batch_size):
            index = torch.from_numpy(batch_rows).to(targets.device)
            loss = weighted_mse(head(features).reshape(-1), targets[index], weights[index])
            total += float(loss) * len(batch_rows)
            count += len(batch_rows)
    return total / max(count, 1)


def fit_head(
    train_source: FeatureSource,
    val_source: FeatureSource,
    targets: np.ndarray,
    weights: np.ndarray,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    in_features: int,
    *,
    device: torch.device,
    epochs: int = 100,
    patience: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
) -> FitResult:
    """Train ``nn.Linear(in_features, 1)`` on the features of ``train_rows`` (module docstring).

    Args:
        train_source: features of the training rows (cached or through the backbone).
        val_source: features of the validation rows (eval transform).
        targets: ratings of every stimulus ``(n,)``.
        weights: loss weight of every stimulus ``(n,)`` (ones for plain MSE).
        train_rows: stimulus rows of the training split ``(n_train,)``.
        val_rows: rows of the validation split ``(n_val,)`` (may be empty: no early stopping).
        in_features: feature dimension.
        device: where the head trains.
        epochs: maximum number of passes over the training rows.
        patience: stop after this many epochs without a lower validation loss.
        lr, weight_decay: Adam's learning rate and L2 penalty.
        batch_size: images per step.
        seed: seed of the shuffling generator (and of the augmentations, set by the caller).
        progress: show a progress bar over epochs.

    Returns:
        :class:`FitResult` with the best epoch's head.
    """
    from tqdm.auto import tqdm

    if len(train_rows) == 0:
        raise DataError("the training split is empty")
    y = torch.tensor(np.asarray(targets, dtype=np.float32), device=device)
    w = torch.tensor(np.asarray(weights, dtype=np.float32), device=device)
    head = nn.Linear(in_features, 1).to(device)
    train_index = torch.as_tensor(train_rows, dtype=torch.long, device=device)
    with torch.no_grad():  # start from the constant (weighted) mean rating
        head.weight.zero_()
        head.bias.fill_(float((w[train_index] * y[train_index]).sum() / w[train_index].sum()))
    optimiser = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    has_val = len(val_rows) > 0
    result = FitResult(head=head)
    best_state = copy.deepcopy(head.state_dict())
    if has_val:
        result.best_val_loss = _mean_loss(head, val_source, val_rows, y, w, batch_size)
    stale = 0
    bar = tqdm(range(1, epochs + 1), disable=not progress, unit="epoch", desc="train head")
    for epoch in bar:
        head.train()
        order = np.asarray(train_rows)[torch.randperm(len(train_rows), generator=generator).numpy()]
        total = 0.0
        for batch_rows, features in train_source.batches(order, batch_size):
            index = torch.from_numpy(batch_rows).to(device)
            loss = weighted_mse(head(features).reshape(-1), y[index], w[index])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            total += float(loss.detach()) * len(batch_rows)
        head.eval()
        train_loss = total / len(train_rows)
        val_loss = (
            _mean_loss(head, val_source, val_rows, y, w, batch_size) if has_val else train_loss
        )
        result.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
        if val_loss < result.best_val_loss:
            result.best_val_loss, result.best_epoch, stale = val_loss, epoch, 0
            best_state = copy.deepcopy(head.state_dict())
        else:
            stale += 1
            if has_val and stale >= patience:
                break
    bar.close()
    head.load_state_dict(best_state)
    result.head = head.cpu().eval()
    return result


def predict(
    head: nn.Linear, source: FeatureSource, rows: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """Predicted valence of ``rows`` ``(n_rows,)`` float64, in the order of ``rows``."""
    device = next(head.parameters()).device
    out = np.empty(len(rows), dtype=np.float64)
    position = {int(r): i for i, r in enumerate(rows)}
    with torch.no_grad():
        for batch_rows, features in source.batches(np.asarray(rows), batch_size):
            values = head(features.to(device)).reshape(-1).cpu().numpy()
            for r, v in zip(batch_rows, values, strict=True):
                out[position[int(r)]] = float(v)
    return out


def cross_fitted_predictions(
    train_source: FeatureSource,
    eval_source: FeatureSource,
    targets: np.ndarray,
    levels: np.ndarray,
    folds: np.ndarray,
    val_rows: np.ndarray,
    in_features: int,
    *,
    loss: LossName,
    device: torch.device,
    epochs: int = 100,
    patience: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 32,
    seed: int = 0,
) -> np.ndarray:
    """Out-of-fold predicted valence: each stimulus predicted by a head that never saw it.

    The head of fold ``j`` is fitted exactly as the main head (:func:`fit_head`, level weights of
    its own training rows) on every stimulus outside fold ``j`` except the validation rows, early
    stopping on the validation rows outside fold ``j``, and predicts fold ``j``. Correlating these
    predictions with the ratings of the same stimuli is then not optimistic, unlike the main
    head's predictions of its own training images.

    Args:
        train_source, eval_source: features (as for :func:`fit_head`).
        targets: ratings ``(n,)``; levels: their integer levels ``(n,)``.
        folds: fold index of every stimulus ``(n,)`` (:func:`~object2brain.data.splits.make_folds`).
        val_rows: the main split's validation rows (never trained on; early stopping).
        in_features: feature dimension.
        loss, device, epochs, patience, lr, weight_decay, batch_size: as for :func:`train_head`.
        seed: fold ``j`` shuffles its batches with ``seed + 1 + j``.

    Returns:
        Predicted valence ``(n,)`` float64.
    """
    is_val = np.zeros(len(targets), dtype=bool)
    is_val[val_rows] = True
    predicted = np.full(len(targets), np.nan)
    for j in np.unique(folds):
        held = np.flatnonzero(folds == j)
        train_rows = np.flatnonzero((folds != j) & ~is_val)
        fold_val = np.flatnonzero((folds != j) & is_val)
        lw = level_weights(levels[train_rows]) if loss == "weighted_mse" else None
        fit = fit_head(
            train_source,
            eval_source,
            targets,
            sample_weights(levels, lw),
            train_rows,
            fold_val,
            in_features,
            device=device,
            epochs=epochs,
            patience=patience,
            lr=lr,
            weight_decay=weight_decay,
            batch_size=batch_size,
            seed=seed + 1 + int(j),
        )
        head = fit.head.to(device)
        predicted[held] = predict(head, eval_source, held, batch_size=max(batch_size, 64))
        log.info(
            "cross-fitting fold %d: %d stimuli predicted by a head fitted on %d (best epoch %d)",
            j,
            len(held),
            len(train_rows),
            fit.best_epoch,
        )
    return predicted


# --------------------------------------------------------------------------------------------
# Metrics


def regression_metrics(predicted: np.ndarray, rated: np.ndarray) -> dict[str, float | None]:
    """MAE, RMSE, Pearson r, Spearman rho and R^2 of ``predicted`` vs ``rated`` (both ``(n,)``).

    ``R^2 = 1 - sum (y - yhat)^2 / sum (y - mean y)^2``. Undefined values (constant input, fewer
    than 2 images) are ``None``.
    """
    from scipy import stats

    p = np.asarray(predicted, dtype=np.float64)
    y = np.asarray(rated, dtype=np.float64)
    n = int(p.size)
    out: dict[str, float | None] = {"n": n}
    if n == 0:
        return out | {"mae": None, "rmse": None, "pearson": None, "spearman": None, "r2": None}
    error = p - y
    out["mae"] = float(np.mean(np.abs(error)))
    out["rmse"] = float(np.sqrt(np.mean(error**2)))
    constant = n < 2 or np.ptp(p) == 0 or np.ptp(y) == 0
    out["pearson"] = None if constant else float(stats.pearsonr(p, y).statistic)
    out["spearman"] = None if constant else float(stats.spearmanr(p, y).statistic)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    out["r2"] = None if ss_tot == 0 else 1.0 - float(np.sum(error**2)) / ss_tot
    return out


def per_level_metrics(
    predicted: np.ndarray, rated: np.ndarray, levels: np.ndarray
) -> dict[str, dict[str, float]]:
    """Per valence level: ``n``, ``mae``, ``rmse``, ``mean_predicted``, ``mean_rated``, ``bias``.

    ``bias = mean(predicted - rated)`` within the level (regression to the mean shows as a
    positive bias at negative levels and a negative one at positive levels).
    """
    p, y, lv = (np.asarray(a) for a in (predicted, rated, levels))
    out: dict[str, dict[str, float]] = {}
    for level in np.unique(lv):
        mask = lv == level
        error = p[mask] - y[mask]
        out[str(int(level))] = {
            "n": int(mask.sum()),
            "mae": float(np.mean(np.abs(error))),
            "rmse": float(np.sqrt(np.mean(error**2))),
            "mean_predicted": float(np.mean(p[mask])),
            "mean_rated": float(np.mean(y[mask])),
            "bias": float(np.mean(error)),
        }
    return out


# --------------------------------------------------------------------------------------------
# The whole stage


@dataclass
class HeadResult:
    """What :func:`train_head` produced for one model."""

    name: str
    arch: str
    head_path: Path
    metrics_path: Path
    metrics: dict[str, Any]
    features_path: Path | None
    features_reused: bool
    seconds: float
    out_of_fold_path: Path | None = None


@dataclass
class TrainHeadResult:
    """Outputs of :func:`train_head`: the split, the images skipped and one entry per model."""

    out: Path
    split_path: Path
    models: dict[str, HeadResult]
    n_images: int
    missing_path: Path | None = None
    n_missing: int = 0
    manifest_path: Path | None = None
    files: list[Path] = field(default_factory=list)


def _model_names(archs: Sequence[str]) -> list[str]:
    names: list[str] = []
    for i, arch in enumerate(archs):
        names.append(arch if archs.count(arch) == 1 else f"{arch}_{i + 1}")
    return names


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _json_ready(value.item())
    return value


def _load_data(
    findingemo: str | Path | None,
    image_root: str | Path | None,
    stimuli: str | Path | StimulusSet | None,
    valence_range: tuple[float, float],
) -> RatedImages:
    from object2brain.data.findingemo import load_findingemo, load_rated_stimuli

    if (findingemo is None) == (stimuli is None):
        raise DataError(
            "give exactly one rated image set: --findingemo ANN --image-root DIR, or --stimuli T"
        )
    if stimuli is not None:
        if image_root is not None:
            raise DataError("--image-root goes with --findingemo, not with --stimuli")
        return load_rated_stimuli(stimuli, valence_range=valence_range)
    return load_findingemo(findingemo, image_root, valence_range=valence_range)


def train_head(
    models: str | LoadedModel | Sequence[str | LoadedModel],
    *,
    out: str | Path,
    weights: str | Sequence[str] = "default",
    findingemo: str | Path | None = None,
    image_root: str | Path | None = None,
    stimuli: str | Path | StimulusSet | None = None,
    split: str | Path | None = None,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    valence_range: tuple[float, float] = (-3.0, 3.0),
    loss: LossName = "weighted_mse",
    augment: bool = False,
    cache: bool = True,
    epochs: int = 100,
    patience: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 32,
    device: str | torch.device = "auto",
    seed: int = 0,
    num_workers: int | None = None,
    figures: bool = True,
    progress: bool = True,
    cross_fit: int = 0,
) -> TrainHeadResult:
    """Train a one-output valence head on each frozen backbone; the same split for all models.

    Args:
        models: architecture name(s) (see ``object2brain models``) or loaded model(s).
        out: output folder (created; its parent must exist).
        weights: backbone weights, one for all models or one per model (ignored for loaded
            models).
        findingemo: FindingEmo annotation file (``"default"``: the one in ``findingemo-light``);
            goes with ``image_root``. Images missing under the root are skipped and listed in
            ``<out>/missing_images.csv``.
        image_root: folder the annotation's ``image_path`` values are relative to.
        stimuli: instead of FindingEmo, a stimulus table with a ``valence`` column.
        split: reuse this split file (``stimulus_id, split``) instead of drawing one.
        fractions: train/val/test shares of a new split, stratified by valence level.
        valence_range: the declared rating scale; ratings outside are an error.
        loss: ``weighted_mse`` (inverse level frequency, mean 1; module docstring) or ``mse``.
        augment: random crop + horizontal flip on training images (disables the feature cache).
        cache: cache the penultimate features in ``<out>/<model>/features.h5`` (default); with
            ``False`` every epoch recomputes them through the backbone.
        epochs, patience, lr, weight_decay, batch_size: training (see :func:`fit_head`).
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        seed: seed of the split, the batch order and the augmentations.
        num_workers: image-decoding worker processes (default:
            :func:`~object2brain.models.inputs.default_workers`).
        figures: write the predicted-vs-rated scatter figure of each model.
        progress: show progress bars.
        cross_fit: with ``K >= 2``, also fit ``K`` fold heads (:func:`cross_fitted_predictions`,
            folds from :func:`~object2brain.data.splits.make_folds`) and write every stimulus's
            out-of-fold prediction to ``<out>/<model>/out_of_fold.csv`` (``stimulus_id, fold,
            valence, level, predicted``), with metrics under ``"out_of_fold"``. Use these, not the
            main head's, to correlate predicted valence with the ratings of the training stimuli
            (``extract(valence=...)``). ``0`` (default): no cross-fitting.

    Returns:
        :class:`TrainHeadResult`. Files: ``<out>/split.csv``, ``<out>/missing_images.csv`` (if
        any), ``<out>/head_metrics.csv|.parquet``, ``<out>/manifest.json``, and per model
        ``<out>/<model>/{head.safetensors, head.json, metrics.json, predictions.csv,
        features.h5}`` (+ ``out_of_fold.csv``) and
        ``<out>/figures/predicted_vs_rated_<model>.png|.svg``.

    Raises:
        Object2BrainError subclasses on bad input, before anything is written.
    """
    from object2brain._version import __version__
    from object2brain.data.splits import load_split, make_folds, make_split, save_split
    from object2brain.devices import resolve_device
    from object2brain.io import check_output_folder, write_json, write_table
    from object2brain.manifest import build_manifest, file_sha256, output_list
    from object2brain.models.zoo import LoadedModel, build_architecture, load_model

    started = time.time()
    out = Path(out).expanduser()
    if loss not in LOSSES:
        raise DataError(f"loss {loss!r}: use {' or '.join(LOSSES)}")
    for label, value in (("epochs", epochs), ("batch size", batch_size), ("patience", patience)):
        if value < 1:
            raise DataError(f"{label} {value}: must be at least 1")
    if not lr > 0:  # also NaN
        raise DataError(f"learning rate {lr}: must be positive (0 would never train the head)")
    if cross_fit == 1 or cross_fit < 0:
        raise DataError(f"cross-fit {cross_fit}: use 0 (off) or 2 or more folds")
    specs: list[str | LoadedModel] = (
        [models] if isinstance(models, str | LoadedModel) else list(models)
    )
    if not specs:
        raise ModelError("no model given (--model)")
    weight_list = [weights] if isinstance(weights, str) else list(weights)
    if len(weight_list) == 1:
        weight_list = weight_list * len(specs)
    if len(weight_list) != len(specs):
        raise ModelError(
            f"{len(weight_list)} --weights for {len(specs)} --model: give one for all or one each"
        )
    torch_device = resolve_device(device)
    for spec in specs:
        if isinstance(spec, str):
            build_architecture(spec, on_meta=True)  # unknown names fail here, cheaply
    check_output_folder(out)
    if augment and cache:
        log.warning("--augment: features change every epoch, so they are not cached")
        cache = False

    data = _load_data(findingemo, image_root, stimuli, valence_range)
    stimulus_set = data.stimuli
    ids = stimulus_set.ids
    if split is not None:
        split_frame = load_split(split, ids)
        split_frame = split_frame.assign(valence=data.valence, level=data.levels)
        split_frame = split_frame[["stimulus_id", "valence", "level", "split"]]
    else:
        split_frame = make_split(ids, data.valence, fractions=fractions, seed=seed)
    folds = (
        make_folds(data.valence, cross_fit, seed=seed, within=split_frame["split"].to_numpy())
        if cross_fit
        else None
    )
    loaded_models = [
        spec if isinstance(spec, LoadedModel) else load_model(spec, w, seed=seed)
        for spec, w in zip(specs, weight_list, strict=True)
    ]
    names = _model_names([m.name for m in loaded_models])

    # Inputs are valid: from here on, write.
    out.mkdir(parents=True, exist_ok=True)
    split_path = save_split(split_frame, out / "split.csv")
    split_sha = file_sha256(split_path)
    missing_path: Path | None = None
    if len(data.missing):
        from object2brain.io import atomic_path

        missing_path = out / "missing_images.csv"
        with atomic_path(missing_path) as temp:
            data.missing.to_csv(temp, index=False)
        log.warning(
            "%d of %d annotated images are missing or unreadable under the image root and were "
            "skipped; listed in %s",
            len(data.missing),
            len(data.missing) + len(ids),
            missing_path,
        )

    assignment = split_frame["split"].to_numpy()
    rows = {name: np.flatnonzero(assignment == name) for name in ("train", "val", "test")}
    targets = data.valence
    levels = data.levels
    lw = level_weights(levels[rows["train"]]) if loss == "weighted_mse" else None
    w = sample_weights(levels, lw)
    workers = (
        num_workers
        if num_workers is not None
        else default_workers(len(ids), batch_size, torch_device, min_batches=4)
    )

    results: dict[str, HeadResult] = {}
    summary_rows: list[dict[str, Any]] = []
    written: list[Path] = []
    for name, loaded in zip(names, loaded_models, strict=True):
        t0 = time.time()
        model_dir = out / name
        model_dir.mkdir(parents=True, exist_ok=True)
        features_path: Path | None = None
        reused = False
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # augmentations in the main process and worker seeds
            if cache:
                features_path = model_dir / FEATURE_CACHE_NAME
                features, reused = cached_features(
                    loaded,
                    stimulus_set,
                    features_path,
                    device=torch_device,
                    batch_size=batch_size,
                    num_workers=workers,
                    progress=progress,
                )
                train_source: FeatureSource = CachedFeatures(features, torch_device)
                eval_source: FeatureSource = train_source
                in_features = int(features.shape[1])
            else:
                train_source = BackboneFeatures(
                    loaded,
                    stimulus_set,
                    device=torch_device,
                    augment=augment,
                    num_workers=workers,
                )
                eval_source = (
                    BackboneFeatures(loaded, stimulus_set, device=torch_device, num_workers=workers)
                    if augment
                    else train_source
                )
                in_features = _in_features(loaded)
            fit = fit_head(
                train_source,
                eval_source,
                targets,
                w,
                rows["train"],
                rows["val"],
                in_features,
                device=torch_device,
                epochs=epochs,
                patience=patience,
                lr=lr,
                weight_decay=weight_decay,
                batch_size=batch_size,
                seed=seed,
                progress=progress,
            )
            head = fit.head.to(torch_device)
            everything = np.arange(len(ids))
            predicted = predict(head, eval_source, everything, batch_size=max(batch_size, 64))
            head = head.cpu()
            out_of_fold = None
            if folds is not None:
                out_of_fold = cross_fitted_predictions(
                    train_source,
                    eval_source,
                    targets,
                    levels,
                    folds,
                    rows["val"],
                    in_features,
                    loss=loss,
                    device=torch_device,
                    epochs=epochs,
                    patience=patience,
                    lr=lr,
                    weight_decay=weight_decay,
                    batch_size=batch_size,
                    seed=seed,
                )

        metrics: dict[str, Any] = {}
        for part in ("train", "val", "test"):
            metrics[part] = regression_metrics(predicted[rows[part]], targets[rows[part]])
        metrics["per_level"] = {
            part: per_level_metrics(predicted[rows[part]], targets[rows[part]], levels[rows[part]])
            for part in ("train", "val", "test")
        }
        out_of_fold_path: Path | None = None
        if folds is None:  # an earlier run's predictions would no longer match this head
            (model_dir / OUT_OF_FOLD_NAME).unlink(missing_ok=True)
        if out_of_fold is not None and folds is not None:
            metrics["out_of_fold"] = regression_metrics(out_of_fold, targets)
            metrics["per_level"]["out_of_fold"] = per_level_metrics(out_of_fold, targets, levels)
            out_of_fold_path = _write_csv(
                pd.DataFrame(
                    {
                        "stimulus_id": ids,
                        "fold": folds,
                        "valence": targets,
                        "level": levels,
                        "predicted": out_of_fold,
                    }
                ),
                model_dir / OUT_OF_FOLD_NAME,
            )
            written.append(out_of_fold_path)
        metrics["training"] = {
            "loss": loss,
            "level_weights": {str(k): v for k, v in (lw or {}).items()},
            "epochs_run": len(fit.history),
            "best_epoch": fit.best_epoch,
            "best_val_loss": fit.best_val_loss,
            "history": fit.history,
            "cross_fit_folds": cross_fit,
        }
        metrics = _json_ready(metrics)
        predictions = pd.DataFrame(
            {
                "stimulus_id": ids,
                "split": assignment,
                "valence": targets,
                "level": levels,
                "predicted": predicted,
            }
        )
        _write_csv(predictions, model_dir / "predictions.csv")
        metrics_path = write_json(model_dir / "metrics.json", metrics)
        written += [model_dir / "predictions.csv", metrics_path]
        if figures:
            from object2brain.report.figures.heads import plot_predicted_vs_rated

            written += plot_predicted_vs_rated(predictions, out / "figures", name, metrics=metrics)
        meta = _json_ready(
            {
                "model": name,
                "arch": loaded.arch,
                "backbone_weights": loaded.weights,
                "backbone_weights_sha256": loaded.weights_sha256,
                "replaced_layer": loaded.output_layer,
                "feature_dim": in_features,
                "preprocessing": loaded.preprocessing.to_dict(),
                "loss": loss,
                "level_weights": {str(k): v for k, v in (lw or {}).items()},
                "valence_range": list(valence_range),
                "split_file": str(split_path.resolve()),
                "split_sha256": split_sha,
                "n_train": len(rows["train"]),
                "n_val": len(rows["val"]),
                "n_test": len(rows["test"]),
                "augment": augment,
                "epochs": epochs,
                "epochs_run": len(fit.history),
                "best_epoch": fit.best_epoch,
                "patience": patience,
                "lr": lr,
                "weight_decay": weight_decay,
                "batch_size": batch_size,
                "seed": seed,
                "metrics": {"test": metrics["test"], "val": metrics["val"]},
                "object2brain_version": __version__,
            }
        )
        head_path = save_head(head, model_dir / "head.safetensors", meta)
        for part in ("train", "val", "test", "out_of_fold"):
            if part in metrics:
                summary_rows.append({"model": name, "split": part, **metrics[part]})
        seconds = round(time.time() - t0, 3)
        results[name] = HeadResult(
            name=name,
            arch=loaded.arch,
            head_path=head_path,
            metrics_path=metrics_path,
            metrics=metrics,
            features_path=features_path,
            features_reused=reused,
            seconds=seconds,
            out_of_fold_path=out_of_fold_path,
        )
        test = metrics["test"]
        log.info(
            "%s: test spearman %s, r2 %s (best epoch %d) -> %s",
            name,
            _fmt(test.get("spearman")),
            _fmt(test.get("r2")),
            fit.best_epoch,
            head_path,
        )

    written += write_table(pd.DataFrame(summary_rows), out, "head_metrics")
    written += [split_path, *([missing_path] if missing_path else [])]
    written += [p for r in results.values() for p in (r.head_path, sidecar_path(r.head_path))]
    inputs = {"split": split_sha}
    if data.source is not None and data.source.is_file():
        inputs["ratings"] = file_sha256(data.source)
    inputs["images_fingerprint"] = stimulus_set.fingerprint()
    for name, loaded in zip(names, loaded_models, strict=True):
        inputs[f"weights:{name}"] = loaded.weights_sha256
    manifest_path = write_json(
        out / "manifest.json",
        build_manifest(
            "train-head",
            {
                "models": [m.arch for m in loaded_models],
                "names": names,
                "weights": [m.weights for m in loaded_models],
                "findingemo": None if findingemo is None else str(findingemo),
                "image_root": None if image_root is None else str(image_root),
                "stimuli": None if stimuli is None else str(getattr(stimuli, "source", stimuli)),
                "split": None if split is None else str(split),
                "fractions": list(fractions),
                "valence_range": list(valence_range),
                "loss": loss,
                "augment": augment,
                "cache": cache,
                "cross_fit": cross_fit,
                "epochs": epochs,
                "patience": patience,
                "lr": lr,
                "weight_decay": weight_decay,
                "batch_size": batch_size,
                "device": str(torch_device),
                "out": str(out),
            },
            seeds={"seed": seed},
            inputs=inputs,
            outputs=output_list(written, out),
            extra={
                "n_images": len(ids),
                "n_missing": len(data.missing),
                "n_split": {k: len(v) for k, v in rows.items()},
                "seconds": round(time.time() - started, 3),
                "models": {
                    n: {"seconds": r.seconds, "features_reused": r.features_reused}
                    for n, r in results.items()
                },
            },
        ),
    )
    return TrainHeadResult(
        out=out,
        split_path=split_path,
        models=results,
        n_images=len(ids),
        missing_path=missing_path,
        n_missing=len(data.missing),
        manifest_path=manifest_path,
        files=sorted([*written, manifest_path]),
    )


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


def _in_features(loaded: LoadedModel) -> int:
    layer = loaded.module.get_submodule(loaded.output_layer)
    if not isinstance(layer, nn.Linear):
        raise ModelError(
            f"{loaded.arch}: output layer {loaded.output_layer!r} is a "
            f"{type(layer).__name__}, not a Linear layer a valence head can replace"
        )
    return int(layer.in_features)


def _write_csv(frame: pd.DataFrame, path: Path) -> Path:
    from object2brain.io import atomic_path

    with atomic_path(path) as temp:
        frame.to_csv(temp, index=False)
    return path
