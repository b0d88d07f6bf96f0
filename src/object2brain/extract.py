"""Batched activation extraction into an activation store.

One forward pass per batch records every requested layer through :class:`LayerRecorder`; the
batch's activations are copied to the host and written to ``<out>.partial`` on a writer thread
while the next batch is computed, so at most three batches' activations are held (one computed,
one waiting, one being written) whatever the number of stimuli. The store is renamed to
``<out>`` and marked complete only at the end; an interrupted run (Ctrl-C, crash, killed job)
resumes from the last written batch when the same command is run again.

GPU options (all off by default, so stored values are today's float32 ones):

- ``amp_dtype="bfloat16"|"float16"``: the forward pass runs under ``torch.autocast`` (mixed
  precision); activations are converted back to float32 before storage. Faster on tensor-core
  GPUs, but values differ from float32 by the precision of that type (bf16: ~3 significant
  digits), so leave it off for numbers that are compared across runs.
- ``channels_last=True``: network and inputs in NHWC memory format (faster convolutions on
  tensor cores); values are those of the default layout up to float rounding (tested: 1e-5).
- ``decode="torch"`` (or ``"auto"`` = ``torch`` on CUDA): plain JPEG files are read as bytes by
  the loader workers and decoded on the compute device with ``torchvision.io.decode_jpeg`` (nvJPEG
  on CUDA), then resized (antialiased, rounded to 8 bits like Pillow), centre-cropped and
  normalised there. Only baseline (non-progressive) 8-bit greyscale or RGB/YCbCr JPEGs whose EXIF
  orientation is absent or 1 take this path; every other file (PNG, CMYK, progressive, rotated
  by EXIF, ...) is decoded by Pillow exactly as in the default path. Different decoders and
  resamplers differ by about one 8-bit level per pixel; the ``decode`` mode is part of the
  store's fingerprint.
- Pinned host memory and non-blocking host-to-device copies are used on CUDA.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from object2brain._version import __version__
from object2brain.data.images import load_image
from object2brain.data.ratings import load_predicted_valence
from object2brain.data.stimuli import StimulusSet, load_stimuli
from object2brain.devices import resolve_device
from object2brain.errors import LayerError, StimulusError, StoreError, listing
from object2brain.manifest import build_manifest, cached_file_sha256, file_sha256
from object2brain.models.layers import VALENCE_LAYER, LayerRecorder, resolve_layers
from object2brain.models.zoo import LoadedModel, Preprocessing, load_model
from object2brain.projection import project, srp_matrix
from object2brain.store import (
    ActivationStore,
    BackgroundWriter,
    StoreWriter,
    check_writable,
    partial_path,
    write_json,
)

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("object2brain.extract")

StorageDtype = Literal["float32", "float16"]
AmpDtype = Literal["bfloat16", "float16"]
DecodeMode = Literal["pil", "torch", "auto"]
AMP_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16}
DECODE_MODES: tuple[str, ...] = ("pil", "torch", "auto")
_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
}
_TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}


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


def probe_layers(loaded: LoadedModel, layer_names: Sequence[str], device: torch.device) -> None:
    """One forward pass of a blank image, before any file is created: a module that runs more
    than once per pass, returns no tensor or does not run at all fails here, not mid-run."""
    crop = loaded.preprocessing.crop_size
    network = loaded.module.to(device).eval()
    with LayerRecorder(network, layer_names) as recorder, torch.inference_mode():
        network(torch.zeros(1, 3, crop, crop, device=device))
        silent = [name for name in layer_names if name not in recorder.outputs]
    if silent:
        raise LayerError(
            f"module(s) {', '.join(silent)} of {loaded.name} did not run in a forward pass; "
            "choose modules on the path from the image to the output"
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


def extract(
    model: LoadedModel | str,
    stimuli: StimulusSet | str | Path,
    *,
    out: str | Path,
    layers: str | Sequence[str] = "all",
    weights: str = "default",
    batch_size: int = 32,
    device: str | torch.device = "auto",
    dtype: StorageDtype = "float32",
    srp: int | None = None,
    seed: int = 0,
    num_workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    amp_dtype: AmpDtype | str | None = None,
    channels_last: bool = False,
    decode: DecodeMode | str = "pil",
    valence: str | Path | pd.Series | Mapping[str, float] | None = None,
) -> Path:
    """Extract activations of ``layers`` for every stimulus into the activation store ``out``.

    Args:
        model: a :class:`LoadedModel`, or an architecture name loaded with ``weights``.
        stimuli: a :class:`StimulusSet`, or a stimulus table / image folder to load.
        out: the ``.h5`` file to write (DESIGN.md section 3 layout).
        layers: ``all`` (the canonical layers) or names / a comma-separated list.
        weights: used only when ``model`` is a name.
        batch_size: images per forward pass (memory is bounded by one batch).
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        dtype: storage precision; the forward pass is always float32.
        srp: if given, layers with more than ``srp`` features are stored as a sparse random
            projection ``(n, srp)`` of their centred activations
            (see :mod:`object2brain.projection`).
        seed: seed of the projection matrices (and of ``weights=none`` when loading by name).
        num_workers: image-decoding worker processes (default: :func:`default_workers`).
        overwrite: replace an existing store at ``out`` written by another run (a complete store
            of this very run is always reused as it is).
        progress: show a progress bar.
        amp_dtype: ``None`` (float32 forward pass, the default), ``bfloat16`` or ``float16``:
            mixed precision with ``torch.autocast`` (module docstring); stored as ``dtype``.
        channels_last: NHWC memory format for the network and its inputs.
        decode: ``pil`` (default), ``torch`` (plain JPEGs decoded and preprocessed on
            ``device``; others by Pillow) or ``auto`` (``torch`` on CUDA when torchvision can
            decode there, else ``pil``).
        valence: predicted valence to store as layer ``valence`` instead of the head's outputs
            (with or without a head): a table with ``stimulus_id, predicted`` (e.g.
            ``train-head --cross-fit``'s ``out_of_fold.csv``) or a Series/mapping by stimulus id.
            The store's attribute ``valence_source`` says which (``head`` or ``supplied``).

    Returns:
        The path of the complete store.
    """
    started = time.time()
    out = Path(out).expanduser()
    if dtype not in _NUMPY_DTYPES:
        raise StoreError(f"--dtype {dtype!r}: use float32 or float16")
    if srp is not None and srp < 1:
        raise StoreError(f"--srp {srp}: the projection dimension must be positive")
    if batch_size < 1:
        raise StoreError(f"batch size {batch_size}: must be at least 1")
    if num_workers is not None and num_workers < 0:
        raise StoreError(f"--workers {num_workers}: must be 0 or more")
    if amp_dtype is not None and amp_dtype not in AMP_DTYPES:
        raise StoreError(f"--amp {amp_dtype!r}: use bfloat16 or float16 (or none for float32)")
    if decode not in DECODE_MODES:
        raise StoreError(f"--decode {decode!r}: use {', '.join(DECODE_MODES)}")
    stimulus_set = stimuli if isinstance(stimuli, StimulusSet) else load_stimuli(stimuli)
    supplied = None if valence is None else load_predicted_valence(valence, stimulus_set.ids)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, weights, seed=seed)
    layer_names = resolve_layers(loaded, layers)
    torch_device = resolve_device(device)
    check_writable(out)
    probe_layers(loaded, layer_names, torch_device)
    on_device_decode = uses_device_decoding(decode, torch_device)

    config: dict[str, Any] = {
        **loaded.describe(),
        "layers": layer_names,
        "valence": loaded.has_head,
        "dtype": dtype,
        "srp": srp,
        "seed": seed,
        "stimulus_ids": stimulus_set.ids,
        "stimuli": stimulus_set.fingerprint(),
    }
    # Only options that change stored values, and only when not at their default, so stores
    # written before these options existed keep their fingerprint.
    if amp_dtype is not None:
        config["amp_dtype"] = amp_dtype
    if on_device_decode:
        config["decode"] = "torch"
    if supplied is not None:
        config["valence"] = "supplied"
        config["valence_sha256"] = hashlib.sha256(supplied.tobytes()).hexdigest()
    # What the store holds, by content: weights and head by SHA-256 and images by their bytes,
    # not by path, so a study moved to another folder or machine keeps its stores.
    identity = {k: v for k, v in config.items() if k not in ("weights", "head")}
    identity["head_sha256"] = cached_file_sha256(loaded.head["path"]) if loaded.head else None
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    record = partial(
        _write_manifest,
        config=config,
        stimulus_set=stimulus_set,
        loaded=loaded,
        batch_size=batch_size,
        device=torch_device,
        channels_last=channels_last,
        on_device_decode=on_device_decode,
        seed=seed,
    )
    if out.exists():
        if _same_complete_store(out, fingerprint):
            log.info("%s is already complete for this model, layers and stimuli", out)
            if not manifest_path(out).is_file():  # stopped between the store and its manifest
                record(out, seconds=None)
            return out
        if not overwrite:
            raise StoreError(f"{out}: already exists (from another run); pass --overwrite")

    writer = StoreWriter.resume(out, fingerprint)
    if writer is not None:
        log.info("resuming %s at stimulus %d of %d", out, writer.n_done, len(stimulus_set))
    else:
        attrs = {
            "model": loaded.name,
            "arch": loaded.arch,
            "weights": loaded.weights,
            "weights_sha256": loaded.weights_sha256,
            "preprocessing": loaded.preprocessing.to_dict(),
            "object2brain_version": __version__,
            "head": loaded.head,
            "dtype": dtype,
        }
        if supplied is not None or loaded.has_head:
            attrs["valence_source"] = "supplied" if supplied is not None else "head"
        writer = StoreWriter.create(out, stimulus_set.ids, attrs, fingerprint)
    try:
        _run_batches(
            loaded,
            stimulus_set,
            writer,
            layer_names,
            device=torch_device,
            batch_size=batch_size,
            dtype=_NUMPY_DTYPES[dtype],
            srp=srp,
            seed=seed,
            num_workers=num_workers,
            progress=progress,
            amp_dtype=AMP_DTYPES[amp_dtype] if amp_dtype is not None else None,
            channels_last=channels_last,
            on_device_decode=on_device_decode,
            valence=supplied,
        )
        path = writer.finish()
    finally:
        writer.close()

    record(path, seconds=round(time.time() - started, 3))
    return path


def _write_manifest(
    path: Path,
    config: dict[str, Any],
    stimulus_set: StimulusSet,
    loaded: LoadedModel,
    batch_size: int,
    device: torch.device,
    channels_last: bool,
    on_device_decode: bool,
    seed: int,
    seconds: float | None,
) -> Path:
    """``<store>.manifest.json`` (``seconds`` None: the store was completed by an earlier run)."""
    inputs = {"stimuli_fingerprint": config["stimuli"], "weights": loaded.weights_sha256}
    if stimulus_set.source is not None and stimulus_set.source.is_file():
        inputs["stimulus_table"] = file_sha256(stimulus_set.source)
    return write_json(
        manifest_path(path),
        build_manifest(
            "extract",
            {k: v for k, v in config.items() if k != "stimulus_ids"}
            | {
                "out": str(path),
                "batch_size": batch_size,
                "device": str(device),
                "channels_last": channels_last,
                "decode": "torch" if on_device_decode else "pil",
            },
            seeds={"seed": seed},
            inputs=inputs,
            outputs=[str(path)],
            extra={"n_stimuli": len(stimulus_set), "seconds": seconds},
        ),
    )


def manifest_path(store: Path) -> Path:
    """``acts.h5`` -> ``acts.manifest.json``."""
    return store.with_name(store.stem + ".manifest.json")


def _same_complete_store(path: Path, fingerprint: str) -> bool:
    try:
        with ActivationStore.open(path) as store:
            return bool(store.attrs.get("fingerprint") == fingerprint)
    except StoreError:
        return False


def uses_device_decoding(decode: str, device: torch.device) -> bool:
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


def _run_batches(
    loaded: LoadedModel,
    stimuli: StimulusSet,
    writer: StoreWriter,
    layer_names: list[str],
    *,
    device: torch.device,
    batch_size: int,
    dtype: np.dtype[Any],
    srp: int | None,
    seed: int,
    num_workers: int | None,
    progress: bool,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    on_device_decode: bool = False,
    valence: np.ndarray | None = None,
) -> None:
    """Write the rows from ``writer.n_done`` on; ``valence`` ``(n,)``: supplied predictions that
    replace the head's output as layer ``valence``."""
    from tqdm.auto import tqdm

    n, start = len(stimuli), writer.n_done
    if start >= n:
        return
    paths, ids = stimuli.paths[start:], stimuli.ids[start:]
    loader = image_loader(
        paths,
        ids,
        loaded.preprocessing,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        on_device_decode=on_device_decode,
    )
    network = loaded.module.to(device).eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        network.to(memory_format=torch.channels_last)
    projections: dict[str, torch.Tensor] = {}
    order: list[str] = []
    bar = tqdm(total=n, initial=start, disable=not progress, unit="img", desc="extract")

    def store(batch: _HostBatch) -> None:  # runs on the writer thread
        if batch.copied is not None:
            batch.copied.synchronize()
        _check_storable(list(batch.blocks), batch.peaks, dtype, batch.ids)
        arrays = {name: block.numpy() for name, block in batch.blocks.items()}
        for name, array in arrays.items():
            writer.ensure_layer(name, n, tuple(array.shape[1:]), dtype)
        if writer.n_done == 0:
            writer.set_attr("order", order)
            if srp is not None:
                writer.set_attr("srp", _srp_attrs(srp, seed, arrays, projections))
        writer.write_rows(batch.first_row, arrays)
        bar.update(len(batch.ids))

    background: BackgroundWriter[_HostBatch] = BackgroundWriter(store, depth=1)
    try:
        with LayerRecorder(network, layer_names) as recorder, torch.inference_mode():
            for batch in loader:
                indices, inputs = model_inputs(batch, loaded.preprocessing, device, ids)
                inputs = inputs.contiguous(memory_format=memory_format)
                recorder.reset()
                autocast = (
                    torch.autocast(device.type, dtype=amp_dtype)
                    if amp_dtype is not None
                    else contextlib.nullcontext()
                )
                with autocast:
                    output = network(inputs)
                blocks = {name: block.float() for name, block in recorder.outputs.items()}
                if valence is not None:
                    rows = start + np.asarray(indices, dtype=np.int64)
                    blocks[VALENCE_LAYER] = torch.from_numpy(valence[rows]).float().to(device)
                elif loaded.has_head:
                    blocks[VALENCE_LAYER] = output.reshape(output.shape[0], -1)[:, 0].float()
                if srp is not None:
                    blocks = _project_blocks(blocks, srp, seed, projections, device)
                if not order:
                    order.extend(
                        [*recorder.order, *([VALENCE_LAYER] if VALENCE_LAYER in blocks else [])]
                    )
                background.put(
                    _to_host(blocks, dtype, start + int(indices[0]), [ids[int(i)] for i in indices])
                )
        background.close()
    except BaseException:
        background.close(raise_error=False)  # keep the batches already written (resumable)
        raise
    finally:
        bar.close()
        if channels_last:
            network.to(memory_format=torch.contiguous_format)


@dataclass
class _HostBatch:
    """One batch on its way to the store.

    Attributes:
        first_row: store row of the batch's first stimulus.
        ids: the batch's stimulus ids ``(batch,)``.
        blocks: layer -> host copy ``(batch, ...)`` in the storage dtype (pinned memory on CUDA).
        peaks: largest ``|activation|`` of each layer and row ``(n_layers, batch)``, float32,
            computed before the cast to the storage dtype (NaN/inf propagate).
        copied: CUDA event recorded after the copies were queued (``None`` on the CPU).
    """

    first_row: int
    ids: list[str]
    blocks: dict[str, torch.Tensor]
    peaks: torch.Tensor
    copied: torch.cuda.Event | None


def _to_host(
    blocks: dict[str, torch.Tensor], dtype: np.dtype[Any], first_row: int, ids: list[str]
) -> _HostBatch:
    """Queue the copies of ``blocks`` (layer -> ``(batch, ...)`` float32) to the host, cast to the
    storage dtype on the device; on CUDA the copies are asynchronous, into pinned memory, and the
    call returns at once (no synchronisation with the device)."""
    peaks = torch.stack([b.reshape(b.shape[0], -1).abs().amax(dim=1) for b in blocks.values()])
    target = _TORCH_DTYPES[dtype.name]
    device = peaks.device
    if device.type != "cuda":
        host = {name: b.to("cpu", target).contiguous() for name, b in blocks.items()}
        return _HostBatch(first_row, ids, host, peaks.cpu(), None)
    host = {}
    for name, block in blocks.items():
        pinned = torch.empty(block.shape, dtype=target, pin_memory=True)
        host[name] = pinned.copy_(block.to(target), non_blocking=True)
    host_peaks = torch.empty(peaks.shape, dtype=peaks.dtype, pin_memory=True)
    host_peaks.copy_(peaks, non_blocking=True)
    copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
    copied.record(torch.cuda.current_stream(device))  # the copies' stream (cuda:N, not cuda:0)
    return _HostBatch(first_row, ids, host, host_peaks, copied)


#: Largest finite float16 value: larger activations would be stored as inf.
FLOAT16_MAX = float(np.finfo(np.float16).max)


def _check_storable(
    names: Sequence[str], peaks: torch.Tensor, dtype: np.dtype[Any], batch_ids: Sequence[str]
) -> None:
    """Refuse NaN/inf activations and, for float16 storage, values beyond its range.

    ``peaks`` ``(n_layers, batch)``: largest ``|activation|`` per layer (in ``names`` order) and
    row. The first offending layer is reported, with every offending stimulus id.
    """
    for name, peak in zip(names, peaks, strict=True):
        bad = ~torch.isfinite(peak)
        problem = "NaN or infinite activations"
        if not bool(bad.any()) and dtype == np.float16:
            bad = peak > FLOAT16_MAX
            problem = f"activations beyond float16's range ({FLOAT16_MAX:g}; use --dtype float32)"
        if bool(bad.any()):
            rows = [batch_ids[int(i)] for i in torch.nonzero(bad).flatten()]
            raise StoreError(f"layer {name!r}: {problem} for stimulus id(s) {listing(rows)}")


def _project_blocks(
    blocks: dict[str, torch.Tensor],
    dim: int,
    seed: int,
    cache: dict[str, torch.Tensor],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    projected: dict[str, torch.Tensor] = {}
    for name, block in blocks.items():
        in_features = int(np.prod(block.shape[1:], dtype=np.int64))
        if name == VALENCE_LAYER or in_features <= dim:
            projected[name] = block
            continue
        if name not in cache:
            cache[name] = srp_matrix(in_features, dim, seed=seed, layer=name, device=device)
        projected[name] = project(block, cache[name])
    return projected


def _srp_attrs(
    dim: int, seed: int, arrays: dict[str, np.ndarray], projections: dict[str, torch.Tensor]
) -> dict[str, Any]:
    return {
        "dim": dim,
        "seed": seed,
        "centred": True,
        "projected_layers": sorted(projections),
        "unprojected_layers": sorted(set(arrays) - set(projections)),
    }


def discard_partial(out: str | Path) -> None:
    """Delete the temporary file of an interrupted extraction (start afresh next time)."""
    partial_path(Path(out)).unlink(missing_ok=True)
