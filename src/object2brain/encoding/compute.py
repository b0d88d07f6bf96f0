r"""Encoding models of one network: every layer (and optionally a banded model across layers) to
every ROI, cross-validated over stimuli; the tables of the ``encode`` stage.

:func:`compute_encoding` is pure (arrays in, :class:`EncodingResult` out; no file I/O). For each
layer and ROI it fits :func:`object2brain.encoding.ridge.fit_ridge_cv` on the outer folds of
:func:`object2brain.encoding.folds.outer_folds` and scores the out-of-fold predictions
(:mod:`object2brain.encoding.scores`) on all stimuli (``condition = "all"``) and on the stimuli of
each condition. ``perm_null``: ``predictions`` permutes the out-of-fold predictions within the
outer folds (fast; conservative, see ``permutation_test``); ``refit`` relabels the responses and
reruns the cross-validation of the layer for every permutation (exact; on the runtime's device
with :mod:`object2brain.encoding.smoother`, float64; banded rows always use ``predictions``: the
band-weight search is not linear in the responses); ``fixed_alpha`` relabels and refits each
voxel with the alphas its real responses chose (one product per fold and alpha,
:class:`~object2brain.encoding.smoother.FixedAlphaSmoother`; banded rows as for ``refit``;
measured conservative, see ``validation/encoding_fixed_alpha_null.md``); ``refit_tail`` is
``refit`` with a p at its floor ``1 / (n_perm + 1)`` extended by a normal approximation of the
same refits (:func:`~object2brain.encoding.scores.tail_p`), for a small ``n_perm``. BH-FDR runs
over the
rows (layers x ROIs, banded model included) of each model and condition.

Layer features ``(n, ...)`` are flattened to ``(n, p)``. With ``reduce = srp:DIM`` a layer with
``p > DIM`` is projected by the sparse random projection of
:mod:`object2brain.activations.projection` (seeded by the root seed and the layer name, each row
centred first; no fit, so it is applied before the folds); ``pca:DIM`` is fitted inside each
training set. That PCA (and the standardisation, when on) depends on the layer's features and
the fold's stimuli only, so it is fitted once per layer and outer fold
(:class:`~object2brain.encoding.ridge.ReductionCache`, keyed by layer, fold and the fold's
stimulus ids) and shared by every ROI's ridge fit, the ``refit`` null and the banded model; the
numbers are those of a fit per ROI, bit for bit.

:func:`predict_with_filters` predicts the responses of the held-out stimuli from the same layer's
features with some filters zeroed (or only some kept), with each fold's fitted weights: the input
of the encoding lesion.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from object2brain.activations.projection import project, srp_matrix
from object2brain.devices import resolve_device
from object2brain.encoding.folds import folds_table, outer_folds
from object2brain.encoding.ridge import (
    BackendName,
    BandedFit,
    FoldReduction,
    ReductionCache,
    RidgeFit,
    backend_for,
    check_inputs,
    fit_banded_cv,
    fit_ridge_cv,
)
from object2brain.encoding.scores import (
    NullRefit,
    fdr_bh,
    noise_ceiling,
    pearson_r,
    permutation_test,
    r2_score,
    refit_permutation_tests,
    roi_summary,
)
from object2brain.encoding.smoother import (
    FixedAlphaSmoother,
    TorchCvSmoother,
    fit_fixed_alpha_smoother,
    fit_torch_smoother,
)
from object2brain.errors import DataError, listing
from object2brain.executors import Executor, executor_for
from object2brain.options import EncodeOptions, Runtime
from object2brain.tables import ENCODING, ENCODING_BANDS, ENCODING_VOXELS

#: Columns of the ``encoding``, ``encoding_voxels`` and ``encoding_bands`` tables.
ENCODING_COLUMNS, ENCODING_VOXEL_COLUMNS, ENCODING_BAND_COLUMNS = (
    tuple(schema.column_names) for schema in (ENCODING, ENCODING_VOXELS, ENCODING_BANDS)
)
#: Condition label of the rows scored on all stimuli.
ALL_CONDITIONS = "all"

RoiKey = tuple[str, str]
"""An ROI: ``(target, subject)``."""


@dataclass(frozen=True)
class LayerFit:
    """The fitted encoding model of one layer and ROI: the cross-validated ridge and how the
    layer's features became its inputs (``srp_dim``: SRP to this many features, else ``None``)."""

    layer: str
    ridge: RidgeFit
    srp_dim: int | None
    seed: int


