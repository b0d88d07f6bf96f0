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
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from object2brain._version import __version__
from object2brain.activations.projection import project, srp_matrix
from object2brain.activations.store import (
    ActivationStore,
    BackgroundWriter,
    StoreWriter,
    partial_path,
)
from object2brain.data.ratings import load_predicted_valence
from object2brain.data.stimuli import StimulusSet, load_stimuli
from object2brain.devices import resolve_device
from object2brain.errors import LayerError, StoreError, listing
from object2brain.io import check_writable, write_json
from object2brain.manifest import build_manifest, cached_file_sha256, file_sha256
from object2brain.models.inputs import (
    DECODE_MODES,
    DecodeMode,
    image_loader,
    model_inputs,
    uses_device_decoding,
)
from object2brain.models.layers import VALENCE_LAYER, LayerRecorder, resolve_layers
from object2brain.models.zoo import LoadedModel, load_model

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("object2brain.activations.extract")

StorageDtype = Literal["float32", "float16"]
AmpDtype = Literal["bfloat16", "float16"]
AMP_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
}
_TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}


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
            (see :mod:`object2brain.activations.projection`).
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
