"""The whole dissection: planted face filter -> Faces, outputs, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from object2brain.api.dissect import dissect
from object2brain.errors import DataError, LayerError, ModelError
from object2brain.explain.detectors import default_detection_cache
from object2brain.explain.dissect import FILTER_OBJECTS_COLUMNS

from .helpers import (
    FACE,
    FACE_CHANNEL,
    FACE_POSITIONS,
    make_composites,
    planted_model,
    stimulus_csv,
)


@pytest.fixture(scope="module")
def composites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("composites")
    paths = make_composites(folder, n=6)
    (plain,) = make_composites(folder / "plain", n=1, with_face=False)
    paths.append(plain.rename(plain.with_name("plain00.png")))
    return stimulus_csv(paths, folder)


def test_planted_face_filter_is_assigned_to_faces(composites: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = dissect(planted_model(), composites, layer="features", out=out, device="cpu",
                     gallery_filters=1, gallery_images=3, progress=False)  # fmt: skip
    assert tuple(result.table.columns) == FILTER_OBJECTS_COLUMNS
    table = result.table[result.table["fold"].isna()]  # all images; then 2 selection folds
    assert sorted(result.table["fold"].dropna().unique()) == [0, 1]
    assert len(result.table) == 3 * len(table)
    assigned = table[table["assigned"]]
    assert assigned[["filter", "group"]].values.tolist() == [[FACE_CHANNEL, "Faces"]]
    faces = table[table["group"] == "Faces"].set_index("filter")
    assert faces.loc[FACE_CHANNEL, "enrichment"] > 3 * faces["enrichment"].drop(FACE_CHANNEL).max()
    assert faces.loc[FACE_CHANNEL, "n_images"] >= 6
    # The plain photo has no detection: left out and counted.
    assert result.summary["images_without_detections"] == 1
    assert result.summary["images_used"] == 6
    # Outputs: tables, figures, manifest, detection cache (JSON).
    for name in ("filter_objects.csv", "filter_objects.parquet", "detections.csv", "manifest.json"):
        assert (out / name).is_file()
    read = pd.read_parquet(out / "filter_objects.parquet")
    assert tuple(read.columns) == FILTER_OBJECTS_COLUMNS and len(read) == len(result.table)
    for stem in ("filter_group_heatmap", "gallery_Faces"):
        assert (out / "figures" / f"{stem}.png").is_file()
        assert (out / "figures" / f"{stem}.svg").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "dissect"
    assert manifest["summary"]["images_without_detections"] == 1
    # in the user's shared cache (XDG_CACHE_HOME: a temporary folder in the tests)
    assert len(list(default_detection_cache().rglob("*.json"))) == 7
    # A second run takes every detection from the cache.
    again = dissect(planted_model(), composites, layer="features", out=out, device="cpu",
                    figures=False, progress=False)  # fmt: skip
    assert again.summary["cache_hits"] == 7
    pd.testing.assert_frame_equal(again.table, result.table)


def test_given_boxes_clipped_and_counted(composites: Path, tmp_path: Path) -> None:
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(
        "stimulus_id,x0,y0,x1,y1,label\n"
        "comp00,50,30,146,126,Human face\n"
        "comp01,170,120,266,216,Human face\n"
        "comp01,-40,-40,400,300,Building\n"  # clipped to the image
        "comp02,400,10,500,50,Car\n"  # entirely outside the image
        "comp03,10,10,30,30,Flux capacitor\n"  # unmapped
        "nosuch,1,1,2,2,Car\n"  # unknown stimulus
    )
    result = dissect(planted_model(), composites, layer="features", detector=f"boxes:{boxes}",
                     min_images=1, device="cpu", progress=False)  # fmt: skip
    s = result.summary
    assert s["clipped"] == 1 and s["outside_image"] == 1 and s["unmapped"] == 1
    assert s["unmapped_classes"] == {"Flux capacitor": 1}
    assert s["boxes_file_unmatched"] == ["nosuch"]
    assert s["images_used"] == 2 and s["images_without_detections"] == 5
    # the enrichment rule still singles out the planted face channel; with boxes on only two
    # images the assignment test (boxes shuffled across images) cannot reach p < 0.05, so
    # nothing is assigned: two images are no evidence that a filter follows faces
    table = result.table
    best = table.loc[table.groupby("filter")["enrichment"].idxmax()]
    above = best[best["enrichment"] >= 1.5]
    assert above[["filter", "group"]].values.tolist() == [[FACE_CHANNEL, "Faces"]]
    assert not table["assigned"].any()
    assert (table["p_assign"].dropna() >= 1 / 3).all()


def test_no_usable_detection_is_a_clear_error(composites: Path, tmp_path: Path) -> None:
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("stimulus_id,x0,y0,x1,y1,label\ncomp00,1,1,20,20,Flux capacitor\n")
    with pytest.raises(DataError, match="no image has a usable detection"):
        dissect(planted_model(), composites, layer="features", detector=f"boxes:{boxes}",
                device="cpu", progress=False)  # fmt: skip


def test_model_without_head_needs_target(composites: Path, tmp_path: Path) -> None:
    model = planted_model(outputs=3)
    boxes = tmp_path / "boxes.csv"
    # The faces' boxes as "person": one image would leave the assignment null no other image's
    # boxes to draw, so every composite gets its box.
    rows = [f"comp{i:02d},{x},{y},{x + FACE},{y + FACE},person" for i, (x, y) in
            enumerate(FACE_POSITIONS)]  # fmt: skip
    boxes.write_text("stimulus_id,x0,y0,x1,y1,label\n" + "\n".join(rows) + "\n")
    common = {"detector": f"boxes:{boxes}", "device": "cpu", "progress": False}
    with pytest.raises(ModelError, match="--target INDEX"):
        dissect(model, composites, layer="features", **common)
    result = dissect(model, composites, layer="features", target=0, min_images=1, **common)
    assigned = result.table[result.table["assigned"]]
    assert assigned[["filter", "group"]].values.tolist() == [[FACE_CHANNEL, "Humans"]]
    with pytest.raises(ModelError, match=r"--target 3: the model has outputs 0..2"):
        dissect(model, composites, layer="features", target=3, **common)
    with pytest.raises(LayerError, match="not spatial maps"):
        dissect(model, composites, layer="fc", target=0, **common)
    with pytest.raises(LayerError, match="close matches: features"):
        dissect(model, composites, layer="featurs", target=0, **common)


def test_stimulus_lists_are_built_once_not_per_image(
    composites: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``StimulusSet.paths``/``ids`` build a list on every access: reading them per image made a
    25,000-image dissection quadratic (hours). Their number of reads must not grow with images."""
    from object2brain.data.stimuli import StimulusSet

    reads = {"paths": 0, "ids": 0}
    for name in reads:
        original = getattr(StimulusSet, name)

        def counted(self: StimulusSet, original: property = original, name: str = name) -> object:
            reads[name] += 1
            return original.fget(self)  # type: ignore[misc]

        monkeypatch.setattr(StimulusSet, name, property(counted))
    table = pd.read_csv(composites)
    counts = []
    for n in (3, 6):
        subset = tmp_path / f"stimuli{n}.csv"
        table.iloc[:n].to_csv(subset, index=False)
        reads.update(paths=0, ids=0)
        dissect(planted_model(), subset, layer="features", out=tmp_path / f"out{n}", device="cpu",
                gallery_filters=1, gallery_images=3, batch_size=2, progress=False)  # fmt: skip
        counts.append(dict(reads))
    assert counts[0] == counts[1], counts