@dataclass(frozen=True)
class EncodingResult:
    """Tables of the ``encode`` stage for one model, plus the fitted models.

    ``encoding`` (:data:`ENCODING_COLUMNS`), ``encoding_voxels`` (:data:`ENCODING_VOXEL_COLUMNS`),
    ``encoding_bands`` (:data:`ENCODING_BAND_COLUMNS`, empty without banded ridge), ``folds``
    (``stimulus_id``, ``fold``); ``fits[(layer, target, subject)]``.
    """

    encoding: pd.DataFrame
    encoding_voxels: pd.DataFrame
    encoding_bands: pd.DataFrame
    folds: pd.DataFrame
    fits: Mapping[tuple[str, str, str], LayerFit] = field(default_factory=dict)


@dataclass(frozen=True)
class _Study:
    """What every layer x ROI fit shares."""

    model: str
    options: EncodeOptions
    seed: int
    backend: BackendName
    device: str
    folds: np.ndarray
    ids: tuple[str, ...]
    conditions: np.ndarray | None
    runs: Mapping[RoiKey, np.ndarray]
    coords: Mapping[RoiKey, np.ndarray]


def layer_inputs(raw: np.ndarray, layer: str, srp_dim: int | None, seed: int) -> np.ndarray:
    """Model inputs ``(n, p)`` of a layer's features ``(n, ...)``: flattened, then SRP-projected
    to ``srp_dim`` features when given (float64)."""
    flat = np.asarray(raw, dtype=np.float64).reshape(raw.shape[0], -1)
    if srp_dim is None:
        return flat
    matrix = srp_matrix(flat.shape[1], srp_dim, seed=seed, layer=layer)
    projected = project(torch.from_numpy(flat.astype(np.float32)), matrix)
    return projected.double().numpy()


def _srp_dim(options: EncodeOptions, raw: np.ndarray) -> int | None:
    kind, dim = options.reduction()
    p = int(np.prod(raw.shape[1:]))
    return dim if kind == "srp" and dim is not None and p > dim else None


def predict_with_filters(
    fit: LayerFit, features: np.ndarray, keep: np.ndarray | Sequence[bool]
) -> np.ndarray:
    """Out-of-fold predictions ``(n, v)`` from the layer's features ``(n, C, ...)`` (filters on
    axis 1) with the filters where ``keep`` ``(C,)`` is False set to zero, each stimulus predicted
    by the weights fitted without it (its outer fold's model). Lesion: ``keep = ~group``; keep
    only: ``keep = group``."""
    mask = np.asarray(keep, dtype=bool)
    if features.ndim < 2 or mask.shape != (features.shape[1],):
        raise DataError(
            f"encoding lesion: {mask.size} filter flags for features of shape {features.shape}"
        )
    if any(fold.weights.shape[0] == 0 for fold in fit.ridge.folds):
        raise DataError(
            f"encoding lesion: layer {fit.layer} was fitted without keeping its weights; fit it "
            "with keep_weights=True (EncodeOptions) to predict from lesioned features"
        )
    shape = (1, mask.size) + (1,) * (features.ndim - 2)
    masked = features * mask.reshape(shape)
    return fit.ridge.predict(layer_inputs(masked, fit.layer, fit.srp_dim, fit.seed))


def _check_shapes(
    features: Mapping[str, np.ndarray], responses: Mapping[RoiKey, np.ndarray], n: int
) -> None:
    bad = [f"layer {k} {v.shape}" for k, v in features.items() if v.shape[0] != n]
    bad += [f"ROI {k[0]}/{k[1]} {v.shape}" for k, v in responses.items() if v.shape[0] != n]
    if bad:
        raise DataError(f"encoding: {n} stimuli, but first dimension differs: {listing(bad)}")
    flat = [k for k, v in responses.items() if v.ndim != 2]
    if flat:
        raise DataError(
            f"encoding: responses must be (stimuli, voxels); got no voxel axis for ROI(s) "
            f"{listing([f'{t}/{s}' for t, s in flat])} (an RDM file has no voxels: use rsa)"
        )


