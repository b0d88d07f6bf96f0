"""EmoCAM++ dissection: the object groups each filter attends to when it drives valence.

For every image with at least one detection of a mapped class:

1. per-filter Grad-CAM maps ``M_k`` of the layer, ``(batch, K, h, w)``, after ``direction``
   (:func:`~object2brain.explain.filtercam.filter_cams`: one forward + one backward per batch);
2. each detection box ``b`` is mapped into the model's input frame (the resized, centre-cropped
   ``S x S`` picture the network sees; boxes partly outside the image are clipped, boxes entirely
   outside it, or outside the centre crop, are dropped; all counted);
3. box importance ``I(k, b)`` = mean of filter k's map, bilinearly upsampled to ``S x S``, inside
   box ``b``; enrichment ``E(k, b) = I(k, b) / mean of that upsampled map over the whole input``
   (undefined, and skipped, where the map is zero everywhere);
4. per object group ``g``: ``importance(k, g)`` = mean of ``I(k, b)`` over g's boxes in all images,
   ``enrichment(k, g)`` = mean of ``E(k, b)`` over the same boxes, ``n_images(g)`` = images in
   which g was detected;
5. assignment: filter k belongs to ``argmax_g enrichment(k, g)`` over the groups detected in at
   least ``min_images`` images, when that enrichment is at least ``threshold`` (groups seen in
   too few images are not candidates, rather than blocking the assignment).

Box importances of all filters and boxes come from integral images, without a loop over filters.
Bilinear upsampling is separable and linear, ``U_k = R_H M_k R_W^T`` with ``R`` the ``(S, h)``
interpolation matrices, so the integral image of the upsampled map is
``C_H U_k C_W^T = P_H M_k P_W^T`` with ``P = C R`` (``C``: cumulative sums, one zero row on top,
shape ``(S + 1, h)``). A box sum is the usual four-corner difference of that integral image,
``sum_b U_k = (P_H[y1] - P_H[y0]) M_k (P_W[x1] - P_W[x0])^T``, so only the corner rows of ``P``
are needed and maps stay at layer resolution: one batched matrix product gives ``(boxes, K)``.

Memory is flat across batches: per-batch maps are dropped, only ``(groups, K)`` sums and a
fixed-size top-image list per (group, filter) for the galleries are kept.

The stage is resolve -> compute -> write: :func:`object2brain.api.dissect.dissect` loads the model,
stimuli, detector and group map; :func:`compute_dissection` returns a :class:`DissectResult`
(tables, counts, and the arrays of the gallery figures) without writing anything but the
detection cache; :func:`write_dissection` writes the tables and ``manifest.json``. Figures are
drawn from the result by :mod:`object2brain.report.figures.dissect`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from object2brain.data.image_array import is_array_file
from object2brain.data.splits import condition_folds
from object2brain.data.stimuli import StimulusSet
from object2brain.devices import resolve_device
from object2brain.errors import DataError, LayerError, ModelError
from object2brain.explain.detectors import Detector, GivenBoxes, ImageDetections, detect_images
from object2brain.explain.filtercam import filter_cams, upsample_maps
from object2brain.explain.groups import GroupMap
from object2brain.heads.io import FoldHeads
from object2brain.io import write_json, write_table
from object2brain.manifest import build_manifest, file_sha256, output_list
from object2brain.models.image_cache import ImageCache
from object2brain.models.inputs import (
    displayed_size,
    image_batches,
    load_inputs,
    uses_device_decoding,
)
from object2brain.models.layers import resolve_layers
from object2brain.models.zoo import LoadedModel, Preprocessing
from object2brain.options import DissectOptions, Runtime
from object2brain.tables import FILTER_OBJECTS

log = logging.getLogger("object2brain.dissect")

#: Columns of the ``filter_objects`` table, in order (from :mod:`object2brain.tables`).
FILTER_OBJECTS_COLUMNS: tuple[str, ...] = tuple(FILTER_OBJECTS.column_names)


# ----------------------------------------------------------------------------------------------
# integral-image box importance


def integral_weights(n_in: int, n_out: int, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """Integral of bilinear upsampling along one axis, ``P`` of shape ``(n_out + 1, n_in)``.

    ``R`` ``(n_out, n_in)`` is the interpolation matrix of ``F.interpolate(mode="bilinear",
    align_corners=False)`` along one axis (upsampled = ``R @ x``); ``P[i] = sum_{r < i} R[r]``,
    so ``(P[b] - P[a]) @ x`` is the sum of the upsampled values ``a <= r < b``. Float64.
    """
    eye = torch.eye(n_in, dtype=torch.float64, device=device)
    R = F.interpolate(eye[None], size=n_out, mode="linear", align_corners=False)[0].T
    zero = torch.zeros(1, n_in, dtype=torch.float64, device=device)
    return torch.cat([zero, R.cumsum(dim=0)])


def box_importance(
    maps: torch.Tensor,
    boxes: torch.Tensor,
    image_index: torch.Tensor,
    image_size: tuple[int, int],
) -> torch.Tensor:
    """Mean of each filter's upsampled map inside each box, for all filters and boxes at once.

    Args:
        maps: per-filter maps at layer resolution, ``(batch, K, h, w)``.
        boxes: integer pixel boxes ``(N, 4)`` as ``(x0, y0, x1, y1)`` in the upsampled frame,
            ``0 <= x0 < x1 <= W``, ``0 <= y0 < y1 <= H`` (``x1``, ``y1`` exclusive).
        image_index: which image of the batch each box belongs to, ``(N,)``.
        image_size: ``(H, W)`` of the upsampled frame.

    Returns:
        ``I`` of shape ``(N, K)``: ``I[n, k] = mean_{y0<=y<y1, x0<=x<x1} U_k[y, x]`` with
        ``U_k = upsample(maps[image_index[n], k], image_size)`` (bilinear), computed from the
        integral image (module docstring) without forming ``U``.
    """
    batch, K, h, w = maps.shape
    n = boxes.shape[0]
    if n == 0:
        return maps.new_zeros(0, K)
    height, width = image_size
    boxes = boxes.to(device=maps.device, dtype=torch.long)
    image_index = image_index.to(device=maps.device, dtype=torch.long)
    x0, y0, x1, y1 = boxes.unbind(dim=1)
    if bool(((x1 <= x0) | (y1 <= y0) | (x0 < 0) | (y0 < 0) | (x1 > width) | (y1 > height)).any()):
        raise ValueError(f"boxes must satisfy 0 <= x0 < x1 <= {width}, 0 <= y0 < y1 <= {height}")
    Ph = integral_weights(h, height, device=maps.device)
    Pw = integral_weights(w, width, device=maps.device)
    u = (Ph[y1] - Ph[y0]) / (y1 - y0).to(torch.float64)[:, None]  # (N, h)
    v = (Pw[x1] - Pw[x0]) / (x1 - x0).to(torch.float64)[:, None]  # (N, w)
    weights = (u[:, :, None] * v[:, None, :]).reshape(n, h * w).to(maps.dtype)
    # Block-diagonal product: boxes of image b only meet the maps of image b.
    counts = torch.bincount(image_index, minlength=batch)
    order = torch.argsort(image_index, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(image_index)
    slot[order] = torch.arange(n, device=maps.device) - starts[image_index[order]]
    padded = maps.new_zeros(batch, h * w, int(counts.max()))
    padded[image_index, :, slot] = weights
    sums = torch.bmm(maps.reshape(batch, K, h * w), padded)  # (batch, K, max boxes per image)
    return sums[image_index, :, slot]


def image_means(maps: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Mean of each upsampled map over the whole frame, ``(batch, K)`` from ``(batch, K, h, w)``."""
    batch, K, h, w = maps.shape
    height, width = image_size
    u = integral_weights(h, height, device=maps.device)[-1] / height
    v = integral_weights(w, width, device=maps.device)[-1] / width
    weights = (u[:, None] * v[None, :]).reshape(h * w).to(maps.dtype)
    return maps.reshape(batch, K, h * w) @ weights