def test_on_device_decoding_gives_the_same_dissection(
    composites: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """decode="torch" (nvJPEG on a GPU; torchvision's CPU decoder here) takes the plain JPEGs:
    the same filter is assigned and the statistics agree within the decoders' one-level
    difference; the mode is recorded in the manifest; a PNG still goes through Pillow."""
    import sys

    from PIL import Image

    table = pd.read_csv(composites)
    folder = tmp_path / "jpegs"
    folder.mkdir()
    paths = []
    for i, source in enumerate(table["path"]):
        target = folder / (Path(source).stem + (".png" if i == 0 else ".jpg"))
        Image.open(source).convert("RGB").save(target, quality=95)
        paths.append(str(target))
    jpegs = tmp_path / "stimuli.csv"
    table.assign(path=paths).to_csv(jpegs, index=False)
    extract_module = sys.modules["object2brain.models.inputs"]
    decoded: list[int] = []
    original = extract_module._decode_jpeg
    monkeypatch.setattr(
        extract_module,
        "_decode_jpeg",
        lambda data, device: (decoded.append(len(data)), original(data, device))[1],
    )
    runs = {}
    for decode in ("pil", "torch"):
        runs[decode] = dissect(planted_model(), jpegs, layer="features", out=tmp_path / decode,
                               device="cpu", figures=False, decode=decode, batch_size=4,
                               progress=False)  # fmt: skip
    used = runs["pil"].summary["images_used"]
    assert sum(decoded) == used - 1  # every JPEG used, not the PNG
    for result in runs.values():
        assigned = result.table[result.table["assigned"]]
        assert assigned[["filter", "group"]].values.tolist() == [[FACE_CHANNEL, "Faces"]]
    a, b = runs["pil"].table, runs["torch"].table
    faces = (a["group"] == "Faces").to_numpy()
    for column in ("importance", "enrichment"):
        scale = float(np.nanmax(np.abs(a.loc[faces, column])))
        assert float(np.nanmax(np.abs(a.loc[faces, column] - b.loc[faces, column]))) < 1e-2 * scale
    manifest = json.loads((tmp_path / "torch" / "manifest.json").read_text())
    assert manifest["config"]["decode"] == "torch"
    with pytest.raises(DataError, match="--decode"):
        dissect(planted_model(), jpegs, layer="features", device="cpu", decode="nvjpeg",
                progress=False)  # fmt: skip


def test_layer_without_spatial_extent_is_refused(composites: Path) -> None:
    """resnet18's avgpool has 1 x 1 maps: refused, naming it and the deepest spatial layer."""
    from object2brain.models.zoo import load_model

    model = load_model("resnet18", "none", seed=0)
    with pytest.raises(LayerError, match=r"'avgpool'.*1 x 1 maps.*deepest.*'layer4'"):
        dissect(model, composites, layer="avgpool", target=0, device="cpu", progress=False)
