"""Training valence heads: resolve the inputs, compute the heads (pure), in three steps.

1. **resolve**: :func:`resolve_train_options` (keyword arguments -> :class:`TrainHeadOptions`),
   :func:`resolve_models`, :func:`load_rated` (FindingEmo or a rated stimulus table) and
   :func:`split_rated` (the train/val/test split, one for all models, and the cross-fitting
   folds); nothing is written.
2. **features**: :func:`prepare_features` gives each model's penultimate features, computed once
   and kept in an activation store (``<out>/<model>/features.h5``, reused by a rerun;
   :mod:`.features`), or, without the cache (``cache=False``, forced by ``augment=True``), through
   the frozen backbone for every batch of every epoch, with the same batch order (without
   augmentation the same head as the cached path up to float rounding).
3. **compute**: :func:`compute_heads` fits each model's head (:func:`~.fit.fit_head`), predicts
   every stimulus, optionally cross-fits ``K`` fold heads for out-of-fold predictions, and returns
   a :class:`HeadsResult` (heads, metrics, ``head_metrics`` table, predictions) without writing.

:mod:`.write` then writes the files. Every model of a run shares the split; each head's batches
are shuffled by a generator seeded with ``seed`` and the global torch RNG (augmentations, worker
seeds) is reseeded with ``seed`` per model, inside ``torch.random.fork_rng``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from object2brain.errors import DataError, ModelError
from object2brain.heads.features import (
    FEATURES_NAME,
    BackboneFeatures,
    CachedFeatures,
    FeatureSources,
    cached_features,
    in_features,
)
from object2brain.heads.fit import (
    PREDICT_BATCH,
    FitResult,
    RatedFeatures,
    cross_fitted_predictions,
    degeneracy,
    fit_fold_heads,
    fit_head,
    per_level_metrics,
    predict,
    regression_metrics,
)
from object2brain.options import (
    LOSSES,
    OptionsError,
    Runtime,
    TrainHeadOptions,
    resolve_options,
)
from object2brain.tables import HEAD_METRICS

if TYPE_CHECKING:
    from object2brain.data.findingemo import RatedImages
    from object2brain.data.stimuli import StimulusSet
    from object2brain.models.zoo import LoadedModel

log = logging.getLogger("object2brain.heads")

#: File of the out-of-fold predictions in a model's output folder.
OUT_OF_FOLD_NAME = "out_of_fold.csv"
SPLITS: tuple[str, str, str] = ("train", "val", "test")

# --------------------------------------------------------------------------------------------
# Resolve


#: Today's wording of a rejected option value, by option.
_OPTION_MESSAGES: dict[str, Callable[[Any], str]] = {
    "loss": lambda v: f"loss {v!r}: use {' or '.join(LOSSES)}",
    "epochs": lambda v: f"epochs {v}: must be at least 1",
    "batch_size": lambda v: f"batch size {v}: must be at least 1",
    "patience": lambda v: f"patience {v}: must be at least 1",
    "lr": lambda v: f"learning rate {v}: must be positive (0 would never train the head)",
    "cross_fit": lambda v: f"cross-fit {v}: use 0 (off) or 2 or more folds",
}


def resolve_train_options(
    options: TrainHeadOptions | None, values: Mapping[str, Any]
) -> TrainHeadOptions:
    """``options`` updated by the keyword ``values`` given (``None`` values: not given).

    Raises:
        DataError: a bad loss, epochs, batch size, patience, learning rate or cross-fit count.
        OptionsError: any other invalid option.
    """
    given = {key: value for key, value in values.items() if value is not None}
    try:
        return resolve_options(TrainHeadOptions, options, **given)
    except OptionsError:
        for key, message in _OPTION_MESSAGES.items():
            if key in given and not _valid_option(key, given[key]):
                raise DataError(message(given[key])) from None
        raise


def _valid_option(key: str, value: Any) -> bool:
    try:
        TrainHeadOptions.model_validate({key: value})
    except ValueError:  # pydantic's ValidationError
        return False
    return True


def resolve_models(
    models: str | LoadedModel | Sequence[str | LoadedModel],
    weights: str | Sequence[str],
) -> list[tuple[str | LoadedModel, str]]:
    """Pair each model (name or loaded) with its weights; unknown names fail here, cheaply.

    Raises:
        ModelError: no model, a weights count that is neither one nor one per model, or an
            unknown architecture.
    """
    from object2brain.models.zoo import LoadedModel, build_architecture

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
    for spec in specs:
        if isinstance(spec, str):
            build_architecture(spec, on_meta=True)
    return list(zip(specs, weight_list, strict=True))


def load_models(
    specs: Sequence[tuple[str | LoadedModel, str]], *, seed: int
) -> dict[str, LoadedModel]:
    """Load every model; keyed by its name (``arch``, or ``arch_<i>`` when repeated)."""
    from object2brain.models.zoo import LoadedModel, load_model

    loaded = [
        spec if isinstance(spec, LoadedModel) else load_model(spec, w, seed=seed)
        for spec, w in specs
    ]
    archs = [m.name for m in loaded]
    names = [a if archs.count(a) == 1 else f"{a}_{i + 1}" for i, a in enumerate(archs)]
    return dict(zip(names, loaded, strict=True))


def load_rated(
    findingemo: str | Path | None,
    image_root: str | Path | None,
    stimuli: str | Path | StimulusSet | None,
    valence_range: tuple[float, float],
) -> RatedImages:
    """The rated images: FindingEmo (annotation file + image root) or a stimulus table."""
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


@dataclass(frozen=True)
class RatedSplit:
    """The rated images with their split and cross-fitting folds.

    Attributes:
        data: the rated images (ratings, levels, images missing from the source).
        split: ``stimulus_id, valence, level, split`` in stimulus order (the split file).
        folds: fold of every stimulus ``(n,)`` int64, or ``None`` without cross-fitting.
        n_folds: the number of folds ``K`` (0: no cross-fitting).
        selection: selection fold of every stimulus ``(n,)`` int64
            (:func:`~object2brain.data.splits.condition_folds`: stratified by condition, the
            dissection's folds for the same stimuli and seed), or ``None``: no fold heads.
    """

    data: RatedImages
    split: pd.DataFrame
    folds: np.ndarray | None
    n_folds: int
    selection: np.ndarray | None = None

    @property
    def assignment(self) -> np.ndarray:
        """Split name of every stimulus ``(n,)``."""
        return self.split["split"].to_numpy()

    @property
    def rows(self) -> dict[str, np.ndarray]:
        """Stimulus rows of ``train``, ``val`` and ``test``."""
        assignment = self.assignment
        return {name: np.flatnonzero(assignment == name) for name in SPLITS}


def split_rated(
    data: RatedImages,
    split: str | Path | None,
    options: TrainHeadOptions,
    *,
    seed: int,
    in_study: bool,
) -> RatedSplit:
    """The split file ``split`` matched to ``data``, or a new split (``options.fractions``,
    stratified by valence level), and the folds of ``options.folds(in_study=...)``."""
    from object2brain.data.splits import condition_folds, load_split, make_folds, make_split

    ids = data.stimuli.ids
    if split is not None:
        frame = load_split(split, ids).assign(valence=data.valence, level=data.levels)
        frame = frame[["stimulus_id", "valence", "level", "split"]]
    else:
        frame = make_split(ids, data.valence, fractions=options.fractions, seed=seed)
    k = options.folds(in_study=in_study)
    within = frame["split"].to_numpy()
    folds = make_folds(data.valence, k, seed=seed, within=within) if k else None
    s = options.selection_folds or 0
    if s > len(ids):
        raise DataError(f"--selection-folds {s}: more folds than the {len(ids)} rated stimuli")
    conditions = data.stimuli.conditions
    selection = condition_folds(conditions, len(ids), s, seed=seed) if s else None
    return RatedSplit(data=data, split=frame, folds=folds, n_folds=k, selection=selection)


# --------------------------------------------------------------------------------------------
# Features


@dataclass(frozen=True)
class ModelFeatures:
    """One model and where its head's features come from.

    Attributes:
        name: the model's label in this run (output folder name).
        loaded: the frozen backbone.
        sources: its features (stored, or through the backbone).
        features_path: the feature store, or ``None`` without the cache.
        reused: whether the store was reused from an earlier run.
        seconds: time spent computing or reading the features.
    """

    name: str
    loaded: LoadedModel
    sources: FeatureSources
    features_path: Path | None
    reused: bool
    seconds: float


def uses_cache(options: TrainHeadOptions) -> bool:
    """Whether the features are computed once and stored (not with augmentation)."""
    return options.cache and not options.augment


def prepare_features(
    name: str,
    loaded: LoadedModel,
    stimuli: StimulusSet,
    options: TrainHeadOptions,
    runtime: Runtime,
    *,
    folder: Path,
) -> ModelFeatures:
    """``loaded``'s penultimate features for every stimulus.

    With the cache, they are read from the feature store ``<folder>/<name>/features.h5`` when it
    matches, else computed once and stored there; otherwise a source that runs the backbone on
    every batch (augmented training images, eval-transform validation and prediction).
    """
    from object2brain.devices import resolve_device
    from object2brain.models.image_cache import ImageCache
    from object2brain.models.inputs import default_workers

    started = time.time()
    device = resolve_device(runtime.device)
    workers = options.num_workers
    if workers is None:
        workers = default_workers(len(stimuli), options.batch_size, device, min_batches=4)
    images = None  # the decoded-image cache (not the feature store of ``options.cache``)
    if options.image_cache is not None:
        images = ImageCache(options.image_cache, loaded.preprocessing)
    if not uses_cache(options):
        train = BackboneFeatures(
            loaded, stimuli, device=device, augment=options.augment, num_workers=workers,
            cache=images,
        )  # fmt: skip
        evaluate = (
            BackboneFeatures(loaded, stimuli, device=device, num_workers=workers, cache=images)
            if options.augment
            else train
        )
        sources = FeatureSources(train, evaluate, in_features(loaded))
        return ModelFeatures(name, loaded, sources, None, False, time.time() - started)
    path = folder / name / FEATURES_NAME
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(runtime.seed)
        features, reused = cached_features(
            loaded,
            stimuli,
            path,
            device=device,
            batch_size=options.batch_size,
            num_workers=workers,
            progress=runtime.progress,
            cache=images,
        )
    source = CachedFeatures(features, device)
    sources = FeatureSources(source, source, int(features.shape[1]))
    return ModelFeatures(name, loaded, sources, path, reused, time.time() - started)


# --------------------------------------------------------------------------------------------
# Compute


@dataclass(frozen=True)
class HeadFit:
    """One model's trained head and what it predicts.

    Attributes:
        model: the model and its features.
        fit: the trained head (CPU) with its history and level weights.
        metrics: ``metrics.json``: ``train``/``val``/``test`` (and ``out_of_fold``) regression
            metrics, ``per_level`` metrics of each, ``training`` (loss, level weights, epochs).
        predictions: ``stimulus_id, split, valence, level, predicted`` (``predictions.csv``).
        out_of_fold: ``stimulus_id, fold, valence, level, predicted`` (``out_of_fold.csv``), or
            ``None`` without cross-fitting.
        seconds: features + fitting time.
        degenerate: why the head is degenerate (:func:`~.fit.degeneracy`), or ``None``; later
            stages skip a degenerate head's model.
        fold_heads: the selection fold heads (fold ``k``'s fitted without the stimuli of
            selection fold ``k``), empty without selection folds.
    """

    model: ModelFeatures
    fit: FitResult
    metrics: dict[str, Any]
    predictions: pd.DataFrame
    out_of_fold: pd.DataFrame | None
    seconds: float
    degenerate: str | None = None
    fold_heads: tuple[FitResult, ...] = ()

    @property
    def head(self) -> nn.Linear:
        """``nn.Linear(in_features, 1)`` on the CPU."""
        return self.fit.head


@dataclass(frozen=True)
class HeadsResult:
    """What :func:`compute_heads` computed.

    Attributes:
        rated: the rated images, their split and folds.
        heads: one :class:`HeadFit` per model, by model name.
        head_metrics: the ``head_metrics`` table (:data:`~object2brain.tables.HEAD_METRICS`): one
            row per model and split (``train``, ``val``, ``test``, ``out_of_fold``).
        options: the options used.
        runtime: seed, device, progress.
    """

    rated: RatedSplit
    heads: dict[str, HeadFit]
    head_metrics: pd.DataFrame
    options: TrainHeadOptions
    runtime: Runtime


def json_ready(value: Any) -> Any:
    """``value`` with string keys, plain Python numbers and ``None`` for non-finite floats."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return json_ready(value.item())
    return value


def _metrics(
    predicted: np.ndarray,
    out_of_fold: np.ndarray | None,
    rated: RatedSplit,
    fit: FitResult,
    options: TrainHeadOptions,
) -> dict[str, Any]:
    """The ``metrics.json`` content of one head."""
    targets, levels, rows = rated.data.valence, rated.data.levels, rated.rows
    metrics: dict[str, Any] = {
        part: regression_metrics(predicted[rows[part]], targets[rows[part]]) for part in SPLITS
    }
    metrics["per_level"] = {
        part: per_level_metrics(predicted[rows[part]], targets[rows[part]], levels[rows[part]])
        for part in SPLITS
    }
    if out_of_fold is not None:
        metrics["out_of_fold"] = regression_metrics(out_of_fold, targets)
        metrics["per_level"]["out_of_fold"] = per_level_metrics(out_of_fold, targets, levels)
    metrics["training"] = {
        "loss": options.loss,
        "level_weights": {str(k): v for k, v in (fit.level_weights or {}).items()},
        "epochs_run": len(fit.history),
        "best_epoch": fit.best_epoch,
        "best_val_loss": fit.best_val_loss,
        "history": fit.history,
        "cross_fit_folds": rated.n_folds,
    }
    return dict(json_ready(metrics))


def compute_head(
    model: ModelFeatures, rated: RatedSplit, options: TrainHeadOptions, runtime: Runtime
) -> HeadFit:
    """Fit one model's head, predict every stimulus, cross-fit if asked; writes nothing."""
    from object2brain.devices import resolve_device

    started = time.time()
    device = resolve_device(runtime.device)
    data = rated.data
    features = RatedFeatures(model.sources, data.valence, data.levels)
    rows = rated.rows
    out_of_fold = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(runtime.seed)  # augmentations in the main process and worker seeds
        fit = fit_head(
            features,
            rows["train"],
            rows["val"],
            options,
            seed=runtime.seed,
            device=device,
            progress=runtime.progress,
        )
        head = fit.head.to(device)
        batch = max(options.batch_size, PREDICT_BATCH)
        predicted = predict(head, model.sources.eval, np.arange(len(data.valence)), batch)
        fit.head = head.cpu()
        if rated.folds is not None:
            out_of_fold = cross_fitted_predictions(
                features, rated.folds, rows["val"], options, seed=runtime.seed, device=device
            )
        fold_heads: list[FitResult] = []
        if rated.selection is not None:
            fold_heads = fit_fold_heads(
                features, rated.selection, rows["val"], options, seed=runtime.seed, device=device
            )
    columns = {"stimulus_id": data.stimuli.ids, "valence": data.valence, "level": data.levels}
    predictions = pd.DataFrame({**columns, "split": rated.assignment, "predicted": predicted})[
        ["stimulus_id", "split", "valence", "level", "predicted"]
    ]
    oof_table = None
    if out_of_fold is not None:
        oof_table = pd.DataFrame({**columns, "fold": rated.folds, "predicted": out_of_fold})[
            ["stimulus_id", "fold", "valence", "level", "predicted"]
        ]
    held_out = rows["test"] if len(rows["test"]) >= 2 else np.arange(len(data.valence))
    return HeadFit(
        model=model,
        fit=fit,
        metrics=_metrics(predicted, out_of_fold, rated, fit, options),
        predictions=predictions,
        out_of_fold=oof_table,
        seconds=round(model.seconds + time.time() - started, 3),
        degenerate=degeneracy(fit, predicted[held_out], data.valence[held_out]),
        fold_heads=tuple(fold_heads),
    )


def compute_heads(
    models: Sequence[ModelFeatures],
    rated: RatedSplit,
    options: TrainHeadOptions,
    runtime: Runtime,
) -> HeadsResult:
    """Fit a head per model on one split (:func:`compute_head`); the ``head_metrics`` table."""
    heads: dict[str, HeadFit] = {}
    for model in models:
        heads[model.name] = fit = compute_head(model, rated, options, runtime)
        test = fit.metrics["test"]
        log.info(
            "%s: test spearman %s, r2 %s (best epoch %d)",
            model.name,
            _fmt(test.get("spearman")),
            _fmt(test.get("r2")),
            fit.fit.best_epoch,
        )
        if fit.degenerate:
            log.warning(
                "%s: the valence head is degenerate (%s): later stages skip this model",
                model.name,
                fit.degenerate,
            )
    rows = [
        {
            "model": name,
            "split": part,
            **fit.metrics[part],
            "degenerate": fit.degenerate is not None,
            "degenerate_reason": fit.degenerate or "",
        }
        for name, fit in heads.items()
        for part in (*SPLITS, "out_of_fold")
        if part in fit.metrics
    ]
    table = pd.DataFrame(rows, columns=list(HEAD_METRICS.column_names))
    return HeadsResult(rated, heads, table, options, runtime)


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"
