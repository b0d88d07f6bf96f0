"""Image input: the one path by which stimulus images become model inputs, for every stage that
runs a network on stimuli (extraction, head features, dissection and its gallery, propagation).

- :func:`image_loader` + :func:`model_inputs`: ordered batches of a list of image files, and the
  float32 model inputs ``(B, 3, crop, crop)`` of each on the compute device, with decoding errors
  reported by stimulus id and path; :func:`image_batches` composes the two;
- :func:`load_inputs`: a few images decoded at once in the main process (figures);
- decoding, chosen by ``decode`` (:data:`~object2brain.options.DecodeMode`), resolved by
  :func:`uses_device_decoding`:

  - ``pil``: loader workers decode with Pillow (:func:`~object2brain.data.images.load_image`)
    and hand over uint8 pixels; the compute device normalises them
    (:meth:`~object2brain.models.zoo.Preprocessing.normalize`);
  - ``torch`` (or ``auto`` = ``torch`` on CUDA): plain JPEG files (:func:`is_plain_jpeg`) travel
    as bytes and are decoded on the compute device (nvJPEG on CUDA), then resized (antialiased,
    rounded to 8 bits like Pillow), centre-cropped and normalised there; every other file goes
    through Pillow exactly as above. The two paths differ by about one 8-bit level per pixel.

- datasets: :class:`ImageDataset` (Pillow), :class:`EncodedImageDataset` (bytes or Pillow) and
  the worker count :func:`default_workers`.

A "path" may also be a row of an HDF5 image array (``FILE#ROW``, ``FILE#DATASET#ROW``; see
:mod:`object2brain.data.image_array`): :func:`~object2brain.data.images.load_image` returns its
pixels as the RGB picture, so it takes the Pillow path above (never the on-device JPEG path) and
gives exactly the inputs of an image file with the same pixels. Each loader worker opens the HDF5
file itself (handles are cached per process, never inherited across ``fork``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from object2brain.data.image_array import parse_array_ref, row_size
from object2brain.data.images import load_image
from object2brain.errors import StimulusError
from object2brain.models.zoo import Preprocessing
from object2brain.options import DecodeMode

log = logging.getLogger("object2brain.inputs")


class ImageDataset(Dataset[tuple[int, torch.Tensor, str]]):
    """Stimulus images as model inputs: item ``i`` is ``(i, image (3, crop, crop), error)``.

    ``pixels=True``: the image is the uint8 output of :meth:`Preprocessing.pixels` (a quarter
    of the bytes for loader workers to hand over); :meth:`Preprocessing.normalize` on the compute
    device then gives exactly the float input of the default.

    Decoding errors are returned as text (``error``) rather than raised, so the main process can
    report the stimulus id and path in one clear message, whichever worker hit them.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        ids: Sequence[str],
        preprocessing: Preprocessing,
        *,
        augment: bool = False,
        pixels: bool = False,
    ):
        self.paths = list(paths)
        self.ids = list(ids)
        self.crop = preprocessing.crop_size
        self.transform = (
            preprocessing.pixels(augment=augment)
            if pixels
            else preprocessing.transform(augment=augment)
        )
        self.dtype = torch.uint8 if pixels else torch.float32

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str]:
        try:
            return index, self.transform(load_image(self.paths[index])), ""
        except Exception as exc:  # any decoder failure is reported with its stimulus
            message = f"{self.ids[index]} ({self.paths[index]}): {type(exc).__name__}: {exc}"
            return index, torch.zeros(3, self.crop, self.crop, dtype=self.dtype), message


def is_plain_jpeg(path: str | Path) -> bool:
    """Whether ``path`` is a JPEG that :func:`torchvision.io.decode_jpeg` decodes exactly as
    :func:`~object2brain.data.images.load_image` sees it: baseline (not progressive), 8-bit,
    greyscale or 3-channel, no EXIF rotation. Reads the header only."""
    from PIL import Image

    if parse_array_ref(path) is not None:
        return False  # a row of an image array: pixels, not a file
    try:
        with Image.open(path) as image:
            if image.format != "JPEG" or image.mode not in {"RGB", "L"}:
                return False
            if image.info.get("progressive") or image.info.get("progression"):
                return False
            if "adobe_transform" in image.info and image.mode == "RGB":
                return False  # Adobe RGB-coded JPEGs: colour transform handled by Pillow only
            orientation = image.getexif().get(0x0112, 1)
            return bool(orientation in (None, 1))
    except Exception:
        return False  # let the Pillow path report the problem with its stimulus


