"""Batched activation extraction into an activation store: a streaming stage.

Most stages are resolve -> compute -> write, with ``compute`` returning its whole result in
memory. An activation store does not fit in memory (25,000 images x a VGG16 conv layer is
hundreds of GB), so here *compute* and *write* interleave batch by batch, and the shape becomes:

- **resolve** (:func:`object2brain.api.extract.extract`): load the model, the stimuli and any
  supplied valence; validate the options (:class:`~object2brain.options.ExtractOptions`);
- **plan** (:func:`plan_extraction`, pure apart from one probing forward pass): the layers, the
  device, the decoding path and the store's fingerprint, as an :class:`ExtractionPlan`;
- **stream** (:func:`run_extraction`): compute one batch, hand it to the writer, compute the next.

One forward pass per batch records every requested layer through :class:`LayerRecorder`; the
batch's activations are copied to the host and written to ``<out>.partial`` on a writer thread
(:class:`~object2brain.activations.store.BackgroundWriter`) while the next batch is computed, so at
most three batches' activations are held (one computed, one waiting, one being written) whatever
the number of stimuli; on a CPU with two or more threads, two batches are computed side by side
(:func:`cpu_lanes`: one lane per batch, each with half the intra-op threads, bit for bit the values
of one batch at a time; float32 networks without others' hooks only), so at most five. The partial
file records how many rows are written (``n_done``, raised in the flush and sync that commit a
batch's rows; each row is checked by its digest on resume); the store is renamed to ``<out>`` and
marked complete only at the end, so an interrupted run (Ctrl-C, crash, killed job, full disk)
resumes from the last written batch when the same command is run again. One run at a time writes
``<out>``: a second one is refused by the lock. The manifest (``<store stem>.manifest.json``) is
written last.

Speed options (float32 values unless stated; all but ``channels_last`` off by default):

- ``amp="bfloat16"|"float16"``: the forward pass runs under ``torch.autocast`` (mixed
  precision); activations are converted back to float32 before storage. Faster on tensor-core
  GPUs, but values differ from float32 by the precision of that type (bf16: ~3 significant
  digits), so leave it off for numbers that are compared across runs.
- ``channels_last`` (default ``True``; ``False``: the contiguous layout): network and inputs in
  NHWC memory format (faster convolutions on tensor cores and on CPUs: on 2 Xeon cores resnet18's
  forward pass takes ~20% less CPU time); values are those of the contiguous layout up to float
  rounding (~3e-6 of a layer's largest value over the zoo's networks; tested: 1e-5). It is not
  part of the store's fingerprint.
- ``fold_batchnorm=True``: eval-mode batch norms folded into the convolutions before them
  (:mod:`object2brain.models.fusion`; the loaded model is not changed); values equal up to float
  rounding (~2e-6 of a layer's largest value on resnet18), part of the store's fingerprint.
- ``quantize="int8"`` (CPU only): post-training static int8 quantization
  (:mod:`object2brain.models.quantize`: torch.ao FX, x86 backend, calibrated on the first 64
  stimuli by id, whatever the chunk, shard or worker count); recorded layers are dequantized to
  float32 at their hooks under the same module names. Values differ from float32 by a few % of
  a layer's largest value (``docs/methods.md``); the mode, backend and calibration set are part
  of the store's fingerprint. The calibration is cached (:func:`int8_cache_path`), so a rerun or
  a Ray shard converts the cached observers instead of calibrating (the same network).
- ``decode="torch"`` (or ``"auto"`` = ``torch`` on CUDA): plain JPEG files are decoded on the
  compute device (:mod:`object2brain.models.inputs`). Different decoders and resamplers differ by
  about one 8-bit level per pixel; the ``decode`` mode is part of the store's fingerprint.
- Pinned host memory and non-blocking host-to-device copies are used on CUDA.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from object2brain.data.image_array import is_array_file
from object2brain.data.stimuli import StimulusSet
from object2brain.devices import resolve_device
from object2brain.errors import LayerError, StoreError, listing
from object2brain.io import disk_errors, output_lock, write_json
from object2brain.manifest import build_manifest, cached_file_sha256, file_sha256
from object2brain.models import timing
from object2brain.models.fusion import fold_batchnorm
from object2brain.models.image_cache import ImageCache
from object2brain.models.inputs import image_batches, uses_device_decoding
from object2brain.models.layers import VALENCE_LAYER, LayerRecorder, resolve_layers
from object2brain.models.quantize import (
    CALIBRATION_BATCH,
    calibration_ids,
    calibration_key,
    load_calibration,
    quantization_config,
    quantize_int8,
    save_calibration,
)
from object2brain.models.zoo import LoadedModel
from object2brain.options import AmpDtype, ExtractOptions, Runtime, StorageDtype

log = logging.getLogger("object2brain.activations.extract")

__all__ = [
    "AmpDtype",
    "ExtractionPlan",
    "StorageDtype",
    "discard_partial",
    "int8_cache_beside",
    "int8_cache_path",
    "manifest_path",
    "plan_extraction",
    "plan_network",
    "probe_layers",
    "run_extraction",
    "write_manifest",
]

AMP_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
}
_TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}


def probe_layers(loaded: LoadedModel, layer_names: Sequence[str], device: torch.device) -> None:
    """One forward pass of a blank image, before any file is created: a module that runs more
    than once per pass, returns no tensor or does not run at all fails here, not mid-run.

    The pass runs on fake tensors (:class:`torch._subclasses.fake_tensor.FakeTensorMode`: shapes
    and types, no arithmetic), which costs ~0.05 CPU-s where a real one-image pass of resnet18
    costs ~0.9 on a 2-core CPU; a network fake tensors cannot run (data-dependent shapes, custom
    kernels) is probed by a real pass."""
    crop = loaded.preprocessing.crop_size
    network = loaded.module.to(device).eval()
    try:
        silent = _probe_pass(network, layer_names, (1, 3, crop, crop), device, fake=True)
    except LayerError:
        raise
    except Exception as exc:  # what fake tensors do not support: probe for real
        log.debug("fake-tensor probe failed (%s); probing with a real forward pass", exc)
        silent = _probe_pass(network, layer_names, (1, 3, crop, crop), device, fake=False)
    if silent:
        raise LayerError(
            f"module(s) {', '.join(silent)} of {loaded.name} did not run in a forward pass; "
            "choose modules on the path from the image to the output"
        )


def _probe_pass(
    network: torch.nn.Module,
    layer_names: Sequence[str],
    shape: tuple[int, ...],
    device: torch.device,
    *,
    fake: bool,
) -> list[str]:
    """The layers of ``layer_names`` that gave no output in one forward pass of zeros."""
    mode: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
    with LayerRecorder(network, layer_names) as recorder, mode, torch.inference_mode():
        network(torch.zeros(shape, device=device))
        return [name for name in layer_names if name not in recorder.outputs]


@dataclass(frozen=True)
class ExtractionPlan:
    """Everything an extraction run needs, resolved (:func:`plan_extraction`).

    Attributes:
        loaded: the model (with its head, if any).
        stimuli: the stimuli, in store row order.
        layers: dotted names of the recorded modules, in the order asked for.
        options: the validated options.
        runtime: seed (of the projection matrices), device string, progress bars.
        device: the compute device.
        on_device_decode: plain JPEGs decoded on ``device`` (``decode`` resolved).
        valence: supplied predicted valence ``(n_stimuli,)`` float, stored as layer ``valence``
            instead of the head's output; ``None``: the head's output (if there is a head).
        config: the store's settings (model description, layers, dtype, srp, seed, stimuli),
            recorded in its manifest.
        fingerprint: SHA-256 of what the store holds, by content (weights, head, image bytes,
            settings that change stored values): a complete store with the same fingerprint is
            reused, a partial one resumed.
        image_cache: the decoded-image cache (``options.image_cache``), or ``None``; it changes
            no stored value, so it is not part of the fingerprint.
        calibration: with ``quantize="int8"``, the calibration stimuli (the first of the whole
            set by id; kept as they are in the plan of a shard or a resumed run), else ``None``.
        calibration_cache: with ``quantize="int8"`` and no ``image_cache``, the file caching
            the calibration (:func:`int8_cache_path`); ``None``: beside the store being written
            (``<out>.int8.safetensors``). Set to the final store's by ``o2b.extract``, so the
            shards of a Ray run share it.
    """

    loaded: LoadedModel
    stimuli: StimulusSet
    layers: list[str]
    options: ExtractOptions
    runtime: Runtime
    device: torch.device
    on_device_decode: bool
    valence: np.ndarray | None
    config: dict[str, Any] = field(repr=False)
    fingerprint: str
    image_cache: ImageCache | None = field(default=None, repr=False)
    calibration: StimulusSet | None = field(default=None, repr=False)
    calibration_cache: Path | None = field(default=None, repr=False)

    @property
    def storage_dtype(self) -> np.dtype[Any]:
        return _NUMPY_DTYPES[self.options.dtype]

    def store_attrs(self) -> dict[str, Any]:
        """File attributes of a new store (``order``, ``srp``, ``complete`` come later)."""
        loaded = self.loaded
        attrs: dict[str, Any] = {
            "model": loaded.name,
            "arch": loaded.arch,
            "weights": loaded.weights,
            "weights_sha256": loaded.weights_sha256,
            "preprocessing": loaded.preprocessing.to_dict(),
            "object2brain_version": __version__,
            "head": loaded.head,
            "dtype": self.options.dtype,
        }
        if self.valence is not None or loaded.has_head:
            attrs["valence_source"] = "supplied" if self.valence is not None else "head"
        return attrs


def plan_extraction(
    loaded: LoadedModel,
    stimuli: StimulusSet,
    layers: str | Sequence[str],
    options: ExtractOptions,
    runtime: Runtime,
    *,
    valence: np.ndarray | None = None,
    probe: bool = True,
) -> ExtractionPlan:
    """Resolve the layers (``all`` or names), the device and the decoding path, probe the layers
    with one blank forward pass (unless ``probe`` is False: a store written from another
    extraction's layers, :mod:`object2brain.pipeline.backbone`), and fingerprint the store-to-be.

    Raises:
        LayerError: an unknown layer, or a module that does not run once per forward pass.
    """
    layer_names = resolve_layers(loaded, layers)
    device = resolve_device(runtime.device)
    _check_quantize(options, device)
    if probe:
        probe_layers(loaded, layer_names, device)
    on_device_decode = uses_device_decoding(options.decode, device)
    config: dict[str, Any] = {
        **loaded.describe(),
        "layers": layer_names,
        "valence": loaded.has_head,
        "dtype": options.dtype,
        "srp": options.srp,
        "seed": runtime.seed,
        "stimulus_ids": stimuli.ids,
        "stimuli": stimuli.fingerprint(),
    }
    # Only options that change stored values, and only when not at their default, so stores
    # written before these options existed keep their fingerprint.
    if options.amp is not None:
        config["amp_dtype"] = options.amp
    if options.fold_batchnorm:
        config["fold_batchnorm"] = True
    if on_device_decode:
        config["decode"] = "torch"
    calibration = None
    if options.quantize != "none":
        config["quantize"] = quantization_config(stimuli.ids)
        calibration = stimuli.subset(calibration_ids(stimuli.ids))
    if valence is not None:
        config["valence"] = "supplied"
        config["valence_sha256"] = hashlib.sha256(valence.tobytes()).hexdigest()
    # What the store holds, by content: weights and head by SHA-256 and images by their bytes,
    # not by path, so a study moved to another folder or machine keeps its stores.
    identity = {k: v for k, v in config.items() if k not in ("weights", "head")}
    identity["head_sha256"] = cached_file_sha256(loaded.head["path"]) if loaded.head else None
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    cache = None
    if options.image_cache is not None:
        cache = ImageCache(options.image_cache, loaded.preprocessing)
    return ExtractionPlan(
        loaded, stimuli, layer_names, options, runtime, device, on_device_decode, valence,
        config, fingerprint, cache, calibration,
    )  # fmt: skip


def _check_quantize(options: ExtractOptions, device: torch.device) -> None:
    """``quantize`` runs on the CPU only and in float32 (not with ``amp``)."""
    if options.quantize == "none":
        return
    if device.type != "cpu":
        raise StoreError(
            f"extract: --quantize {options.quantize} runs on the CPU only (device {device}); "
            "use --device cpu, or --amp bfloat16|float16 for a faster GPU pass"
        )
    if options.amp is not None:
        raise StoreError(
            f"extract: --quantize {options.quantize} and --amp {options.amp} exclude each other"
        )


def run_extraction(plan: ExtractionPlan, out: Path, *, overwrite: bool = False) -> Path:
    """Stream the plan's activations into the store ``out`` and write its manifest.

    A complete store of this very plan (same fingerprint) is reused as it is; a partial one is
    resumed from its last written batch; another run's store is replaced only with
    ``overwrite``.

    Only one run writes ``out`` at a time: its lock (:func:`object2brain.io.output_lock`) is taken
    before anything is opened for writing, and the parent folder of ``out`` is created.

    Returns:
        The path of the complete store.

    Raises:
        StoreError: ``out`` holds another run's store (without ``overwrite``), activations that
            cannot be stored (NaN/inf, beyond float16's range), another run holds the lock, or a
            write failed (``No space left on device``: the batches before it are kept).
    """
    with output_lock(out), disk_errors(out):
        return _run_locked(plan, out, overwrite=overwrite)


def _run_locked(plan: ExtractionPlan, out: Path, *, overwrite: bool) -> Path:
    """:func:`run_extraction` under the lock of ``out``."""
    started = time.time()
    if out.exists():
        if _same_complete_store(out, plan.fingerprint):
            log.info("%s is already complete for this model, layers and stimuli", out)
            if not manifest_path(out).is_file():  # stopped between the store and its manifest
                write_manifest(plan, out, seconds=None)
            return out
        if not overwrite:
            raise StoreError(f"{out}: already exists (from another run); pass --overwrite")
    writer = StoreWriter.resume(out, plan.fingerprint)
    if writer is not None:
        log.info("resuming %s at stimulus %d of %d", out, writer.n_done, len(plan.stimuli))
    else:
        writer = StoreWriter.create(out, plan.stimuli.ids, plan.store_attrs(), plan.fingerprint)
    try:
        _run_batches(plan, writer)
        path = writer.finish()
    finally:
        writer.close()
    write_manifest(plan, path, seconds=round(time.time() - started, 3))
    return path


def write_manifest(plan: ExtractionPlan, path: Path, *, seconds: float | None) -> Path:
    """``<store>.manifest.json`` of the store ``path`` written for ``plan`` (``seconds`` None: the
    store was completed by an earlier run)."""
    stimuli, loaded, options = plan.stimuli, plan.loaded, plan.options
    inputs = {"stimuli_fingerprint": plan.config["stimuli"], "weights": loaded.weights_sha256}
    # an image array (tens of GB) enters through the stimulus fingerprint (its rows' pixels)
    source = stimuli.source
    if source is not None and source.is_file() and not is_array_file(source):
        inputs["stimulus_table"] = file_sha256(source)
    return write_json(
        manifest_path(path),
        build_manifest(
            "extract",
            {k: v for k, v in plan.config.items() if k != "stimulus_ids"}
            | {
                "out": str(path),
                "batch_size": options.batch_size,
                "device": str(plan.device),
                "channels_last": options.channels_last,
                "decode": "torch" if plan.on_device_decode else "pil",
                "image_cache": None if options.image_cache is None else str(options.image_cache),
            },
            seeds={"seed": plan.runtime.seed},
            inputs=inputs,
            outputs=[str(path)],
            extra={"n_stimuli": len(stimuli), "seconds": seconds},
        ),
    )


_write_manifest = write_manifest  # the name the Ray executor imports


def manifest_path(store: Path) -> Path:
    """``acts.h5`` -> ``acts.manifest.json``."""
    return store.with_name(store.stem + ".manifest.json")


def _same_complete_store(path: Path, fingerprint: str) -> bool:
    try:
        with ActivationStore.open(path) as store:
            return bool(store.attrs.get("fingerprint") == fingerprint)
    except StoreError:
        return False


def _run_batches(plan: ExtractionPlan, writer: StoreWriter) -> None:
    """Write the rows from ``writer.n_done`` on: batches computed here, stored on the writer
    thread (:class:`_BatchStore`)."""
    from tqdm.auto import tqdm

    n, start = len(plan.stimuli), writer.n_done
    if start >= n:
        return
    loaded, device, options = plan.loaded, plan.device, plan.options
    ids = plan.stimuli.ids[start:]
    batches = image_batches(
        plan.stimuli.paths[start:],
        ids,
        loaded.preprocessing,
        device=device,
        batch_size=options.batch_size,
        num_workers=options.num_workers,
        on_device_decode=plan.on_device_decode,
        cache=plan.image_cache,
    )
    network = plan_network(plan, writer.path)
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
    reformat = options.channels_last and options.quantize == "none"  # int8: the inputs only
    if reformat:
        network.to(memory_format=torch.channels_last)
    bar = tqdm(total=n, initial=start, disable=not plan.runtime.progress, unit="img",
               desc="extract")  # fmt: skip
    sink = _BatchStore(plan, writer, bar.update)
    background: BackgroundWriter[_HostBatch] = BackgroundWriter(sink.store, depth=1)
    try:
        # recorded outputs copied straight into the stored (contiguous) layout: with
        # channels_last (or int8's NHWC taps) one copy instead of a copy and a transposition
        recorder = LayerRecorder(network, plan.layers, memory_format=torch.contiguous_format)
        compute = _BatchCompute(plan, network, recorder, memory_format, sink.projections, start,
                                ids)  # fmt: skip
        # one batch at a time for int8 (lanes are measured on float32 only) and for a network
        # hooked by someone else (e.g. the study's head-input capture), whose hooks may expect
        # the batches one after the other, in order
        lanes = 1 if options.quantize != "none" or has_forward_hooks(network) else cpu_lanes(device)
        with recorder:
            for host in in_lanes(compute, batches, lanes):
                if not sink.order:
                    sink.order.extend(
                        [*recorder.order,
                         *([VALENCE_LAYER] if VALENCE_LAYER in host.blocks else [])]
                    )  # fmt: skip
                background.put(host)
        background.close()
    except BaseException:
        background.close(raise_error=False)  # keep the batches already written (resumable)
        raise
    finally:
        bar.close()
        if reformat:
            network.to(memory_format=torch.contiguous_format)


#: Most CPU lanes (:func:`cpu_lanes`); 1 turns them off (benchmarks compare the two).
MAX_CPU_LANES = 2


def cpu_lanes(device: torch.device) -> int:
    """Batches computed at once on ``device``: on the CPU, with at least two intra-op threads,
    :data:`MAX_CPU_LANES` (each lane runs whole batches with its share of the threads); else 1.

    Why: on few cores one forward pass over all threads spends much of its time at the barriers
    of each operator, and spins there while the decoding and writing threads hold a core; two
    batches side by side with one thread each do the same arithmetic (bit for bit on resnet18:
    each output is reduced within one thread either way) without barriers. Measured on 2 shared
    cores (``benchmarks/cpu_lanes.py``, load 3.3, channels_last): 1.68 CPU-s per resnet18 batch
    of 32 over two threads, 1.16 as two one-thread lanes; end to end near idle 3-14% more images
    per second than one lane (docs/performance.md). Extraction uses them for float32 networks only
    (``quantize="int8"`` computes one batch at a time: its rate was not shown to gain)."""
    if device.type != "cpu" or torch.get_num_threads() < 2:
        return 1
    return max(1, min(MAX_CPU_LANES, torch.get_num_threads()))


def has_forward_hooks(network: torch.nn.Module) -> bool:
    """Whether a forward (pre-)hook is registered on ``network``, one of its modules, or for every
    module (``torch.nn.modules.module.register_module_forward_hook``)."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._forward_hooks_with_kwargs
        for m in network.modules()
    )


def in_lanes(
    compute: Callable[[torch.Tensor, torch.Tensor], _HostBatch],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    lanes: int,
) -> Iterator[_HostBatch]:
    """``compute(indices, inputs)`` of every batch of ``batches``, yielded in batch order.

    ``lanes`` 1: one batch after the other in this thread. More: on ``lanes`` threads with
    ``torch.get_num_threads() // lanes`` intra-op threads each, at most ``lanes`` batches computed
    at once and one more waiting, so a lane that finishes starts the next batch at once; this
    thread meanwhile takes the next batch from ``batches`` and hands the results on in order.
    The intra-op thread count is a process-wide setting in torch (threads started later inherit
    the last one set): it is restored when the lanes stop. An error in a lane is raised here at
    its batch; the batches queued behind it are cancelled, those running are waited for. An error
    of ``batches`` (an image that cannot be decoded) is raised after the batches before it."""
    if lanes <= 1:
        with torch.inference_mode():
            for indices, inputs in batches:
                yield compute(indices, inputs)
        return
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    threads = torch.get_num_threads()
    per_lane = max(1, threads // lanes)

    def run(indices: torch.Tensor, inputs: torch.Tensor) -> _HostBatch:
        if torch.get_num_threads() != per_lane:  # per thread (OpenMP), set once per lane
            torch.set_num_threads(per_lane)
        with torch.inference_mode():  # thread-local, as autocast
            return compute(indices, inputs)

    pool = ThreadPoolExecutor(lanes, thread_name_prefix="o2b-lane")
    pending: deque[Future[_HostBatch]] = deque()
    failed: Exception | None = None
    try:
        while True:
            try:
                batch = next(batches, None)
            except Exception as exc:  # e.g. an image that cannot be decoded: the batches before
                failed = exc  # it are finished and handed on first (written: a rerun resumes)
                break
            if batch is None:
                break
            pending.append(pool.submit(run, *batch))
            if len(pending) > lanes:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
        if failed is not None:
            raise failed
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)
        torch.set_num_threads(threads)


class _BatchCompute:
    """One batch through the network, on whichever thread calls it: forward pass with the
    recorder's hooks, the layers' blocks (and valence), the projection (``srp``) and the host
    copy in the storage dtype (:func:`_to_host`)."""

    def __init__(
        self,
        plan: ExtractionPlan,
        network: torch.nn.Module,
        recorder: LayerRecorder,
        memory_format: torch.memory_format,
        projections: dict[str, torch.Tensor],
        start: int,
        ids: Sequence[str],
    ) -> None:
        self.plan, self.network, self.recorder = plan, network, recorder
        self.memory_format, self.projections = memory_format, projections
        self.start, self.ids = start, ids
        self._lock = threading.Lock()  # the projection matrices are made once

    def __call__(self, indices: torch.Tensor, inputs: torch.Tensor) -> _HostBatch:
        plan, device, options = self.plan, self.plan.device, self.plan.options
        self.recorder.reset()
        with timing.stage("forward", device), _autocast(device, options.amp):
            output = self.network(inputs.contiguous(memory_format=self.memory_format))
        blocks = _batch_blocks(plan, self.recorder.outputs, output,
                               self.start + indices.numpy())  # fmt: skip
        self.recorder.reset()  # the host copy below holds them
        if options.srp is not None:
            blocks = _project_blocks(blocks, options.srp, plan.runtime.seed, self.projections,
                                     device, self._lock)  # fmt: skip
        rows = [self.ids[int(i)] for i in indices]
        with timing.stage("copy", device):
            return _to_host(blocks, plan.storage_dtype, self.start + int(indices[0]), rows)


def plan_network(plan: ExtractionPlan, out: Path) -> torch.nn.Module:
    """The plan's network on its device in eval mode; with ``fold_batchnorm`` a copy with its
    batch norms folded into the convolutions (:func:`~object2brain.models.fusion.fold_batchnorm`;
    convolutions whose own output is recorded are kept as they are); with ``quantize`` its int8
    copy (calibration cached for the store ``out``: :func:`int8_cache_path`)."""
    network = plan.loaded.module.to(plan.device).eval()
    if plan.options.fold_batchnorm:
        network, count = fold_batchnorm(network, keep=plan.layers)
        log.info("folded %d batch norms of %s into their convolutions", count, plan.loaded.name)
    if plan.options.quantize == "int8":
        _check_quantize(plan.options, plan.device)  # a Ray node's device may differ
        network = _int8_network(plan, network, out)
    return network


def int8_cache_path(plan: ExtractionPlan, out: Path, key: str) -> Path:
    """Where the int8 calibration of key ``key`` is cached: in the decoded-image cache folder
    (``image_cache``) as ``int8-<key>.safetensors`` (shared by every store calibrated on the same
    network, layers and images), else ``plan.calibration_cache``, else beside the store ``out``
    as ``<out>.int8.safetensors`` (one file per store, replaced when the key changes)."""
    if plan.options.image_cache is not None:
        return Path(plan.options.image_cache).expanduser() / f"int8-{key[:32]}.safetensors"
    if plan.calibration_cache is not None:
        return plan.calibration_cache
    return int8_cache_beside(out)


def int8_cache_beside(out: Path) -> Path:
    """The int8 calibration cache beside the store ``out``: ``<out>.int8.safetensors``."""
    return out.with_name(out.name + ".int8.safetensors")


def _int8_network(plan: ExtractionPlan, network: torch.nn.Module, out: Path) -> torch.nn.Module:
    """``network`` quantized to int8 (:func:`~object2brain.models.quantize.quantize_int8`),
    calibrated on ``plan.calibration`` decoded as every other image, in batches of
    :data:`~object2brain.models.quantize.CALIBRATION_BATCH`, or with the observers of an earlier
    calibration of the same key (:func:`int8_cache_path`; the same network bit for bit)."""
    calibration = plan.calibration
    assert calibration is not None  # set by plan_extraction with quantize
    started = time.perf_counter()
    with timing.stage("quantize"):  # decoding the calibration images included
        preprocessing = {**plan.loaded.preprocessing.to_dict(),
                         "decode": "torch" if plan.on_device_decode else "pil"}  # fmt: skip
        key = calibration_key(network, plan.layers, calibration.fingerprint(), preprocessing)
        cache = int8_cache_path(plan, out, key)
        observers = load_calibration(cache, key)
        if observers is not None:
            crop = plan.loaded.preprocessing.crop_size
            try:
                quantized = quantize_int8(network, plan.layers, None, observers=observers,
                                          input_shape=(1, 3, crop, crop))  # fmt: skip
            except LayerError as exc:  # same key, other observers (a cache of another version)
                log.warning("int8 calibration cache %s: %s; calibrating again", cache, exc)
            else:
                log.info("int8 calibration of %s read from %s", plan.loaded.name, cache)
                return quantized
        batches = image_batches(
            calibration.paths, calibration.ids, plan.loaded.preprocessing, device=plan.device,
            batch_size=CALIBRATION_BATCH, num_workers=0, on_device_decode=plan.on_device_decode,
            cache=plan.image_cache,
        )  # fmt: skip
        # decoded before tracing: torch.fx patches nn.Module.__call__ process-wide while it
        # traces, which breaks the transforms of a decoding thread
        inputs = [batch for _, batch in batches]
        quantized = quantize_int8(network, plan.layers, inputs)
        save_calibration(cache, key, quantized.observers)
    log.info("quantized %s to int8 on %d calibration images in %.1f s", plan.loaded.name,
             len(calibration), time.perf_counter() - started)  # fmt: skip
    return quantized


def _autocast(device: torch.device, amp: AmpDtype | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to ``amp`` on ``device``, or nothing (float32)."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def _batch_blocks(
    plan: ExtractionPlan,
    recorded: dict[str, torch.Tensor],
    output: torch.Tensor,
    rows: np.ndarray,
) -> dict[str, torch.Tensor]:
    """Layer -> ``(batch, ...)`` float32 of one batch, plus layer ``valence`` ``(batch,)``: the
    supplied predictions of store rows ``rows`` or the head's output ``output[:, 0]``."""
    blocks = {name: block.float() for name, block in recorded.items()}
    if plan.valence is not None:
        supplied = plan.valence[np.asarray(rows, dtype=np.int64)]
        blocks[VALENCE_LAYER] = torch.from_numpy(supplied).float().to(plan.device)
    elif plan.loaded.has_head:
        blocks[VALENCE_LAYER] = output.reshape(output.shape[0], -1)[:, 0].float()
    return blocks


class _BatchStore:
    """The writer thread's side: checks a batch and writes it at its rows.

    ``order`` (layer names in network order) and ``projections`` (layer -> SRP matrix) are filled
    by the computing side before the first batch is queued; they are written as the store's
    ``order`` and ``srp`` attributes with the first rows.
    """

    def __init__(self, plan: ExtractionPlan, writer: StoreWriter, advance: Any) -> None:
        self.plan = plan
        self.writer = writer
        self.advance = advance
        self.order: list[str] = []
        self.projections: dict[str, torch.Tensor] = {}

    def store(self, batch: _HostBatch) -> None:
        with timing.stage("write"):
            self._store(batch)

    def _store(self, batch: _HostBatch) -> None:
        plan, writer, dtype = self.plan, self.writer, self.plan.storage_dtype
        if batch.copied is not None:
            batch.copied.synchronize()
        _check_storable(list(batch.blocks), batch.peaks, dtype, batch.ids, batch.blocks)
        arrays = {name: block.numpy() for name, block in batch.blocks.items()}
        for name, array in arrays.items():
            writer.ensure_layer(name, len(plan.stimuli), tuple(array.shape[1:]), dtype,
                                plan.options.batch_size)  # fmt: skip
        if writer.n_done == 0:
            writer.set_attr("order", self.order)
            if plan.options.srp is not None:
                srp = _srp_attrs(plan.options.srp, plan.runtime.seed, arrays, self.projections)
                writer.set_attr("srp", srp)
        writer.write_rows(batch.first_row, arrays)
        self.advance(len(batch.ids))


@dataclass
class _HostBatch:
    """One batch on its way to the store.

    Attributes:
        first_row: store row of the batch's first stimulus.
        ids: the batch's stimulus ids ``(batch,)``.
        blocks: layer -> host copy ``(batch, ...)`` in the storage dtype (pinned memory on CUDA).
        peaks: largest ``|activation|`` of each layer, float32, computed before the cast to the
            storage dtype (NaN/inf propagate): ``(n_layers, 1)`` over the whole batch for
            float32 storage, ``(n_layers, batch)`` per row for float16 (:func:`_to_host`).
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
    call returns at once (no synchronisation with the device).

    The values are checked (:func:`_check_storable`) by their largest ``|value|``: per layer over
    the whole batch for float32 storage (a NaN or inf anywhere makes it non-finite; one pass at
    memory speed, 0.013-0.019 CPU-s per batch of 32 resnet18 images vs 0.065-0.077 per row), per
    row for float16, whose range check needs the float32 values of each row before the cast."""
    per_row = dtype != np.float32
    peaks = torch.stack([_peak(b, per_row=per_row) for b in blocks.values()])
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


def _peak(block: torch.Tensor, *, per_row: bool = True) -> torch.Tensor:
    """Largest ``|value|`` of each row of ``block`` ``(batch, ...)`` -> ``(batch,)``, or of the
    whole block -> ``(1,)`` (``per_row`` false); NaN if any is NaN; in one pass without a
    temporary ``abs`` copy."""
    if not per_row:
        low, high = torch.aminmax(block)
        return torch.maximum(-low, high).reshape(1)
    low, high = torch.aminmax(block.reshape(block.shape[0], -1), dim=1)
    return torch.maximum(-low, high)


#: Largest finite float16 value: larger activations would be stored as inf.
FLOAT16_MAX = float(np.finfo(np.float16).max)


def _check_storable(
    names: Sequence[str],
    peaks: torch.Tensor,
    dtype: np.dtype[Any],
    batch_ids: Sequence[str],
    blocks: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Refuse NaN/inf activations and, for float16 storage, values beyond its range.

    ``peaks`` ``(n_layers, batch)``: largest ``|activation|`` per layer (in ``names`` order) and
    row; or ``(n_layers, 1)``: per layer over the batch (float32 storage), in which case a
    non-finite layer's rows are found in its float32 values ``blocks[name]`` ``(batch, ...)``.
    The first offending layer is reported, with every offending stimulus id.
    """
    for name, peak in zip(names, peaks, strict=True):
        if len(peak) != len(batch_ids) and not bool(torch.isfinite(peak).all()):
            if blocks is None or blocks[name].dtype != torch.float32:
                raise ValueError(f"layer {name!r}: per-layer peaks need the float32 rows")
            peak = _peak(blocks[name])
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
    lock: threading.Lock | None = None,
) -> dict[str, torch.Tensor]:
    """Each block projected by its layer's SRP matrix (made once into ``cache``, under ``lock``
    when lanes share it); valence and blocks of at most ``dim`` features as they are."""
    projected: dict[str, torch.Tensor] = {}
    for name, block in blocks.items():
        in_features = int(np.prod(block.shape[1:], dtype=np.int64))
        if name == VALENCE_LAYER or in_features <= dim:
            projected[name] = block
            continue
        if name not in cache:
            with lock or contextlib.nullcontext():
                if name not in cache:
                    cache[name] = srp_matrix(in_features, dim, seed=seed, layer=name,
                                             device=device)  # fmt: skip
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
