"""The decoded-image cache and the pipelined image path, on the CPU.

- the pipelined ``decode=torch`` path (reading threads, one batched decode) gives exactly the
  inputs of the loader path, for plain JPEGs and for every file it leaves to Pillow;
- a second extraction with another layer set decodes no image (decoders patched and counted),
  and its activations equal those of a run without the cache bit for bit;
- a changed image file or a changed preprocessing misses the cache;
- a truncated data file or a damaged index is detected and rebuilt; a record failing its
  checksum is decoded afresh.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import object2brain as o2b
from o2b_testing import PHOTOS, shipped_photo
from object2brain.activations.store import ActivationStore
from object2brain.models import timing
from object2brain.models.image_cache import ImageCache
from object2brain.models.inputs import (
    DECODER_PIL,
    image_batches,
    image_loader,
    model_inputs,
    pipelined_batches,
)
from object2brain.models.zoo import LoadedModel, Preprocessing

inputs_module = importlib.import_module("object2brain.models.inputs")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return o2b.load_model("resnet18", "none", seed=0)


def make_images(folder: Path) -> list[Path]:
    """Plain JPEGs of several sizes and files the device decoder leaves to Pillow."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, name in enumerate(PHOTOS[:5]):
        image = shipped_photo(name)
        image.thumbnail((150 + 10 * k, 150 + 10 * k))
        paths.append(folder / f"{name}.jpg")
        image.save(paths[-1], quality=90)
    base = shipped_photo("astronaut").resize((120, 90))
    paths.append(folder / "progressive.jpg")
    base.save(paths[-1], quality=90, progressive=True)
    paths.append(folder / "cmyk.jpg")
    base.convert("CMYK").save(paths[-1], quality=90)
    paths.append(folder / "image.png")
    base.save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_images(tmp_path_factory.mktemp("cache_images"))


