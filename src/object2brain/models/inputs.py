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
    (:meth:`~object2brain.models.zoo.Preprocessing.normalize`); without workers the next batch
    is decoded on a thread (:func:`read_ahead`) while the network runs on this one;
  - ``torch`` (or ``auto`` = ``torch`` on CUDA): plain JPEG files (:func:`is_plain_jpeg`) travel
    as bytes and are decoded on the compute device (nvJPEG on CUDA), then resized (antialiased,
    rounded to 8 bits like Pillow), centre-cropped and normalised there; every other file goes
    through Pillow exactly as above. The two paths differ by about one 8-bit level per pixel.

- datasets: :class:`ImageDataset` (Pillow), :class:`EncodedImageDataset` (bytes or Pillow) and
  the worker count :func:`default_workers`; :func:`pixel_dataset` + :func:`remember_pixels`: the
  Pillow-pixels dataset with the decoded-image cache, for stages with their own loader (the
  train-head feature pass).

A "path" may also be a row of an HDF5 image array (``FILE#ROW``, ``FILE#DATASET#ROW``; see
:mod:`object2brain.data.image_array`): :func:`~object2brain.data.images.load_image` returns its
pixels as the RGB picture, so it takes the Pillow path above (never the on-device JPEG path) and
gives exactly the inputs of an image file with the same pixels. Each loader worker opens the HDF5
file itself (handles are cached per process, never inherited across ``fork``).
"""

from __future__ import annotations

import contextlib
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
from object2brain.models import timing
from object2brain.models.image_cache import CacheEntry, ImageCache
from object2brain.models.zoo import Preprocessing
from object2brain.options import DecodeMode

log = logging.getLogger("object2brain.inputs")


class ImageDataset(Dataset[tuple[int, torch.Tensor, str]]):
    """Stimulus images as model inputs: item ``i`` is ``(i, image (3, crop, crop), error)``.

    ``pixels=True``: the image is the uint8 output of :meth:`Preprocessing.pixels` (a quarter
    of the bytes for loader workers to hand over); :meth:`Preprocessing.normalize` on the compute
    device then gives exactly the float input of the default.

    ``cache`` + ``hits`` (with ``pixels=True``): images with an entry in ``hits`` are read from
    the decoded-image cache instead of being decoded.

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
        cache: ImageCache | None = None,
        hits: Sequence[CacheEntry | None] | None = None,
    ):
        self.paths = list(paths)
        self.cache = cache if pixels and not augment else None
        self.hits: list[CacheEntry | None] = (
            list(hits) if hits is not None else [None] * len(self.paths)
        )
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
        entry = self.hits[index]
        if self.cache is not None and entry is not None:
            cached = self.cache.read(entry)
            if cached is not None:
                return index, torch.from_numpy(cached), ""
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