def _condition_masks(conditions: np.ndarray | None, n: int) -> list[tuple[str, np.ndarray]]:
    masks = [(ALL_CONDITIONS, np.ones(n, dtype=bool))]
    if conditions is not None:
        masks += [(str(c), conditions == c) for c in sorted(set(conditions.tolist()), key=str)]
    return masks


def _score_rows(
    study: _Study,
    layer: str,
    roi: RoiKey,
    responses: np.ndarray,
    predictions: np.ndarray,
    extra: dict[str, Any],
    refit: NullRefit | None = None,
) -> list[dict[str, Any]]:
    """One ``encoding`` row per condition (``all`` first) of the out-of-fold predictions;
    ``refit`` given: the exact permutation test that reruns the cross-validation."""
    rows = []
    n_perm = study.options.n_perm
    masks = _condition_masks(study.conditions, responses.shape[0])
    exact = (
        refit_permutation_tests(
            responses,
            predictions,
            refit,
            [m for _, m in masks],
            n_perm=n_perm,
            seed=study.seed,
            stop=study.options.perm_stop,
            tail=study.options.perm_null == "refit_tail",
        )
        if refit is not None
        else None
    )
    for index, (condition, mask) in enumerate(masks):
        y, p = responses[mask], predictions[mask]
        r, r2 = pearson_r(y, p), r2_score(y, p)
        summary = roi_summary(r, r2)
        if exact is not None:
            test = exact[index]  # one refit per permutation, scored on every condition
        else:
            test = permutation_test(y, p, n_perm=n_perm, seed=study.seed, groups=study.folds[mask])
        runs = study.runs.get(roi)
        nc = float(np.mean(noise_ceiling(runs[:, mask]))) if runs is not None else float("nan")
        rows.append(
            {
                "model": study.model,
                "layer": layer,
                "target": roi[0],
                "subject": roi[1],
                "condition": condition,
                "n_voxels": int(y.shape[1]),
                "r_mean": summary.r_mean,
                "r_median": summary.r_median,
                "r2_mean": summary.r2_mean,
                "nc_mean": nc,
                "frac_nc": summary.r_mean / nc if nc > 0 else float("nan"),
                "p_perm": test.p,
                "n_perm": test.n_used,  # fewer than options.n_perm where a sequential test stopped
                "n_stimuli": int(mask.sum()),
                "n_folds": study.options.folds,
                **extra,
            }
        )
    return rows


def _voxel_rows(
    study: _Study,
    layer: str,
    roi: RoiKey,
    responses: np.ndarray,
    predictions: np.ndarray,
    alphas: np.ndarray,
) -> pd.DataFrame:
    """``encoding_voxels`` rows of one layer and ROI; ``alphas`` ``(v,)`` (median over folds)."""
    v = responses.shape[1]
    coords = study.coords.get(roi)
    grid = np.full((v, 3), np.nan) if coords is None else np.asarray(coords, dtype=np.float64)
    if grid.shape != (v, 3):
        raise DataError(f"encoding: ROI {roi[0]}/{roi[1]} has {v} voxels but coords {grid.shape}")
    return pd.DataFrame(
        {
            "model": study.model,
            "layer": layer,
            "target": roi[0],
            "subject": roi[1],
            "voxel": np.arange(v),
            "i": grid[:, 0],
            "j": grid[:, 1],
            "k": grid[:, 2],
            "r": pearson_r(responses, predictions),
            "r2": r2_score(responses, predictions),
            "alpha": alphas,
        }
    )


def _reduction_cache(options: EncodeOptions) -> ReductionCache:
    """An empty cache of the fold reductions (PCA, standardisation) of ``options``."""
    kind, dim = options.reduction()
    return ReductionCache(pca_dim=dim if kind == "pca" else None, standardize=options.standardize)


