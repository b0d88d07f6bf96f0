r"""Object2Brain on encoding models: how much of an ROI's predicted response each object group's
filters carry (``lesion --analysis encoding``).

For every model, layer ``L``, object group ``g``, variant and ROI (``target``, ``subject``):

1. the encoding model of ``L`` is fitted as the ``encode`` stage fits it
   (:func:`object2brain.encoding.ridge.fit_ridge_cv`: the same seeded outer and inner folds,
   penalty grid and training-fold standardisation, from ``EncodeOptions``), so ``r_full`` equals
   the ``encode`` table's ``r_mean`` for the same options and seed;
2. **lesion**: the held-out features of each outer fold get ``g``'s filters set to zero;
   **keep**: every other filter of ``L`` set to zero; each fold's fitted weights predict its own
   test stimuli (no refit);
3. ``r_variant`` is the ROI's mean Pearson r over voxels of these out-of-fold predictions,
   ``delta_r = r_variant - r_full``;
4. null: the same random filter subsets as the RSA lesion
   (:func:`object2brain.lesion.analysis.null_subset_masks`: same sizes, seeds and draws, uniform
   or norm-matched), each predicted the same way; ``p_null`` two-sided and ``z_null`` as there;
   ``p_fdr``: Benjamini-Hochberg over groups x ROIs within model, layer, variant, condition and
   subject level. ``p_perm`` is NaN (``n_perm = 0``): no stimulus-label permutation is run for
   encoding rows.

Selection (``options.selection``, column ``selection``): ``same``, or a filter table without
per-fold rows, scores the all-images groups on all stimuli (circular). ``cross_fit`` (default):
per selection fold ``k`` (:func:`object2brain.lesion.analysis.with_selection`: the dissection's
recorded folds, else drawn again), fold ``k``'s groups and their own null subsets (seeds shifted
by :func:`~object2brain.lesion.analysis.fold_seed_shift`) are scored on fold ``k``'s stimuli
only, with the same fit; r, delta and every null draw are combined over folds by the RSA
lesion's fold-size weighted mean, draw by draw.

Per-subject rows, plus ``subject = group`` for a target with two or more subjects: the mean over
its subjects of ``r_full``, ``r_variant`` and of every null subset's r (the subsets are the same
for every subject), so the group row has its own null.

Why refit rather than load the ``encode`` stage's weights: the fit is deterministic (seeded
folds), costs one ridge fit per layer and ROI, and needs no ``features x voxels`` weights on disk
for every fold, layer and ROI (the ``encode`` stage does not keep them, see ``keep_weights``).

Computation: a lesioned prediction is affine in the filter mask ``m`` ``(C,)``. With the fold's
standardisation (mean :math:`\mu`, sd :math:`s`) and weights :math:`W` ``(p, v)``, intercept
:math:`b`, the prediction of a test stimulus with features :math:`x` (filter :math:`c` owning the
columns :math:`J_c` of the flattened ``(C, h, w)`` features) is

.. math:: \hat{y}(m) = b - (\mu / s) W + \sum_c m_c \, (x_{J_c} / s_{J_c}) W_{J_c},

so each filter's contribution ``(C, n, v)`` is computed once and every subset costs one product
with the mask matrix. Contributions are held for a block of voxels at a time
(:data:`BLOCK_BYTES`), so the memory does not grow with the ROI.

Features must map to filters: the layer's activations ``(n, C, ...)`` unreduced (``reduce =
none``); a store layer kept as a random projection (``--srp``) or an encoding reduction
(``srp:DIM``, ``pca:DIM``) is refused, naming the layer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from object2brain.activations.store import ActivationStore
from object2brain.data import ALL_CONDITION
from object2brain.devices import resolve_device
from object2brain.encoding.folds import outer_folds
from object2brain.encoding.ridge import RidgeFit, fit_ridge_cv
from object2brain.errors import DataError
from object2brain.executors import Executor, LocalExecutor, executor_for
from object2brain.lesion.analysis import (
    FilterTable,
    LayerFilters,
    _combine,
    _Estimate,
    _Part,
    _parts,
    fold_seed_shift,
    layers_to_lesion,
    load_layer,
    null_interval,
    null_p_z,
    null_subset_masks,
    store_model,
    stratum_counts,
    with_selection,
)
from object2brain.lesion.engine import filter_norms, norm_strata
from object2brain.options import EncodeOptions, LesionOptions, Runtime
from object2brain.rsa.inference import with_fdr
from object2brain.rsa.targets import AnalysisSet, Condition
from object2brain.tables import OBJECT2BRAIN

log = logging.getLogger("object2brain.lesion.encoding")

#: Bytes of filter contributions (or of subset predictions) held at once.
BLOCK_BYTES = 1 << 28
#: Subject label of the mean over a target's subjects.
GROUP = "group"

RoiKey = tuple[str, str]


@dataclass(frozen=True)
class EncodingLesionData:
    """What the encoding lesion predicts, on the analysed stimuli ``ids`` (rows in that order):
    ``responses[(target, subject)]`` ``(n, v)`` and the condition labels ``(n,)`` (or None)."""

    ids: list[str]
    responses: Mapping[RoiKey, np.ndarray]
    conditions: Sequence[str] | None = None


def check_encoding_options(encode: EncodeOptions, layers: Sequence[str]) -> None:
    """Refuse an encoding reduction: its model features are not the layer's filters.

    Raises:
        DataError: naming the layers and the reduction.
    """
    if encode.reduce != "none":
        raise DataError(
            f"lesion --analysis encoding: layer(s) {', '.join(layers)} would be encoded with "
            f"reduce={encode.reduce}, whose features are not the layer's filters; the encoding "
            "lesion needs unreduced features (encode reduce: none)"
        )


def compute_encoding_lesion(
    stores: Sequence[ActivationStore],
    filters: FilterTable,
    data: EncodingLesionData,
    options: LesionOptions,
    encode: EncodeOptions,
    runtime: Runtime,
    *,
    executor: Executor | None = None,
    notes: list[str] | None = None,
) -> pd.DataFrame:
    """``object2brain`` rows (``analysis = encoding``) of every store, layer, group, variant,
    ROI and condition (module docstring); ``p_fdr`` filled, ``p_perm`` NaN. Each ROI's fit and
    subset predictions run as one task of ``executor`` (default: the executor of
    ``runtime.executor``); the rows are the same for every executor and number of workers.
    ``notes``: gets the manifest note of every layer whose cross-fitted selection fell back to
    ``same`` (once each).

    Raises:
        DataError: a reduction in ``encode``, a projected store layer, a layer without filters,
            and the encoding checks (fewer stimuli than folds, NaN or constant voxels, ...).
    """
    device = resolve_device(runtime.device)
    executor = executor or executor_for(runtime)
    labels = None if data.conditions is None else np.asarray(data.conditions, dtype=object)
    folds = outer_folds(len(data.ids), encode.folds, seed=runtime.seed, conditions=labels)
    # what the selection folds are drawn from when the dissection did not record them
    analysed = AnalysisSet(list(data.ids), [], labels)
    rows: list[dict[str, Any]] = []
    for store in stores:
        name = store_model(store)
        layers = layers_to_lesion(store, filters.frame, name, options.layers)
        check_encoding_options(encode, layers)
        for layer in layers:
            task = load_layer(store, layer, name, filters, data.ids, options.groups, device)
            task, note = with_selection(task, filters, analysed, options, runtime.seed)
            if note and notes is not None and note not in notes:
                notes.append(note)
            features = _layer_features(store, layer, data.ids, task.stats.n_filters)
            rows += _layer_rows(
                task, features, data, folds, labels, options, encode, runtime, executor
            )
    frame = pd.DataFrame(rows, columns=[*OBJECT2BRAIN.column_names])
    return with_fdr(
        frame, ["model", "layer", "variant", "condition", "subject"], [("p_null", "p_fdr")]
    )


def _layer_features(
    store: ActivationStore, layer: str, ids: list[str], n_filters: int
) -> np.ndarray:
    """The layer's activations ``(n, C, positions)`` (float64)."""
    if layer in store.projected_layers:  # also refused by the filter statistics
        raise DataError(f"{store.path}: layer {layer!r} is a random projection, not filters")
    raw = store.read(layer, ids=ids)
    if raw.ndim < 2 or raw.shape[1] != n_filters:
        raise DataError(f"{store.path}: layer {layer!r} of shape {raw.shape} has no filter axis")
    return np.asarray(raw, dtype=np.float64).reshape(raw.shape[0], raw.shape[1], -1)


