"""Lesions inside the forward pass: zero filters of one layer and follow the change downstream.

:class:`ChannelMask` is a context-managed forward hook that multiplies a layer's output by a 0/1
mask over its channels (axis 1), so every later layer and the valence output see the lesion.
:func:`forward_with_mask` runs a stimulus set through the masked network and returns the
activations of the requested later layers (and the predicted valence); with an all-ones mask it
reproduces an unlesioned extraction exactly (same batch size). :func:`propagate_layer` measures,
for every object group's lesion (or keep-only), the change of the direct correlation of predicted
with rated valence (table ``propagate_behavior``) and of later layers' alignment with the targets
of the analysis set (table ``propagate_alignment``).
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
from object2brain.models.inputs import image_loader, model_inputs
from object2brain.models.layers import VALENCE_LAYER, ForwardHooks, LayerRecorder
from object2brain.models.zoo import LoadedModel
from object2brain.options import LesionOptions
from object2brain.rsa.compare import correlate_prepared, prepare
from object2brain.rsa.inference import correlation_test
from object2brain.rsa.rdm import rdm_from_features, upper_triangle
from object2brain.rsa.targets import MIN_CORRELATION_VALUES, AnalysisSet, TargetColumns


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
) -> dict[str, np.ndarray]:
    """Activations ``{name: (n, ...)}`` of ``record`` (and ``valence`` with a head) under ``mask``.

    ``mask`` ``(K,)`` is 1 for filters of ``layer`` that are kept and 0 for lesioned ones.
    """
    device = torch.device(device)
    names = [name for name in record if name != VALENCE_LAYER]
    ids = stimuli.ids
    loader = image_loader(stimuli.paths, ids, model.preprocessing, device=device,
                          batch_size=batch_size, num_workers=0, on_device_decode=False)  # fmt: skip
    network = model.module.to(device).eval()
    blocks: dict[str, list[np.ndarray]] = {name: [] for name in names}
    valence: list[np.ndarray] = []
    with (
        ChannelMask(network, layer, mask),
        LayerRecorder(network, names) as recorder,
        torch.inference_mode(),
    ):
        for batch in loader:
            _, inputs = model_inputs(batch, model.preprocessing, device, ids)
            recorder.reset()
            output = network(inputs)
            for name in names:
                blocks[name].append(recorder.outputs[name].cpu().numpy())
            if model.has_head:
                valence.append(output.reshape(output.shape[0], -1)[:, 0].cpu().numpy())
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
    """What one masked forward pass is summarised by, for one lesioned layer."""

    model: LoadedModel
    analysis: AnalysisSet
    layer: str
    later: list[str]
    columns: TargetColumns
    prepared: dict[str, torch.Tensor]  # condition -> prepared target vectors (Q, m_c)
    options: LesionOptions
    device: torch.device

    def run(self, mask: np.ndarray) -> tuple[Behavior, Alignment]:
        """Forward pass with ``mask`` ``(K,)`` on ``layer``, summarised per condition."""
        record = [*self.later, *([VALENCE_LAYER] if self.model.has_head else [])]
        assert self.analysis.stimuli is not None  # checked by the caller
        acts = forward_with_mask(
            self.model, self.analysis.stimuli, self.layer, mask, record,
            batch_size=self.options.batch_size, device=self.device,
        )  # fmt: skip
        return self._behavior(acts), self._alignment(acts)

    def _behavior(self, acts: dict[str, np.ndarray]) -> Behavior:
        rated, behavior = self.analysis.rated, {}
        if rated is None or VALENCE_LAYER not in acts:
            return {}
        for condition in self.analysis.conditions:
            rows = condition.rows[self.analysis.held_out[condition.rows]]
            if len(rows) < MIN_CORRELATION_VALUES:
                continue
            predicted = acts[VALENCE_LAYER][rows]
            for method in ("pearson", "spearman"):
                r = correlation_test(predicted, rated[rows], method, 0, 0)[0]
                behavior[(condition.name, method)] = float(r)
        return behavior

    def _alignment(self, acts: dict[str, np.ndarray]) -> Alignment:
        metric, method = self.options.rdm_metric, self.options.compare_method
        alignment = {}
        for condition in self.analysis.conditions:
            for name in self.later:
                features = acts[name][condition.rows]
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
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Change of direct behaviour correlation and of later layers' alignment per group lesion.

    For every group (filters ``(k,)`` of ``layer``) and variant of ``options``, the network runs
    with those filters zeroed (``lesion``) or only those kept (``keep``); returned are the
    ``propagate_behavior`` table (predicted vs rated valence on the analysis set's held-out
    stimuli, ``n`` of them, per condition and method) and the ``propagate_alignment`` table
    (every later layer of the store against every target column, per condition).
    """
    order = [name for name in store.layers if name != VALENCE_LAYER]
    if layer not in order:
        raise DataError(f"layer {layer!r} is not in the activation store")
    n_filters = store.shape(layer)[1]
    columns = analysis.columns(group_rdm=False)
    vectors = columns.vectors()
    # each condition's target RDMs ranked / standardised once, not once per group and layer
    prepared = {
        c.name: prepare(
            vectors[:, condensed_subset(len(analysis.ids), c.rows)], options.compare_method
        )
        for c in analysis.conditions
    }
    later = order[order.index(layer) + 1 :]
    downstream = _Downstream(model, analysis, layer, later, columns, prepared, options, device)
    full = downstream.run(np.ones(n_filters))
    behavior_rows: list[dict[str, Any]] = []
    alignment_rows: list[dict[str, Any]] = []
    for group, filters in groups.items():
        for variant in options.variants:
            mask = np.ones(n_filters) if variant == "lesion" else np.zeros(n_filters)
            mask[filters] = 0.0 if variant == "lesion" else 1.0
            common = {"model": model.name, "layer": layer, "group": group, "variant": variant}
            lesioned = downstream.run(mask)
            behavior_rows += _behavior_rows(common, full[0], lesioned[0], analysis)
            alignment_rows += _alignment_rows(common, full[1], lesioned[1])
    return pd.DataFrame(behavior_rows), pd.DataFrame(alignment_rows)


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
