"""Batched activation extraction into an activation store.

One forward pass per batch records every requested layer through :class:`LayerRecorder`; the
batch's activations are written to ``<out>.partial`` and dropped before the next batch, so memory
is bounded by one batch whatever the number of stimuli. The store is renamed to ``<out>`` and
marked complete only at the end; an interrupted run (Ctrl-C, crash, killed job) resumes from the
last written batch when the same command is run again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from object2brain._version import __version__
from object2brain.data.images import load_image
from object2brain.data.stimuli import StimulusSet, load_stimuli
from object2brain.devices import resolve_device
from object2brain.errors import StimulusError, StoreError
from object2brain.manifest import build_manifest, file_sha256
from object2brain.models.layers import VALENCE_LAYER, LayerRecorder, resolve_layers
from object2brain.models.zoo import LoadedModel, Preprocessing, load_model
from object2brain.projection import project, srp_matrix
from object2brain.store import (
    ActivationStore,
    StoreWriter,
    check_writable,
    partial_path,
    write_json,
)

log = logging.getLogger("object2brain.extract")

StorageDtype = Literal["float32", "float16"]
_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
}


class ImageDataset(Dataset[tuple[int, torch.Tensor, str]]):
    """Stimulus images as model inputs: item ``i`` is ``(i, image (3, crop, crop), error)``.

    Decoding errors are returned as text (``error``) rather than raised, so the main process can
    report the stimulus id and path in one clear message, whichever worker hit them.
    """

    def __init__(self, paths: Sequence[Path], ids: Sequence[str], preprocessing: Preprocessing):
        self.paths = list(paths)
        self.ids = list(ids)
        self.crop = preprocessing.crop_size
        self.transform = preprocessing.transform()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str]:
        try:
            return index, self.transform(load_image(self.paths[index])), ""
        except Exception as exc:  # any decoder failure is reported with its stimulus
            message = f"{self.ids[index]} ({self.paths[index]}): {type(exc).__name__}: {exc}"
            return index, torch.zeros(3, self.crop, self.crop), message


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
        num_workers: image-decoding worker processes (default: up to 4, fewer on small sets).
        overwrite: replace an existing store at ``out`` written by another run (a complete store
            of this very run is always reused as it is).
        progress: show a progress bar.

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
    stimulus_set = stimuli if isinstance(stimuli, StimulusSet) else load_stimuli(stimuli)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, weights, seed=seed)
    layer_names = resolve_layers(loaded, layers)
    torch_device = resolve_device(device)
    check_writable(out)

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
    fingerprint = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()

    if out.exists():
        if _same_complete_store(out, fingerprint):
            log.info("%s is already complete for this model, layers and stimuli", out)
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
        )
        path = writer.finish()
    finally:
        writer.close()

    inputs = {"stimuli_fingerprint": stimulus_set.fingerprint(), "weights": loaded.weights_sha256}
    if stimulus_set.source is not None and stimulus_set.source.is_file():
        inputs["stimulus_table"] = file_sha256(stimulus_set.source)
    write_json(
        manifest_path(path),
        build_manifest(
            "extract",
            {k: v for k, v in config.items() if k != "stimulus_ids"}
            | {"out": str(path), "batch_size": batch_size, "device": str(torch_device)},
            seeds={"seed": seed},
            inputs=inputs,
            outputs=[str(path)],
            extra={"n_stimuli": len(stimulus_set), "seconds": round(time.time() - started, 3)},
        ),
    )
    return path


def manifest_path(store: Path) -> Path:
    """``acts.h5`` -> ``acts.manifest.json``."""
    return store.with_name(store.stem + ".manifest.json")


def _same_complete_store(path: Path, fingerprint: str) -> bool:
    try:
        with ActivationStore.open(path) as store:
            return bool(store.attrs.get("fingerprint") == fingerprint)
    except StoreError:
        return False


def _default_workers(n_remaining: int, batch_size: int) -> int:
    if n_remaining <= batch_size:
        return 0  # start-up of worker processes would cost more than it saves
    return min(4, os.cpu_count() or 1)


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
) -> None:
    from tqdm.auto import tqdm

    n, start = len(stimuli), writer.n_done
    if start >= n:
        return
    dataset = ImageDataset(stimuli.paths[start:], stimuli.ids[start:], loaded.preprocessing)
    workers = _default_workers(n - start, batch_size) if num_workers is None else num_workers
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    network = loaded.module.to(device).eval()
    projections: dict[str, torch.Tensor] = {}
    bar = tqdm(total=n, initial=start, disable=not progress, unit="img", desc="extract")
    try:
        with LayerRecorder(network, layer_names) as recorder, torch.inference_mode():
            for indices, images, errors in loader:
                failed = [e for e in errors if e]
                if failed:
                    raise StimulusError(
                        f"{len(failed)} image(s) could not be decoded: {'; '.join(failed)}"
                    )
                recorder.reset()
                output = network(images.to(device, non_blocking=True))
                blocks = dict(recorder.outputs)
                if loaded.has_head:
                    blocks[VALENCE_LAYER] = output.reshape(output.shape[0], -1)[:, 0]
                if srp is not None:
                    blocks = _project_blocks(blocks, srp, seed, projections, device)
                arrays = {
                    name: block.to("cpu").numpy().astype(dtype, copy=False)
                    for name, block in blocks.items()
                }
                for name, array in arrays.items():
                    writer.ensure_layer(name, n, tuple(array.shape[1:]), dtype)
                if writer.n_done == 0:
                    order = [*recorder.order, *([VALENCE_LAYER] if loaded.has_head else [])]
                    writer.set_attr("order", order)
                    if srp is not None:
                        writer.set_attr("srp", _srp_attrs(srp, seed, arrays, projections))
                writer.write_rows(start + int(indices[0]), arrays)
                bar.update(len(indices))
    finally:
        bar.close()


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