class EncodedImageDataset(Dataset[tuple[int, torch.Tensor, bool, str]]):
    """Stimuli for decoding on the compute device: item ``i`` is ``(i, payload, encoded, error)``.

    ``encoded=True``: ``payload`` is the file's bytes ``(n_bytes,)`` uint8 (a plain JPEG, see
    :func:`is_plain_jpeg`); otherwise ``payload`` is the model input ``(3, crop, crop)`` decoded
    and transformed by Pillow exactly as :class:`ImageDataset` does.
    """

    def __init__(self, paths: Sequence[Path], ids: Sequence[str], preprocessing: Preprocessing):
        self.fallback = ImageDataset(paths, ids, preprocessing)

    def __len__(self) -> int:
        return len(self.fallback)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, bool, str]:
        path = self.fallback.paths[index]
        if is_plain_jpeg(path):
            try:
                data = Path(path).read_bytes()
                return index, torch.frombuffer(bytearray(data), dtype=torch.uint8), True, ""
            except OSError:
                pass  # the Pillow path reports it
        i, tensor, error = self.fallback[index]
        return i, tensor, False, error


@dataclass
class EncodedBatch:
    """A batch of :class:`EncodedImageDataset` items in as few tensors as possible.

    Every tensor a loader worker hands over costs the main process a shared-memory handle (and a
    pinned copy): one per image capped the loader at ~1,700 images/s on a 16-core H100 host,
    below the device's decode and forward rates. So the encoded files travel end to end in one
    byte tensor, and the items decoded by Pillow (the fallback) in one stacked tensor.

    Attributes:
        indices: dataset index of each item ``(B,)``.
        data: the encoded items' file bytes end to end ``(n_bytes,)`` uint8.
        offsets: item ``j`` of the encoded ones is ``data[offsets[j]:offsets[j + 1]]``
            ``(n_encoded + 1,)`` int64.
        encoded: whether each item (batch order) is in ``data`` (else in ``images``) ``(B,)``.
        images: the other items' model inputs ``(n_fallback, 3, crop, crop)`` float32, in batch
            order (``(0,)`` when there is none).
        errors: error message of each item, ``""`` when it loaded ``(B,)``.
    """

    indices: torch.Tensor
    data: torch.Tensor
    offsets: torch.Tensor
    encoded: list[bool]
    images: torch.Tensor
    errors: list[str]

    def payloads(self) -> list[torch.Tensor]:
        """Each item's payload in batch order: its bytes ``(n_bytes_i,)`` (views of ``data``)
        if encoded, else its model input ``(3, crop, crop)``."""
        bounds = self.offsets.tolist()
        out, next_encoded, next_image = [], 0, 0
        for flag in self.encoded:
            if flag:
                out.append(self.data[bounds[next_encoded] : bounds[next_encoded + 1]])
                next_encoded += 1
            else:
                out.append(self.images[next_image])
                next_image += 1
        return out

    def pin_memory(self) -> EncodedBatch:
        """Called by the DataLoader's pinning thread (``pin_memory=True``)."""
        return EncodedBatch(
            self.indices,
            self.data.pin_memory() if self.data.numel() else self.data,
            self.offsets,
            self.encoded,
            self.images.pin_memory() if self.images.numel() else self.images,
            self.errors,
        )


def collate_encoded(items: Sequence[tuple[int, torch.Tensor, bool, str]]) -> EncodedBatch:
    """Collate :class:`EncodedImageDataset` items (in the loader worker) into one
    :class:`EncodedBatch`."""
    encoded = [bool(item[2]) for item in items]
    chunks = [item[1] for item, flag in zip(items, encoded, strict=True) if flag]
    fallback = [item[1] for item, flag in zip(items, encoded, strict=True) if not flag]
    sizes = torch.tensor([0, *(len(c) for c in chunks)], dtype=torch.int64)
    return EncodedBatch(
        indices=torch.tensor([item[0] for item in items], dtype=torch.long),
        data=torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8),
        offsets=torch.cumsum(sizes, dim=0),
        encoded=encoded,
        images=torch.stack(fallback) if fallback else torch.empty(0),
        errors=[item[3] for item in items],
    )


