"""The edge of the stage behind ``o2b.train_head``: resolve -> features -> compute -> figures ->
write (the steps live in :mod:`object2brain.heads.train` and :mod:`object2brain.heads.write`)."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from object2brain.data.findingemo import VALENCE_RANGE
from object2brain.executors import stage_runtime
from object2brain.heads.train import (
    OUT_OF_FOLD_NAME,
    HeadsResult,
    ModelFeatures,
    compute_heads,
    load_models,
    load_rated,
    prepare_features,
    resolve_models,
    resolve_train_options,
    split_rated,
    uses_cache,
)
from object2brain.heads.write import (
    HEAD_NAME,
    MANIFEST_NAME,
    METRICS_NAME,
    MISSING_NAME,
    SPLIT_NAME,
    RunRecord,
    write_heads,
)
from object2brain.options import LossName, Runtime, TrainHeadOptions

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from object2brain.data.stimuli import StimulusSet
    from object2brain.models.zoo import LoadedModel

__all__ = ["OUT_OF_FOLD_NAME", "HeadResult", "TrainHeadResult", "train_head"]

log = logging.getLogger("object2brain.heads")


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


def train_head(
    models: str | LoadedModel | Sequence[str | LoadedModel],
    *,
    out: str | Path,
    weights: str | Sequence[str] = "default",
    findingemo: str | Path | None = None,
    image_root: str | Path | None = None,
    stimuli: str | Path | StimulusSet | None = None,
    split: str | Path | None = None,
    valence_range: tuple[float, float] = VALENCE_RANGE,
    options: TrainHeadOptions | None = None,
    in_study: bool = False,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    figures: bool = True,
    loss: LossName | None = None,
    augment: bool | None = None,
    cache: bool | None = None,
    epochs: int | None = None,
    patience: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    batch_size: int | None = None,
    fractions: tuple[float, float, float] | None = None,
    num_workers: int | None = None,
    cross_fit: int | None = None,
    selection_folds: int | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    image_cache: str | Path | None = None,
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
        valence_range: the declared rating scale; ratings outside are an error.
        options: the training options (:class:`~object2brain.options.TrainHeadOptions`); the
            option keywords below, when given, override its fields.
        in_study: the context of ``cross_fit=None``: 5 folds in a study (heads fitted on the
            study's own stimuli), none for train-head alone.
        seed: seed of the split, the folds, the batch order and the augmentations.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        progress: show progress bars.
        executor: ``local`` (this process) | ``ray``: the feature pass (with the feature
            cache) in shards on an actor pool of a Ray cluster at ``ray_address`` (``auto``:
            the cluster of this machine; ``None``: a local one), stitched into the same feature
            store; training stays here (:mod:`object2brain.executors.features`).
        figures: write the predicted-vs-rated scatter figure of each model.
        loss, augment, cache, epochs, patience, lr, weight_decay, batch_size, fractions,
        num_workers, cross_fit, selection_folds, image_cache: the fields of
            :class:`TrainHeadOptions` (``None``: from ``options``, else its default). ``cache``
            keeps the penultimate features in an activation store ``<out>/<model>/features.h5``
            (off with ``augment``);
            ``cross_fit=K`` (``K >= 2``) also fits ``K`` fold heads and writes every stimulus's
            out-of-fold prediction to ``<out>/<model>/out_of_fold.csv`` (``stimulus_id, fold,
            valence, level, predicted``), with metrics under ``"out_of_fold"``: use these, not
            the main head's, to correlate predicted valence with the ratings of the training
            stimuli (``extract(valence=...)``). ``selection_folds=K`` also fits ``K`` heads on
            the condition-stratified selection folds and saves them as
            ``<out>/<model>/head.fold<k>.safetensors`` (sidecar ``head.fold<k>.json`` naming
            fold ``k``'s held-out stimuli) for ``dissect(fold_heads=...)``.

    Returns:
        :class:`TrainHeadResult`. Files: ``<out>/split.csv``, ``<out>/missing_images.csv`` (if
        any), ``<out>/head_metrics.csv|.parquet``, ``<out>/manifest.json``, and per model
        ``<out>/<model>/{head.safetensors, head.json, metrics.json, predictions.csv,
        features.h5}`` (+ ``out_of_fold.csv``) and
        ``<out>/figures/predicted_vs_rated_<model>.png|.svg``.

    Raises:
        Object2BrainError subclasses on bad input, before anything is written.
    """
    from object2brain.devices import resolve_device
    from object2brain.io import check_output_folder, staged_output

    started = time.time()
    out = Path(out).expanduser()
    values = {
        "loss": loss, "augment": augment, "cache": cache, "epochs": epochs,
        "patience": patience, "lr": lr, "weight_decay": weight_decay,
        "batch_size": batch_size, "fractions": fractions, "num_workers": num_workers,
        "cross_fit": cross_fit, "selection_folds": selection_folds, "image_cache": image_cache,
    }  # fmt: skip
    opts = resolve_train_options(options, values)
    specs = resolve_models(models, weights)
    torch_device = resolve_device(device)
    runtime = stage_runtime(
        seed=seed, device=str(torch_device), progress=progress, executor=executor,
        ray_address=ray_address,
    )  # fmt: skip
    check_output_folder(out)
    if opts.augment and opts.cache:
        log.warning("--augment: features change every epoch, so they are not cached")
    data = load_rated(findingemo, image_root, stimuli, valence_range)
    rated = split_rated(data, split, opts, seed=seed, in_study=in_study)
    loaded = load_models(specs, seed=seed)

    # Inputs are valid: from here on, compute and write, under the lock of ``out`` (feature
    # caches go into ``out`` itself; the results are swapped in as a whole at the end).
    with staged_output(out) as staging:
        features = [
            _features(name, model, data.stimuli, opts, runtime, out)
            for name, model in loaded.items()
        ]
        result = compute_heads(features, rated, opts, runtime)
        figure_files = draw_figures(result, staging.folder) if figures else []
        record = _record(findingemo, image_root, stimuli, split, str(torch_device), started)
        files = write_heads(result, staging.folder, record=record, figures=figure_files)
    return _summary(result, out, staging.final(files))


