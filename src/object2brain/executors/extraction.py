"""Extraction on a Ray cluster: shards of stimuli computed by the stages' actor pool
(:mod:`object2brain.executors.pool`), stitched by the driver into ONE activation store equal to a
local run's.

- **Shards**: the stimulus table cut into consecutive ranges of ``shard_size`` rows, a multiple
  of the batch size, so every batch holds the same images as in a local run (on the CPU the
  values are then bit-identical to the local store).
- **Actors** (:func:`~object2brain.executors.pool.run_on_pool`, ``workers`` actors, one shard
  per call): each actor receives the resolved
  :class:`~object2brain.activations.extract.ExtractionPlan` once (from the object store), holds
  its own copy of the model, and computes a shard with the local extraction code
  (:func:`~object2brain.activations.extract.run_extraction`: the same hooks, projections, checks
  and per-batch functions) into a shard store
  ``<out>.shards/shard-NNNNN.h5``. The images are read by the actors from their paths, so
  ``--out`` and the images must be on a filesystem every node sees.
- **Stitching**: the driver copies the shards, in order, into ``<out>``: stimulus ids, the
  attributes (``order``, ``srp``, model, weights, preprocessing ...), the fingerprint and the
  manifest are those of a local run; the shard folder is removed once the store is complete.
- **int8** (``quantize="int8"``): the driver calibrates once before the pool starts (or finds
  the cached calibration) and writes the cache every actor then reads
  (:func:`~object2brain.activations.extract.int8_cache_path`; beside ``<out>`` unless
  ``--image-cache``), so actors starting together do not each calibrate. The driver has read
  every image already (the plan's fingerprint hashes their bytes) and int8 runs on CPUs only,
  so this needs no lock of its own on the shared filesystem; a driver killed while calibrating
  leaves no cache (written under a temporary name and renamed), its store lock is released with
  the process, and the rerun calibrates again.
- **Faults**: an actor whose process dies is restarted and its shard retried by Ray (up to
  ``max_retries`` times); a shard store that was half-written resumes from its last flushed batch
  (:class:`~object2brain.activations.store.StoreWriter`). A rerun after a crash or a lost node
  skips every complete shard and redoes only the missing ones. A shard that fails on every try
  is one :class:`~object2brain.executors.base.ExecutorError` naming the stage and the shard; the
  finished shards are kept, the pool's actors killed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import time
from pathlib import Path

from object2brain.activations.extract import (
    ExtractionPlan,
    _same_complete_store,
    int8_cache_beside,
    manifest_path,
    plan_network,
    run_extraction,
    write_manifest,
)
from object2brain.activations.store import ActivationStore, StoreWriter
from object2brain.errors import StoreError
from object2brain.executors.pool import (
    PoolSettings,
    ShardActor,
    run_on_pool,
    shard_folder,
    shard_path,
    shard_ranges,
)
from object2brain.io import disk_errors, output_lock

log = logging.getLogger("object2brain.executors.extraction")

__all__ = ["extract_on_ray", "shard_folder", "shard_plan", "shard_ranges", "stitch_shards"]


def shard_plan(plan: ExtractionPlan, rows: range) -> ExtractionPlan:
    """The plan of the stimuli ``rows`` (its own fingerprint: the whole plan's and the range)."""
    ids = plan.stimuli.ids[rows.start : rows.stop]
    valence = None if plan.valence is None else plan.valence[rows.start : rows.stop]
    key = f"{plan.fingerprint}:{rows.start}:{rows.stop}".encode()
    return dataclasses.replace(
        plan,
        stimuli=plan.stimuli.subset(ids),
        valence=valence,
        runtime=plan.runtime.model_copy(update={"progress": False}),
        config={**plan.config, "stimulus_ids": ids},
        fingerprint=hashlib.sha256(key).hexdigest(),
    )


@dataclasses.dataclass(frozen=True)
class _ExtractJob:
    """What every actor needs (one object-store entry): the resolved plan, the shard folder and
    the shards' rows."""

    plan: ExtractionPlan
    folder: str
    ranges: list[tuple[int, int]]


class _ShardActor(ShardActor):
    """One actor of the pool: holds the plan (and so one model, on this node's device)."""

    def setup(self, job: _ExtractJob) -> None:
        from object2brain.devices import resolve_device

        device = resolve_device(job.plan.runtime.device)  # this node's device
        self.plan = dataclasses.replace(job.plan, device=device)
        self.folder = Path(job.folder)
        self.ranges = job.ranges

    def compute(self, index: int) -> None:
        start, stop = self.ranges[index]
        sub = shard_plan(self.plan, range(start, stop))
        run_extraction(sub, shard_path(self.folder, index), overwrite=True)


def _missing_shards(plan: ExtractionPlan, folder: Path, ranges: list[range]) -> list[int]:
    return [
        i
        for i, rows in enumerate(ranges)
        if not _same_complete_store(shard_path(folder, i), shard_plan(plan, rows).fingerprint)
    ]


def extract_on_ray(
    plan: ExtractionPlan,
    out: Path,
    *,
    overwrite: bool = False,
    settings: PoolSettings | None = None,
    shard_size: int | None = None,
) -> Path:
    """:func:`~object2brain.activations.extract.run_extraction` on a Ray cluster (module
    docstring): the same store, attributes and manifest. ``settings``: the pool (its
    ``gpus_per_worker`` is set from the plan's device: one GPU per actor on CUDA);
    ``shard_size``: rows per shard (``None``: ``BATCHES_PER_SHARD`` batches).

    Raises:
        StoreError: as the local run (another run's store without ``overwrite``, the lock).
        ExecutorError: Ray missing, or a shard that failed on every try (finished shards kept).
    """
    pool = dataclasses.replace(
        settings or PoolSettings(), gpus_per_worker=1.0 if plan.device.type == "cuda" else 0.0
    )
    if plan.calibration is not None and plan.calibration_cache is None:  # one file for all
        plan = dataclasses.replace(plan, calibration_cache=int8_cache_beside(out))
    with output_lock(out), disk_errors(out):
        started = time.time()
        if out.exists():
            if _same_complete_store(out, plan.fingerprint):
                if not manifest_path(out).is_file():
                    write_manifest(plan, out, seconds=None)
                return out
            if not overwrite:
                raise StoreError(f"{out}: already exists (from another run); pass --overwrite")
        folder = shard_folder(out)
        folder.mkdir(parents=True, exist_ok=True)
        ranges = shard_ranges(len(plan.stimuli), plan.options.batch_size, shard_size)
        todo = _missing_shards(plan, folder, ranges)
        log.info("extract on Ray: %d of %d shards to compute", len(todo), len(ranges))
        if todo and plan.calibration is not None:
            plan_network(plan, out)  # int8: calibrated here once (or read), cached for the actors
        job = _ExtractJob(plan, str(folder), [(r.start, r.stop) for r in ranges])
        run_on_pool(
            _ShardActor, job, todo, pool, stage="extract", total=len(ranges),
            missing=lambda: _missing_shards(plan, folder, ranges), folder=str(folder),
        )  # fmt: skip
        path = stitch_shards(plan, out, [shard_path(folder, i) for i in range(len(ranges))])
        write_manifest(plan, path, seconds=round(time.time() - started, 3))
        shutil.rmtree(folder, ignore_errors=True)
        return path


def stitch_shards(plan: ExtractionPlan, out: Path, shards: list[Path]) -> Path:
    """Copy the complete shard stores ``shards`` (in row order) into the store ``out``, with the
    attributes and fingerprint of a local run of ``plan``."""
    writer = StoreWriter.create(out, plan.stimuli.ids, plan.store_attrs(), plan.fingerprint)
    try:
        for index, path in enumerate(shards):
            with ActivationStore.open(path) as shard:
                if index == 0:
                    attrs = shard.attrs
                    writer.set_attr("order", shard.layers)
                    if "srp" in attrs:
                        writer.set_attr("srp", attrs["srp"])
                blocks = {layer: shard.read(layer) for layer in shard.layers}
            for name, block in blocks.items():  # chunks inside the first shard's rows
                writer.ensure_layer(
                    name, len(plan.stimuli), tuple(block.shape[1:]), block.dtype, len(block)
                )
            writer.write_rows(writer.n_done, blocks)
        return writer.finish()
    finally:
        writer.close()