def all_inputs(batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    collected = {}
    for indices, inputs in batches:
        for i, row in zip(indices.tolist(), inputs, strict=True):
            collected[i] = row.clone()
    return torch.stack([collected[i] for i in sorted(collected)])


def loader_inputs(paths: list[Path], prep: Preprocessing, *, device_decode: bool) -> torch.Tensor:
    ids = [p.stem for p in paths]
    loader = image_loader(paths, ids, prep, device=CPU, batch_size=3, num_workers=0,
                          on_device_decode=device_decode)  # fmt: skip
    return all_inputs(model_inputs(batch, prep, CPU, ids) for batch in loader)


class Counter:
    """Patches the decoders of the image path and counts their calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pillow = 0
        self.device = 0
        load_image, decode = inputs_module.load_image, inputs_module._decode_jpeg

        def counted_load(*args: object, **kwargs: object) -> Image.Image:
            self.pillow += 1
            return load_image(*args, **kwargs)  # type: ignore[arg-type]

        def counted_decode(*args: object, **kwargs: object) -> list[torch.Tensor]:
            self.device += len(args[0])  # type: ignore[arg-type]
            return decode(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(inputs_module, "load_image", counted_load)
        monkeypatch.setattr(inputs_module, "_decode_jpeg", counted_decode)


@pytest.mark.parametrize("threads", [0, 3])
def test_pipelined_path_equals_the_loader_path(images: list[Path], threads: int) -> None:
    prep = Preprocessing()
    ids = [p.stem for p in images]
    got = all_inputs(pipelined_batches(images, ids, prep, device=CPU, batch_size=3,
                                       threads=threads))  # fmt: skip
    reference = loader_inputs(images, prep, device_decode=True)
    assert torch.equal(got, reference)
    pillow = loader_inputs(images, prep, device_decode=False)
    assert torch.equal(got[5:], pillow[5:])  # progressive, CMYK, PNG: Pillow's exact inputs
    assert not torch.equal(got[:5], pillow[:5])  # plain JPEGs: decoded by torchvision


@pytest.mark.parametrize("decode", ["pil", "torch"])
def test_cached_path_gives_identical_inputs_and_decodes_nothing(
    images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, decode: str
) -> None:
    prep = Preprocessing()
    ids = [p.stem for p in images]
    device_decode = decode == "torch"

    def run(cache: ImageCache | None) -> torch.Tensor:
        return all_inputs(image_batches(images, ids, prep, device=CPU, batch_size=3,
                                        num_workers=0, on_device_decode=device_decode,
                                        cache=cache))  # fmt: skip

    reference = run(None)
    cache = ImageCache(tmp_path / "cache", prep)
    first = run(cache)
    assert len(ImageCache(tmp_path / "cache", prep)) == len(images)
    counter = Counter(monkeypatch)
    second = run(ImageCache(tmp_path / "cache", prep))
    assert (counter.pillow, counter.device) == (0, 0)
    assert torch.equal(first, reference) and torch.equal(second, reference)


def extract(model: LoadedModel, images: list[Path], out: Path, layers: list[str],
            **options: object) -> dict[str, np.ndarray]:  # fmt: skip
    o2b.extract(model, images[0].parent, out=out, layers=layers, device="cpu", batch_size=3,
                num_workers=0, progress=False, **options)  # type: ignore[arg-type]  # fmt: skip
    with ActivationStore.open(out) as store:
        return {layer: store.read(layer) for layer in layers}


@pytest.mark.parametrize("decode", ["pil", "torch"])
def test_second_extraction_with_other_layers_reads_no_image(
    model: LoadedModel,
    images: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    decode: str,
) -> None:
    cache = tmp_path / "cache"
    extract(model, images, tmp_path / "a.h5", ["conv1"], image_cache=cache, decode=decode)
    counter = Counter(monkeypatch)
    got = extract(model, images, tmp_path / "b.h5", ["layer1", "layer4"], image_cache=cache,
                  decode=decode)  # fmt: skip
    assert (counter.pillow, counter.device) == (0, 0)
    monkeypatch.undo()
    plain = extract(model, images, tmp_path / "c.h5", ["layer1", "layer4"], decode=decode)
    for layer in plain:
        assert np.array_equal(got[layer], plain[layer]), layer  # bit for bit


def test_changed_image_or_preprocessing_misses(images: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    paths = make_images(folder)[:3]
    prep = Preprocessing()
    cache = ImageCache(tmp_path / "cache", prep)
    keys = [ImageCache.key(p, DECODER_PIL) for p in paths]
    cache.add(keys, np.zeros((3, 3, 224, 224), dtype=np.uint8))
    assert all(e is not None for e in cache.lookup(keys))
    image = Image.open(paths[1]).convert("RGB")
    image.save(paths[1], quality=60)  # the same name, other bytes
    new_keys = [ImageCache.key(p, DECODER_PIL) for p in paths]
    hits = ImageCache(tmp_path / "cache", prep).lookup(new_keys)
    assert [h is not None for h in hits] == [True, False, True]
    # another decoder: other pixels, another key
    assert ImageCache(tmp_path / "cache", prep).lookup([ImageCache.key(paths[0], "torch:cpu")]) == [
        None
    ]
    for other in (Preprocessing(resize_size=232), Preprocessing(interpolation="bicubic")):
        assert ImageCache(tmp_path / "cache", other).lookup(keys) == [None, None, None]
    # a moved image keeps its key (content, not path)
    moved = tmp_path / "moved.jpg"
    moved.write_bytes(paths[0].read_bytes())
    assert ImageCache.key(moved, DECODER_PIL) == keys[0]


def filled_cache(images: list[Path], folder: Path) -> tuple[ImageCache, torch.Tensor]:
    prep = Preprocessing()
    ids = [p.stem for p in images]
    cache = ImageCache(folder, prep)
    got = all_inputs(image_batches(images, ids, prep, device=CPU, batch_size=3, num_workers=0,
                                   on_device_decode=False, cache=cache))  # fmt: skip
    assert len(cache) == len(images)
    return cache, got


def test_truncated_cache_is_detected_and_rebuilt(
    images: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache, reference = filled_cache(images, tmp_path / "cache")
    size = cache.data_path.stat().st_size
    with open(cache.data_path, "r+b") as data:
        data.truncate(size - cache.record_size // 2)
    with caplog.at_level(logging.WARNING, logger="object2brain"):
        reopened = ImageCache(tmp_path / "cache", Preprocessing())
    notes = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(notes) == 1 and "truncated" in notes[0]
    assert len(reopened) == 0 and not reopened.data_path.exists()
    _, again = filled_cache(images, tmp_path / "cache")  # rebuilt
    assert torch.equal(again, reference)


def test_damaged_index_and_record_are_detected(
    images: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache, reference = filled_cache(images, tmp_path / "cache")
    # a flipped byte in a record: that image is decoded afresh, the others are read
    with open(cache.data_path, "r+b") as data:
        data.seek(cache.record_size * 2 + 100)
        byte = data.read(1)
        data.seek(cache.record_size * 2 + 100)
        data.write(bytes([byte[0] ^ 0xFF]))
    with caplog.at_level(logging.WARNING, logger="object2brain"):
        _, got = filled_cache(images, tmp_path / "cache")
    assert torch.equal(got, reference)
    assert any("checksum" in r.getMessage() for r in caplog.records)
    # an index cut mid-line: rebuilt
    text = cache.index_path.read_text()
    cache.index_path.write_text(text[:-10])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="object2brain"):
        assert len(ImageCache(tmp_path / "cache", Preprocessing())) == 0
    assert any("damaged" in r.getMessage() for r in caplog.records)


def test_stage_profile_counts_every_stage(
    model: LoadedModel, images: list[Path], tmp_path: Path
) -> None:
    with timing.profile_stages() as times:
        extract(model, images, tmp_path / "p.h5", ["layer4"], decode="torch")
    profile = times.as_dict()
    assert profile["images"] == len(images)
    for name in timing.STAGES:
        assert profile[f"{name}_s"] > 0, name
    assert not timing.profiling()