def _fit_layer(
    study: _Study,
    layer: str,
    inputs: np.ndarray,
    roi: RoiKey,
    responses: np.ndarray,
    cache: ReductionCache,
) -> RidgeFit:
    """The cross-validated ridge of one layer and ROI, on the layer's shared fold reductions."""
    options = study.options
    kind, dim = options.reduction()
    try:
        if cache.pca_dim is not None or cache.standardize:
            check_inputs(inputs, responses, "encoding")  # before fitting a reduction
        reductions = cache.reductions(layer, inputs, study.folds, study.ids)
        return fit_ridge_cv(
            inputs,
            responses,
            study.folds,
            alphas=options.alphas,
            inner_folds=options.inner_folds,
            seed=study.seed,
            pca_dim=dim if kind == "pca" else None,
            standardize=options.standardize,
            keep_weights=options.keep_weights,
            backend=study.backend,
            reductions=reductions,
        )
    except DataError as exc:
        raise DataError(f"layer {layer}, ROI {roi[0]}/{roi[1]}: {exc}") from None


def _refit(
    study: _Study, inputs: np.ndarray, reductions: Sequence[FoldReduction] | None
) -> TorchCvSmoother | FixedAlphaSmoother | None:
    """``perm_null = refit``: the layer's cross-validation as maps of the responses (shared by
    the ROIs, on the layer's shared fold ``reductions``; float64 torch on the study's device,
    :mod:`object2brain.encoding.smoother`; it relabels, refits and scores there);
    ``fixed_alpha``: the layer's ridge maps per outer fold and alpha (bound to each ROI's
    chosen alphas); else ``None``."""
    if study.options.perm_null == "predictions" or study.options.n_perm == 0:
        return None
    kind, dim = study.options.reduction()
    if study.options.perm_null == "fixed_alpha":
        return fit_fixed_alpha_smoother(
            inputs,
            study.folds,
            alphas=study.options.alphas,
            pca_dim=dim if kind == "pca" else None,
            standardize=study.options.standardize,
            reductions=reductions,
            device=study.device,
        )
    return fit_torch_smoother(
        inputs,
        study.folds,
        alphas=study.options.alphas,
        inner_folds=study.options.inner_folds,
        seed=study.seed,
        pca_dim=dim if kind == "pca" else None,
        standardize=study.options.standardize,
        reductions=reductions,
        device=study.device,
    )


def _banded(
    study: _Study,
    inputs: Mapping[str, np.ndarray],
    roi: RoiKey,
    responses: np.ndarray,
    cache: ReductionCache,
) -> tuple[str, BandedFit]:
    options = study.options
    bands = list(inputs) if options.banded == ["all"] else list(options.banded or [])
    missing = [b for b in bands if b not in inputs]
    if missing:
        raise DataError(f"encoding: banded layer(s) not analysed: {listing(missing)}")
    kind, dim = options.reduction()
    shared = [cache.reductions(b, inputs[b], study.folds, study.ids) for b in bands]
    fit = fit_banded_cv(
        [inputs[b] for b in bands],
        responses,
        study.folds,
        alphas=options.alphas,
        inner_folds=options.inner_folds,
        n_iter=options.n_iter,
        seed=study.seed,
        pca_dim=dim if kind == "pca" else None,
        standardize=options.standardize,
        backend=study.backend,
        reductions=None if any(r is None for r in shared) else [r for r in shared if r],
    )
    return "banded:" + "+".join(bands), fit


def _band_rows(
    study: _Study, label: str, bands: Sequence[str], roi: RoiKey, fit: BandedFit
) -> list[dict[str, Any]]:
    return [
        {
            "model": study.model,
            "bands": label,
            "layer": band,
            "target": roi[0],
            "subject": roi[1],
            "n_voxels": int(fit.r2_joint.size),
            "r2_joint_mean": float(np.mean(fit.r2_joint)),
            "r2_share_mean": float(np.mean(fit.r2_shares[j])),
            "alpha_median": float(np.median(np.exp(-fit.deltas[:, j, :]))),
        }
        for j, band in enumerate(bands)
    ]


