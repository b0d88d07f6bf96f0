"""``o2b.encode`` (``object2brain encode``): load the inputs -> fit the encoding models -> write
the tables, the voxel maps and ``manifest.json`` -> draw the figures.

The computation is :func:`object2brain.encoding.compute_encoding` (cross-validated ridge from
every layer to every voxel, with himalaya), once per activation store (model); the options are
:class:`object2brain.options.EncodeOptions`.

Responses (what is predicted), keyed by ``(target, subject)``:

- brain patterns (a patterns HDF5, or a manifest of patterns / NIfTI / NSD / THINGS-fMRI
  sources): the mean pattern of each stimulus ``(n, voxels)``; run-wise data also give the
  split-half noise ceiling; NIfTI sources keep each voxel's indices i, j, k and the betas' grid,
  so the per-voxel r is also written as an image. An RDMs source has no voxels: an error.
- ratings (``--ratings``): one ROI ``behavior`` / ``group`` whose voxels are the raters (column
  ``c`` = rater ``c`` in the order of the ratings table); every rater must rate every stimulus.

Files written into ``out``: ``encoding``, ``encoding_voxels`` and (banded ridge)
``encoding_bands`` tables (CSV and Parquet), ``folds.csv`` (``stimulus_id``, ``fold``),
``maps/<model>/<layer>/<subject>_r.nii.gz`` for NIfTI sources (float32 r on the betas' grid, NaN
outside the subject's ROIs), ``figures/encoding_<model>.png|svg`` and ``manifest.json``.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from object2brain.activations.store import ActivationStore
from object2brain.api.rsa import (
    ActivationsArg,
    BrainArg,
    RatingsArg,
    StimuliArg,
    describe_source,
    input_hashes,
    stimulus_table,
    store_paths,
)
from object2brain.data import GROUP_SUBJECT
from object2brain.data.brain import BrainData, BrainItem, VoxelGrid, load_brain
from object2brain.data.ratings import load_ratings
from object2brain.data.stimuli import StimulusSet
from object2brain.encoding import EncodingResult, LayerFit, compute_encoding
from object2brain.errors import DataError, listing
from object2brain.executors import stage_runtime
from object2brain.io import (
    atomic_path,
    check_output_folder,
    staged_output,
    write_json,
    write_tables,
)
from object2brain.lesion.analysis import store_model
from object2brain.manifest import build_manifest, output_list
from object2brain.options import DuplicateRatings, EncodeOptions, Runtime, resolve_options

log = logging.getLogger(__name__)

RoiKey = tuple[str, str]
#: Target name of the ratings (its voxels are the raters).
BEHAVIOR_TARGET = "behavior"


@dataclass
class EncodeResult:
    """The ``encode`` tables of every model (concatenated), the folds, the fitted models
    (``fits[model][(layer, target, subject)]``) and the files written."""

    encoding: pd.DataFrame
    encoding_voxels: pd.DataFrame
    encoding_bands: pd.DataFrame
    folds: pd.DataFrame
    fits: dict[str, Mapping[tuple[str, str, str], LayerFit]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class EncodingTargets:
    """What the encoding models predict, on the analysed stimuli ``ids`` (rows in that order).

    ``responses[(target, subject)]`` ``(n, v)``; ``runs[...]`` ``(n_runs, n, v)`` where run-wise
    data exist; ``coords[...]`` ``(v, 3)`` voxel indices and ``grids[...]`` for NIfTI sources;
    ``conditions`` ``(n,)`` or None; ``raters``: the rater ids (voxels of ``behavior``).
    """

    ids: list[str]
    conditions: list[str] | None
    responses: dict[RoiKey, np.ndarray]
    runs: dict[RoiKey, np.ndarray] = field(default_factory=dict)
    coords: dict[RoiKey, np.ndarray] = field(default_factory=dict)
    grids: dict[RoiKey, VoxelGrid] = field(default_factory=dict)
    raters: list[str] = field(default_factory=list)


def encode(
    activations: ActivationsArg,
    *,
    brain: BrainArg = None,
    ratings: RatingsArg = None,
    stimuli: StimuliArg = None,
    out: str | Path | None = None,
    options: EncodeOptions | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    figures: bool = True,
    folds: int | None = None,
    inner_folds: int | None = None,
    alphas: Sequence[float] | None = None,
    reduce: str | None = None,
    banded: Sequence[str] | None = None,
    n_iter: int | None = None,
    n_perm: int | None = None,
    perm_null: str | None = None,
    perm_stop: int | None = None,
    layers: Sequence[str] | None = None,
    duplicate_ratings: str | None = None,
    executor: str = "local",
    ray_address: str | None = None,
) -> EncodeResult:
    """Encoding models: cross-validated ridge from every layer of every model to every voxel.

    Args:
        activations: one or more activation stores (.h5), one model each.
        brain: brain manifest (YAML) or patterns HDF5 (or loaded :class:`BrainData`); not RDMs.
        ratings: long ratings table (``subject, stimulus_id, valence``): each rater is a voxel
            of the target ``behavior``.
        stimuli: stimulus table (``stimulus_id``, optional ``condition``); default: the first
            store's ids, no conditions.
        out: output folder (nothing written if None).
        options: :class:`EncodeOptions`; the option keywords below (when given) override it.
        seed: seed of the folds, SRP, band search and permutations.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (himalaya's torch_cuda backend on CUDA).
        progress: log one line per model and layer.
        executor: ``local`` (this process) | ``ray``: the
            cross-validation folds on a Ray cluster at
            ``ray_address`` (``auto``: the cluster of this machine; ``None``: a local one); the
            results are those of a local run (:mod:`object2brain.executors`).
        figures: draw the layer profiles (when ``out`` is given).
        folds, inner_folds, alphas, reduce, banded, n_iter, n_perm, perm_null, perm_stop,
            layers, duplicate_ratings: the fields of :class:`EncodeOptions` (None: not
            given).

    Raises:
        DataError: no brain data nor ratings, an RDMs source, stimuli missing from a store or
            the brain data, raters with unrated stimuli, and the engine's checks (fewer stimuli
            than folds, a layer with one feature, constant voxels, ...).
    """
    opts = _resolve(
        options,
        folds=folds,
        inner_folds=inner_folds,
        alphas=alphas,
        reduce=reduce,
        banded=banded,
        n_iter=n_iter,
        n_perm=n_perm,
        perm_null=perm_null,
        perm_stop=perm_stop,
        layers=layers,
        duplicate_ratings=duplicate_ratings,
    )
    runtime = stage_runtime(
        seed=seed, device=str(device), progress=progress, executor=executor,
        ray_address=ray_address,
    )  # fmt: skip
    if brain is None and ratings is None:
        raise DataError("encode needs brain data (--brain) or ratings (--ratings) to predict")
    if out is not None:
        check_output_folder(out)
    paths = store_paths(activations)
    brain_data = load_brain(brain) if brain is not None else None
    with ExitStack() as stack:
        stores = [stack.enter_context(ActivationStore.open(p)) for p in paths]
        stimulus_set = stimulus_table(stimuli)
        ids = stimulus_set.ids if stimulus_set is not None else stores[0].stimulus_ids
        targets = load_targets(
            brain_data,
            ratings,
            list(ids),
            _conditions(stimulus_set),
            duplicates=opts.duplicate_ratings,
        )
        results = {
            store_model(store): _encode_store(store, targets, opts, runtime) for store in stores
        }
    result = combine(results)
    if out is not None:
        config = {
            "activations": [str(p) for p in paths],
            "brain": describe_source(brain),
            "ratings": describe_source(ratings),
            "stimuli": describe_source(stimuli),
            "device": str(device),
            "raters": targets.raters,
            **opts.model_dump(mode="json"),
        }
        more = [Path(s) for s in dict.fromkeys(i.source for i in (brain_data or _NO_BRAIN).items)]
        inputs = input_hashes(paths, [brain, ratings, stimuli], more)
        with staged_output(out) as staging:  # the folder changes as a whole, under its lock
            files = write_encoding(result, targets, staging.folder, config, inputs, seed, figures)
        result.files = staging.final(files)
    return result


def _resolve(options: EncodeOptions | None, **given: Any) -> EncodeOptions:
    """``options`` with the keywords given (not None; sequences as lists), validated."""
    values = {
        key: list(value) if isinstance(value, tuple | list) else value
        for key, value in given.items()
        if value is not None
    }
    return resolve_options(EncodeOptions, options, **values)


def _conditions(stimulus_set: StimulusSet | None) -> list[str] | None:
    """The stimulus table's ``condition`` column as text (None without one)."""
    if stimulus_set is None or "condition" not in stimulus_set.table:
        return None
    return [str(c) for c in stimulus_set.table["condition"]]


