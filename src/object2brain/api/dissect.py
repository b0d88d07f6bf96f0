"""The edge of the dissection stage, ``o2b.dissect``: load the model, stimuli, detector and group
map, validate the options, compute (:func:`object2brain.explain.dissect.compute_dissection`),
draw the figures from the result (:mod:`object2brain.report.figures.dissect`) and write the
tables and manifest (:func:`object2brain.explain.dissect.write_dissection`)."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from object2brain.errors import DataError
from object2brain.executors import stage_runtime
from object2brain.io import check_output_folder, optional_staging
from object2brain.options import DissectOptions, OptionsError, Runtime, as_flags, resolve_options

if TYPE_CHECKING:
    import torch

    from object2brain.data.stimuli import StimulusSet
    from object2brain.executors.dissection import DissectShards
    from object2brain.explain.detectors import Detector
    from object2brain.explain.dissect import DissectResult
    from object2brain.explain.groups import GroupMap
    from object2brain.models.zoo import LoadedModel

__all__ = ["dissect", "draw_dissection_figures"]


def dissect(
    model: LoadedModel | str,
    stimuli: StimulusSet | str | Path,
    *,
    layer: str | None = None,
    out: str | Path | None = None,
    options: DissectOptions | None = None,
    detector: str | Detector | None = None,
    groups: str | Path | GroupMap | None = None,
    direction: str | None = None,
    target: int | None = None,
    threshold: float | None = None,
    min_images: int | None = None,
    n_null_assign: int | None = None,
    selection_folds: int | None = None,
    batch_size: int | None = None,
    decode: str | None = None,
    num_workers: int | None = None,
    image_cache: str | Path | None = None,
    fold_heads: str | Path | None = None,
    gallery_filters: int | None = None,
    gallery_images: int | None = None,
    weights: str = "default",
    head: str | Path | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    cache_dir: str | Path | None = None,
    figures: bool = True,
    executor: str = "local",
    ray_address: str | None = None,
) -> DissectResult:
    """EmoCAM++: per-filter Grad-CAM x object detections -> the ``filter_objects`` table.

    Args:
        model: a :class:`~object2brain.models.zoo.LoadedModel`, or an architecture name loaded
            with ``weights``, ``head`` and ``seed``.
        stimuli: a :class:`~object2brain.data.stimuli.StimulusSet`, or a table / image folder.
        layer: one dotted module name with spatial output ``(batch, K, h, w)`` (or
            ``options.layer``, which may map model names to layers).
        out: folder for ``filter_objects.csv/.parquet``, ``detections.csv/.parquet``,
            ``figures/`` and ``manifest.json``; ``None`` writes nothing.
        options: :class:`~object2brain.options.DissectOptions`; the keywords from ``detector``
            to ``gallery_images``, when given, override its fields (meanings and defaults
            there). ``detector`` may also be a
            :class:`~object2brain.explain.detectors.Detector` and ``groups`` a
            :class:`~object2brain.explain.groups.GroupMap` (default: the shipped map that fits
            the detector).
        weights, head: used only when ``model`` is a name.
        seed: recorded; seeds random weights when ``model`` is a name.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        progress: progress bars.
        executor: ``local`` (this process) | ``ray``: the Grad-CAM
            pass in shards of images on an actor pool on a Ray cluster at
            ``ray_address`` (``auto``: the cluster of this machine; ``None``: a local one); the
            results are those of a local run (:mod:`object2brain.executors`).
        cache_dir: detection cache folder (default: ``options.detection_cache``, else the
            user's cache shared with ``object2brain run`` and the command line,
            :func:`~object2brain.explain.detectors.default_detection_cache`).
        figures: draw the enrichment heatmap and one gallery per group (needs ``out``).

    Returns:
        The :class:`~object2brain.explain.dissect.DissectResult`, with ``out`` and ``files``
        set when written.

    Raises:
        DataError: invalid options (named by their flag), bad boxes / groups files, or no image
            with a usable detection.
        LayerError: unknown layer or one without spatial maps.
        ModelError: no valence head and no ``target``.
    """
    from object2brain.data.stimuli import StimulusSet, load_stimuli
    from object2brain.explain.dissect import compute_dissection, write_dissection
    from object2brain.models.zoo import LoadedModel, load_model

    started = time.time()
    given = {
        "layer": layer, "direction": direction, "target": target, "threshold": threshold,
        "min_images": min_images, "n_null_assign": n_null_assign,
        "selection_folds": selection_folds, "batch_size": batch_size,
        "decode": decode,
        "num_workers": num_workers, "image_cache": image_cache, "fold_heads": fold_heads,
        "gallery_filters": gallery_filters,
        "gallery_images": gallery_images,
        "detector": detector if isinstance(detector, str) else None,
        "groups": groups if isinstance(groups, str | Path) else None,
    }  # fmt: skip
    resolved = _resolve(options, {k: v for k, v in given.items() if v is not None})
    runtime = stage_runtime(
        seed=seed, device=str(device), progress=progress, executor=executor,
        ray_address=ray_address,
    )  # fmt: skip
    out_path = None if out is None else Path(out).expanduser()
    if out_path is not None:
        check_output_folder(out_path)
    stimulus_set = stimuli if isinstance(stimuli, StimulusSet) else load_stimuli(stimuli)
    loaded = (
        model
        if isinstance(model, LoadedModel)
        else load_model(model, weights, head=head, seed=seed)
    )
    _warn_degenerate_head(loaded)
    det, group_map = _detector_and_groups(detector, groups, resolved, runtime)
    cache = _cache_folder(cache_dir, resolved)
    with optional_staging(out_path) as staging:  # the lock first: the cache may lie in out
        shards = _sharded_pass(runtime, out_path, stimulus_set)
        result = compute_dissection(
            loaded, stimulus_set, det, group_map, resolved, runtime, cache_dir=cache,
            gallery=figures and out_path is not None, accumulate=shards,
        )  # fmt: skip
        if staging is not None:  # tables, figures, manifest: swapped in as a whole
            folder = staging.folder
            drawn = draw_dissection_figures(result, folder / "figures") if figures else []
            result.summary["seconds"] = round(time.time() - started, 3)
            result.files = staging.final(write_dissection(result, folder, also_written=drawn))
            result.out = staging.out
    result.summary["seconds"] = round(time.time() - started, 3)
    if shards is not None:  # written (or nothing to write): the shards are no longer needed
        shutil.rmtree(shards.folder, ignore_errors=True)
    return result


def _sharded_pass(runtime: Runtime, out: Path | None, stimuli: StimulusSet) -> DissectShards | None:
    """With ``--executor ray``: the Grad-CAM pass in shards on the Ray cluster, the shard files
    next to ``out`` (``<out>.shards/``, kept until the tables are written, so a rerun after a
    failure redoes only the missing shards; without ``out``, a temporary folder)."""
    if runtime.executor != "ray":
        return None
    from object2brain.executors import RayExecutor
    from object2brain.executors.dissection import DissectShards, dissect_shard_folder

    if out is None:
        folder = Path(tempfile.mkdtemp(prefix="o2b-dissect-shards-"))
    else:
        folder = dissect_shard_folder(out)
    executor = RayExecutor(address=runtime.ray_address)
    return DissectShards(executor, folder, key=stimuli.fingerprint())


def draw_dissection_figures(result: DissectResult, folder: Path) -> list[Path]:
    """The enrichment heatmap (filters x groups) and one gallery per group with panels, from the
    result's table and gallery arrays (PNG + SVG each)."""
    from object2brain.report.figures.dissect import (
        GalleryPanel,
        plot_filter_group_heatmap,
        plot_group_gallery,
    )

    table = result.table
    files = plot_filter_group_heatmap(table[table["fold"].isna()], folder)  # all-images rows
    names = [f.name for f in fields(GalleryPanel)]
    for group in result.summary["groups"]:
        panels = [
            GalleryPanel(**{name: getattr(entry, name) for name in names})
            for entry in result.gallery
            if entry.group == group
        ]
        if panels:
            files += plot_group_gallery(panels, folder, group)
    return files