@dataclass
class _Tables:
    """Rows collected over layers and ROIs."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    voxels: list[pd.DataFrame] = field(default_factory=list)
    bands: list[dict[str, Any]] = field(default_factory=list)
    fits: dict[tuple[str, str, str], LayerFit] = field(default_factory=dict)


def _add_banded(
    study: _Study,
    inputs: Mapping[str, np.ndarray],
    responses: Mapping[RoiKey, np.ndarray],
    tables: _Tables,
) -> None:
    """The banded model of every ROI: its ``encoding`` and ``encoding_voxels`` rows (layer
    ``banded:l1+l2+...``, no single alpha) and its ``encoding_bands`` rows. The bands' fold
    reductions are fitted once (on the driver) and shared by the ROIs."""
    cache = _reduction_cache(study.options)
    for roi, y in responses.items():
        label, banded = _banded(study, inputs, roi, y, cache)
        names = label.removeprefix("banded:").split("+")
        extra = {"feature_dim": sum(inputs[b].shape[1] for b in names), "alpha_median": np.nan}
        tables.rows += _score_rows(study, label, roi, y, banded.predictions, extra)
        nan = np.full(y.shape[1], np.nan)
        tables.voxels.append(_voxel_rows(study, label, roi, y, banded.predictions, nan))
        tables.bands += _band_rows(study, label, names, roi, banded)


def _finish(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The ``encoding`` table: BH-FDR per model and condition, columns in order."""
    table = pd.DataFrame(rows)
    table["p_fdr"] = np.nan
    for _, index in table.groupby(["model", "condition"], sort=False).groups.items():
        table.loc[index, "p_fdr"] = fdr_bh(table.loc[index, "p_perm"].to_numpy())
    return table.loc[:, list(ENCODING_COLUMNS)].reset_index(drop=True)


@dataclass(frozen=True)
class _LayerJob:
    """What the task of every layer shares (an executor's shared object: the features and
    responses go to a Ray object store once)."""

    study: _Study
    features: Mapping[str, np.ndarray]
    responses: Mapping[RoiKey, np.ndarray]


@dataclass(frozen=True)
class _LayerPart:
    """One layer's results: its model inputs (kept for a banded model, else empty), its
    ``encoding`` rows, ``encoding_voxels`` frames and fits."""

    inputs: np.ndarray
    rows: list[dict[str, Any]]
    voxels: list[pd.DataFrame]
    fits: dict[tuple[str, str, str], LayerFit]


def encode_layer(job: _LayerJob, layer: str) -> _LayerPart:
    """The encoding models of ``layer`` to every ROI (a pure function of the job and the layer:
    one executor task; the same numbers wherever it runs). The layer's fold reductions (PCA,
    standardisation) are fitted once, here, and shared by every ROI and the ``refit`` null."""
    study, options = job.study, job.study.options
    srp_dim = _srp_dim(options, job.features[layer])
    inputs = layer_inputs(job.features[layer], layer, srp_dim, study.seed)
    part = _LayerPart(inputs if options.banded is not None else inputs[:0], [], [], {})
    cache = _reduction_cache(options)
    refit = None
    for index, (roi, y) in enumerate(job.responses.items()):
        ridge = _fit_layer(study, layer, inputs, roi, y, cache)  # checks the inputs first
        if index == 0:
            refit = _refit(study, inputs, cache.reductions(layer, inputs, study.folds, study.ids))
        part.fits[(layer, *roi)] = LayerFit(layer, ridge, srp_dim, study.seed)
        alphas = np.median(ridge.alphas, axis=0)
        extra = {"feature_dim": ridge.feature_dim, "alpha_median": float(np.median(alphas))}
        null = refit.bind(ridge.alphas) if isinstance(refit, FixedAlphaSmoother) else refit
        part.rows.extend(_score_rows(study, layer, roi, y, ridge.predictions, extra, null))
        part.voxels.append(_voxel_rows(study, layer, roi, y, ridge.predictions, alphas))
    return part