_NO_BRAIN = BrainData([])


def _encode_store(
    store: ActivationStore, targets: EncodingTargets, options: EncodeOptions, runtime: Runtime
) -> EncodingResult:
    """The encoding models of one store's layers (``options.layers``, else every layer with
    more than one feature: a one-number layer such as ``valence`` is left out, logged)."""
    model = store_model(store)
    layers = options.layers
    if layers is None:
        single = [name for name in store.layers if int(np.prod(store.shape(name)[1:])) < 2]
        if single:
            log.info("%s: layer(s) with one feature left out of encoding: %s", model, single)
        layers = [name for name in store.layers if name not in single]
    unknown = [name for name in layers if name not in store.layers]
    if unknown:
        raise DataError(f"{store.path}: no layer(s) {listing(unknown)} in the store")
    features = {name: store.read(name, ids=targets.ids) for name in layers}

    def say(message: str) -> None:
        if runtime.progress:
            log.info("%s", message)

    try:
        return compute_encoding(
            features,
            targets.responses,
            options.model_copy(update={"layers": list(layers)}),
            runtime,
            stimulus_ids=targets.ids,
            model=model,
            conditions=targets.conditions,
            runs=targets.runs,
            voxel_coords=targets.coords,
            progress=say,
        )
    except DataError as exc:
        raise DataError(f"{store.path}: {exc}") from None


