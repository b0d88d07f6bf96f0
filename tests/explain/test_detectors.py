"""Detectors (given boxes, OpenCV, offline torchvision), the detection cache and group maps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torchvision

from object2brain.errors import DataError, WeightsUnavailableError
from object2brain.explain.detectors import (
    Detection,
    GivenBoxes,
    OpenCVDetector,
    detect_images,
    make_detector,
)
from object2brain.explain.groups import load_groups, normalise_class

from .helpers import FACE, FACE_POSITIONS, make_composites


def test_csv_boxes(tmp_path: Path) -> None:
    path = tmp_path / "boxes.csv"
    path.write_text(
        "stimulus_id,x0,y0,x1,y1,label,score\na,1,2,30,40,Human face,0.9\na,0,0,5,5,Dog,\n"
    )
    boxes = make_detector(f"boxes:{path}")
    assert isinstance(boxes, GivenBoxes)
    found = boxes.detect(None, stimulus_id="a", path=Path("x.jpg"))  # type: ignore[arg-type]
    assert found == [Detection(1, 2, 30, 40, "Human face", 0.9), Detection(0, 0, 5, 5, "Dog", 1.0)]
    assert boxes.unmatched() == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stimulus_id,x0,y0,x1,label\na,1,2,3,face\n", r"missing column\(s\) y1"),
        ("stimulus_id,x0,y0,x1,y1,label\na,1,2,30,40,face\nb,5,x,9,9,face\n", r"row 2 \(line 3\)"),
        ("stimulus_id,x0,y0,x1,y1,label\na,10,2,3,40,face\n", r"row 1 \(line 2\): empty box"),
        ("stimulus_id,x0,y0,x1,y1,label\n,1,2,3,4,face\n", r"row 1 .*empty stimulus_id"),
    ],
)
def test_bad_boxes_file_names_file_and_row(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as info:
        make_detector(f"boxes:{path}")
    assert "bad.csv" in str(info.value)


def test_coco_boxes(tmp_path: Path) -> None:
    payload = {
        "images": [{"id": 7, "file_name": "imgs/cat01.jpg"}, {"id": 8, "file_name": "z.jpg"}],
        "categories": [{"id": 1, "name": "Cat"}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 20, 30, 40]}],
    }
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(payload))
    boxes = make_detector(f"boxes:{path}")
    found = boxes.detect(None, stimulus_id="s1", path=Path("/data/cat01.jpg"))  # type: ignore[arg-type]
    assert found == [Detection(10, 20, 40, 60, "Cat", 1.0)]
    assert boxes.unmatched() == ["z.jpg (id 8)"]  # type: ignore[attr-defined]
    payload["annotations"][0]["category_id"] = 3  # type: ignore[index]
    path.write_text(json.dumps(payload))
    with pytest.raises(DataError, match=r"coco.json.*annotation 0.*unknown category_id 3"):
        make_detector(f"boxes:{path}")


def test_coco_file_name_beats_image_id_and_ambiguity_is_an_error(tmp_path: Path) -> None:
    """Stimulus ``1`` (file ``1.jpg``) must get image ``1.jpg`` even though image id 1 exists."""
    payload = {
        "images": [
            {"id": 1, "file_name": "2.jpg"},
            {"id": 2, "file_name": "1.jpg"},
            {"id": 3, "file_name": "a/dup.jpg"},
            {"id": 4, "file_name": "b/dup.jpg"},
            {"id": 5, "file_name": "only_by_id.jpg"},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [0, 0, 5, 5]},
            {"id": 3, "image_id": 5, "category_id": 2, "bbox": [1, 1, 5, 5]},
        ],
    }
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(payload))
    boxes = make_detector(f"boxes:{path}")

    def labels(sid: str, file: str) -> list[str]:
        found = boxes.detect(None, stimulus_id=sid, path=Path(file))  # type: ignore[arg-type]
        return [d.label for d in found]

    assert labels("1", "/data/1.jpg") == ["dog"]
    assert labels("2", "/data/2.jpg") == ["cat"]
    assert labels("5", "/data/renamed.png") == ["dog"]  # by image id, the last resort
    with pytest.raises(DataError, match=r"coco.json: stimulus 'x' matches a/dup.jpg \(id 3\), "):
        labels("x", "/data/dup.jpg")
    assert boxes.unmatched() == ["a/dup.jpg (id 3)", "b/dup.jpg (id 4)"]  # type: ignore[attr-defined]


def test_box_table_matches_stimulus_ids_only(tmp_path: Path) -> None:
    """A stimulus without rows gets no boxes, even when its file is named like another id."""
    path = tmp_path / "boxes.csv"
    path.write_text("stimulus_id,x0,y0,x1,y1,label\nb,1,2,30,40,cat\n")
    boxes = make_detector(f"boxes:{path}")
    assert boxes.detect(None, stimulus_id="a", path=Path("b.png")) == []  # type: ignore[arg-type]
    assert boxes.unmatched() == ["b"]  # type: ignore[attr-defined]


def test_unknown_detector_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown detector 'yolo'"):
        make_detector("yolo")
    with pytest.raises(DataError, match="not found"):
        make_detector(f"boxes:{tmp_path / 'none.csv'}")


@pytest.mark.parametrize("kind", ["fasterrcnn", "retinanet", "fcos", "ssdlite"])
def test_torchvision_detectors_offline_message(kind: str) -> None:
    detector = make_detector(kind)
    with pytest.raises(WeightsUnavailableError, match=r"download.*--detector opencv"):
        detector.ensure_ready()
    # cached detections are keyed by what makes them: DEFAULT weights follow the release
    assert detector.config()["torchvision"] == torchvision.__version__


def test_opencv_finds_pasted_faces_and_cache(tmp_path: Path) -> None:
    paths = make_composites(tmp_path / "imgs", n=3)
    detector = OpenCVDetector(parts=("face",))
    ids = [p.stem for p in paths]
    found, hits = detect_images(detector, ids, paths, cache_dir=tmp_path / "cache")
    assert hits == 0
    for item, (x, y) in zip(found, FACE_POSITIONS[:3], strict=True):
        faces = [d for d in item.detections if d.label == "face"]
        centre = (x + FACE / 2, y + FACE / 2)
        assert any(d.x0 < centre[0] < d.x1 and d.y0 < centre[1] < d.y1 for d in faces)
    again, hits = detect_images(detector, ids, paths, cache_dir=tmp_path / "cache")
    assert hits == 3 and again == found
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 3


def test_shipped_group_maps() -> None:
    coco = load_groups("coco")
    assert len(coco.classes) == 80 and coco.group_of("person") == "Humans"
    assert load_groups("opencv").group_of("Face_Profile") == "Faces"
    openimages = load_groups("openimages")
    assert openimages.group_of("human face") == "Faces"
    assert openimages.group_of("Human hand") == "BodyParts"
    assert openimages.unmapped(["Car", "Flux capacitor"]) == ["Flux capacitor"]
    merged = load_groups("default")
    assert merged.group_of("teddy bear") == "Animals" and merged.group_of("eye") == "Faces"
    assert normalise_class(" Upper_body ") == "upper body"


def test_user_group_map_errors(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("groups:\n  A: [cat]\n  B: [Cat, dog]\n")
    with pytest.raises(DataError, match=r"g.yaml.*'Cat' is in both 'A' and 'B'"):
        load_groups(path)
    path.write_text("classes: [a]\n")
    with pytest.raises(DataError, match="groups:"):
        load_groups(path)
    with pytest.raises(DataError, match="not found"):
        load_groups(tmp_path / "missing.yaml")
