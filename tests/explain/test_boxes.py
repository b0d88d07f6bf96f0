"""Box importance from integral images, box geometry, clipping and counting, assignment."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from object2brain.explain.detectors import Detection, ImageDetections
from object2brain.explain.dissect import (
    FilterScores,
    GroupAccumulator,
    InputGeometry,
    assign_filters,
    box_importance,
    brute_force_box_importance,
    filter_objects_table,
    image_means,
    prepare_boxes,
)
from object2brain.explain.filtercam import upsample_maps
from object2brain.explain.groups import load_groups
from object2brain.models.zoo import Preprocessing


@st.composite
def _case(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
    batch = draw(st.integers(1, 3))
    K = draw(st.integers(1, 5))
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    H, W = draw(st.integers(h, 40)), draw(st.integers(w, 40))
    n = draw(st.integers(1, 6))
    boxes, owners = [], []
    for _ in range(n):
        x0 = draw(st.integers(0, W - 1))
        y0 = draw(st.integers(0, H - 1))
        boxes.append([x0, y0, draw(st.integers(x0 + 1, W)), draw(st.integers(y0 + 1, H))])
        owners.append(draw(st.integers(0, batch - 1)))
    seed = draw(st.integers(0, 2**16))
    maps = torch.rand(batch, K, h, w, generator=torch.Generator().manual_seed(seed))
    return maps, torch.tensor(boxes), torch.tensor(owners), (H, W)


@settings(max_examples=60, deadline=None)
@given(_case())
def test_integral_image_equals_brute_force(
    case: tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]],
) -> None:
    maps, boxes, owners, size = case
    fast = box_importance(maps, boxes, owners, size)
    slow = brute_force_box_importance(maps, boxes, owners, size)
    assert fast.shape == (len(boxes), maps.shape[1])
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        image_means(maps, size), upsample_maps(maps, size).mean(dim=(2, 3)), rtol=1e-5, atol=1e-5
    )


def test_box_importance_realistic_size() -> None:
    maps = torch.rand(4, 64, 7, 7)
    boxes = torch.tensor(
        [[0, 0, 224, 224], [10, 20, 30, 200], [100, 100, 101, 101], [5, 7, 220, 9]]
    )
    owners = torch.tensor([0, 3, 3, 1])
    fast = box_importance(maps, boxes, owners, (224, 224))
    torch.testing.assert_close(fast, brute_force_box_importance(maps, boxes, owners, (224, 224)))
    with pytest.raises(ValueError, match="boxes must satisfy"):
        box_importance(maps, torch.tensor([[5, 5, 5, 9]]), torch.tensor([0]), (224, 224))


@pytest.mark.parametrize(("width", "height"), [(300, 200), (180, 260), (64, 64)])
def test_geometry_matches_the_model_transform(width: int, height: int) -> None:
    prep = Preprocessing(resize_size=72, crop_size=64, mean=(0.0,) * 3, std=(1.0,) * 3)
    box = (width * 0.3, height * 0.4, width * 0.6, height * 0.7)
    array = np.zeros((height, width, 3), np.uint8)
    array[round(box[1]) : round(box[3]), round(box[0]) : round(box[2])] = 255
    tensor = prep.transform()(Image.fromarray(array))[0]
    rows = torch.nonzero(tensor.amax(dim=1) > 0.5).ravel()
    cols = torch.nonzero(tensor.amax(dim=0) > 0.5).ravel()
    geometry = InputGeometry.of(width, height, 72, 64)
    x0, y0, x1, y1 = geometry.to_input(*box)
    assert abs(x0 - int(cols.min())) <= 1.5 and abs(x1 - int(cols.max()) - 1) <= 1.5
    assert abs(y0 - int(rows.min())) <= 1.5 and abs(y1 - int(rows.max()) - 1) <= 1.5


def test_boxes_clipped_dropped_unmapped_and_empty_images_counted() -> None:
    groups = load_groups("opencv")
    items = [
        ImageDetections(
            "a",
            200,
            100,
            (
                Detection(-20, -10, 120, 40, "face"),  # clipped to the image
                Detection(250, 10, 300, 50, "face"),  # entirely outside the image
                Detection(10, 10, 40, 40, "Giraffe"),  # unmapped class
                Detection(0, 0, 20, 100, "person"),  # inside the image, outside the crop
                Detection(90, 20, 110, 80, "upper_body"),  # used
            ),
        ),
        ImageDetections("b", 100, 100, ()),  # nothing: left out
    ]
    prepared = prepare_boxes(items, groups, resize=64, crop=64)
    counts = prepared.counts
    assert counts["detections"] == 5
    assert counts["clipped"] == 1
    assert counts["outside_image"] == 1
    assert counts["unmapped"] == 1 and prepared.unmapped == {"Giraffe": 1}
    assert counts["outside_crop"] == 1
    assert counts["used"] == 2
    assert counts["images_used"] == 1 and counts["images_without_detections"] == 1
    boxes, gids = prepared.by_image[0]
    assert (boxes >= 0).all() and (boxes <= 64).all()
    assert [groups.groups[g] for g in gids] == ["Faces", "Humans"]
    assert list(prepared.frame["status"]) == [
        "used", "outside_image", "unmapped", "outside_crop", "used"
    ]  # fmt: skip


def test_accumulator_and_assignment() -> None:
    # Two images, filter 0 concentrated in the top-left quarter, filter 1 uniform.
    maps = torch.zeros(2, 2, 4, 4)
    maps[:, 0, :2, :2] = 1.0
    maps[:, 1] = 1.0
    boxes = torch.tensor([[0, 0, 16, 16], [16, 16, 32, 32], [0, 0, 16, 16]])
    owners, groups = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0])
    acc = GroupAccumulator(2, 2, top=2)
    importance = box_importance(maps, boxes, owners, (32, 32))
    acc.add(importance, image_means(maps, (32, 32)), owners, groups, torch.tensor([5, 9]))
    imp, enr = acc.means()
    assert enr[0, 0] > 2.5 and enr[1, 0] < 0.5
    np.testing.assert_allclose(enr[:, 1], 1.0, rtol=1e-5)
    assert set(acc.top_images[0, 0].tolist()) == {5, 9}
    assignment = assign_filters(enr, np.array([2, 1]), threshold=1.5, min_images=1)
    assert assignment.tolist() == [0, -1]
    assert assign_filters(enr, np.array([2, 1]), min_images=5).tolist() == [-1, -1]
    # the assignment test: the best group's p_assign_fdr must be below 0.05 as well
    p_fdr = np.array([[0.01, 0.5], [0.5, 0.5]])
    assert assign_filters(enr, np.array([2, 1]), min_images=1, p_fdr=p_fdr).tolist() == [0, -1]
    p_fdr[0, 0] = 0.05
    assert assign_filters(enr, np.array([2, 1]), min_images=1, p_fdr=p_fdr).tolist() == [-1, -1]
    p = np.full_like(enr, 0.2)
    scores = FilterScores(imp, enr, p, p, np.array([2, 1]))
    table = filter_objects_table("m", "L", ["A", "B"], scores, assignment)
    assert list(table.columns) == [
        "model", "layer", "filter", "group", "importance", "enrichment", "p_assign",
        "p_assign_fdr", "n_images", "assigned", "fold",
    ]  # fmt: skip
    assert table["fold"].isna().all()  # the all-images rows
    assert table["assigned"].sum() == 1
    assert table.loc[table["assigned"], ["filter", "group"]].values.tolist() == [[0, "A"]]