def _features(
    name: str,
    loaded: LoadedModel,
    stimuli: StimulusSet,
    options: TrainHeadOptions,
    runtime: Runtime,
    out: Path,
) -> ModelFeatures:
    """The head's features (:func:`~object2brain.heads.train.prepare_features`); with
    ``--executor ray`` and the feature cache, the feature store is first written from shards
    computed on the Ray cluster (:mod:`object2brain.executors.features`), then read as a local
    run reads it."""
    if runtime.executor != "ray":
        return prepare_features(name, loaded, stimuli, options, runtime, folder=out)
    if not uses_cache(options):
        log.warning("--executor ray with --augment: the features change every epoch, so %s's "
                    "training runs in this process", name)  # fmt: skip
        return prepare_features(name, loaded, stimuli, options, runtime, folder=out)
    from object2brain.devices import resolve_device
    from object2brain.executors.features import features_on_ray
    from object2brain.executors.pool import PoolSettings
    from object2brain.heads.features import FEATURES_NAME

    started = time.time()
    computed = features_on_ray(
        loaded, stimuli, out / name / FEATURES_NAME, device=resolve_device(runtime.device),
        batch_size=options.batch_size, num_workers=options.num_workers or 0,
        settings=PoolSettings(address=runtime.ray_address),
    )  # fmt: skip
    features = prepare_features(name, loaded, stimuli, options, runtime, folder=out)
    if not computed:
        return features
    return dataclasses.replace(features, reused=False, seconds=time.time() - started)


def _record(
    findingemo: str | Path | None,
    image_root: str | Path | None,
    stimuli: Any,
    split: str | Path | None,
    device: str,
    started: float,
) -> RunRecord:
    """The run's inputs as its manifest records them."""
    return RunRecord(
        findingemo=None if findingemo is None else str(findingemo),
        image_root=None if image_root is None else str(image_root),
        stimuli=None if stimuli is None else str(getattr(stimuli, "source", stimuli)),
        split=None if split is None else str(split),
        device=device,
        started=started,
    )


def draw_figures(result: HeadsResult, out: Path) -> list[Path]:
    """Predicted vs rated valence of each model: ``<out>/figures/predicted_vs_rated_<model>``."""
    from object2brain.report.figures.heads import plot_predicted_vs_rated

    files: list[Path] = []
    for name, fit in result.heads.items():
        files += plot_predicted_vs_rated(
            fit.predictions, out / "figures", name, metrics=fit.metrics
        )
    return files


def _summary(result: HeadsResult, out: Path, files: list[Path]) -> TrainHeadResult:
    models = {
        name: HeadResult(
            name=name,
            arch=fit.model.loaded.arch,
            head_path=out / name / HEAD_NAME,
            metrics_path=out / name / METRICS_NAME,
            metrics=fit.metrics,
            features_path=fit.model.features_path,
            features_reused=fit.model.reused,
            seconds=fit.seconds,
            out_of_fold_path=None if fit.out_of_fold is None else out / name / OUT_OF_FOLD_NAME,
        )
        for name, fit in result.heads.items()
    }
    data = result.rated.data
    return TrainHeadResult(
        out=out,
        split_path=out / SPLIT_NAME,
        models=models,
        n_images=len(data.stimuli),
        missing_path=out / MISSING_NAME if len(data.missing) else None,
        n_missing=len(data.missing),
        manifest_path=out / MANIFEST_NAME,
        files=files,
    )