def _encode_layers(
    job: _LayerJob,
    layers: Sequence[str],
    executor: Executor,
    progress: Callable[[str], None] | None,
) -> list[_LayerPart]:
    """:func:`encode_layer` of every layer: in this process layer by layer (with progress), or
    as the tasks of ``executor``."""
    say = progress or (lambda _message: None)
    if executor.name != "local":
        say(f"encoding {job.study.model}: {len(layers)} layer(s) on {executor.name}")
        return executor.map_chunks(encode_layer, layers, stage="encode layers", shared=job)
    parts = []
    for layer in layers:
        say(f"encoding {job.study.model} {layer}")
        parts.append(encode_layer(job, layer))
    return parts


def compute_encoding(
    features: Mapping[str, np.ndarray],
    responses: Mapping[RoiKey, np.ndarray],
    options: EncodeOptions,
    runtime: Runtime,
    *,
    stimulus_ids: Sequence[str],
    model: str = "model",
    conditions: Sequence[str] | None = None,
    runs: Mapping[RoiKey, np.ndarray] | None = None,
    voxel_coords: Mapping[RoiKey, np.ndarray] | None = None,
    progress: Callable[[str], None] | None = None,
    executor: Executor | None = None,
) -> EncodingResult:
    """Encoding models of ``model``: every layer of ``features`` to every ROI of ``responses``.

    Each layer is one task of ``executor`` (:func:`encode_layer`; default: the executor of
    ``runtime.executor``, in this process for ``local``): the tables are the same for every
    executor and number of workers. The banded model runs on the driver.

    Args:
        features: ``{layer: (n, ...)}`` activations of the ``n`` stimuli (rows in the order of
            ``stimulus_ids``).
        responses: ``{(target, subject): (n, v)}`` responses (e.g. betas averaged over runs).
        options: folds, alphas, reduction, banded layers, permutations.
        runtime: root seed (folds, SRP, permutations, band search) and device (himalaya's
            ``numpy`` backend on the CPU, ``torch_cuda`` on CUDA).
        stimulus_ids: ``n`` ids (for the folds table).
        conditions: ``n`` condition labels: folds stratified by condition and rows per
            condition.
        runs: ``{(target, subject): (runs, n, v)}`` run-wise responses for the noise ceiling.
        voxel_coords: ``{(target, subject): (v, 3)}`` voxel indices i, j, k on the source grid.
        progress: called with a short message per layer.

    Raises:
        DataError: mismatched shapes, fewer stimuli than folds, a condition with fewer stimuli
            than folds, a layer with one feature, NaN or constant voxels, no voxel axis.
    """
    n = len(stimulus_ids)
    layers = options.layers or list(features)
    unknown = [layer for layer in layers if layer not in features]
    if unknown:
        raise DataError(f"encoding: unknown layer(s) {listing(unknown)}")
    _check_shapes({layer: features[layer] for layer in layers}, responses, n)
    labels = None if conditions is None else np.asarray(conditions, dtype=object)
    device = resolve_device(runtime.device)
    study = _Study(
        model=model,
        options=options,
        seed=runtime.seed,
        backend=backend_for(device),
        device=str(device),
        folds=outer_folds(n, options.folds, seed=runtime.seed, conditions=labels),
        ids=tuple(str(i) for i in stimulus_ids),
        conditions=labels,
        runs=runs or {},
        coords=voxel_coords or {},
    )
    tables = _Tables()
    inputs: dict[str, np.ndarray] = {}
    job = _LayerJob(study, {layer: features[layer] for layer in layers}, dict(responses))
    parts = _encode_layers(job, layers, executor or executor_for(runtime), progress)
    for layer, part in zip(layers, parts, strict=True):
        inputs[layer] = part.inputs
        tables.rows += part.rows
        tables.voxels += part.voxels
        tables.fits |= part.fits
    if options.banded is not None:
        if progress is not None:
            progress(f"encoding {model} banded")
        _add_banded(study, inputs, responses, tables)
    rows, voxels, bands, fits = tables.rows, tables.voxels, tables.bands, tables.fits
    return EncodingResult(
        encoding=_finish(rows),
        encoding_voxels=pd.concat(voxels, ignore_index=True).loc[:, list(ENCODING_VOXEL_COLUMNS)],
        encoding_bands=pd.DataFrame(bands, columns=list(ENCODING_BAND_COLUMNS)),
        folds=folds_table(stimulus_ids, study.folds),
        fits=fits,
    )
