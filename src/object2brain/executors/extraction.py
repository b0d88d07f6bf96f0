"""Extraction on a Ray cluster: shards of stimuli computed by an actor pool of Ray Data, stitched
by the driver into ONE activation store equal to a local run's.

- **Shards**: the stimulus table cut into consecutive ranges of ``shard_size`` rows, a multiple
  of the batch size, so every batch holds the same images as in a local run (on the CPU the
  values are then bit-identical to the local store).
- **Actors** (``Dataset.map_batches`` with an actor pool of ``workers`` actors, one shard per
  call): each actor receives the resolved :class:`~object2brain.activations.extract.ExtractionPlan`
  once (from the object store), holds its own copy of the model, and computes a shard with the
  local extraction code (:func:`~object2brain.activations.extract.run_extraction`: the same
  hooks, projections, checks and per-batch functions) into a shard store
  ``<out>.shards/shard-NNNNN.h5``. The images are read by the actors from their paths, so
  ``--out`` and the images must be on a filesystem every node sees.
- **Stitching**: the driver copies the shards, in order, into ``<out>``: stimulus ids, the
  attributes (``order``, ``srp``, model, weights, preprocessing ...), the fingerprint and the
  manifest are those of a local run; the shard folder is removed once the store is complete.
- **Faults**: an actor whose process dies is restarted and its shard retried by Ray Data (up to
  ``max_retries`` times); a shard store that was half-written resumes from its last flushed batch
  (:class:`~object2brain.activations.store.StoreWriter`). A rerun after a crash or a lost node
  skips every complete shard and redoes only the missing ones. A shard that fails on every try
  is one :class:`~object2brain.executors.base.ExecutorError` naming the stage and the shard; the
  finished shards are kept.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import importlib
import logging
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from object2brain.activations.extract import (
    ExtractionPlan,
    _same_complete_store,
    _write_manifest,
    manifest_path,
    run_extraction,
)
from object2brain.activations.store import ActivationStore, StoreWriter
from object2brain.errors import StoreError
from object2brain.executors.base import ExecutorError, chunks_of
from object2brain.executors.ray import connect
from object2brain.io import disk_errors, output_lock

log = logging.getLogger("object2brain.executors.extraction")

__all__ = ["extract_on_ray", "shard_folder", "shard_plan", "shard_ranges"]

#: Default shard size in batches.
BATCHES_PER_SHARD = 8


def shard_folder(out: Path) -> Path:
    """``acts.h5`` -> ``acts.h5.shards/``."""
    return out.with_name(out.name + ".shards")


def shard_ranges(n: int, batch_size: int, shard_size: int | None = None) -> list[range]:
    """Rows of each shard: ``shard_size`` rounded up to a multiple of ``batch_size`` (default
    ``BATCHES_PER_SHARD`` batches), so shards hold whole batches of a local run."""
    size = shard_size if shard_size is not None else BATCHES_PER_SHARD * batch_size
    size = max(batch_size, -(-size // batch_size) * batch_size)
    return chunks_of(n, size)


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


def _shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.h5"


class _ShardActor:
    """One actor of the pool: holds the plan (and so one model); each call computes shards."""

    def __init__(self, plan_ref: list[Any], folder: str, ranges: list[tuple[int, int]]) -> None:
        import ray

        from object2brain.devices import resolve_device

        plan: ExtractionPlan = ray.get(plan_ref[0])
        device = resolve_device(plan.runtime.device)  # this node's device
        self.plan = dataclasses.replace(plan, device=device)
        self.folder = Path(folder)
        self.ranges = ranges

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = []
        for index in batch["shard"].tolist():
            start, stop = self.ranges[index]
            sub = shard_plan(self.plan, range(start, stop))
            run_extraction(sub, _shard_path(self.folder, index), overwrite=True)
            done.append(index)
        return {"shard": np.asarray(done, dtype=np.int64)}


def _missing_shards(plan: ExtractionPlan, folder: Path, ranges: list[range]) -> list[int]:
    return [
        i
        for i, rows in enumerate(ranges)
        if not _same_complete_store(_shard_path(folder, i), shard_plan(plan, rows).fingerprint)
    ]


def _compute_shards(
    plan: ExtractionPlan, folder: Path, ranges: list[range], todo: list[int], settings: RaySettings
) -> None:
    """Run the shards ``todo`` on an actor pool of Ray Data."""
    ray = connect(settings.address)
    data = importlib.import_module("ray.data")
    gpus = 1.0 if plan.device.type == "cuda" else 0.0
    workers = settings.workers or max(1, min(len(todo), int(ray.cluster_resources()["CPU"])))
    plan_ref = [ray.put(plan)]  # once in the object store; every actor gets its own copy
    dataset = data.from_items([{"shard": i} for i in todo], override_num_blocks=len(todo))
    with warnings.catch_warnings():  # max_restarts / max_task_retries have no named parameter
        warnings.simplefilter("ignore", DeprecationWarning)
        mapped = dataset.map_batches(
            _ShardActor,
            fn_constructor_args=(plan_ref, str(folder), [(r.start, r.stop) for r in ranges]),
            batch_size=1,
            concurrency=min(workers, len(todo)),
            num_cpus=settings.cpus_per_worker,
            num_gpus=gpus,
            max_restarts=settings.max_retries,  # a dead actor's process is started again
            max_task_retries=settings.max_retries,  # and its shard retried
        )
    failure = None
    try:
        finished = sorted(int(row["shard"]) for row in mapped.take_all())
    except Exception as exc:
        failure = _first_line(exc)
    if failure is not None:
        del mapped, dataset
        gc.collect()  # the failed run's executor and actors are freed (their CPUs, GPUs)
        missing = _missing_shards(plan, folder, ranges)
        raise ExecutorError(
            f"extract: shard(s) {missing} of {len(ranges)} failed ({failure}); the "
            f"finished shards are kept in {folder}: rerun the same command to redo the rest"
        )
    if finished != sorted(todo):
        raise ExecutorError(f"extract: shards {sorted(set(todo) - set(finished))} did not run")


def _first_line(exc: Exception) -> str:
    """``Type: first line`` of ``exc`` (terminal colour codes removed)."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines()]
    return f"{type(exc).__name__}: {next((line for line in lines if line), '')}"