_NullKey = tuple[str, int, tuple[int, ...]]
"""Variant, group size and stratum counts: groups with the same key share their null subsets."""


@dataclass(frozen=True)
class _Masks:
    """Every filter subset of one layer: row 0 the intact layer, then one row per (group,
    variant) ``estimates``, then the null subsets of each key at ``null_rows[key]``."""

    masks: np.ndarray
    estimates: list[tuple[str, int, str, _NullKey]]
    null_rows: dict[_NullKey, slice]


def _subset_masks(task: LayerFilters, options: LesionOptions, seed: int) -> _Masks:
    K = task.stats.n_filters
    norms = filter_norms(task.stats) if options.null_subsets == "matched" else None
    rows = [np.ones(K, dtype=bool)]
    estimates: list[tuple[str, int, str, _NullKey]] = []
    nulls: dict[_NullKey, np.ndarray] = {}
    for group, members in task.groups.items():
        strata = None if norms is None else norm_strata(norms, members)
        for variant in options.variants:
            mask = np.full(K, variant == "lesion")
            mask[members] = variant == "keep"
            rows.append(mask)
            key: _NullKey = (str(variant), len(members), stratum_counts(strata, members))
            estimates.append((group, len(members), variant, key))
            if options.n_null and key not in nulls:
                nulls[key] = null_subset_masks(K, members, strata, options.n_null, seed, variant)
    start = len(rows)
    null_rows: dict[_NullKey, slice] = {}
    for key, block in nulls.items():
        null_rows[key] = slice(start, start + len(block))
        start += len(block)
    masks = np.concatenate([np.stack(rows), *nulls.values()]) if nulls else np.stack(rows)
    return _Masks(masks, estimates, null_rows)