def decode_pixels(
    data: Sequence[torch.Tensor], preprocessing: Preprocessing, device: torch.device
) -> torch.Tensor:
    """Resized, centre-cropped pixels ``(n, 3, crop, crop)`` uint8 on ``device`` of plain JPEG
    files given as byte tensors ``(n_bytes_i,)``: decoded on ``device`` all at once, grouped by
    size, resized so the short side is ``resize_size`` (antialiased, rounded to 8-bit levels as
    Pillow does) and centre-cropped."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    crop = preprocessing.crop_size
    pixels = torch.empty((len(data), 3, crop, crop), dtype=torch.uint8, device=device)
    if not data:
        return pixels
    decoded = _decode_jpeg(list(data), device)
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
        cropped = TF.center_crop(resized.round_().clamp_(0, 255), [crop, crop])
        pixels[members] = cropped.to(torch.uint8)
    return pixels


def normalize_decoded(pixels: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """Model input ``(n, 3, crop, crop)`` float32 of pixels decoded by :func:`decode_pixels`:
    ``(pixels / 255 - mean) / std`` (a division, where :meth:`Preprocessing.normalize` of the
    Pillow path multiplies by 1/255: the two differ in the last bit, so each path keeps its own
    arithmetic and a cached image is normalised as the decoder that made it was)."""
    device = pixels.device
    mean = torch.tensor(preprocessing.mean, device=device)[:, None, None]
    std = torch.tensor(preprocessing.std, device=device)[:, None, None]
    return (pixels.to(torch.float32) / 255.0 - mean) / std


def decode_batch(
    payloads: Sequence[torch.Tensor],
    encoded: Sequence[bool],
    preprocessing: Preprocessing,
    device: torch.device,
) -> torch.Tensor:
    """Model inputs ``(B, 3, crop, crop)`` float32 on ``device`` from a batch of
    :class:`EncodedImageDataset` payloads: encoded JPEG bytes through :func:`decode_pixels` and
    :func:`normalize_decoded`; already transformed payloads are copied."""
    crop = preprocessing.crop_size
    batch = torch.empty((len(payloads), 3, crop, crop), dtype=torch.float32, device=device)
    jpeg_slots = [i for i, flag in enumerate(encoded) if flag]
    for i, flag in enumerate(encoded):
        if not flag:
            batch[i] = payloads[i].to(device, non_blocking=True)
    if jpeg_slots:
        pixels = decode_pixels([payloads[i] for i in jpeg_slots], preprocessing, device)
        batch[jpeg_slots] = normalize_decoded(pixels, preprocessing)
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
    cache: ImageCache | None = None,
    hits: Sequence[CacheEntry | None] | None = None,
) -> DataLoader[Any]:
    """Batches of stimulus images in order, for :func:`model_inputs`: Pillow-decoded uint8
    pixels (:class:`ImageDataset` with ``pixels=True``; those with an entry in ``hits`` read
    from ``cache`` instead) or, with ``on_device_decode``, file bytes (:class:`EncodedBatch`);
    pinned on CUDA. ``num_workers`` ``None``: :func:`default_workers`."""
    dataset: Dataset[Any] = (
        EncodedImageDataset(paths, ids, preprocessing)
        if on_device_decode
        else ImageDataset(paths, ids, preprocessing, pixels=True, cache=cache, hits=hits)
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
    Feeding a GPU: a fair share of the cores this process may use (:func:`usable_cores`) divided
    among the visible GPUs, less two (the main process, which runs the GPU, and the pinning
    thread), at least 1 and at most 32: 14 workers on a 16-core single-GPU host (Pillow decoding
    of 500 x 375 JPEGs runs at ~150-250 images/s per core, so 4 workers capped the Pillow path at
    ~1,000 images/s on an H200). On the CPU the workers compete with the forward pass for the
    same cores, so one per 4 cores, at most 4, and none on machines of up to 3 cores (measured on
    2 cores: resnet18 extraction ran at 30 images/s without workers, 25 with two).
    """
    if n_items <= min_batches * batch_size:
        return 0
    cores = usable_cores()
    if device.type != "cuda":
        return min(4, cores // 4)
    gpus = max(1, torch.cuda.device_count())
    return max(1, min(32, cores // gpus - 2))


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def default_threads(device: torch.device) -> int:
    """Reading threads of the pipelined path (:func:`pipelined_batches`): reading bytes waits on
    the disk, not the CPU, so twice the usable cores, at least 4 and at most 32."""
    del device  # the same on every device: the threads read files
    return max(4, min(32, 2 * usable_cores()))


def image_batches(
    paths: Sequence[Path],
    ids: Sequence[str],
    preprocessing: Preprocessing,
    *,
    device: torch.device,
    batch_size: int,
    num_workers: int | None,
    on_device_decode: bool,
    cache: ImageCache | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Dataset indices ``(B,)`` and model inputs ``(B, 3, crop, crop)`` float32 on ``device`` of
    each batch of ``paths``, in order.

    ``on_device_decode``: the pipelined path (:func:`pipelined_batches`; ``num_workers`` is its
    thread count). Otherwise Pillow in loader worker processes (:func:`image_loader` then
    :func:`model_inputs`). ``cache``: decoded pixels are read from and added to this
    decoded-image cache (:class:`~object2brain.models.image_cache.ImageCache`); the inputs are
    bit for bit those of a run without it (on the same device).
    """
    if on_device_decode:
        threads = default_threads(device) if num_workers is None else num_workers
        yield from pipelined_batches(
            paths, ids, preprocessing, device=device, batch_size=batch_size, threads=threads,
            cache=cache,
        )  # fmt: skip
        return
    dataset = pixel_dataset(paths, ids, preprocessing, cache=cache)
    loader = image_loader(
        paths, ids, preprocessing, device=device, batch_size=batch_size,
        num_workers=num_workers, on_device_decode=False, cache=cache, hits=dataset.hits,
    )  # fmt: skip
    # without worker processes the next batch is decoded on a thread while this one is used
    batches = read_ahead(loader) if loader.num_workers == 0 else iter(loader)
    while True:
        with timing.stage("read"):  # waiting for the loader: reading + Pillow in its workers
            batch = next(batches, None)
        if batch is None:
            return
        remember_pixels(dataset, batch)
        with timing.stage("decode", device, images=len(batch[0])):
            result = model_inputs(batch, preprocessing, device, ids)
        yield result


def read_ahead(batches: Any, depth: int = 1) -> Iterator[Any]:
    """The items of ``batches``, produced on a thread of their own up to ``depth`` items ahead
    of the consumer (a single-process loader: Pillow and the uint8 copies release the GIL, so
    the next batch is decoded while the network runs on this one). An error of the producer is
    raised here, at its item; closing the generator stops the thread after its current item."""
    import queue
    import threading

    items: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in batches:
                while not stop.is_set():
                    try:
                        items.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(("end", None))
        except BaseException as exc:  # handed to the consumer
            items.put(("error", exc))

    thread = threading.Thread(target=produce, name="o2b-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = items.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                items.get_nowait()
            thread.join(timeout=0.05)


#: Decoder names in the decoded-image cache's keys (pixels differ by decoder).
DECODER_PIL = "pil"


def pixel_dataset(
    paths: Sequence[Path],
    ids: Sequence[str],
    preprocessing: Preprocessing,
    *,
    cache: ImageCache | None = None,
    augment: bool = False,
) -> ImageDataset:
    """The Pillow-pixels dataset (:class:`ImageDataset` with ``pixels=True``) of every stage that
    runs a network on stimuli by the Pillow path: images held by the decoded-image ``cache``
    are read from it instead of being decoded (not with ``augment``: random crops are not
    cached). Its batches' new pixels go into the cache with :func:`remember_pixels`; the inputs
    are bit for bit those of a run without a cache."""
    use = None if augment else cache
    hits = _cache_hits(use, paths, [DECODER_PIL] * len(paths))
    return ImageDataset(paths, ids, preprocessing, augment=augment, pixels=True, cache=use,
                        hits=hits)  # fmt: skip


def remember_pixels(dataset: ImageDataset, batch: Any) -> None:
    """Add the pixels of a loader batch ``(indices (B,), pixels (B, 3, crop, crop) uint8,
    errors)`` of :func:`pixel_dataset` that were decoded (not read from its cache) to the cache,
    and mark them cached for the dataset's next pass (a batch with a decoding error adds
    nothing: the caller reports it). No cache: nothing."""
    cache = dataset.cache
    if cache is None or any(batch[2]):
        return
    rows = [int(i) for i in batch[0].tolist()]
    misses = [j for j, i in enumerate(rows) if dataset.hits[i] is None]
    if not misses:
        return
    keys = [ImageCache.key(dataset.paths[rows[j]], DECODER_PIL) for j in misses]
    cache.add(keys, batch[1][misses].numpy())
    for j, key in zip(misses, keys, strict=True):
        dataset.hits[rows[j]] = cache.entries.get(key)


def device_decoder(device: torch.device) -> str:
    """Cache decoder name of torchvision's JPEG decoder on ``device``: ``torch:cuda`` (nvJPEG)
    or ``torch:cpu`` (libjpeg-turbo), whose pixels may differ."""
    return f"torch:{device.type}"


def _cache_hits(
    cache: ImageCache | None, paths: Sequence[Path], decoders: Sequence[str]
) -> list[CacheEntry | None]:
    """The cache entry of each image (``None``: not cached, or no cache)."""
    if cache is None:
        return [None] * len(paths)
    keys = [ImageCache.key(path, decoder) for path, decoder in zip(paths, decoders, strict=True)]
    return cache.lookup(keys)


@dataclass
class _Item:
    """One image read by a thread of the pipelined path.

    ``payload``: file bytes ``(n_bytes,)`` uint8 when ``encoded`` (a plain JPEG for the device
    decoder), else pixels ``(3, crop, crop)`` uint8 (from the cache or Pillow); ``decoder``: whose
    pixels they are (cache key and normalisation); ``cached``: read from the cache; ``key``: its
    cache key (``None`` without a cache).
    """

    payload: torch.Tensor
    encoded: bool
    decoder: str
    cached: bool
    error: str = ""
    key: str | None = None


class _ItemReader:
    """What a reading thread does for image ``i``: cached pixels, else the bytes of a plain JPEG,
    else Pillow pixels (exactly :class:`ImageDataset`'s). The header check and the content hash
    of the cache key run in the thread too (25,000 header reads take seconds)."""

    def __init__(
        self,
        paths: Sequence[Path],
        ids: Sequence[str],
        preprocessing: Preprocessing,
        device: torch.device,
        cache: ImageCache | None,
    ) -> None:
        self.pillow = ImageDataset(paths, ids, preprocessing, pixels=True)
        self.device_decoder = device_decoder(device)
        self.cache = cache

    def __call__(self, index: int) -> _Item:
        with timing.stage("read"):
            return self._read(index)

    def _read(self, index: int) -> _Item:
        path = self.pillow.paths[index]
        plain = is_plain_jpeg(path)
        decoder = self.device_decoder if plain else DECODER_PIL
        key = None
        if self.cache is not None:
            try:
                key = ImageCache.key(path, decoder)
            except OSError:
                key = None  # unreadable: Pillow names the problem below
            entry = self.cache.entries.get(key) if key is not None else None
            cached = self.cache.read(entry) if entry is not None else None
            if cached is not None:
                return _Item(torch.from_numpy(cached), False, decoder, True, key=key)
        if plain:
            try:
                data = Path(path).read_bytes()
                return _Item(torch.frombuffer(bytearray(data), dtype=torch.uint8), True, decoder,
                             False, key=key)  # fmt: skip
            except OSError:
                pass  # Pillow names the problem below
        _, pixels, error = self.pillow[index]
        return _Item(pixels, False, DECODER_PIL, False, error, None if plain else key)


def pipelined_batches(
    paths: Sequence[Path],
    ids: Sequence[str],
    preprocessing: Preprocessing,
    *,
    device: torch.device,
    batch_size: int,
    threads: int,
    cache: ImageCache | None = None,
    ahead: int = 3,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Dataset indices ``(B,)`` and model inputs ``(B, 3, crop, crop)`` float32 on ``device`` of
    each batch of ``paths``, in order, by the pipelined image path (``decode="torch"``):

    1. ``threads`` threads read each image (``0``: in this thread), up to ``ahead`` batches
       ahead: its cached pixels, else a plain JPEG's bytes, else (progressive, CMYK, PNG, EXIF
       rotation, array rows, ...) its Pillow pixels; no worker processes, so no tensor per image
       crosses a process boundary;
    2. the batch's JPEG bytes are decoded in one batched call on ``device`` (nvJPEG on CUDA),
       resized and cropped there (:func:`decode_pixels`), normalised (each image as its decoder's
       path does) and the new pixels are added to ``cache`` on a background thread;
    3. on CUDA, step 2 runs on a stream of its own, and the batch is handed over with the
       compute stream made to wait for it: the batch after it is read and decoded while the
       caller's forward pass and device-to-host copies of this one run.

    On the CPU the same code runs without streams, and gives exactly the inputs of
    :func:`image_loader` + :func:`model_inputs` with ``on_device_decode=True``.

    Raises:
        StimulusError: an image that cannot be decoded (named), or a batch nvJPEG rejects.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    reader = _ItemReader(paths, ids, preprocessing, device, cache)
    starts = list(range(0, len(paths), batch_size))
    side = torch.cuda.Stream(device) if device.type == "cuda" else None  # type: ignore[no-untyped-call]
    pool = ThreadPoolExecutor(threads, thread_name_prefix="o2b-read") if threads > 0 else None
    writer = ThreadPoolExecutor(1, thread_name_prefix="o2b-cache") if cache is not None else None
    queued: list[list[Future[_Item]]] = []

    def submit(first: int) -> None:
        indices = range(first, min(first + batch_size, len(paths)))
        if pool is not None:
            queued.append([pool.submit(reader, i) for i in indices])
        else:
            done: list[Future[_Item]] = []
            for i in indices:
                future: Future[_Item] = Future()
                future.set_result(reader(i))
                done.append(future)
            queued.append(done)

    try:
        for first in starts[:ahead]:
            submit(first)
        for number, first in enumerate(starts):
            items = [future.result() for future in queued.pop(0)]
            if number + ahead < len(starts):
                submit(starts[number + ahead])
            indices = torch.arange(first, first + len(items))
            yield indices, _assemble(items, indices, reader, ids, preprocessing, device, side,
                                     writer)  # fmt: skip
    finally:
        for batch in queued:
            for future in batch:
                future.cancel()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if writer is not None:
            writer.shutdown(wait=True)


def _assemble(
    items: list[_Item],
    indices: torch.Tensor,
    reader: _ItemReader,
    ids: Sequence[str],
    preprocessing: Preprocessing,
    device: torch.device,
    side: torch.cuda.Stream | None,
    writer: Any,
) -> torch.Tensor:
    """Step 2-3 of :func:`pipelined_batches` for one batch: model inputs on ``device``."""
    failed = [item.error for item in items if item.error]
    if failed:
        raise StimulusError(f"{len(failed)} image(s) could not be decoded: {'; '.join(failed)}")
    context = torch.cuda.stream(side) if side is not None else contextlib.nullcontext()
    with context, timing.stage("decode", device, images=len(items)):
        pixels = _batch_pixels(items, indices, ids, preprocessing, device)
        torch_rows = [j for j, item in enumerate(items) if item.decoder != DECODER_PIL]
        pil_rows = [j for j, item in enumerate(items) if item.decoder == DECODER_PIL]
        inputs = torch.empty(pixels.shape, dtype=torch.float32, device=device)
        if torch_rows:
            inputs[torch_rows] = normalize_decoded(pixels[torch_rows], preprocessing)
        if pil_rows:
            inputs[pil_rows] = preprocessing.normalize(pixels[pil_rows])
        new = [j for j, item in enumerate(items) if not item.cached and item.key is not None]
        if writer is not None and new:
            keys = [str(items[j].key) for j in new]
            host = pixels[new].to("cpu", non_blocking=side is not None)
            ready = _record_event(side)
            writer.submit(_add_to_cache, reader.cache, keys, host, ready)
    if side is not None:
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(side)
        inputs.record_stream(compute)
    return inputs


def _batch_pixels(
    items: list[_Item],
    indices: torch.Tensor,
    ids: Sequence[str],
    preprocessing: Preprocessing,
    device: torch.device,
) -> torch.Tensor:
    """Pixels ``(B, 3, crop, crop)`` uint8 on ``device`` of one batch's items: the encoded ones
    decoded on ``device`` in one call, the others copied."""
    crop = preprocessing.crop_size
    pixels = torch.empty((len(items), 3, crop, crop), dtype=torch.uint8, device=device)
    encoded = [j for j, item in enumerate(items) if item.encoded]
    others = [j for j, item in enumerate(items) if not item.encoded]
    if others:
        stacked = torch.stack([items[j].payload for j in others])
        if device.type == "cuda":
            stacked = stacked.pin_memory()
        pixels[others] = stacked.to(device, non_blocking=True)
    if encoded:
        try:
            pixels[encoded] = decode_pixels([items[j].payload for j in encoded], preprocessing,
                                            device)  # fmt: skip
        except RuntimeError as exc:  # e.g. a truncated JPEG rejected by nvJPEG
            names = ", ".join(ids[int(indices[j])] for j in encoded)
            raise StimulusError(
                f"on-device JPEG decoding failed for a batch of stimuli ({names}): "
                f"{exc}; rerun with decode='pil' to have the file named"
            ) from exc
    return pixels


def _record_event(stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
    if stream is None:
        return None
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(stream)
    return event


def _add_to_cache(
    cache: ImageCache, keys: list[str], host: torch.Tensor, ready: torch.cuda.Event | None
) -> None:
    """On the cache-writing thread: wait for the copy to the host, then append."""
    if ready is not None:
        ready.synchronize()
    try:
        cache.add(keys, host.numpy())
    except OSError as exc:  # a full disk must not stop the run: the cache is an optimisation
        log.warning("image cache %s: could not add %d images (%s)", cache.folder, len(keys), exc)


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