def brute_force_box_importance(
    maps: torch.Tensor,
    boxes: torch.Tensor,
    image_index: torch.Tensor,
    image_size: tuple[int, int],
) -> torch.Tensor:
    """Reference for :func:`box_importance`: upsample every map, average inside each box."""
    up = upsample_maps(maps, image_size)
    rows = [
        up[int(b), :, int(y0) : int(y1), int(x0) : int(x1)].mean(dim=(1, 2))
        for (x0, y0, x1, y1), b in zip(boxes.tolist(), image_index.tolist(), strict=True)
    ]
    return torch.stack(rows) if rows else maps.new_zeros(0, maps.shape[1])


# ----------------------------------------------------------------------------------------------
# boxes: image pixels -> model input frame


@dataclass(frozen=True)
class InputGeometry:
    """How an image of ``width x height`` becomes the ``crop x crop`` model input.

    Resize so the short side is ``resize`` (long side ``int(resize * long / short)``, as
    torchvision does), then take the centre crop (offset ``round((size - crop) / 2)``).
    """

    scale_x: float
    scale_y: float
    left: int
    top: int
    crop: int

    @classmethod
    def of(cls, width: int, height: int, resize: int, crop: int) -> InputGeometry:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = (
            (short, long) if short == resize else (resize, int(resize * long / short))
        )
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        left = round((new_w - crop) / 2.0)
        top = round((new_h - crop) / 2.0)
        return cls(new_w / width, new_h / height, left, top, crop)

    def to_input(self, x0: float, y0: float, x1: float, y1: float) -> tuple[float, ...]:
        """Box in image pixels -> box in input pixels (not clipped)."""
        return (
            x0 * self.scale_x - self.left,
            y0 * self.scale_y - self.top,
            x1 * self.scale_x - self.left,
            y1 * self.scale_y - self.top,
        )


@dataclass
class PreparedBoxes:
    """Usable boxes of all stimuli in the model's input frame, and what happened to the others.

    Attributes:
        frame: one row per detection: ``stimulus_id``, ``label``, ``group`` (or empty),
            ``score``, ``x0..y1`` (image pixels, after clipping), ``input_x0..input_y1`` (input
            pixels), ``status`` (``used``, ``unmapped``, ``outside_image``, ``outside_crop``),
            ``clipped`` (partly outside the image).
        by_image: stimulus position -> ``(boxes (n, 4) int64, group index (n,))`` for used boxes.
        counts: summary counts (module docstring of :func:`dissect`).
        unmapped: detector class -> number of detections without a group.
    """

    frame: pd.DataFrame
    by_image: dict[int, tuple[np.ndarray, np.ndarray]]
    counts: dict[str, int]
    unmapped: dict[str, int]


def prepare_boxes(
    detections: Sequence[ImageDetections],
    groups: GroupMap,
    *,
    resize: int,
    crop: int,
) -> PreparedBoxes:
    """Clip boxes to their image, map classes to groups and boxes to the ``crop x crop`` input."""
    group_index = {g: i for i, g in enumerate(groups.groups)}
    records: list[dict[str, Any]] = []
    by_image: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    counts = Counter(
        {"detections": 0, "clipped": 0, "outside_image": 0, "outside_crop": 0, "unmapped": 0}
    )
    unmapped: Counter[str] = Counter()
    for position, item in enumerate(detections):
        geometry = InputGeometry.of(item.width, item.height, resize, crop)
        boxes: list[list[int]] = []
        gids: list[int] = []
        for det in item.detections:
            counts["detections"] += 1
            cx0, cy0 = max(det.x0, 0.0), max(det.y0, 0.0)
            cx1, cy1 = min(det.x1, float(item.width)), min(det.y1, float(item.height))
            clipped = (cx0, cy0, cx1, cy1) != (det.x0, det.y0, det.x1, det.y1)
            group = groups.group_of(det.label)
            record: dict[str, Any] = {
                "stimulus_id": item.stimulus_id,
                "label": det.label,
                "group": group or "",
                "score": det.score,
                "x0": cx0,
                "y0": cy0,
                "x1": cx1,
                "y1": cy1,
                "input_x0": -1,
                "input_y0": -1,
                "input_x1": -1,
                "input_y1": -1,
                "clipped": clipped,
            }
            records.append(record)
            if cx1 - cx0 <= 0 or cy1 - cy0 <= 0:
                counts["outside_image"] += 1
                record["status"] = "outside_image"
                continue
            counts["clipped"] += int(clipped)
            if group is None:
                counts["unmapped"] += 1
                unmapped[det.label] += 1
                record["status"] = "unmapped"
                continue
            fx0, fy0, fx1, fy1 = geometry.to_input(cx0, cy0, cx1, cy1)
            ix0, iy0 = min(max(round(fx0), 0), crop), min(max(round(fy0), 0), crop)
            ix1, iy1 = min(max(round(fx1), 0), crop), min(max(round(fy1), 0), crop)
            if fx1 <= 0 or fy1 <= 0 or fx0 >= crop or fy0 >= crop:
                counts["outside_crop"] += 1
                record["status"] = "outside_crop"
                continue
            if ix1 <= ix0:  # thinner than a pixel after rounding: keep one pixel
                ix0, ix1 = (ix0, ix0 + 1) if ix0 < crop else (crop - 1, crop)
            if iy1 <= iy0:
                iy0, iy1 = (iy0, iy0 + 1) if iy0 < crop else (crop - 1, crop)
            record.update(input_x0=ix0, input_y0=iy0, input_x1=ix1, input_y1=iy1, status="used")
            boxes.append([ix0, iy0, ix1, iy1])
            gids.append(group_index[group])
        if boxes:
            by_image[position] = (np.asarray(boxes, np.int64), np.asarray(gids, np.int64))
    columns = [
        "stimulus_id", "label", "group", "score", "x0", "y0", "x1", "y1",
        "input_x0", "input_y0", "input_x1", "input_y1", "clipped", "status",
    ]  # fmt: skip
    frame = pd.DataFrame.from_records(records, columns=columns)
    counts["used"] = sum(len(b) for b, _ in by_image.values())
    counts["images"] = len(detections)
    counts["images_used"] = len(by_image)
    counts["images_without_detections"] = len(detections) - len(by_image)
    return PreparedBoxes(frame, by_image, dict(counts), dict(unmapped))


# ----------------------------------------------------------------------------------------------
# accumulation and assignment


