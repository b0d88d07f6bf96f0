"""Stimuli read from rows of an HDF5 image array: ids, table references, identical pixels and
activations to image files, loader workers, content hashing, and bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from object2brain.activations.store import ActivationStore
from object2brain.api.extract import extract
from object2brain.data.image_array import close_image_arrays, parse_array_ref
from object2brain.data.images import image_sha256, load_image
from object2brain.data.nsd import nsd_stimulus_id
from object2brain.data.stimuli import load_stimuli
from object2brain.errors import StimulusError
from object2brain.explain.detectors import Detection, Detector, detect_images
from object2brain.models.inputs import displayed_size, image_loader, model_inputs
from object2brain.models.zoo import load_model

N, H, W = 7, 20, 28


def write_array(path: Path, pixels: np.ndarray, dataset: str = "imgBrick") -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset(dataset, data=pixels)
    return path


@pytest.fixture
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(N, H, W, 3), dtype=np.uint8)


@pytest.fixture
def array_file(tmp_path: Path, pixels: np.ndarray) -> Path:
    return write_array(tmp_path / "nsd_stimuli.hdf5", pixels)


def test_array_source_ids_rows_and_scheme(array_file: Path, pixels: np.ndarray) -> None:
    every = load_stimuli(array_file)
    assert (
        every.ids
        == [nsd_stimulus_id(r + 1) for r in range(N)]
        == [f"nsd-{r + 1:05d}" for r in range(N)]
    )
    assert every.source == array_file
    assert [str(p) for p in every.paths] == [f"{array_file.resolve()}#{r}" for r in range(N)]
    for row in (0, N - 1):
        np.testing.assert_array_equal(np.asarray(load_image(every.paths[row])), pixels[row])
    assert displayed_size(every.paths[0]) == (W, H)

    some = load_stimuli(array_file, rows=[5, 1], id_scheme="img{row:03d}-{index}")
    assert some.ids == ["img005-6", "img001-2"]
    np.testing.assert_array_equal(np.asarray(load_image(some.paths[0])), pixels[5])
    named = load_stimuli(array_file, rows=[2], id_scheme=lambda r: f"coco{r}")
    assert named.ids == ["coco2"]


def test_table_references_rows_relative_to_the_table(
    array_file: Path, pixels: np.ndarray, tmp_path: Path
) -> None:
    write_array(tmp_path / "other.h5", pixels[::-1].copy(), dataset="stim/images")
    table = tmp_path / "tables" / "stimuli.csv"
    table.parent.mkdir()
    pd.DataFrame(
        {
            "stimulus_id": ["nsd-00003", "nsd-00001", "flip"],
            "path": ["../nsd_stimuli.hdf5#2", str(array_file) + "#0", "../other.h5#stim/images#0"],
            "condition": ["a", "b", "a"],
            "valence": [0.5, -1.0, 2.0],
        }
    ).to_csv(table, index=False)
    stimuli = load_stimuli(table)
    assert stimuli.conditions == ["a", "b", "a"]
    ref = parse_array_ref(stimuli.paths[2])
    assert ref is not None and ref.dataset == "stim/images" and ref.row == 0
    assert ref.file == (tmp_path / "other.h5").resolve()
    for path, expected in zip(stimuli.paths, (pixels[2], pixels[0], pixels[-1]), strict=True):
        np.testing.assert_array_equal(np.asarray(load_image(path)), expected)


def test_png_and_array_give_bit_identical_activations(
    array_file: Path, pixels: np.ndarray, tmp_path: Path
) -> None:
    folder = tmp_path / "png"
    folder.mkdir()
    for r in range(3):
        Image.fromarray(pixels[r]).save(folder / f"{nsd_stimulus_id(r + 1)}.png")
    files = load_stimuli(folder)
    array = load_stimuli(array_file, rows=[0, 1, 2])
    assert files.ids == array.ids
    stores = []
    for name, stimuli in (("files", files), ("array", array)):
        out = extract(
            "resnet18",
            stimuli,
            out=tmp_path / f"{name}.h5",
            layers=["layer1", "fc"],
            weights="none",
            device="cpu",
            batch_size=2,
            num_workers=0,
            progress=False,
        )
        stores.append(out)
    with ActivationStore.open(stores[0]) as a, ActivationStore.open(stores[1]) as b:
        for layer in ("layer1", "fc"):
            first, second = a.read(layer, files.ids), b.read(layer, files.ids)
            assert first.tobytes() == second.tobytes(), layer


def test_loader_workers_open_the_file_themselves(array_file: Path) -> None:
    stimuli = load_stimuli(array_file)
    stimuli.fingerprint()  # the parent process holds the file open before the workers fork
    model = load_model("alexnet", weights="none")

    def inputs(workers: int) -> torch.Tensor:
        loader = image_loader(
            stimuli.paths,
            stimuli.ids,
            model.preprocessing,
            device=torch.device("cpu"),
            batch_size=2,
            num_workers=workers,
            on_device_decode=True,  # array rows take the Pillow path whatever is asked
        )
        got = [
            model_inputs(b, model.preprocessing, torch.device("cpu"), stimuli.ids) for b in loader
        ]
        assert torch.cat([i for i, _ in got]).tolist() == list(range(N))
        return torch.cat([x for _, x in got])

    assert torch.equal(inputs(2), inputs(0))
    # after a close the main process reopens the file on demand
    close_image_arrays()
    assert torch.equal(inputs(0), inputs(2))


def test_fingerprint_follows_row_pixels(
    array_file: Path, pixels: np.ndarray, tmp_path: Path
) -> None:
    before = load_stimuli(array_file).fingerprint()
    copy = tmp_path / "copy" / "nsd_stimuli.hdf5"
    copy.parent.mkdir()
    shutil.copy(array_file, copy)
    assert load_stimuli(copy).fingerprint() == before  # moved: same pixels, same ids
    rewritten = write_array(tmp_path / "rewritten.hdf5", pixels)
    assert load_stimuli(rewritten).fingerprint() == before  # other file bytes, same pixels
    edited = pixels.copy()
    edited[4, 3, 2, 1] ^= 1
    changed = write_array(tmp_path / "edited.hdf5", edited)
    assert load_stimuli(changed).fingerprint() != before
    assert (
        load_stimuli(changed, rows=[0, 1]).fingerprint()
        == load_stimuli(array_file, rows=[0, 1]).fingerprint()
    )
    # rows of another shape with the same bytes are other images
    reshaped = write_array(tmp_path / "reshaped.hdf5", pixels.reshape(N, W, H, 3))
    assert image_sha256(f"{reshaped}#0") != image_sha256(f"{array_file}#0")


class CountingDetector(Detector):
    kind = "counting"

    def __init__(self) -> None:
        self.calls = 0

    def detect(self, image: Image.Image, *, stimulus_id: str, path: Path) -> list[Detection]:
        self.calls += 1
        return [Detection(0.0, 0.0, float(image.width), float(image.height), "thing")]


def test_detection_cache_is_keyed_on_row_pixels(array_file: Path, tmp_path: Path) -> None:
    stimuli = load_stimuli(array_file, rows=[0, 1, 2])
    detector = CountingDetector()
    found, hits = detect_images(detector, stimuli.ids, stimuli.paths, cache_dir=tmp_path / "c")
    assert hits == 0 and detector.calls == 3
    assert (found[0].width, found[0].height) == (W, H)
    again, hits = detect_images(detector, stimuli.ids, stimuli.paths, cache_dir=tmp_path / "c")
    assert hits == 3 and detector.calls == 3 and again == found


def test_bad_arrays_name_the_file_and_dataset(
    array_file: Path, pixels: np.ndarray, tmp_path: Path
) -> None:
    floats = write_array(tmp_path / "floats.hdf5", pixels.astype(np.float32))
    with pytest.raises(StimulusError, match=r"floats\.hdf5 dataset 'imgBrick': .*found float32"):
        load_stimuli(floats)
    grey = write_array(tmp_path / "grey.hdf5", pixels[..., 0].copy())
    with pytest.raises(StimulusError, match=r"grey\.hdf5 dataset 'imgBrick': .*\(7, 20, 28\)"):
        load_stimuli(grey)
    with pytest.raises(StimulusError, match=r"nsd_stimuli\.hdf5 dataset 'images': no such dataset"):
        load_stimuli(array_file, dataset="images")
    with pytest.raises(StimulusError, match=r"nsd_stimuli\.hdf5 dataset 'imgBrick': row\(s\) 7"):
        load_stimuli(array_file, rows=[1, 7])
    with pytest.raises(StimulusError, match=r"id_scheme apply to an image array source"):
        load_stimuli(tmp_path, rows=[1])

    table = tmp_path / "stimuli.csv"
    pd.DataFrame(
        {
            "stimulus_id": ["ok", "past", "gone", "nodata"],
            "path": [
                "nsd_stimuli.hdf5#6",
                "nsd_stimuli.hdf5#7",
                "missing.hdf5#0",
                "nsd_stimuli.hdf5#brick#0",
            ],
        }
    ).to_csv(table, index=False)
    with pytest.raises(StimulusError) as info:
        load_stimuli(table)
    message = str(info.value)
    assert message.startswith(f"{table}: ")
    assert "missing.hdf5: image array file not found (dataset 'imgBrick')" in message
    assert "1 row(s) past the end of" in message and "past (row 7)" in message
    assert "nsd_stimuli.hdf5 dataset 'brick': no such dataset (datasets in the file: imgBrick)" in (
        message
    )
    assert "ok" not in message.replace("not found", "")

    unchecked = load_stimuli(table, check="table")  # the table alone; reading the row fails
    with pytest.raises(StimulusError, match=r"nsd_stimuli\.hdf5 dataset 'imgBrick': row 7 is past"):
        load_image(unchecked.paths[1])
