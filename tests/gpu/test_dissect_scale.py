"""Corpus-scale dissection: boxes files need no pixel decoding for detection, and image sizes
read from headers equal the decoded ones (EXIF rotation included)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from o2b_testing import shipped_photo
from object2brain.data.images import load_image
from object2brain.explain import detectors
from object2brain.explain.detectors import GivenBoxes, detect_images
from object2brain.explain.dissect import given_box_detections
from object2brain.models.inputs import displayed_size


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    base = shipped_photo("coffee").resize((90, 60))
    paths = []
    for i, orientation in enumerate([1, 6, 8, 3, None]):
        path = tmp_path / f"img{i}.jpg"
        if orientation is None:
            base.save(path)
        else:
            exif = Image.Exif()
            exif[0x0112] = orientation
            base.save(path, exif=exif.tobytes())
        paths.append(path)
    png = tmp_path / "img5.png"
    base.save(png)
    return [*paths, png]


def test_displayed_size_matches_decoding(images: list[Path]) -> None:
    for path in images:
        assert displayed_size(path) == load_image(path).size, path.name


def test_given_boxes_detections_equal_the_decoding_path(
    images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = tmp_path / "boxes.csv"
    lines = [f"{p.stem},1,2,30,40,person" for p in images[::2]]
    table.write_text("stimulus_id,x0,y0,x1,y1,label\n" + "\n".join(lines) + "\n")
    ids = [p.stem for p in images]
    reference, _ = detect_images(GivenBoxes(table), ids, images)

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded an image")

    monkeypatch.setattr("object2brain.data.images.load_image", no_decoding)
    monkeypatch.setattr(detectors, "detect_images", no_decoding)
    assert given_box_detections(GivenBoxes(table), ids, images) == reference