def _detector_and_groups(
    detector: str | Detector | None,
    groups: str | Path | GroupMap | None,
    options: DissectOptions,
    runtime: Runtime,
) -> tuple[Detector, GroupMap]:
    """The detector (given, or made from ``options.detector`` on the run's device) and the group
    map (given, loaded from ``options.groups``, or the shipped map that fits the detector)."""
    from object2brain.devices import resolve_device
    from object2brain.explain.detectors import Detector, make_detector
    from object2brain.explain.groups import GroupMap, default_groups_for, load_groups

    det = (
        detector
        if isinstance(detector, Detector)
        else make_detector(options.detector, device=resolve_device(runtime.device))
    )
    if isinstance(groups, GroupMap):
        return det, groups
    source = options.groups
    return det, load_groups(source) if source is not None else default_groups_for(det.kind)


def _warn_degenerate_head(loaded: LoadedModel) -> None:
    """A warning when the model's valence head is degenerate (the pipeline skips such a model;
    called directly, the dissection runs and fails if every map is zero)."""
    import logging

    from object2brain.heads.io import degenerate_reason

    path = (loaded.head or {}).get("path")
    reason = degenerate_reason(Path(path)) if path else None
    if reason:
        logging.getLogger("object2brain.dissect").warning(
            "%s: the valence head %s is degenerate (%s): its maps explain a (nearly) constant "
            "output",
            loaded.name,
            path,
            reason,
        )


def _cache_folder(cache_dir: str | Path | None, options: DissectOptions) -> Path:
    """The detection cache: ``cache_dir``, else the option, else the user's shared cache."""
    from object2brain.explain.detectors import default_detection_cache

    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if options.detection_cache is not None:
        return Path(options.detection_cache).expanduser()
    return default_detection_cache()


def _resolve(options: DissectOptions | None, values: dict[str, Any]) -> DissectOptions:
    """The options, as a :class:`DataError` naming each option by its flag when invalid."""
    try:
        return resolve_options(DissectOptions, options, **values)
    except OptionsError as exc:
        raise DataError(f"dissect: {as_flags(DissectOptions, str(exc))}") from None