def _condition_masks(labels: np.ndarray | None, n: int) -> list[tuple[str, np.ndarray]]:
    masks = [(ALL_CONDITION, np.ones(n, dtype=bool))]
    if labels is not None:
        masks += [(str(c), labels == c) for c in sorted(set(labels.tolist()), key=str)]
    return masks


def _fit(
    features: np.ndarray, y: np.ndarray, folds: np.ndarray, encode: EncodeOptions, seed: int
) -> RidgeFit:
    return fit_ridge_cv(
        features.reshape(features.shape[0], -1),
        y,
        folds,
        alphas=encode.alphas,
        inner_folds=encode.inner_folds,
        seed=seed,
        standardize=encode.standardize,
        keep_weights=True,
    )


def subset_mean_r(
    fit: RidgeFit,
    features: np.ndarray,
    responses: np.ndarray,
    masks: np.ndarray,
    conditions: Sequence[np.ndarray],
) -> np.ndarray:
    """Mean over voxels of the Pearson r ``(M, len(conditions))`` between ``responses``
    ``(n, v)`` and the out-of-fold predictions of each filter subset ``masks`` ``(M, C)`` (True:
    kept) from ``features`` ``(n, C, positions)``, scored on the stimuli of each condition mask
    ``(n,)``. Equals :meth:`RidgeFit.predict` on the masked, flattened features (voxels whose
    prediction is constant are left out of the mean, as in the ``encode`` table)."""
    return blocks_mean_r(fit, features, responses, [(masks, conditions)])[0]