@dataclasses.dataclass(frozen=True)
class RaySettings:
    """How the shards run: the cluster ``address`` (``None``: the running Ray, else a local
    one), ``workers`` actors (``None``: one per CPU), ``cpus_per_worker``, ``shard_size`` rows
    (``None``: ``BATCHES_PER_SHARD`` batches) and ``max_retries`` per shard."""

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float = 1.0
    shard_size: int | None = None
    max_retries: int = 3


def extract_on_ray(
    plan: ExtractionPlan,
    out: Path,
    *,
    overwrite: bool = False,
    settings: RaySettings | None = None,
) -> Path:
    """:func:`~object2brain.activations.extract.run_extraction` on a Ray cluster (module
    docstring): the same store, attributes and manifest.

    Raises:
        StoreError: as the local run (another run's store without ``overwrite``, the lock).
        ExecutorError: Ray missing, or a shard that failed on every try (finished shards kept).
    """
    settings = settings or RaySettings()
    with output_lock(out), disk_errors(out):
        started = time.time()
        if out.exists():
            if _same_complete_store(out, plan.fingerprint):
                if not manifest_path(out).is_file():
                    _write_manifest(plan, out, seconds=None)
                return out
            if not overwrite:
                raise StoreError(f"{out}: already exists (from another run); pass --overwrite")
        folder = shard_folder(out)
        folder.mkdir(parents=True, exist_ok=True)
        ranges = shard_ranges(len(plan.stimuli), plan.options.batch_size, settings.shard_size)
        todo = _missing_shards(plan, folder, ranges)
        log.info("extract on Ray: %d of %d shards to compute", len(todo), len(ranges))
        if todo:
            _compute_shards(plan, folder, ranges, todo, settings)
        path = stitch_shards(plan, out, [_shard_path(folder, i) for i in range(len(ranges))])
        _write_manifest(plan, path, seconds=round(time.time() - started, 3))
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
            for name, block in blocks.items():
                writer.ensure_layer(name, len(plan.stimuli), tuple(block.shape[1:]), block.dtype)
            writer.write_rows(writer.n_done, blocks)
        return writer.finish()
    finally:
        writer.close()