def combine(results: Mapping[str, EncodingResult]) -> EncodeResult:
    """One :class:`EncodeResult` of the per-model results (the folds are the same for all:
    same stimuli, conditions and seed)."""
    parts = list(results.values())
    return EncodeResult(
        encoding=pd.concat([r.encoding for r in parts], ignore_index=True),
        encoding_voxels=pd.concat([r.encoding_voxels for r in parts], ignore_index=True),
        encoding_bands=pd.concat([r.encoding_bands for r in parts], ignore_index=True),
        folds=parts[0].folds,
        fits={model: r.fits for model, r in results.items()},
    )


# --- targets -------------------------------------------------------------------------------


def load_targets(
    brain: BrainData | None,
    ratings: RatingsArg,
    ids: list[str],
    conditions: list[str] | None,
    *,
    duplicates: DuplicateRatings = "error",
) -> EncodingTargets:
    """The responses of the brain items and raters on ``ids`` (see :class:`EncodingTargets`);
    ``duplicates``: repeated ratings of a pair refused or averaged (``duplicate_ratings``)."""
    targets = EncodingTargets(ids=ids, conditions=conditions, responses={})
    if brain is not None:
        rdms = [item.label for item in brain.items if item.kind == "rdm"]
        if rdms:
            raise DataError(
                f"{listing(rdms)}: an RDM has no voxels, and encoding models predict voxels: give "
                "patterns (a patterns HDF5, NIfTI betas) or use `rsa` for RDMs"
            )
        brain.common_ids(ids, "error")
        for item in brain.items:
            _add_item(targets, item.take(ids))
    if ratings is not None:
        table = load_ratings(ratings, ids, duplicates=duplicates)
        matrix = table.matrix(ids)  # (raters, n)
        unrated = [s for s, row in zip(table.subjects, matrix, strict=True) if np.isnan(row).any()]
        if unrated:
            where = describe_source(ratings) or "ratings"
            raise DataError(
                f"{where}: rater(s) {listing(unrated)} did not rate every analysed stimulus; "
                "encoding predicts each rater's ratings (one voxel per rater), so every rater "
                "must rate every stimulus"
            )
        targets.responses[(BEHAVIOR_TARGET, GROUP_SUBJECT)] = matrix.T.astype(np.float64)
        targets.raters.extend(table.subjects)
    return targets


def _add_item(targets: EncodingTargets, item: BrainItem) -> None:
    """One brain item's mean patterns (ids order), run-wise responses and voxel places."""
    key = (item.roi, item.subject)
    _, patterns = item.mean_patterns()
    targets.responses[key] = np.asarray(patterns, dtype=np.float64)
    if item.coords is not None and item.grid is not None:
        targets.coords[key] = item.coords
        targets.grids[key] = item.grid
    if item.runs is None:
        return
    runs = run_matrix(item, targets.ids)
    if runs is None:
        log.warning(
            "%s: not every run holds every stimulus once; no noise ceiling for this ROI",
            item.label,
        )
    else:
        targets.runs[key] = runs