def blocks_mean_r(
    fit: RidgeFit,
    features: np.ndarray,
    responses: np.ndarray,
    blocks: Sequence[tuple[np.ndarray, Sequence[np.ndarray]]],
) -> list[np.ndarray]:
    """:func:`subset_mean_r` of every block ``(masks (M_b, C), conditions [(n,)])`` (one per
    selection fold: its subsets scored on its stimuli), the filter contributions computed once
    for all blocks."""
    n, C, _ = features.shape
    v = responses.shape[1]
    totals = [np.zeros((len(masks), len(conditions))) for masks, conditions in blocks]
    counts = [np.zeros((len(masks), len(conditions))) for masks, conditions in blocks]
    voxel_block = max(1, BLOCK_BYTES // (8 * C * n))
    for first in range(0, v, voxel_block):
        cols = slice(first, min(first + voxel_block, v))
        base, parts = _contributions(fit, features, cols)
        chunk = max(1, BLOCK_BYTES // (8 * n * parts.shape[2]))
        for (masks, conditions), total, count in zip(blocks, totals, counts, strict=True):
            weights = masks.astype(np.float64)
            for start in range(0, len(masks), chunk):
                stop = min(start + chunk, len(masks))
                predictions = base[None] + np.einsum("mc,cnv->mnv", weights[start:stop], parts)
                for j, rows in enumerate(conditions):
                    r = _pearson(responses[rows, cols], predictions[:, rows])
                    total[start:stop, j] += np.nansum(r, axis=1)
                    count[start:stop, j] += np.isfinite(r).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return [np.asarray(total / count) for total, count in zip(totals, counts, strict=True)]


def _contributions(
    fit: RidgeFit, features: np.ndarray, cols: slice
) -> tuple[np.ndarray, np.ndarray]:
    """``base`` ``(n, vb)`` and each filter's contribution ``(C, n, vb)`` to the out-of-fold
    predictions of the voxels ``cols`` (module docstring)."""
    n, C, positions = features.shape
    base: np.ndarray | None = None
    parts: np.ndarray | None = None
    for fold in fit.folds:
        if fold.pca is not None:
            raise DataError("the encoding lesion needs unreduced features (no PCA)")
        w = fold.weights[:, cols]
        mean = np.zeros(C * positions) if fold.scaler is None else fold.scaler.mean
        scale = np.ones(C * positions) if fold.scaler is None else fold.scaler.scale
        if base is None or parts is None:
            base = np.empty((n, w.shape[1]))
            parts = np.empty((C, n, w.shape[1]))
        base[fold.test] = fold.intercept[cols] - (mean / scale) @ w
        x = features[fold.test] / scale.reshape(1, C, positions)
        parts[:, fold.test] = np.einsum("tcp,cpv->ctv", x, w.reshape(C, positions, -1))
    assert base is not None and parts is not None
    return base, parts


def _pearson(y: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """r ``(m, v)`` of ``y`` ``(n, v)`` with each of ``predictions`` ``(m, n, v)`` (NaN where a
    prediction or response is constant)."""
    yc = y - y.mean(axis=0)
    pc = predictions - predictions.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.linalg.norm(yc, axis=0)[None] * np.linalg.norm(pc, axis=1)
        return np.asarray(np.einsum("nv,mnv->mv", yc, pc) / norm)


@dataclass(frozen=True)
class _RoiJob:
    """What the task of every ROI of a layer shares (an executor's shared object): the layer's
    features ``(n, C, positions)``, outer folds ``(n,)``, subset masks ``(M, C)`` and condition
    masks ``(n,)``; cross-fitted selection: ``blocks``, per selection fold its subset masks and
    the masks ``(n,)`` of its stimuli in each condition."""

    layer: str
    features: np.ndarray
    folds: np.ndarray
    masks: np.ndarray
    conditions: list[np.ndarray]
    encode: EncodeOptions
    seed: int
    blocks: tuple[tuple[np.ndarray, list[np.ndarray]], ...] = ()


def roi_scores(job: _RoiJob, roi: tuple[RoiKey, np.ndarray]) -> np.ndarray:
    """Mean r ``(M, conditions)`` of every subset's out-of-fold predictions of one ROI
    ``(key, responses (n, v))``: its encoding model fitted, then every subset predicted (one
    executor task; the same numbers wherever it runs)."""
    fit, y = _roi_fit(job, roi)
    return subset_mean_r(fit, job.features, y, job.masks, job.conditions)


def roi_fold_scores(job: _RoiJob, roi: tuple[RoiKey, np.ndarray]) -> list[np.ndarray]:
    """Cross-fitted selection: per selection fold (``job.blocks``), mean r ``(M_k,
    conditions)`` of its subsets' out-of-fold predictions of one ROI on its stimuli; one fit
    per ROI, as :func:`roi_scores`."""
    fit, y = _roi_fit(job, roi)
    return blocks_mean_r(fit, job.features, y, job.blocks)


def _roi_fit(job: _RoiJob, roi: tuple[RoiKey, np.ndarray]) -> tuple[RidgeFit, np.ndarray]:
    key, y = roi
    try:
        return _fit(job.features, y, job.folds, job.encode, job.seed), y
    except DataError as exc:
        raise DataError(f"layer {job.layer}, ROI {key[0]}/{key[1]}: {exc}") from None


def _layer_rows(
    task: LayerFilters,
    features: np.ndarray,
    data: EncodingLesionData,
    folds: np.ndarray,
    labels: np.ndarray | None,
    options: LesionOptions,
    encode: EncodeOptions,
    runtime: Runtime,
    executor: Executor | None = None,
) -> list[dict[str, Any]]:
    """Rows of one layer: every ROI (and target group) x condition x group x variant; each
    ROI's fit and predictions one task of ``executor`` (:func:`roi_scores`). Cross-fitted
    selection (``task.folds``): :func:`_cross_fit_rows`."""
    if task.folds is not None:
        return _cross_fit_rows(
            task, features, data, folds, labels, options, encode, runtime, executor
        )
    subsets = _subset_masks(task, options, runtime.seed)
    conditions = _condition_masks(labels, len(data.ids))
    job = _RoiJob(task.layer, features, folds, subsets.masks, [m for _, m in conditions],
                  encode, runtime.seed)  # fmt: skip
    items = list(data.responses.items())
    found = (executor or LocalExecutor()).map_chunks(
        roi_scores, items, stage=f"lesion encoding {task.model}/{task.layer}", shared=job
    )
    # (M, conditions) mean r of every subset
    scores: dict[RoiKey, np.ndarray] = {roi: r for (roi, _), r in zip(items, found, strict=True)}
    scores |= _group_scores(scores)
    rows: list[dict[str, Any]] = []
    for j, (condition, _) in enumerate(conditions):
        rois = list(scores)
        table = np.stack([scores[roi][:, j] for roi in rois], axis=1)  # (M, T)
        full = table[0]
        for e, (group, size, variant, key) in enumerate(subsets.estimates, start=1):
            delta = table[e] - full
            null_slice = subsets.null_rows.get(key)
            null = None if null_slice is None else table[null_slice] - full[None]
            rows.extend(
                _rows(task, condition, "same", rois, (group, variant, size), full, table[e],
                      delta, null, options.n_null)
            )  # fmt: skip
    return rows


def _cross_fit_rows(
    task: LayerFilters,
    features: np.ndarray,
    data: EncodingLesionData,
    folds: np.ndarray,
    labels: np.ndarray | None,
    options: LesionOptions,
    encode: EncodeOptions,
    runtime: Runtime,
    executor: Executor | None = None,
) -> list[dict[str, Any]]:
    """Rows of one layer with cross-fitted selection: per selection fold ``k``, the groups
    chosen without fold ``k``'s stimuli and their null subsets (seeded per fold as the RSA
    lesion's) scored on fold ``k``'s stimuli of each condition (the encoding fit unchanged: one
    per ROI); r, delta and every null draw combined over folds by the RSA lesion's fold-size
    weighted mean (:func:`object2brain.lesion.analysis._combine`)."""
    assert task.folds is not None
    parts_of: list[tuple[str, list[_Part]]] = []
    for condition, rows in _condition_masks(labels, len(data.ids)):
        parts = _parts(task, Condition(condition, np.flatnonzero(rows)))
        if parts:
            parts_of.append((condition, parts))
        else:
            log.warning(
                "%s/%s: condition %r has too few stimuli per selection fold: no encoding "
                "lesion rows",
                task.model,
                task.layer,
                condition,
            )
    if not parts_of:
        return []
    subsets = [
        _subset_masks(replace(task, groups=groups), options, runtime.seed + fold_seed_shift(k))
        for k, groups in enumerate(task.fold_groups)
    ]
    blocks = tuple(
        (subsets[k].masks, [_rows_mask(parts[k].test, len(data.ids)) for _, parts in parts_of])
        for k in range(len(subsets))
    )
    job = _RoiJob(task.layer, features, folds, subsets[0].masks, [], encode, runtime.seed,
                  blocks)  # fmt: skip
    items = list(data.responses.items())
    found = (executor or LocalExecutor()).map_chunks(
        roi_fold_scores, items, stage=f"lesion encoding {task.model}/{task.layer}", shared=job
    )
    out: list[dict[str, Any]] = []
    for j, (condition, parts) in enumerate(parts_of):
        per_part = []
        rois: list[RoiKey] = []
        for k, part in enumerate(parts):
            scores = {roi: r[k][:, j] for (roi, _), r in zip(items, found, strict=True)}
            scores |= _group_scores(scores)
            rois = list(scores)
            table = np.stack([scores[roi] for roi in rois], axis=1)  # (M_k, T)
            full = table[0]
            estimates = []
            for e, (group, size, variant, key) in enumerate(subsets[part.index].estimates, 1):
                null_slice = subsets[part.index].null_rows.get(key)
                null = None if null_slice is None else table[null_slice] - full[None]
                mask = subsets[part.index].masks[e]
                delta = table[e] - full
                estimates.append(
                    _Estimate(group, float(size), variant, mask, full, table[e], delta, null, None)
                )
            per_part.append(estimates)
        for estimate in _combine(parts, per_part):
            out.extend(
                _rows(task, condition, "cross_fit", rois,
                      (estimate.group, estimate.variant, round(estimate.n_filters)),
                      estimate.r_full, estimate.r_variant, estimate.delta, estimate.null_random,
                      options.n_null)
            )  # fmt: skip
    return out


def _rows(
    task: LayerFilters,
    condition: str,
    selection: str,
    rois: list[RoiKey],
    subset: tuple[str, str, int],
    r_full: np.ndarray,
    r_variant: np.ndarray,
    delta: np.ndarray,
    null: np.ndarray | None,
    n_null: int,
) -> list[dict[str, Any]]:
    """``object2brain`` rows (``analysis = encoding``) of one subset ``(group, variant,
    n_filters)`` for every ROI ``rois`` ``(T,)``: its r ``(T,)``, delta and null draws
    ``(draws, T)``, with ``p_null``, ``z_null`` and the null's interval."""
    group, variant, n_filters = subset
    p, z = null_p_z(delta, null)
    low, high = null_interval(null, len(delta))
    return [
        {
            "model": task.model,
            "layer": task.layer,
            "analysis": "encoding",
            "group": group,
            "variant": variant,
            "selection": selection,
            "target": target,
            "subject": subject,
            "condition": condition,
            "n_filters": n_filters,
            "r_full": r_full[t],
            "r_variant": r_variant[t],
            "delta_r": delta[t],
            "p_null": p[t],
            "z_null": z[t],
            "n_null": n_null,
            "null_low": low[t],
            "null_high": high[t],
            "p_perm": np.nan,
            "p_perm_fdr": np.nan,
            "n_perm": 0,
        }
        for t, (target, subject) in enumerate(rois)
    ]


def _rows_mask(rows: np.ndarray, n: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    return mask


def _group_scores(scores: Mapping[RoiKey, np.ndarray]) -> dict[RoiKey, np.ndarray]:
    """``(target, group)``: the mean over the target's subjects (two or more) of every subset's
    mean r (NaN-aware)."""
    by_target: dict[str, list[np.ndarray]] = {}
    for (target, _subject), values in scores.items():
        by_target.setdefault(target, []).append(values)
    out = {}
    for target, parts in by_target.items():
        if len(parts) >= 2 and (target, GROUP) not in scores:
            with np.errstate(invalid="ignore", divide="ignore"):
                stacked = np.stack(parts)
                finite = np.isfinite(stacked)
                out[(target, GROUP)] = np.where(finite, stacked, 0).sum(0) / finite.sum(0)
    return out
