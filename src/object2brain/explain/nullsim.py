"""Simulated dissections without a network, for the calibration of the assignment test.

A dissection reduces to per-filter maps ``(n, K, h, w)`` and boxes in the ``S x S`` input frame;
:func:`simulate_scores` runs the same accumulation as :func:`~object2brain.explain.dissect.
compute_dissection` (:class:`~object2brain.explain.dissect.GroupAccumulator`,
:class:`~object2brain.explain.dissect.AssignmentNull`) on given arrays, so the false-positive
rate and the power of ``p_assign`` and of the assignment rule can be simulated on thousands of
datasets in seconds (``validation/assignment_null.py`` and the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from object2brain.explain.dissect import (
    AssignmentNull,
    FilterScores,
    GroupAccumulator,
    PreparedBoxes,
    assign_filters,
    box_importance,
    fdr_over_layer,
    image_means,
)


@dataclass(frozen=True)
class SimulatedDataset:
    """Maps ``(n, K, h, w)`` float32 (non-negative), boxes of image ``i`` ``(n_i, 4)`` int64 in
    the ``size x size`` frame and their groups ``(n_i,)`` int64, ``n_groups`` groups."""

    maps: np.ndarray
    boxes: list[np.ndarray]
    groups: list[np.ndarray]
    n_groups: int
    size: int


def random_dataset(
    rng: np.random.Generator,
    *,
    n_images: int = 40,
    n_filters: int = 64,
    map_size: int = 7,
    size: int = 112,
    n_groups: int = 3,
    planted: int = 0,
    gain: float = 2.0,
) -> SimulatedDataset:
    """Maps of independent positive noise (gamma, peaky) and 1-3 random boxes per image in random
    groups; the first ``planted`` filters get ``gain`` added inside the boxes of group 0 (a
    filter that responds to the objects of that group, wherever they are)."""
    maps = rng.gamma(0.5, 1.0, size=(n_images, n_filters, map_size, map_size)).astype(np.float32)
    boxes, groups = [], []
    for i in range(n_images):
        count = int(rng.integers(1, 4))
        side = rng.integers(size // 6, size // 2, size=(count, 2))
        x0 = rng.integers(0, size - side[:, 0] + 1)
        y0 = rng.integers(0, size - side[:, 1] + 1)
        b = np.stack([x0, y0, x0 + side[:, 0], y0 + side[:, 1]], axis=1).astype(np.int64)
        g = rng.integers(0, n_groups, size=count).astype(np.int64)
        boxes.append(b)
        groups.append(g)
        if planted:
            scale = map_size / size
            for (bx0, by0, bx1, by1), gid in zip(b, g, strict=True):
                if gid != 0:
                    continue
                cx0, cy0 = int(bx0 * scale), int(by0 * scale)
                cx1, cy1 = (
                    max(int(np.ceil(bx1 * scale)), cx0 + 1),
                    max(int(np.ceil(by1 * scale)), cy0 + 1),
                )
                maps[i, :planted, cy0:cy1, cx0:cx1] += gain
    return SimulatedDataset(maps, boxes, groups, n_groups, size)


def simulate_scores(
    data: SimulatedDataset, *, n_draws: int, seed: int, batch: int = 16
) -> FilterScores:
    """Importance, enrichment, ``p_assign`` and its FDR of a simulated dataset, through the same
    accumulators as a dissection."""
    n, K = data.maps.shape[:2]
    by_image = {i: (data.boxes[i], data.groups[i]) for i in range(n) if len(data.boxes[i])}
    prepared = PreparedBoxes(pd.DataFrame(), by_image, {}, {})
    accumulator = GroupAccumulator(data.n_groups, K, top=1)
    null = AssignmentNull(prepared, (data.n_groups, K), n_draws, seed)
    frame = (data.size, data.size)
    positions = sorted(by_image)
    for start in range(0, len(positions), batch):
        chunk = positions[start : start + batch]
        maps = torch.from_numpy(data.maps[chunk])
        image_index = torch.from_numpy(
            np.concatenate([np.full(len(by_image[p][0]), j) for j, p in enumerate(chunk)])
        )
        boxes = torch.from_numpy(np.concatenate([by_image[p][0] for p in chunk]))
        group_index = torch.from_numpy(np.concatenate([by_image[p][1] for p in chunk]))
        importance = box_importance(maps, boxes, image_index, frame)
        whole = image_means(maps, frame)
        accumulator.add(importance, whole, image_index, group_index, torch.tensor(chunk))
        null.add(maps, whole, chunk, frame)
    importance_mean, enrichment = accumulator.means()
    n_images = np.zeros(data.n_groups, dtype=np.int64)
    for _, g in by_image.values():
        n_images[np.unique(g)] += 1
    p = null.p_values(enrichment)
    return FilterScores(importance_mean, enrichment, p, fdr_over_layer(p), n_images)


def assigned_filters(
    scores: FilterScores, *, threshold: float = 1.5, min_images: int = 5, test: bool = True
) -> np.ndarray:
    """The assignment ``(K,)`` (-1: none) with (``test``) or without the assignment test."""
    return assign_filters(
        scores.enrichment,
        scores.n_images,
        threshold=threshold,
        min_images=min_images,
        p_fdr=scores.p_assign_fdr if test else None,
    )
