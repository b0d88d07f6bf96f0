"""Lesions inside the forward pass: zero filters of one layer and follow the change downstream.

:class:`ChannelMask` is a context-managed forward hook that multiplies a layer's output by a 0/1
mask over its channels (axis 1), so every later layer and the valence output see the lesion.
:func:`forward_with_mask` runs a stimulus set through the masked network and returns the
activations of the requested later layers (and the predicted valence); with an all-ones mask it
reproduces an unlesioned extraction exactly (same batch size).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import pearsonr, spearmanr
from torch import nn

from object2brain.data.stimuli import StimulusSet
from object2brain.errors import DataError, LayerError
from object2brain.lesion.analysis import condition_sets, with_group_labels, with_group_means
from object2brain.lesion.engine import condensed_subset
from object2brain.models.inputs import image_loader, model_inputs
from object2brain.models.layers import VALENCE_LAYER, ForwardHooks, LayerRecorder
from object2brain.models.zoo import LoadedModel
from object2brain.rsa.compare import correlate_prepared, prepare
from object2brain.rsa.rdm import rdm_from_features, upper_triangle


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


def propagate_layer(
    model: LoadedModel,
    stimuli: StimulusSet,
    store: Any,
    layer: str,
    members: dict[str, np.ndarray],
    variants: Sequence[str],
    targets: Sequence[Any],
    ratings: Any,
    conditions: np.ndarray | None,
    metric: str,
    method: str,
    batch_size: int,
    device: torch.device,
    behavior_ids: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Change of direct behaviour correlation and of later layers' alignment per group lesion.

    The behaviour correlation uses the stimuli in ``behavior_ids`` only (default all; ``n`` in
    the table), e.g. those a valence head was not fitted on.
    """
    order = [name for name in store.layers if name != VALENCE_LAYER]
    if layer not in order:
        raise DataError(f"layer {layer!r} is not in the activation store")
    later = order[order.index(layer) + 1 :]
    n_filters = store.shape(layer)[1]
    ids = stimuli.ids
    rated = ratings.group_mean(ids) if ratings is not None else None
    if rated is None and "valence" in stimuli.table:
        rated = stimuli.table["valence"].to_numpy(dtype=np.float64)
    labels = with_group_labels([(t.name, s) for t in targets for s in t.subjects], list(targets))
    target_vectors = torch.cat(
        [upper_triangle(t.rdms).reshape(len(t.subjects), -1) for t in targets]
    )
    subsets = condition_sets(ids, conditions)
    in_behavior = (
        np.ones(len(ids), dtype=bool) if behavior_ids is None else np.isin(ids, list(behavior_ids))
    )
    n_behavior = {condition: int(in_behavior[keep].sum()) for condition, keep in subsets}
    # each condition's target RDMs ranked / standardised once, not once per group and layer
    prepared_targets = {
        condition: prepare(target_vectors[:, condensed_subset(len(ids), keep)], method)
        for condition, keep in subsets
        if len(keep) >= 4
    }

    def summarise(acts: dict[str, np.ndarray]) -> tuple[dict[Any, float], dict[Any, float]]:
        behavior, alignment = {}, {}
        for condition, keep in subsets:
            rows = keep[in_behavior[keep]]
            if rated is not None and VALENCE_LAYER in acts and len(rows) >= 3:
                predicted = acts[VALENCE_LAYER][rows]
                behavior[(condition, "pearson")] = float(pearsonr(predicted, rated[rows])[0])
                behavior[(condition, "spearman")] = float(spearmanr(predicted, rated[rows])[0])
            if len(keep) < 4:
                continue
            for name in later:
                rdm = upper_triangle(rdm_from_features(acts[name][keep], metric, device=device))
                prepared = prepared_targets[condition].to(rdm.device)
                r = correlate_prepared(prepare(rdm.reshape(1, -1), method), prepared, method)
                values = with_group_means(r.cpu().numpy(), list(targets))[0]
                for (target, subject), value in zip(labels, values, strict=True):
                    alignment[(condition, name, target, subject)] = float(value)
        return behavior, alignment

    record = [*later, *([VALENCE_LAYER] if model.has_head else [])]
    full_b, full_a = summarise(
        forward_with_mask(
            model, stimuli, layer, np.ones(n_filters), record, batch_size=batch_size, device=device
        )
    )
    behavior_rows, alignment_rows = [], []
    for group, filters in members.items():
        for variant in variants:
            mask = np.ones(n_filters) if variant == "lesion" else np.zeros(n_filters)
            mask[filters] = 0.0 if variant == "lesion" else 1.0
            var_b, var_a = summarise(
                forward_with_mask(
                    model, stimuli, layer, mask, record, batch_size=batch_size, device=device
                )
            )
            common = {"model": model.name, "layer": layer, "group": group, "variant": variant}
            for (condition, method_name), r in var_b.items():
                behavior_rows.append(
                    {
                        **common,
                        "condition": condition,
                        "method": method_name,
                        "r_full": full_b[(condition, method_name)],
                        "r_variant": r,
                        "delta_r": r - full_b[(condition, method_name)],
                        "n": n_behavior[condition],
                    }
                )
            for (condition, name, target, subject), r in var_a.items():
                base = full_a[(condition, name, target, subject)]
                alignment_rows.append(
                    {
                        **common,
                        "later_layer": name,
                        "target": target,
                        "subject": subject,
                        "condition": condition,
                        "r_full": base,
                        "r_variant": r,
                        "delta_r": r - base,
                    }
                )
    return pd.DataFrame(behavior_rows), pd.DataFrame(alignment_rows)