class GroupAccumulator:
    """Running per-(group, filter) sums over batches; memory independent of the number of images.

    Holds ``sum_I`` and ``sum_E`` ``(G, K)``, the number of boxes per group ``(G,)``, the number of
    finite ``E`` values ``(G, K)``, and the ``top`` largest per-image importances per (group,
    filter) with their stimulus positions ``(G, K, top)`` (for galleries).
    """

    def __init__(self, n_groups: int, n_filters: int, *, top: int = 4) -> None:
        G, K = n_groups, n_filters
        self.sum_importance = torch.zeros(G, K, dtype=torch.float64)
        self.sum_enrichment = torch.zeros(G, K, dtype=torch.float64)
        self.n_enrichment = torch.zeros(G, K, dtype=torch.float64)
        self.n_boxes = torch.zeros(G, dtype=torch.float64)
        self.top_values = torch.full((G, K, top), -math.inf, dtype=torch.float32)
        self.top_images = torch.full((G, K, top), -1, dtype=torch.long)

    def add(
        self,
        importance: torch.Tensor,
        whole: torch.Tensor,
        image_index: torch.Tensor,
        group_index: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """Add one batch.

        Args:
            importance: ``I`` ``(N, K)`` of the batch's boxes.
            whole: whole-frame map means ``(batch, K)``.
            image_index: image of each box within the batch ``(N,)``.
            group_index: group of each box ``(N,)``.
            positions: stimulus position of each image of the batch ``(batch,)``.
        """
        importance = importance.detach().cpu()
        whole = whole.detach().cpu()
        image_index, group_index = image_index.cpu(), group_index.cpu()
        G, K, top = self.top_values.shape
        denominator = whole[image_index]
        finite = denominator > 0
        enrichment = torch.where(finite, importance / denominator.clamp_min(1e-30), 0.0)
        self.sum_importance.index_add_(0, group_index, importance.double())
        self.sum_enrichment.index_add_(0, group_index, enrichment.double())
        self.n_enrichment.index_add_(0, group_index, finite.double())
        self.n_boxes.index_add_(0, group_index, torch.ones(len(group_index), dtype=torch.float64))
        # Per (image, group): the largest box importance, then merge into the running top list.
        batch = whole.shape[0]
        key = image_index * G + group_index
        best = torch.full((batch * G, K), -math.inf)
        best.scatter_reduce_(0, key[:, None].expand(-1, K), importance.float(), reduce="amax")
        best = best.reshape(batch, G, K).permute(1, 2, 0)  # (G, K, batch)
        images = positions.cpu().long()[None, None, :].expand(G, K, batch)
        values = torch.cat([self.top_values, best], dim=2)
        owners = torch.cat([self.top_images, images], dim=2)
        keep = values.topk(top, dim=2)
        self.top_values = keep.values
        self.top_images = torch.where(
            torch.isfinite(keep.values), owners.gather(2, keep.indices), -1
        )

    def means(self) -> tuple[np.ndarray, np.ndarray]:
        """``importance`` and ``enrichment`` ``(G, K)``; NaN where a group has no box."""
        with np.errstate(invalid="ignore", divide="ignore"):
            importance = (self.sum_importance / self.n_boxes[:, None]).numpy()
            enrichment = (self.sum_enrichment / self.n_enrichment).numpy()
        return importance, enrichment


#: Level of the assignment test: ``p_assign_fdr`` must be below it for an assignment.
ASSIGN_ALPHA = 0.05


class AssignmentNull:
    """The null of ``enrichment(k, g)``: each image's filter maps paired with another image's boxes.

    In every draw ``r = 1..R`` the images with a used box are shuffled (a uniform random
    permutation ``pi_r``) and image ``i``'s maps are scored on the boxes (and groups) of image
    ``pi_r(i)``. Every model input is the same ``S x S`` frame and each box was already mapped
    into it through its own image's resize and crop, so a donor's boxes are used in that frame as
    they are (the geometry is rescaled once, image pixels -> input frame). The null enrichment of
    draw ``r`` is the same mean as the observed one, ``mean over the boxes b of group g of
    I(k, b) / mean(U_k)`` (``U_k`` the receiving image's upsampled map), so the null keeps where
    boxes of each group tend to lie, how many there are and how peaked each filter's maps are;
    it breaks only the pairing of a filter's maps with the objects of *its own* image. Uniform
    permutations (rather than derangements) make the p-value exact when the images' maps are
    exchangeable given the boxes: the observed pairing is then one more draw from the same
    distribution; an image keeps its own boxes in about one place per draw.

    Held: ``sum`` and ``count`` ``(R * G, K)`` float64 (row ``r * G + g``), about
    ``16 R G K`` bytes (80 MB for ``R = 1000``, ``G = 10``, ``K = 512``).
    """

    def __init__(
        self,
        prepared: PreparedBoxes,
        shape: tuple[int, int],
        n_draws: int,
        seed: int,
        *,
        stream: int = 0,
    ) -> None:
        G, K = shape
        positions = sorted(prepared.by_image)
        self.n_groups, self.n_draws = G, n_draws
        self.row_of = {p: i for i, p in enumerate(positions)}
        boxes = [prepared.by_image[p] for p in positions]
        self.counts = np.asarray([len(b) for b, _ in boxes], dtype=np.int64)
        self.starts = np.cumsum(self.counts) - self.counts
        self.boxes = np.concatenate([b for b, _ in boxes]) if boxes else np.zeros((0, 4), np.int64)
        self.groups = np.concatenate([g for _, g in boxes]) if boxes else np.zeros(0, np.int64)
        n = len(positions)
        # stream 0: the all-images null; stream k + 1: selection fold k's (its own draws)
        rng = np.random.default_rng([int(seed), 0x0A551, *([stream] if stream else [])])
        #: ``donors[r, i]``: the image whose boxes image ``i`` gets in draw ``r`` (a uniform
        #: random permutation per draw; none with fewer than two images).
        self.donors = (
            rng.permuted(np.tile(np.arange(n), (n_draws, 1)), axis=1)
            if n >= 2
            else np.zeros((0, n), dtype=np.int64)
        )
        self.sum = torch.zeros(n_draws * G, K, dtype=torch.float64)
        self.count = torch.zeros(n_draws * G, K, dtype=torch.float64)

    def donor_boxes(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """The boxes ``(M, 4)`` scored on image ``position`` over all draws, and the row
        ``r * G + g`` ``(M,)`` of each (its draw and the group of its donor box)."""
        donors = self.donors[:, self.row_of[position]]
        counts = self.counts[donors]
        first = np.cumsum(counts) - counts
        index = np.repeat(self.starts[donors] - first, counts) + np.arange(int(counts.sum()))
        draws = np.repeat(np.arange(len(donors)), counts)
        return self.boxes[index], draws * self.n_groups + self.groups[index]

    def add(
        self,
        maps: torch.Tensor,
        whole: torch.Tensor,
        positions: Sequence[int],
        image_size: tuple[int, int],
    ) -> None:
        """Score the batch's maps ``(batch, K, h, w)`` (whole-frame means ``(batch, K)``) on the
        donors' boxes of every draw; images outside this null's set are skipped."""
        parts = [
            (b, self.donor_boxes(int(position)))
            for b, position in enumerate(positions)
            if int(position) in self.row_of
        ]
        if not parts:
            return
        rows = np.concatenate([r for _, (_, r) in parts])
        if len(rows) == 0:
            return
        boxes = torch.from_numpy(np.concatenate([bx for _, (bx, _) in parts]))
        image_index = torch.from_numpy(
            np.concatenate([np.full(len(r), b, dtype=np.int64) for b, (_, r) in parts])
        )
        importance = box_importance(maps, boxes, image_index, image_size).detach().cpu()
        denominator = whole.detach().cpu()[image_index]
        finite = denominator > 0
        enrichment = torch.where(finite, importance / denominator.clamp_min(1e-30), 0.0)
        key = torch.from_numpy(rows)
        self.sum.index_add_(0, key, enrichment.double())
        self.count.index_add_(0, key, finite.double())

    def p_values(self, enrichment: np.ndarray) -> np.ndarray:
        """One-sided ``p_assign`` ``(G, K)`` of the observed ``enrichment`` ``(G, K)``:
        ``(1 + #{r: E_r >= E}) / (1 + R_valid)`` over the draws in which group ``g`` had a box
        (``R_valid``); NaN where ``E`` is undefined or no draw had a box of ``g``."""
        G, K = enrichment.shape
        with np.errstate(invalid="ignore", divide="ignore"):
            null = (self.sum / self.count).numpy().reshape(self.n_draws, G, K)
        valid = np.isfinite(null)
        exceed = (valid & (null >= enrichment[None])).sum(axis=0)
        n_valid = valid.sum(axis=0)
        p = (1.0 + exceed) / (1.0 + n_valid)
        return np.where(np.isfinite(enrichment) & (n_valid > 0), p, np.nan)


def fdr_over_layer(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values over every finite entry of ``p`` (the layer's
    filters x groups, any shape); NaN stays NaN."""
    from scipy.stats import false_discovery_control

    adjusted = np.full(p.shape, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        adjusted[finite] = false_discovery_control(p[finite], method="bh")
    return adjusted


class SelectionFolds:
    """Sums of the pass per selection fold, for the assignment made without each fold.

    ``fold_of`` ``(n,)``: the selection fold of every stimulus position
    (:func:`~object2brain.data.splits.condition_folds`). Box sums are additive over images, so
    one accumulator per fold (the boxes of the images *in* fold ``f``) gives the sums without
    fold ``k`` as the sum of the other folds' accumulators: the CNN and Grad-CAM run once. The
    assignment null of fold ``k`` is its own :class:`AssignmentNull` over the images not in
    fold ``k`` (donors drawn among them only; stream ``k + 1`` of the seed), so each image's maps
    are also scored on the donors of the ``F - 1`` nulls it belongs to (null cost and memory
    ``F`` times those of the all-images null, for ``F`` folds).
    """

    def __init__(
        self,
        fold_of: np.ndarray,
        prepared: PreparedBoxes,
        shape: tuple[int, int],
        n_draws: int,
        seed: int,
    ) -> None:
        G, K = shape
        self.fold_of = np.asarray(fold_of, dtype=np.int64)
        self.n_folds = int(self.fold_of.max()) + 1
        self.parts = [GroupAccumulator(G, K, top=1) for _ in range(self.n_folds)]
        self.nulls = [
            AssignmentNull(
                _without_fold(prepared, self.fold_of, k), shape, n_draws, seed, stream=k + 1
            )
            for k in range(self.n_folds)
        ]

    def add(
        self,
        importance: torch.Tensor,
        whole: torch.Tensor,
        image_index: torch.Tensor,
        group_index: torch.Tensor,
        positions: torch.Tensor,
        maps: torch.Tensor,
        image_size: tuple[int, int],
    ) -> None:
        """Add one batch (arguments as :meth:`GroupAccumulator.add`; ``maps`` ``(batch, K, h,
        w)`` for the nulls)."""
        importance, image_index = importance.detach().cpu(), image_index.cpu()
        group_index = group_index.cpu()
        box_fold = torch.from_numpy(self.fold_of[positions.cpu().numpy()])[image_index]
        for fold, accumulator in enumerate(self.parts):
            inside = box_fold == fold
            if bool(inside.any()):
                accumulator.add(importance[inside], whole, image_index[inside],
                                group_index[inside], positions)  # fmt: skip
        for null in self.nulls:
            null.add(maps, whole, positions.tolist(), image_size)

    def scores(self, k: int, n_images: np.ndarray) -> FilterScores:
        """:class:`FilterScores` of the images not in fold ``k`` (``n_images`` ``(G,)``: the
        images of each group outside fold ``k``)."""
        others = [part for fold, part in enumerate(self.parts) if fold != k]
        G, K = others[0].sum_importance.shape
        merged = GroupAccumulator(G, K, top=1)
        for part in others:
            merged.sum_importance += part.sum_importance
            merged.sum_enrichment += part.sum_enrichment
            merged.n_enrichment += part.n_enrichment
            merged.n_boxes += part.n_boxes
        return _scores(merged, self.nulls[k], n_images)

    def n_images(self, prepared: PreparedBoxes, k: int, n_groups: int) -> np.ndarray:
        """Images ``(G,)`` outside fold ``k`` in which each group was detected."""
        counts = np.zeros(n_groups, dtype=np.int64)
        for position, (_, gids) in prepared.by_image.items():
            if self.fold_of[position] != k:
                counts[np.unique(gids)] += 1
        return counts


def _without_fold(prepared: PreparedBoxes, fold_of: np.ndarray, k: int) -> PreparedBoxes:
    """``prepared`` restricted to the images not in fold ``k`` (for that fold's null)."""
    kept = {p: boxes for p, boxes in prepared.by_image.items() if fold_of[p] != k}
    return PreparedBoxes(prepared.frame, kept, prepared.counts, prepared.unmapped)


def assign_filters(
    enrichment: np.ndarray,
    n_images: np.ndarray,
    *,
    threshold: float = 1.5,
    min_images: int = 5,
    p_fdr: np.ndarray | None = None,
    alpha: float = ASSIGN_ALPHA,
) -> np.ndarray:
    """Group of each filter, ``(K,)`` int (-1 = none), from enrichment ``(G, K)``.

    ``argmax_g E(g, k)`` over groups with ``n_images(g) >= min_images``, kept when that
    ``E >= threshold`` and, when ``p_fdr`` ``(G, K)`` is given, its ``p_fdr < alpha`` (module
    docstring).
    """
    eligible = (np.asarray(n_images) >= min_images)[:, None] & np.isfinite(enrichment)
    masked = np.where(eligible, enrichment, -np.inf)
    if masked.shape[0] == 0:
        return np.full(enrichment.shape[1], -1, dtype=np.int64)
    best = masked.argmax(axis=0)
    keep = masked.max(axis=0) >= threshold
    if p_fdr is not None:
        best_p = np.take_along_axis(p_fdr, best[None, :], axis=0)[0]
        keep &= np.nan_to_num(best_p, nan=1.0) < alpha
    return np.where(keep, best, -1).astype(np.int64)


def filter_objects_table(
    model: str,
    layer: str,
    groups: Sequence[str],
    scores: FilterScores,
    assignment: np.ndarray,
    *,
    fold: int | None = None,
) -> pd.DataFrame:
    """The ``filter_objects`` table (columns :data:`object2brain.tables.FILTER_OBJECTS`): one row
    per (filter, group), filters outer, groups inner; column ``fold`` = ``fold`` (empty: the
    assignment on all images)."""
    G, K = scores.importance.shape
    filters = np.repeat(np.arange(K), G)
    group_ids = np.tile(np.arange(G), K)

    def flat(values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float64).T.reshape(-1)

    return pd.DataFrame(
        {
            "model": model,
            "layer": layer,
            "filter": filters.astype(np.int64),
            "group": np.asarray(groups, dtype=object)[group_ids] if G else [],
            "importance": flat(scores.importance),
            "enrichment": flat(scores.enrichment),
            "p_assign": flat(scores.p_assign),
            "p_assign_fdr": flat(scores.p_assign_fdr),
            "n_images": np.asarray(scores.n_images, dtype=np.int64)[group_ids] if G else [],
            "assigned": assignment[filters] == group_ids,
            "fold": pd.array([fold] * (G * K), dtype="Int64"),
        },
        columns=list(FILTER_OBJECTS_COLUMNS),
    )


@dataclass(frozen=True)
class FilterScores:
    """Per (group, filter) results of the pass, each ``(G, K)`` (``n_images``: ``(G,)``).

    Attributes:
        importance: mean box importance ``I``.
        enrichment: mean box enrichment ``E``.
        p_assign: one-sided p of ``E`` against :class:`AssignmentNull`.
        p_assign_fdr: Benjamini-Hochberg of ``p_assign`` over the layer's filters x groups.
        n_images: images in which each group was detected.
    """

    importance: np.ndarray
    enrichment: np.ndarray
    p_assign: np.ndarray
    p_assign_fdr: np.ndarray
    n_images: np.ndarray


# ----------------------------------------------------------------------------------------------
# the whole analysis: compute


@dataclass(frozen=True)
class GalleryImage:
    """One panel of a group's gallery figure.

    Attributes:
        group: the object group.
        filter: the filter's channel index ``k``.
        stimulus_id: the image's stimulus.
        image: the model input as a picture ``(S, S, 3)`` uint8 (de-normalised).
        heat: filter ``k``'s map upsampled to the input ``(S, S)`` float32.
        boxes: the group's used boxes in input pixels, ``(x0, y0, x1, y1)``, ``x1``/``y1``
            exclusive.
        enrichment: ``enrichment(k, group)``.
        assigned: filter ``k`` is assigned to the group.
    """

    group: str
    filter: int
    stimulus_id: str
    image: np.ndarray
    heat: np.ndarray
    boxes: list[tuple[int, ...]]
    enrichment: float
    assigned: bool


@dataclass(frozen=True)
class DissectProvenance:
    """What :func:`write_dissection` records in ``manifest.json`` about a run.

    Attributes:
        config: the settings (model description, layer, options, device, seed, decoding,
            detector and group map).
        seed: the run's root seed.
        stimuli_fingerprint: :meth:`StimulusSet.fingerprint` (ids and image bytes).
        weights_sha256: SHA-256 of the model's weights.
        files: input name -> file whose SHA-256 enters the manifest (stimulus table, group
            maps, boxes file), when it is a file.
    """

    config: dict[str, Any]
    seed: int
    stimuli_fingerprint: str
    weights_sha256: str
    files: dict[str, Path]


@dataclass
class DissectResult:
    """What :func:`compute_dissection` produced (and, through the API, what was written).

    Attributes:
        table: the ``filter_objects`` table (:data:`FILTER_OBJECTS_COLUMNS`).
        boxes: every detection with its group, coordinates and status (``detections`` table).
        summary: counts (images, boxes clipped / dropped / unmapped, ...) and settings; keys in
            :func:`compute_dissection`.
        provenance: settings and inputs for the manifest.
        gallery: the gallery figures' panels (empty unless asked for).
        out: output folder, if one was written.
        files: files written.
        notes: caveats of the selection folds for the manifest (``selection_notes``).
        folds: the selection folds, ``stimulus_id, fold`` (``folds.csv``; the definition the
            lesion checks its stimuli against), or ``None`` without selection folds.
    """

    table: pd.DataFrame
    boxes: pd.DataFrame
    summary: dict[str, Any]
    provenance: DissectProvenance | None = None
    gallery: list[GalleryImage] = field(default_factory=list)
    out: Path | None = None
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    folds: pd.DataFrame | None = None


class Accumulate(Protocol):
    """The Grad-CAM pass of :func:`compute_dissection` (the signature of its default,
    ``_accumulate``): the per-(group, filter) sums, the null's and the folds' sums filled in, and
    the images per group ``(G,)``."""

    def __call__(
        self,
        cams: _CamPass,
        prepared: PreparedBoxes,
        stimuli: _Stimuli,
        options: DissectOptions,
        on_device_decode: bool,
        null: AssignmentNull,
        *,
        progress: bool,
        folds: SelectionFolds | None = None,
    ) -> tuple[GroupAccumulator, np.ndarray]: ...


@dataclass(frozen=True)
class _CamPass:
    """How per-filter Grad-CAM maps of a batch are computed: ``network`` on ``device``, maps of
    ``layer`` for output unit ``target`` (``None``: the valence head) after ``direction``."""

    network: torch.nn.Module
    layer: str
    target: int | None
    direction: str
    device: torch.device
    preprocessing: Preprocessing

    @property
    def crop(self) -> int:
        return self.preprocessing.crop_size

    def maps(self, inputs: torch.Tensor) -> torch.Tensor:
        """Per-filter maps ``(B, K, h, w)`` of model inputs ``(B, 3, S, S)``."""
        cams = filter_cams(self.network, self.layer, inputs.to(self.device), target=self.target,
                           direction=self.direction)  # fmt: skip
        return cams.maps


@dataclass(frozen=True)
class _Stimuli:
    """The stimulus lists, read once (:class:`StimulusSet` builds a new list on every access)."""

    ids: list[str]
    paths: list[Path]

    @classmethod
    def of(cls, stimuli: StimulusSet) -> _Stimuli:
        return cls(list(stimuli.ids), list(stimuli.paths))


def compute_dissection(
    loaded: LoadedModel,
    stimuli: StimulusSet,
    detector: Detector,
    groups: GroupMap,
    options: DissectOptions,
    runtime: Runtime,
    *,
    cache_dir: Path | None = None,
    gallery: bool = False,
    accumulate: Accumulate | None = None,
) -> DissectResult:
    """EmoCAM++: per-filter Grad-CAM x object detections -> the ``filter_objects`` table.

    Args:
        loaded: the model; without a valence head, ``options.target`` names the output unit.
        stimuli: the images, in order.
        detector: the object detector (or given boxes).
        groups: detector class -> object group.
        options: layer (``options.layer_for(loaded.name)``: one dotted module name with spatial
            output ``(batch, K, h, w)``), direction, target, threshold, min_images, batch size,
            decoding, workers, gallery sizes.
        runtime: device, seed (recorded), progress bars.
        cache_dir: detection cache (one JSON per image, by content); ``None``: no cache.
        gallery: also compute the gallery panels (the top ``options.gallery_filters`` filters of
            each group, assigned first, then by enrichment; their top
            ``options.gallery_images`` images each), a second Grad-CAM pass over those images.
        accumulate: runs the Grad-CAM pass (default: in this process, batch after batch); e.g.
            :class:`object2brain.executors.dissection.DissectShards`, the pass in shards of
            images on an executor (a Ray cluster), with the same sums.

    Summary counts: ``images``, ``images_used``, ``images_without_detections`` (left out),
    ``detections``, ``used`` boxes, ``clipped`` (partly outside the image), ``outside_image`` /
    ``outside_crop`` (dropped), ``unmapped`` (class without group; per class in
    ``unmapped_classes``), ``cache_hits``, ``boxes_file_unmatched`` (given boxes of unknown ids),
    ``n_filters``, ``layer_resolution``, ``input_size``, ``groups``, ``n_images_per_group``,
    ``n_assigned``, ``seconds`` (0.0 here; the API sets the wall time).

    Raises:
        LayerError: unknown layer or one without spatial maps.
        ModelError: no valence head and no ``target``.
        DataError: no image with a usable detection.
    """
    cams = _cam_pass(loaded, options, resolve_device(runtime.device))
    # Fail fast (before detection) on a layer without maps or a model without valence output.
    probe = cams.maps(torch.zeros(1, 3, cams.crop, cams.crop))
    n_filters, layer_hw = probe.shape[1], tuple(probe.shape[2:])
    del probe
    _require_spatial(loaded, cams, layer_hw)
    lists = _Stimuli.of(stimuli)
    found, hits = _detect(detector, lists, cache_dir, progress=runtime.progress)
    prepared = prepare_boxes(found, groups, resize=loaded.preprocessing.resize_size,
                             crop=cams.crop)  # fmt: skip
    unmatched = detector.unmatched() if isinstance(detector, GivenBoxes) else []
    _log_counts(prepared.counts, prepared.unmapped, unmatched)
    _require_usable(prepared.counts, prepared)
    on_device_decode = uses_device_decoding(options.decode, cams.device)
    shape = (len(groups.groups), n_filters)
    null = AssignmentNull(prepared, shape, options.n_null_assign, runtime.seed)
    fold_of, fold_heads = fold_definition(loaded, stimuli, options, runtime.seed)
    folds = None
    if fold_of is not None and fold_heads is None:  # one pass, per-fold sums
        folds = SelectionFolds(fold_of, prepared, shape, options.n_null_assign, runtime.seed)
    run_pass = accumulate or _accumulate
    accumulator, n_images = run_pass(cams, prepared, lists, options, on_device_decode, null,
                                     progress=runtime.progress, folds=folds)  # fmt: skip
    _require_gradient(accumulator, cams.layer)
    scores = _scores(accumulator, null, n_images)
    assignment = assign_filters(
        scores.enrichment,
        n_images,
        threshold=options.threshold,
        min_images=options.min_images,
        p_fdr=scores.p_assign_fdr,
    )
    enrichment = scores.enrichment
    names = list(groups.groups)
    table = filter_objects_table(loaded.name, cams.layer, names, scores, assignment)
    if fold_heads is not None and fold_of is not None:
        pass_ = _FoldPass(cams, prepared, lists, options, on_device_decode, runtime)
        fold_scores = _fold_head_scores(loaded, fold_heads, fold_of, pass_, shape)
    else:
        fold_scores = _selection_fold_scores(folds, prepared, len(names))
    per_fold = _fold_tables(fold_scores, loaded.name, cams.layer, names, options)
    table = pd.concat([table, *per_fold], ignore_index=True)
    summary: dict[str, Any] = {
        **prepared.counts,
        "unmapped_classes": prepared.unmapped,
        "boxes_file_unmatched": unmatched,
        "cache_hits": hits,
        "n_filters": n_filters,
        "layer_resolution": list(layer_hw),
        "input_size": cams.crop,
        "groups": names,
        "n_images_per_group": {g: int(n) for g, n in zip(names, n_images, strict=True)},
        "n_assigned": {g: int((assignment == i).sum()) for i, g in enumerate(names)},
        "n_null_assign": options.n_null_assign,
        "n_above_threshold": _n_above_threshold(scores, options),
        **_fold_summary(fold_of, per_fold),
        "fold_heads": fold_heads is not None,
        "head_saw_stimuli": head_saw_stimuli(loaded, lists.ids),
        "seconds": 0.0,
    }
    panels = (
        gallery_images(cams, prepared, lists, accumulator, assignment, enrichment, names,
                       n_filters=options.gallery_filters, batch_size=options.batch_size)
        if gallery
        else []
    )  # fmt: skip
    provenance = _provenance(loaded, stimuli, detector, groups, options, runtime, cams,
                             on_device_decode, fold_heads)  # fmt: skip
    notes = selection_notes(loaded, options, fold_heads, summary["head_saw_stimuli"])
    fold_table = None
    if fold_of is not None:
        fold_table = pd.DataFrame({"stimulus_id": lists.ids, "fold": fold_of.astype(np.int64)})
    return DissectResult(table, prepared.frame, summary, provenance, panels, notes=notes,
                         folds=fold_table)  # fmt: skip


def fold_definition(
    loaded: LoadedModel, stimuli: StimulusSet, options: DissectOptions, seed: int
) -> tuple[np.ndarray | None, FoldHeads | None]:
    """The selection fold ``(n,)`` of every stimulus and the fold heads, if any.

    With ``options.fold_heads`` the folds are the heads' (each stimulus in the fold whose head
    held it out; :meth:`~object2brain.heads.io.FoldHeads.fold_of`), else
    :func:`~object2brain.data.splits.condition_folds` of the stimuli's conditions with ``seed``
    (the folds train-head --selection-folds draws for the same stimuli and seed). ``(None,
    None)`` with 0 folds.

    Raises:
        DataError: more folds than stimuli, fold heads whose number differs from
            ``options.selection_folds``, or a stimulus no fold head held out.
        ModelError: fold heads that do not fit the model.
    """
    from object2brain.heads.io import load_fold_heads

    k = options.selection_folds
    if options.fold_heads is not None:
        heads = load_fold_heads(loaded, Path(options.fold_heads))
        if k != heads.n_folds:
            raise DataError(
                f"--fold-heads {options.fold_heads}: {heads.n_folds} fold heads, but "
                f"--selection-folds {k}: give --selection-folds {heads.n_folds}"
            )
        return heads.fold_of(list(stimuli.ids)), heads
    if k == 0:
        return None, None
    if k > len(stimuli):
        raise DataError(f"--selection-folds {k}: more folds than the {len(stimuli)} stimuli")
    return condition_folds(stimuli.conditions, len(stimuli), k, seed=seed), None


@dataclass(frozen=True)
class _FoldPass:
    """What a Grad-CAM pass over a subset of the images needs besides its head and null."""

    cams: _CamPass
    prepared: PreparedBoxes
    stimuli: _Stimuli
    options: DissectOptions
    on_device_decode: bool
    runtime: Runtime


def _fold_head_scores(
    loaded: LoadedModel,
    heads: FoldHeads,
    fold_of: np.ndarray,
    run: _FoldPass,
    shape: tuple[int, int],
) -> list[FilterScores]:
    """Per fold ``k``: a Grad-CAM pass of fold head ``k`` (in place of the valence head) over
    the images not in fold ``k``, scored against an assignment null over those images drawn
    as a dissection of those images alone draws it (stream 0 of the seed): the fold's rows are
    those of a dissection with fold head ``k`` of the other folds' stimuli, p_assign included.
    The fold's selection then saw none of fold ``k``'s stimuli, the head included."""
    from object2brain.heads.io import swapped_head

    scores = []
    for k, head in enumerate(heads.heads):
        prepared = _without_fold(run.prepared, fold_of, k)
        null = AssignmentNull(prepared, shape, run.options.n_null_assign, run.runtime.seed)
        if not prepared.by_image:  # no image with a box outside fold k
            scores.append(_scores(GroupAccumulator(*shape, top=1), null, np.zeros(shape[0], int)))
            continue
        with swapped_head(loaded, heads.layer, head):
            accumulator, n_images = _accumulate(
                run.cams, prepared, run.stimuli, run.options, run.on_device_decode, null,
                progress=run.runtime.progress,
            )  # fmt: skip
        scores.append(_scores(accumulator, null, n_images))
    return scores


def _selection_fold_scores(
    folds: SelectionFolds | None, prepared: PreparedBoxes, n_groups: int
) -> list[FilterScores]:
    """Per fold ``k``: the scores of the images not in fold ``k`` from the one pass's sums."""
    if folds is None:
        return []
    return [folds.scores(k, folds.n_images(prepared, k, n_groups)) for k in range(folds.n_folds)]


def _fold_tables(
    fold_scores: list[FilterScores],
    model: str,
    layer: str,
    names: list[str],
    options: DissectOptions,
) -> list[pd.DataFrame]:
    """The ``filter_objects`` rows of every selection fold ``k`` (``fold = k``): scores,
    ``p_assign`` and assignment from the images not in fold ``k``."""
    tables = []
    for k, scores in enumerate(fold_scores):
        assignment = assign_filters(
            scores.enrichment,
            scores.n_images,
            threshold=options.threshold,
            min_images=options.min_images,
            p_fdr=scores.p_assign_fdr,
        )
        tables.append(filter_objects_table(model, layer, names, scores, assignment, fold=k))
    return tables


def _fold_summary(fold_of: np.ndarray | None, per_fold: list[pd.DataFrame]) -> dict[str, Any]:
    """Summary entries of the selection folds: their number, stimuli per fold and filters
    assigned per group without each fold."""
    if fold_of is None:
        return {"selection_folds": 0}
    n_folds = int(fold_of.max()) + 1
    return {
        "selection_folds": n_folds,
        "fold_sizes": [int((fold_of == k).sum()) for k in range(n_folds)],
        "n_assigned_per_fold": [
            {str(g): int(n) for g, n in t[t["assigned"]].groupby("group").size().items()}
            for t in per_fold
        ],
    }


def head_saw_stimuli(loaded: LoadedModel, ids: Sequence[str]) -> bool | None:
    """Whether the valence head was fitted on any of ``ids``: its sidecar's split file (written
    by train-head) lists them in ``train`` or ``val``. ``None``: unknown (no head file, or its
    split file is not readable here)."""
    split = (loaded.head or {}).get("split_file")
    if not split or not Path(split).is_file():
        return None
    try:
        frame = pd.read_csv(split, dtype=str, keep_default_na=False)
        fitted = set(frame.loc[frame["split"].str.lower().isin(["train", "val"]), "stimulus_id"])
    except (OSError, ValueError, KeyError):
        return None
    return bool(fitted & set(ids))


def selection_notes(
    loaded: LoadedModel,
    options: DissectOptions,
    fold_heads: FoldHeads | None = None,
    saw: bool | None = None,
) -> list[str]:
    """What the manifest says about the selection folds' independence from the valence head
    (``selection_notes``): fold heads (fold k's maps from a head that did not see fold k), a
    head fitted on other stimuli (no circularity from the head), or one head fitted on these
    stimuli (or of unknown origin), which saw every fold."""
    if options.selection_folds == 0 or options.target is not None or not loaded.has_head:
        return []
    if fold_heads is not None:
        return [
            f"{loaded.name}: fold k's Grad-CAM maps come from fold head k "
            f"({fold_heads.folder}), fitted without fold k's stimuli: the selection of fold k "
            "saw none of its stimuli, the valence head included"
        ]
    if saw is False:
        return [
            f"{loaded.name}: the valence head was fitted on other stimuli (none of these): the "
            "cross-fitted selection has no circularity from the head"
        ]
    fitted = "was fitted on these stimuli" if saw else "may have been fitted on these stimuli"
    return [
        f"{loaded.name}: the per-fold assignments (fold = k) leave fold k's images out of the "
        f"assignment, but their Grad-CAM maps come from one valence head that {fitted}, not "
        "from fold heads: it saw the held-out fold's stimuli too, so the cross-fitted "
        "selection is only as independent of fold k as the head is (train-head "
        "--selection-folds and dissect --fold-heads remove this)"
    ]


def _cam_pass(loaded: LoadedModel, options: DissectOptions, device: torch.device) -> _CamPass:
    """The Grad-CAM setting: the one layer to dissect, resolved, and the network on ``device``."""
    layer = options.layer_for(loaded.name)
    names = resolve_layers(loaded, [layer])
    if len(names) != 1:
        raise LayerError(f"--layer {layer!r}: give one layer with spatial maps")
    network = loaded.module.to(device).eval()
    return _CamPass(network, names[0], options.target, options.direction, device,
                    loaded.preprocessing)  # fmt: skip


def _detect(
    detector: Detector, stimuli: _Stimuli, cache_dir: Path | None, *, progress: bool
) -> tuple[list[ImageDetections], int]:
    """Detections of every stimulus (in order) and the number of cache hits."""
    if isinstance(detector, GivenBoxes):  # boxes need no pixels: image sizes from the headers
        return given_box_detections(detector, stimuli.ids, stimuli.paths), 0
    return detect_images(detector, stimuli.ids, stimuli.paths, cache_dir=cache_dir,
                         progress=progress)  # fmt: skip


def _require_usable(counts: dict[str, int], prepared: PreparedBoxes) -> None:
    if not prepared.by_image:
        raise DataError(
            f"no image has a usable detection of a mapped class ({counts['detections']} "
            f"detection(s) in {counts['images']} image(s): {counts['unmapped']} of unmapped "
            f"classes, {counts['outside_image'] + counts['outside_crop']} outside the image or "
            "its centre crop); check the detector and the group map"
        )


def _require_spatial(loaded: LoadedModel, cams: _CamPass, layer_hw: tuple[int, ...]) -> None:
    """Refuse a layer whose maps are 1 x 1 (a global pooling layer): a box covers all of such a
    map or none of it, so enrichment is undefined there."""
    if math.prod(layer_hw) > 1:
        return
    deepest = deepest_spatial_layer(loaded, cams.crop)
    hint = f"; the deepest layer with spatial maps is {deepest!r}" if deepest else ""
    raise LayerError(
        f"--layer {cams.layer!r}: {loaded.name}'s {cams.layer} has "
        f"{' x '.join(map(str, layer_hw))} maps (no spatial extent, e.g. global pooling), where "
        f"enrichment inside a box is undefined: dissect a layer with spatial maps{hint}"
    )


def deepest_spatial_layer(loaded: LoadedModel, crop: int) -> str | None:
    """The last canonical layer (``object2brain layers ARCH``) whose output on a ``crop x crop``
    input is ``(1, K, h, w)`` with ``h * w > 1``; ``None`` if there is none."""
    from object2brain.models.layers import list_layers

    module = loaded.module
    names = [info.name for info in list_layers(loaded)]
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name in names:
        try:
            sub = module.get_submodule(name)
        except AttributeError:
            continue

        def hook(_m: torch.nn.Module, _i: Any, output: Any, name: str = name) -> None:
            if isinstance(output, torch.Tensor):
                shapes[name] = tuple(output.shape)

        handles.append(sub.register_forward_hook(hook))
    device = next(module.parameters()).device
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, crop, crop, device=device))
    finally:
        for handle in handles:
            handle.remove()
    spatial = [n for n in names if len(shapes.get(n, ())) == 4 and math.prod(shapes[n][2:]) > 1]
    return spatial[-1] if spatial else None


def _require_gradient(accumulator: GroupAccumulator, layer: str) -> None:
    """Refuse a pass in which every filter's map was zero on every image (the gradient of the
    explained output at ``layer`` is zero: e.g. a head with zero weights)."""
    if bool((accumulator.n_enrichment > 0).any()) or not bool((accumulator.n_boxes > 0).any()):
        return
    raise ModelError(
        f"the gradient of the explained output at layer {layer!r} is zero on every image, so "
        "every filter map is zero and nothing can be assigned: the valence head (or target "
        "unit) is degenerate (constant output); retrain it or choose another target"
    )


def _scores(
    accumulator: GroupAccumulator, null: AssignmentNull, n_images: np.ndarray
) -> FilterScores:
    """Means of the pass, ``p_assign`` against the null and its FDR over the layer."""
    importance, enrichment = accumulator.means()
    p_assign = null.p_values(enrichment)
    return FilterScores(importance, enrichment, p_assign, fdr_over_layer(p_assign), n_images)


def _n_above_threshold(scores: FilterScores, options: DissectOptions) -> int:
    """Filters the enrichment rule alone would assign (before the test): for the summary."""
    alone = assign_filters(scores.enrichment, scores.n_images, threshold=options.threshold,
                           min_images=options.min_images)  # fmt: skip
    return int((alone >= 0).sum())


def _accumulate(
    cams: _CamPass,
    prepared: PreparedBoxes,
    stimuli: _Stimuli,
    options: DissectOptions,
    on_device_decode: bool,
    null: AssignmentNull,
    *,
    progress: bool,
    folds: SelectionFolds | None = None,
) -> tuple[GroupAccumulator, np.ndarray]:
    """One Grad-CAM pass over the images with a used box: the per-(group, filter) sums
    ``(G, K)`` of the real boxes and, in ``null``, of the donors' boxes (also per selection
    fold, into ``folds``); the number of images each group was detected in ``(G,)``."""
    from tqdm.auto import tqdm

    G, K = null.n_groups, null.sum.shape[1]
    accumulator = GroupAccumulator(G, K, top=options.gallery_images)
    n_images = np.zeros(G, dtype=np.int64)
    for _, gids in prepared.by_image.values():
        n_images[np.unique(gids)] += 1
    positions = sorted(prepared.by_image)
    used_ids = [stimuli.ids[p] for p in positions]
    batches = image_batches(
        [stimuli.paths[p] for p in positions],
        used_ids,
        cams.preprocessing,
        device=cams.device,
        batch_size=options.batch_size,
        num_workers=options.num_workers,
        on_device_decode=on_device_decode,
        cache=None if options.image_cache is None else ImageCache(options.image_cache,
                                                                  cams.preprocessing),
    )  # fmt: skip
    bar = tqdm(total=len(positions), disable=not progress, unit="img", desc="dissect")
    try:
        for indices, inputs in batches:
            batch_positions = torch.tensor([positions[int(i)] for i in indices])
            maps = cams.maps(inputs)
            boxes, image_index, group_index = _batch_boxes(prepared, batch_positions.tolist())
            importance = box_importance(maps, boxes, image_index, (cams.crop, cams.crop))
            whole = image_means(maps, (cams.crop, cams.crop))
            accumulator.add(importance, whole, image_index, group_index, batch_positions)
            null.add(maps, whole, batch_positions.tolist(), (cams.crop, cams.crop))
            if folds is not None:
                folds.add(importance, whole, image_index, group_index, batch_positions, maps,
                          (cams.crop, cams.crop))  # fmt: skip
            del maps, importance, whole
            bar.update(len(indices))
    finally:
        bar.close()
    return accumulator, n_images


def given_box_detections(
    boxes: GivenBoxes, ids: Sequence[str], paths: Sequence[Path]
) -> list[ImageDetections]:
    """Detections of a boxes file (:class:`~object2brain.explain.detectors.GivenBoxes`) for every
    stimulus, with image sizes from the file headers: at corpus scale this avoids decoding every
    image a second time (the pixels are decoded once, by the Grad-CAM loader)."""
    found = []
    for sid, path in zip(ids, paths, strict=True):
        width, height = displayed_size(path)
        detections = boxes.lookup(stimulus_id=sid, path=Path(path))
        found.append(ImageDetections(sid, width, height, tuple(detections)))
    return found


def _batch_boxes(
    prepared: PreparedBoxes, batch_positions: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boxes ``(N, 4)``, image index within the batch ``(N,)`` and group index ``(N,)``."""
    boxes, images, groups = [], [], []
    for i, position in enumerate(batch_positions):
        b, g = prepared.by_image[position]
        boxes.append(b)
        groups.append(g)
        images.append(np.full(len(b), i, dtype=np.int64))
    return (
        torch.from_numpy(np.concatenate(boxes)),
        torch.from_numpy(np.concatenate(images)),
        torch.from_numpy(np.concatenate(groups)),
    )


def _log_counts(counts: dict[str, int], unmapped: dict[str, int], unmatched: list[str]) -> None:
    log.info(
        "%d detection(s) in %d image(s): %d used, %d clipped to the image, %d outside the image, "
        "%d outside the centre crop, %d of unmapped classes",
        counts["detections"], counts["images"], counts["used"], counts["clipped"],
        counts["outside_image"], counts["outside_crop"], counts["unmapped"],
    )  # fmt: skip
    if counts["images_without_detections"]:
        log.warning(
            "%d of %d image(s) left out: no usable detection of a mapped class",
            counts["images_without_detections"], counts["images"],
        )  # fmt: skip
    if unmapped:
        listed = ", ".join(f"{k} ({v})" for k, v in sorted(unmapped.items()))
        log.warning("classes without a group (boxes left out): %s", listed)
    if unmatched:
        log.warning(
            "%d entr(ies) of the boxes file match no stimulus: %s",
            len(unmatched), ", ".join(unmatched[:10]),
        )  # fmt: skip


def _provenance(
    loaded: LoadedModel,
    stimuli: StimulusSet,
    detector: Detector,
    groups: GroupMap,
    options: DissectOptions,
    runtime: Runtime,
    cams: _CamPass,
    on_device_decode: bool,
    fold_heads: FoldHeads | None = None,
) -> DissectProvenance:
    files: dict[str, Path] = {}
    for k, path in enumerate(fold_heads.paths if fold_heads is not None else ()):
        files[f"fold_head:{k}"] = path
    # an image array (tens of GB) enters through the stimulus fingerprint, not a file hash
    if stimuli.source is not None and not is_array_file(stimuli.source):
        files["stimulus_table"] = stimuli.source
    for source in groups.source:
        files[f"groups:{source}"] = Path(source)
    path_of_boxes = getattr(detector, "path", None)
    if isinstance(path_of_boxes, Path):
        files["boxes_file"] = path_of_boxes
    config = {
        **loaded.describe(),
        "layer": cams.layer,
        "direction": options.direction,
        "target": options.target,
        "threshold": options.threshold,
        "min_images": options.min_images,
        "n_null_assign": options.n_null_assign,
        "selection_folds": options.selection_folds,
        "fold_heads": None if options.fold_heads is None else str(options.fold_heads),
        "batch_size": options.batch_size,
        "device": str(cams.device),
        "seed": runtime.seed,
        "decode": "torch" if on_device_decode else "pil",
        "detector": detector.config(),
        "groups": {"name": groups.name, "source": list(groups.source)},
    }
    return DissectProvenance(
        config, runtime.seed, stimuli.fingerprint(), loaded.weights_sha256, files
    )


def gallery_images(
    cams: _CamPass,
    prepared: PreparedBoxes,
    stimuli: _Stimuli,
    accumulator: GroupAccumulator,
    assignment: np.ndarray,
    enrichment: np.ndarray,
    groups: Sequence[str],
    *,
    n_filters: int,
    batch_size: int,
) -> list[GalleryImage]:
    """The gallery panels, group by group: for each group ``g`` its top ``n_filters`` filters
    (assigned to ``g`` first, then by ``enrichment[g]`` ``(G, K)``; filters of undefined
    enrichment skipped), each with the images where its importance on ``g`` was largest
    (``accumulator.top_images``); maps recomputed for those images only, ``batch_size`` at a
    time."""
    choices: list[tuple[int, int, list[int]]] = []
    for g in range(len(groups)):
        row = np.nan_to_num(enrichment[g], nan=-np.inf)
        order = sorted(range(row.shape[0]), key=lambda k: (assignment[k] != g, -row[k]))
        for k in order[:n_filters]:
            images = [int(p) for p in accumulator.top_images[g, k].tolist() if p >= 0]
            if np.isfinite(row[k]) and images:
                choices.append((g, k, images))
    wanted: dict[int, set[int]] = {}
    for _g, k, images in choices:
        for p in images:
            wanted.setdefault(p, set()).add(k)
    pictures, heat = _gallery_maps(cams, stimuli, wanted, batch_size)
    panels = []
    for g, k, images in choices:
        for p in images:
            boxes, gids = prepared.by_image[p]
            panels.append(
                GalleryImage(
                    group=groups[g],
                    filter=k,
                    stimulus_id=stimuli.ids[p],
                    image=pictures[p],
                    heat=heat[(p, k)],
                    boxes=[tuple(int(v) for v in b) for b in boxes[gids == g]],
                    enrichment=float(enrichment[g, k]),
                    assigned=bool(assignment[k] == g),
                )
            )
    return panels


def _gallery_maps(
    cams: _CamPass, stimuli: _Stimuli, wanted: dict[int, set[int]], batch_size: int
) -> tuple[dict[int, np.ndarray], dict[tuple[int, int], np.ndarray]]:
    """Pictures ``(S, S, 3)`` uint8 of the stimuli at positions ``wanted`` and the upsampled maps
    ``(S, S)`` of the filters wanted for each, keyed by ``(position, filter)``."""
    preprocessing, crop = cams.preprocessing, cams.crop
    mean = torch.tensor(preprocessing.mean)[:, None, None]
    std = torch.tensor(preprocessing.std)[:, None, None]
    needed = sorted(wanted)
    pictures: dict[int, np.ndarray] = {}
    heat: dict[tuple[int, int], np.ndarray] = {}
    for start in range(0, len(needed), batch_size):
        chunk = needed[start : start + batch_size]
        tensors = load_inputs([stimuli.paths[p] for p in chunk], preprocessing)
        maps = cams.maps(tensors)
        for i, p in enumerate(chunk):
            rgb = (tensors[i] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
            pictures[p] = (rgb * 255).astype(np.uint8)
            ks = sorted(wanted[p])
            up = upsample_maps(maps[i : i + 1, ks], (crop, crop))[0].cpu().numpy()
            for j, k in enumerate(ks):
                heat[(p, k)] = up[j]
    return pictures, heat


# ----------------------------------------------------------------------------------------------
# write


def write_dissection(
    result: DissectResult, out: Path, *, also_written: Sequence[Path] = ()
) -> list[Path]:
    """Write ``filter_objects`` and ``detections`` (CSV + Parquet) and ``manifest.json`` into
    ``out``; the manifest lists them and ``also_written`` (e.g. figures).

    Returns:
        The table files, then ``also_written``, then the manifest.
    """
    files = [*write_table(result.table, out, "filter_objects")]
    files += write_table(result.boxes, out, "detections")
    (out / FOLDS_NAME).unlink(missing_ok=True)
    if result.folds is not None:
        files.append(write_fold_definition(result.folds, out / FOLDS_NAME))
    files += also_written
    return [*files, write_dissection_manifest(result, out, files)]


#: The dissection's selection folds next to ``filter_objects.csv``: ``stimulus_id, fold``.
FOLDS_NAME = "folds.csv"


def write_fold_definition(folds: pd.DataFrame, path: Path) -> Path:
    """``folds`` (``stimulus_id, fold``) as CSV, atomically."""
    from object2brain.io import atomic_path

    with atomic_path(path) as temp:
        folds[["stimulus_id", "fold"]].to_csv(temp, index=False)
    return path


def write_dissection_manifest(result: DissectResult, out: Path, files: Sequence[Path]) -> Path:
    """``<out>/manifest.json``: settings, seeds, inputs by SHA-256, outputs, summary."""
    if result.provenance is None:
        raise ValueError("a dissection result without provenance cannot be recorded")
    record = result.provenance
    inputs = {"stimuli_fingerprint": record.stimuli_fingerprint, "weights": record.weights_sha256}
    for name, path in record.files.items():
        if path.is_file():
            inputs[name] = file_sha256(path)
    payload = build_manifest(
        "dissect",
        {**record.config, "out": str(out)},
        seeds={"seed": record.seed},
        inputs=inputs,
        outputs=output_list(files, out),
        extra={"summary": result.summary}
        | ({"selection_notes": result.notes} if result.notes else {}),
    )
    return write_json(out / "manifest.json", payload)