def run_matrix(item: BrainItem, ids: Sequence[str]) -> np.ndarray | None:
    """Run-wise responses ``(n_runs, n, v)`` of an item with ``runs`` (rows of each run in
    ``ids`` order), or None when some run lacks a stimulus or repeats one."""
    assert item.runs is not None
    blocks = []
    for run in np.unique(item.runs):
        rows = np.flatnonzero(item.runs == run)
        order = {item.stimulus_ids[r]: r for r in rows}
        if len(order) != len(rows) or set(order) != set(ids):
            return None
        blocks.append(item.data[[order[sid] for sid in ids]])
    return np.stack(blocks) if len(blocks) >= 2 else None


# --- writing -------------------------------------------------------------------------------


def write_encoding(
    result: EncodeResult,
    targets: EncodingTargets,
    out: Path,
    config: dict[str, Any],
    inputs: dict[str, str],
    seed: int,
    figures: bool,
) -> list[Path]:
    """Write the tables, ``folds.csv``, the NIfTI maps, the figures (via
    :mod:`object2brain.report.figures.encoding`) and ``manifest.json``; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    files = write_tables(
        out,
        {name: getattr(result, name) for name in ("encoding", "encoding_voxels", "encoding_bands")},
        unless_empty=("encoding_bands",),
    )
    with atomic_path(out / "folds.csv") as temp:
        result.folds.to_csv(temp, index=False)
    files.append(out / "folds.csv")
    files += write_maps(result.encoding_voxels, targets.grids, out / "maps")
    if figures:
        from object2brain.report.figures.encoding import encoding_figures

        files += encoding_figures(result.encoding, out / "figures")
    summary = {"n_stimuli": len(targets.ids), "n_rois": len(targets.responses)}
    manifest = build_manifest(
        "encode",
        config,
        seeds={"folds": seed, "permutation": seed},
        inputs=inputs,
        outputs=output_list(files, out),
        extra=summary,
    )
    files.append(write_json(out / "manifest.json", manifest))
    return files


def map_name(text: str) -> str:
    """A layer or subject name as a folder or file name (``/`` and ``:`` become ``_``)."""
    return "".join("_" if c in '/\\:*?"<>|' else c for c in text) or "_"


def write_maps(voxels: pd.DataFrame, grids: Mapping[RoiKey, VoxelGrid], folder: Path) -> list[Path]:
    """``<folder>/<model>/<layer>/<subject>_r.nii.gz`` per model, layer and subject with NIfTI
    ROIs: the voxels' r (float32) on the betas' grid, NaN elsewhere (an ROI on another grid than
    the subject's first is left out of the map, logged)."""
    files: list[Path] = []
    nifti = voxels[
        [(t, s) in grids for t, s in zip(voxels["target"], voxels["subject"], strict=True)]
    ]
    for (model, layer, subject), rows in nifti.groupby(["model", "layer", "subject"], sort=False):
        grid: VoxelGrid | None = None
        volume: np.ndarray | None = None
        for target, roi in rows.groupby("target", sort=False):
            own = grids[(str(target), str(subject))]
            if grid is None:
                grid, volume = own, np.full(own.shape, np.nan, dtype=np.float32)
            elif own.shape != grid.shape or not np.allclose(own.affine, grid.affine):
                log.warning("ROI %s of %s is on another grid: not in its map", target, subject)
                continue
            index = roi[["i", "j", "k"]].to_numpy(dtype=np.int64)
            assert volume is not None
            volume[index[:, 0], index[:, 1], index[:, 2]] = roi["r"].to_numpy(np.float32)
        assert grid is not None and volume is not None
        path = (
            folder
            / map_name(str(model))
            / map_name(str(layer))
            / f"{map_name(str(subject))}_r.nii.gz"
        )
        files.append(_save_nifti(volume, grid, path))
    return files


def _save_nifti(volume: np.ndarray, grid: VoxelGrid, path: Path) -> Path:
    """Write a float32 volume with the grid's affine as a gzipped NIfTI-1 file, atomically."""
    import nibabel as nib

    nifti1: Any = nib.Nifti1Image
    image = nifti1(volume, grid.affine)
    image.header.set_data_dtype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temp:
        temp.write_bytes(gzip.compress(image.to_bytes(), mtime=0))
    return path
