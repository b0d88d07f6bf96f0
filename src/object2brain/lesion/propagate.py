"""Lesions inside the forward pass: zero filters of one layer and follow the change downstream.

:class:`ChannelMask` is a context-managed forward hook that multiplies a layer's output by a 0/1
mask over its channels (axis 1), so every later layer and the valence output see the lesion.
:func:`forward_with_mask` runs a stimulus set through the masked network and returns the
activations of the requested later layers (and the predicted valence); with an all-ones mask it
reproduces an unlesioned extraction exactly (same batch size). :func:`propagate_layer` measures,
for every object group's lesion (or keep-only), the change of the direct correlation of predicted
with rated valence (table ``propagate_behavior``) and of later layers' alignment with the targets
of the analysis set (table ``propagate_alignment``).

Cross-fitted selection (``folds`` and ``fold_groups`` given): fold ``k``'s groups (chosen
without fold ``k``'s stimuli) are zeroed in a forward pass over fold ``k``'s stimuli only, and
every correlation is measured on those stimuli; per group, variant and table row, ``r_full``,
``r_variant`` and ``delta_r`` are the means over the folds where the group has filters, weighted
by the fold's stimuli in the correlation (held-out stimuli for behaviour, the condition's
stimuli for alignment) and renormalised over those folds, as the direct lesion's combination.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from object2brain.data.stimuli import StimulusSet
from object2brain.errors import DataError, LayerError
from object2brain.lesion.engine import condensed_subset
from object2brain.models.image_cache import ImageCache
from object2brain.models.inputs import image_batches
from object2brain.models.layers import VALENCE_LAYER, ForwardHooks, LayerRecorder
from object2brain.models.zoo import LoadedModel
from object2brain.options import LesionOptions
from object2brain.rsa.compare import correlate_prepared, prepare
from object2brain.rsa.inference import correlation_test
from object2brain.rsa.rdm import rdm_from_features, upper_triangle
from object2brain.rsa.targets import (
    MIN_CONDITION_STIMULI,
    MIN_CORRELATION_VALUES,
    AnalysisSet,
    TargetColumns,
)


class ChannelMask(ForwardHooks):
    """Forward hook multiplying the output ``(batch, K, ...)`` of ``layer`` by ``mask`` ``(K,)``."""

    def __init__(self, module: nn.Module, layer: str, mask: np.ndarray | torch.Tensor) -> None:
        super().__init__(module)
        self.layer = layer
        self.mask = torch.as_tensor(np.asarray(mask, dtype=np.float32))

    def hooks(self) -> dict[str, Any]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> torch.Tensor:
            if not isinstance(output, torch.Tensor) or output.ndim < 2:
                raise LayerError(f"layer {self.layer!r} has no channel axis to lesion")
            if output.shape[1] != self.mask.numel():
                raise LayerError(
                    f"layer {self.layer!r} has {output.shape[1]} filters, mask has "
                    f"{self.mask.numel()}"
                )
            shape = (1, -1) + (1,) * (output.ndim - 2)
            return output * self.mask.to(output.device, output.dtype).view(shape)

        return {self.layer: hook}


def forward_with_mask(
    model: LoadedModel,
    stimuli: StimulusSet,
    layer: str,
    mask: np.ndarray,
    record: Sequence[str],
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    cache: ImageCache | None = None,
    channels_last: bool = True,
) -> dict[str, np.ndarray]:
    """Activations ``{name: (n, ...)}`` of ``record`` (and ``valence`` with a head) under ``mask``.

    ``mask`` ``(K,)`` is 1 for filters of ``layer`` that are kept and 0 for lesioned ones.
    ``cache``: the decoded-image cache (images held there are not decoded again; the inputs are
    bit for bit those without it). ``channels_last``: the forward pass's memory layout, that of
    extraction's default (:class:`~object2brain.options.ExtractOptions`), so that a mask of
    ones reproduces a default extraction's stored values bit for bit; the layouts differ by
    float rounding only (~1e-6 of a layer's largest value).
    """
    device = torch.device(device)
    names = [name for name in record if name != VALENCE_LAYER]
    ids = stimuli.ids
    batches = image_batches(stimuli.paths, ids, model.preprocessing, device=device,
                            batch_size=batch_size, num_workers=0, on_device_decode=False,
                            cache=cache)  # fmt: skip
    network = model.module.to(device).eval()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    blocks: dict[str, list[np.ndarray]] = {name: [] for name in names}
    valence: list[np.ndarray] = []
    with (
        ChannelMask(network, layer, mask),
        LayerRecorder(network, names, memory_format=torch.contiguous_format) as recorder,
        torch.inference_mode(),
    ):
        try:
            network.to(memory_format=layout)
            for _, inputs in batches:
                recorder.reset()
                output = network(inputs.contiguous(memory_format=layout))
                for name in names:
                    blocks[name].append(recorder.outputs[name].cpu().numpy())
                if model.has_head:
                    valence.append(output.reshape(output.shape[0], -1)[:, 0].cpu().numpy())
        finally:
            network.to(memory_format=torch.contiguous_format)  # the model as it was given
    result = {name: np.concatenate(parts) for name, parts in blocks.items()}
    if model.has_head:
        result[VALENCE_LAYER] = np.concatenate(valence)
    return result


#: ``(condition, method)`` -> r of predicted with rated valence.
Behavior = dict[tuple[str, str], float]
#: ``(condition, later layer, target, subject)`` -> r of the later layer's RDM with the target.
Alignment = dict[tuple[str, str, str, str], float]


@dataclass(frozen=True)
class _Downstream:
    """What one masked forward pass is summarised by, for one lesioned layer.

    ``rows`` ``(m,)``: the ascending indices into the analysis set's ids of the stimuli run
    (all of them, or one selection fold's); ``prepared`` the target vectors of each condition
    restricted to those stimuli. Correlations use the condition's stimuli among ``rows``.
    """

    model: LoadedModel
    analysis: AnalysisSet
    layer: str
    later: list[str]
    columns: TargetColumns
    prepared: dict[str, torch.Tensor]  # condition -> prepared target vectors (Q, m_c)
    options: LesionOptions
    device: torch.device
    rows: np.ndarray

    @classmethod
    def of(
        cls,
        model: LoadedModel,
        analysis: AnalysisSet,
        layer: str,
        later: list[str],
        options: LesionOptions,
        device: torch.device,
        rows: np.ndarray,
    ) -> _Downstream:
        """The summary of the stimuli ``rows``, each condition's targets ranked / standardised
        once (not once per group)."""
        columns = analysis.columns(group_rdm=False)
        vectors = columns.vectors()
        prepared = {
            c.name: prepare(
                vectors[:, condensed_subset(len(analysis.ids), np.intersect1d(c.rows, rows))],
                options.compare_method,
            )
            for c in analysis.conditions
        }
        return cls(model, analysis, layer, later, columns, prepared, options, device, rows)

    def run(self, mask: np.ndarray) -> tuple[Behavior, Alignment]:
        """Forward pass with ``mask`` ``(K,)`` on ``layer``, summarised per condition."""
        record = [*self.later, *([VALENCE_LAYER] if self.model.has_head else [])]
        assert self.analysis.stimuli is not None  # checked by the caller
        stimuli = self.analysis.stimuli
        if len(self.rows) < len(self.analysis.ids):
            stimuli = stimuli.subset([self.analysis.ids[i] for i in self.rows])
        acts = forward_with_mask(
            self.model, stimuli, self.layer, mask, record,
            batch_size=self.options.batch_size, device=self.device,
            cache=None if self.options.image_cache is None
            else ImageCache(self.options.image_cache, self.model.preprocessing),
        )  # fmt: skip
        return self._behavior(acts), self._alignment(acts)

    def positions(self, rows: np.ndarray) -> np.ndarray:
        """Positions in ``self.rows`` (and in a forward pass's outputs) of ``rows`` among them."""
        return np.searchsorted(self.rows, np.intersect1d(rows, self.rows))

    def n_held_out(self, condition_rows: np.ndarray) -> int:
        """Held-out stimuli of a condition among ``self.rows``."""
        return int(self.analysis.held_out[np.intersect1d(condition_rows, self.rows)].sum())

    def _behavior(self, acts: dict[str, np.ndarray]) -> Behavior:
        rated, behavior = self.analysis.rated, {}
        if rated is None or VALENCE_LAYER not in acts:
            return {}
        for condition in self.analysis.conditions:
            rows = np.intersect1d(condition.rows, self.rows)
            rows = rows[self.analysis.held_out[rows]]
            if len(rows) < MIN_CORRELATION_VALUES:
                continue
            predicted = acts[VALENCE_LAYER][np.searchsorted(self.rows, rows)]
            for method in ("pearson", "spearman"):
                r = correlation_test(predicted, rated[rows], method, 0, 0)[0]
                behavior[(condition.name, method)] = float(r)
        return behavior

    def _alignment(self, acts: dict[str, np.ndarray]) -> Alignment:
        metric, method = self.options.rdm_metric, self.options.compare_method
        alignment = {}
        for condition in self.analysis.conditions:
            at = self.positions(condition.rows)
            if len(at) < MIN_CONDITION_STIMULI:  # a fold with few of its stimuli: no rows
                continue
            for name in self.later:
                features = acts[name][at]
                rdm = upper_triangle(rdm_from_features(features, metric, device=self.device))
                prepared = self.prepared[condition.name].to(rdm.device)
                r = correlate_prepared(prepare(rdm.reshape(1, -1), method), prepared, method)
                values = self.columns.with_group(r.cpu().numpy())[0]
                for (target, _kind, subject), value in zip(
                    self.columns.labels, values, strict=True
                ):
                    alignment[(condition.name, name, target, subject)] = float(value)
        return alignment


def propagate_layer(
    model: LoadedModel,
    store: Any,
    layer: str,
    groups: dict[str, np.ndarray],
    analysis: AnalysisSet,
    options: LesionOptions,
    device: torch.device,
    *,
    folds: np.ndarray | None = None,
    fold_groups: Sequence[dict[str, np.ndarray]] = (),
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Change of direct behaviour correlation and of later layers' alignment per group lesion.

    For every group (filters ``(k,)`` of ``layer``) and variant of ``options``, the network runs
    with those filters zeroed (``lesion``) or only those kept (``keep``); returned are the
    ``propagate_behavior`` table (predicted vs rated valence on the analysis set's held-out
    stimuli, ``n`` of them, per condition and method) and the ``propagate_alignment`` table
    (every later layer of the store against every target column, per condition), both with
    column ``selection``.

    ``folds`` ``(n,)`` (the selection fold of every analysed stimulus) and ``fold_groups[k]``
    (the groups chosen without fold ``k``'s stimuli): cross-fitted, fold by fold on each fold's
    stimuli with its own groups, combined over folds (module docstring); ``groups`` is then not
    used. A condition with fewer than ``MIN_CONDITION_STIMULI`` stimuli in a fold (or outside
    it) gives no rows, as in the direct lesion. Else (``same``) ``groups`` on all stimuli.
    """
    order = [name for name in store.layers if name != VALENCE_LAYER]
    if layer not in order:
        raise DataError(f"layer {layer!r} is not in the activation store")
    n_filters = store.shape(layer)[1]
    later = order[order.index(layer) + 1 :]
    if folds is None:
        everything = np.arange(len(analysis.ids))
        downstream = _Downstream.of(model, analysis, layer, later, options, device, everything)
        return _same(model, layer, groups, analysis, options, downstream, n_filters)
    downstreams = [
        _Downstream.of(model, analysis, layer, later, options, device, np.flatnonzero(folds == k))
        for k in range(len(fold_groups))
    ]
    return _cross_fit(model, layer, fold_groups, analysis, options, downstreams, n_filters)


def _mask(n_filters: int, filters: np.ndarray, variant: str) -> np.ndarray:
    """``(K,)``: 0 on ``filters`` for ``lesion``, 1 only on them for ``keep``."""
    mask = np.ones(n_filters) if variant == "lesion" else np.zeros(n_filters)
    mask[filters] = 0.0 if variant == "lesion" else 1.0
    return mask


def _same(
    model: LoadedModel,
    layer: str,
    groups: dict[str, np.ndarray],
    analysis: AnalysisSet,
    options: LesionOptions,
    downstream: _Downstream,
    n_filters: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Groups chosen on all stimuli, measured on all of them (circular)."""
    full = downstream.run(np.ones(n_filters))
    behavior_rows: list[dict[str, Any]] = []
    alignment_rows: list[dict[str, Any]] = []
    for group, filters in groups.items():
        for variant in options.variants:
            common = {"model": model.name, "layer": layer, "group": group, "variant": variant}
            common |= {"selection": "same"}
            lesioned = downstream.run(_mask(n_filters, filters, variant))
            behavior_rows += _behavior_rows(common, full[0], lesioned[0], analysis)
            alignment_rows += _alignment_rows(common, full[1], lesioned[1])
    return pd.DataFrame(behavior_rows), pd.DataFrame(alignment_rows)


def _cross_fit(
    model: LoadedModel,
    layer: str,
    fold_groups: Sequence[dict[str, np.ndarray]],
    analysis: AnalysisSet,
    options: LesionOptions,
    downstreams: list[_Downstream],
    n_filters: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fold ``k``'s groups zeroed on fold ``k``'s stimuli, combined over folds."""
    kept = {
        c.name
        for c in analysis.conditions
        if all(
            len(d.positions(c.rows)) >= MIN_CONDITION_STIMULI
            and c.size - len(d.positions(c.rows)) >= MIN_CONDITION_STIMULI
            for d in downstreams
        )
    }
    fulls = [d.run(np.ones(n_filters)) for d in downstreams]
    held = [{c.name: d.n_held_out(c.rows) for c in analysis.conditions} for d in downstreams]
    size = [{c.name: len(d.positions(c.rows)) for c in analysis.conditions} for d in downstreams]
    names = list(dict.fromkeys(g for groups in fold_groups for g in groups))
    behavior_rows: list[dict[str, Any]] = []
    alignment_rows: list[dict[str, Any]] = []
    for group in names:
        present = [k for k, groups in enumerate(fold_groups) if group in groups]
        for variant in options.variants:
            common = {"model": model.name, "layer": layer, "group": group, "variant": variant}
            common |= {"selection": "cross_fit"}
            runs = {
                k: downstreams[k].run(_mask(n_filters, fold_groups[k][group], variant))
                for k in present
            }
            for key in runs[present[0]][0]:
                if key[0] not in kept or any(key not in runs[k][0] for k in present):
                    continue
                weights = np.array([held[k][key[0]] for k in present], dtype=float)
                full, r = _combined(weights, [fulls[k][0][key] for k in present],
                                    [runs[k][0][key] for k in present])  # fmt: skip
                behavior_rows.append(
                    common
                    | {"condition": key[0], "method": key[1], "r_full": full, "r_variant": r}
                    | {"delta_r": r - full, "n": int(weights.sum())}
                )
            for place in runs[present[0]][1]:
                if place[0] not in kept:
                    continue
                weights = np.array([size[k][place[0]] for k in present], dtype=float)
                full, r = _combined(weights, [fulls[k][1][place] for k in present],
                                    [runs[k][1][place] for k in present])  # fmt: skip
                condition, name, target, subject = place
                alignment_rows.append(
                    common
                    | {"later_layer": name, "target": target, "subject": subject}
                    | {"condition": condition, "r_full": full, "r_variant": r}
                    | {"delta_r": r - full}
                )
    return pd.DataFrame(behavior_rows), pd.DataFrame(alignment_rows)


def _combined(
    weights: np.ndarray, full: Sequence[float], variant: Sequence[float]
) -> tuple[float, float]:
    """The ``weights``-weighted means (renormalised) of ``full`` and ``variant`` over folds."""
    w = weights / weights.sum()
    return float(np.dot(w, full)), float(np.dot(w, variant))


def _behavior_rows(
    common: dict[str, Any], full: Behavior, variant: Behavior, analysis: AnalysisSet
) -> list[dict[str, Any]]:
    n_held_out = {c.name: int(analysis.held_out[c.rows].sum()) for c in analysis.conditions}
    return [
        common
        | {"condition": condition, "method": method, "r_full": full[(condition, method)]}
        | {"r_variant": r, "delta_r": r - full[(condition, method)], "n": n_held_out[condition]}
        for (condition, method), r in variant.items()
    ]


def _alignment_rows(
    common: dict[str, Any], full: Alignment, variant: Alignment
) -> list[dict[str, Any]]:
    return [
        common
        | {"later_layer": name, "target": target, "subject": subject, "condition": condition}
        | {"r_full": full[key], "r_variant": r, "delta_r": r - full[key]}
        for key, r in variant.items()
        for condition, name, target, subject in [key]
    ]