def gpu_decode_available(device: torch.device) -> bool:
    """Whether torchvision can decode JPEGs on ``device`` (nvJPEG on CUDA; always on the CPU)."""
    if device.type == "cpu":
        return True
    try:
        _decode_jpeg([torch.frombuffer(bytearray(_TINY_JPEG), dtype=torch.uint8)], device)
        return True
    except Exception as exc:  # missing nvJPEG, old torchvision, ...
        log.warning("JPEG decoding on %s is unavailable (%s): using Pillow", device, exc)
        return False


def _tiny_jpeg() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 64, 32)).save(buffer, format="JPEG")
    return buffer.getvalue()


_TINY_JPEG = _tiny_jpeg()


def _decode_jpeg(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """``torchvision.io.decode_jpeg`` of a list of JPEG byte tensors to RGB ``(3, H, W)`` uint8."""
    import warnings

    with warnings.catch_warnings():
        # torchvision >= 0.29 announces a move of its decoders to TorchCodec; they still work.
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        if device.type == "cuda":
            # nvJPEG may write into memory that queued work on this stream still reads
            # (pytorch/vision#9606, seen on H100): let that work finish first.
            torch.cuda.current_stream(device).synchronize()
        images: list[torch.Tensor] = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return images


def decode_batch(
    payloads: Sequence[torch.Tensor],
    encoded: Sequence[bool],
    preprocessing: Preprocessing,
    device: torch.device,
) -> torch.Tensor:
    """Model inputs ``(B, 3, crop, crop)`` float32 on ``device`` from a batch of
    :class:`EncodedImageDataset` payloads.

    Encoded JPEG bytes are decoded on ``device`` (all at once), grouped by size, resized so the
    short side is ``resize_size`` (antialiased, rounded to 8-bit levels as Pillow does),
    centre-cropped, scaled to [0, 1] and normalised; already transformed payloads are copied.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    crop = preprocessing.crop_size
    batch = torch.empty((len(payloads), 3, crop, crop), dtype=torch.float32, device=device)
    jpeg_slots = [i for i, flag in enumerate(encoded) if flag]
    for i, flag in enumerate(encoded):
        if not flag:
            batch[i] = payloads[i].to(device, non_blocking=True)
    if not jpeg_slots:
        return batch
    decoded = _decode_jpeg([payloads[i] for i in jpeg_slots], device)
    mean = torch.tensor(preprocessing.mean, device=device)[:, None, None]
    std = torch.tensor(preprocessing.std, device=device)[:, None, None]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for j, image in enumerate(decoded):
        by_shape.setdefault(tuple(image.shape), []).append(j)
    for members in by_shape.values():
        images = torch.stack([decoded[j] for j in members]).to(torch.float32)
        resized = TF.resize(
            images,
            [preprocessing.resize_size],
            interpolation=InterpolationMode(preprocessing.interpolation),
            antialias=True,
        )
        pixels = TF.center_crop(resized.round_().clamp_(0, 255), [crop, crop])
        batch[[jpeg_slots[j] for j in members]] = (pixels / 255.0 - mean) / std
    return batch


def uses_device_decoding(decode: DecodeMode | str, device: torch.device) -> bool:
    """Whether ``decode`` (``pil`` | ``torch`` | ``auto``, validated by the caller) decodes plain
    JPEGs on ``device``: ``torch`` always, ``auto`` on CUDA where nvJPEG works."""
    return decode == "torch" or (
        decode == "auto" and device.type == "cuda" and gpu_decode_available(device)
    )


def image_loader(
    paths: Sequence[Path],
    ids: Sequence[str],
    preprocessing: Preprocessing,
    *,
    device: torch.device,
    batch_size: int,
    num_workers: int | None,
    on_device_decode: bool,
) -> DataLoader[Any]:
    """Batches of stimulus images in order, for :func:`model_inputs`: Pillow-decoded uint8
    pixels (:class:`ImageDataset` with ``pixels=True``) or, with ``on_device_decode``, file bytes
    (:class:`EncodedBatch`); pinned on CUDA. ``num_workers`` ``None``: :func:`default_workers`."""
    dataset: Dataset[Any] = (
        EncodedImageDataset(paths, ids, preprocessing)
        if on_device_decode
        else ImageDataset(paths, ids, preprocessing, pixels=True)
    )
    workers = (
        default_workers(len(paths), batch_size, device) if num_workers is None else num_workers
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate_encoded if on_device_decode else None,
        prefetch_factor=4 if workers > 0 and device.type == "cuda" else None,
    )


def model_inputs(
    batch: Any, preprocessing: Preprocessing, device: torch.device, ids: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dataset indices ``(B,)`` and model inputs ``(B, 3, crop, crop)`` float32 on ``device`` of
    one :func:`image_loader` batch; ``ids``: the loader's stimulus ids (for messages).

    Raises:
        StimulusError: an image that cannot be decoded, named with its id and path.
    """
    encoded_batch = isinstance(batch, EncodedBatch)
    indices, errors = (batch.indices, batch.errors) if encoded_batch else (batch[0], batch[2])
    failed = [e for e in errors if e]
    if failed:
        raise StimulusError(f"{len(failed)} image(s) could not be decoded: {'; '.join(failed)}")
    if not encoded_batch:
        return indices, preprocessing.normalize(batch[1].to(device, non_blocking=True))
    try:
        return indices, decode_batch(batch.payloads(), batch.encoded, preprocessing, device)
    except RuntimeError as exc:  # e.g. a truncated JPEG rejected by nvJPEG
        names = ", ".join(ids[int(i)] for i in indices)
        raise StimulusError(
            f"on-device JPEG decoding failed for a batch of stimuli ({names}): "
            f"{exc}; rerun with decode='pil' to have the file named"
        ) from exc


def default_workers(
    n_items: int, batch_size: int, device: torch.device, *, min_batches: int = 1
) -> int:
    """Image-decoding worker processes for ``n_items`` run on ``device``.

    None for up to ``min_batches`` batches (starting workers would cost more than they save).
    Feeding a GPU: up to 4. On the CPU the workers compete with the forward pass for the same
    cores, so one per 4 cores, at most 4, and none on machines of up to 3 cores (measured on 2
    cores: resnet18 extraction ran at 30 images/s without workers, 25 with two).
    """
    if n_items <= min_batches * batch_size:
        return 0
    cores = os.cpu_count() or 1
    return min(4, cores) if device.type == "cuda" else min(4, cores // 4)


def image_batches(
    paths: Sequence[Path],
    ids: Sequence[str],
    preprocessing: Preprocessing,
    *,
    device: torch.device,
    batch_size: int,
    num_workers: int | None,
    on_device_decode: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Dataset indices ``(B,)`` and model inputs ``(B, 3, crop, crop)`` float32 on ``device`` of
    each batch of ``paths``, in order (:func:`image_loader` then :func:`model_inputs`)."""
    loader = image_loader(
        paths,
        ids,
        preprocessing,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        on_device_decode=on_device_decode,
    )
    for batch in loader:
        yield model_inputs(batch, preprocessing, device, ids)


def load_inputs(paths: Sequence[Path], preprocessing: Preprocessing) -> torch.Tensor:
    """Model inputs ``(n, 3, crop, crop)`` float32 on the CPU of a few images, decoded by Pillow
    in this process with the deterministic transform (no loader: for figures)."""
    transform = preprocessing.transform()
    return torch.stack([transform(load_image(path)) for path in paths])


def displayed_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image as :func:`~object2brain.data.images.load_image` returns
    it (after EXIF rotation), read from the file header without decoding the pixels (for a row
    of an image array, from the array's shape)."""
    from PIL import Image

    ref = parse_array_ref(path)
    if ref is not None:
        return row_size(ref)

    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
