"""Extraction's GPU options, checked on the CPU: channels_last and ``decode=auto`` (which falls
back to Pillow off CUDA) store the default values; bf16 autocast is close; on-device JPEG
decoding is within about one 8-bit level of Pillow, and every file it cannot take goes through
Pillow unchanged."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import object2brain as o2b
from o2b_testing import PHOTOS, shipped_photo
from object2brain.activations.store import ActivationStore
from object2brain.errors import StoreError
from object2brain.models.inputs import (
    EncodedImageDataset,
    ImageDataset,
    collate_encoded,
    decode_batch,
    gpu_decode_available,
    is_plain_jpeg,
)
from object2brain.models.zoo import LoadedModel

image_inputs = importlib.import_module("object2brain.models.inputs")
LAYERS = ["conv1", "layer2", "fc"]


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gpu_jpegs")
    for name in PHOTOS[:5]:
        image = shipped_photo(name)
        image.thumbnail((200, 200))
        image.save(folder / f"{name}.jpg", quality=90)
    return folder


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return o2b.load_model("resnet18", "none", seed=0)


def run(model: LoadedModel, stimuli: Path, out: Path, **options: object) -> dict[str, np.ndarray]:
    o2b.extract(
        model,
        stimuli,
        out=out,
        layers=LAYERS,
        device="cpu",
        batch_size=2,
        num_workers=0,
        progress=False,
        **options,  # type: ignore[arg-type]
    )
    with ActivationStore.open(out) as store:
        return {layer: store.read(layer) for layer in LAYERS}


@pytest.fixture(scope="module")
def default(model: LoadedModel, jpeg_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run(model, jpeg_dir, tmp_path_factory.mktemp("ref") / "ref.h5")


def scaled_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def test_contiguous_layout_and_amp_none_equal_default(
    model: LoadedModel, jpeg_dir: Path, default: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """The default layout is channels_last; the contiguous one gives the same values up to float
    rounding (the convolutions may sum in another order)."""
    got = run(model, jpeg_dir, tmp_path / "contiguous.h5", channels_last=False, amp_dtype=None)
    for layer in LAYERS:
        assert scaled_error(default[layer], got[layer]) <= 1e-5, layer
    # the shared model is back in its default layout afterwards
    conv = model.module.conv1.weight  # type: ignore[union-attr]
    assert isinstance(conv, torch.Tensor) and conv.is_contiguous()


def test_decode_auto_falls_back_to_pillow_off_cuda(
    model: LoadedModel, jpeg_dir: Path, default: dict[str, np.ndarray], tmp_path: Path
) -> None:
    got = run(model, jpeg_dir, tmp_path / "auto.h5", decode="auto")
    for layer in LAYERS:
        np.testing.assert_array_equal(default[layer], got[layer])


def test_bf16_autocast_is_close(
    model: LoadedModel, jpeg_dir: Path, default: dict[str, np.ndarray], tmp_path: Path
) -> None:
    got = run(model, jpeg_dir, tmp_path / "bf16.h5", amp_dtype="bfloat16")
    for layer in LAYERS:
        assert got[layer].dtype == np.float32
        assert scaled_error(default[layer], got[layer]) <= 5e-2, layer


def test_decode_torch_is_close(
    model: LoadedModel, jpeg_dir: Path, default: dict[str, np.ndarray], tmp_path: Path
) -> None:
    got = run(model, jpeg_dir, tmp_path / "torch.h5", decode="torch")
    for layer in LAYERS:
        assert scaled_error(default[layer], got[layer]) <= 2e-2, layer


def test_bad_options_are_clear_errors(model: LoadedModel, jpeg_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="amp"):
        run(model, jpeg_dir, tmp_path / "x.h5", amp_dtype="float64")
    with pytest.raises(StoreError, match="decode"):
        run(model, jpeg_dir, tmp_path / "y.h5", decode="nvjpeg")


def test_on_device_decoding_inputs_within_one_level(model: LoadedModel, jpeg_dir: Path) -> None:
    paths = sorted(jpeg_dir.glob("*.jpg"))
    ids = [p.stem for p in paths]
    prep = model.preprocessing
    reference = torch.stack([ImageDataset(paths, ids, prep)[i][1] for i in range(len(paths))])
    items = [EncodedImageDataset(paths, ids, prep)[i] for i in range(len(paths))]
    assert all(item[2] for item in items)  # all plain JPEGs
    batch = collate_encoded(items)
    got = decode_batch(batch.payloads(), batch.encoded, prep, torch.device("cpu"))
    std = torch.tensor(prep.std)[:, None, None]
    levels = ((got - reference) * std * 255).abs()
    assert float(levels.max()) <= 3.0
    assert float(levels.mean()) <= 0.5


def make_special(folder: Path) -> dict[str, Path]:
    """Files the on-device decoder must leave to Pillow, and one it takes."""
    folder.mkdir(parents=True, exist_ok=True)
    base = shipped_photo("astronaut").resize((120, 90))
    files = {
        "plain": folder / "plain.jpg",
        "grey": folder / "grey.jpg",
        "progressive": folder / "progressive.jpg",
        "rotated": folder / "rotated.jpg",
        "cmyk": folder / "cmyk.jpg",
        "png": folder / "image.png",
    }
    base.save(files["plain"], quality=90)
    base.convert("L").save(files["grey"], quality=90)
    base.save(files["progressive"], quality=90, progressive=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    base.save(files["rotated"], quality=90, exif=exif.tobytes())
    base.convert("CMYK").save(files["cmyk"], quality=90)
    base.save(files["png"])
    return files


def test_plain_jpeg_detection(tmp_path: Path) -> None:
    files = make_special(tmp_path)
    plain = {name: is_plain_jpeg(path) for name, path in files.items()}
    assert plain == {
        "plain": True,
        "grey": True,
        "progressive": False,
        "rotated": False,
        "cmyk": False,
        "png": False,
    }
    assert not is_plain_jpeg(tmp_path / "missing.jpg")


def test_fallback_images_equal_the_pillow_path(model: LoadedModel, tmp_path: Path) -> None:
    files = make_special(tmp_path)
    paths = list(files.values())
    ids = list(files)
    prep = model.preprocessing
    reference = [ImageDataset(paths, ids, prep)[i][1] for i in range(len(paths))]
    items = [EncodedImageDataset(paths, ids, prep)[i] for i in range(len(paths))]
    batch = collate_encoded(items)
    payloads, encoded, errors = batch.payloads(), batch.encoded, batch.errors
    assert errors == [""] * len(paths)
    assert 0 < sum(encoded) < len(encoded)  # a mixed batch: bytes and Pillow inputs interleaved
    assert batch.indices.tolist() == list(range(len(paths)))
    for item, payload in zip(items, payloads, strict=True):  # the flat batch gives them back
        assert torch.equal(item[1], payload)
    got = decode_batch(payloads, encoded, prep, torch.device("cpu"))
    for i, name in enumerate(ids):
        if not encoded[i]:
            torch.testing.assert_close(got[i], reference[i], atol=0, rtol=0, msg=name)
    assert gpu_decode_available(torch.device("cpu"))


def test_default_fingerprint_is_unchanged(
    model: LoadedModel, jpeg_dir: Path, tmp_path: Path
) -> None:
    """A store written with the defaults is reused by a run that spells the defaults out."""
    out = tmp_path / "acts.h5"
    run(model, jpeg_dir, out)
    stamp = out.stat().st_mtime_ns
    run(model, jpeg_dir, out, amp_dtype=None, channels_last=True, decode="pil")
    assert out.stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    ("cores", "gpus", "cpu_workers", "cuda_workers"),
    [(2, 1, 0, 1), (3, 1, 0, 1), (8, 1, 2, 6), (16, 1, 4, 14), (16, 2, 4, 6), (128, 1, 4, 32)],
)
def test_default_workers_leave_cpu_cores_to_the_forward_pass(
    monkeypatch: pytest.MonkeyPatch, cores: int, gpus: int, cpu_workers: int, cuda_workers: int
) -> None:
    """On the CPU the forward pass keeps most cores; feeding GPUs, each GPU's share of the cores
    less two (its main process and pinning thread) decodes with Pillow."""
    monkeypatch.setattr(image_inputs, "usable_cores", lambda: cores)
    monkeypatch.setattr(image_inputs.torch.cuda, "device_count", lambda: gpus)
    assert image_inputs.default_workers(1000, 32, torch.device("cpu")) == cpu_workers
    assert image_inputs.default_workers(1000, 32, torch.device("cuda")) == cuda_workers
    assert image_inputs.default_workers(32, 32, torch.device("cuda")) == 0  # one batch: no workers
    assert image_inputs.default_workers(100, 32, torch.device("cuda"), min_batches=4) == 0
