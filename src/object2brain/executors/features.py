"""The feature pass of ``train-head`` on a Ray cluster: the penultimate features of every
stimulus (the input of the backbone's output layer) computed in shards by the stages' actor pool
(:mod:`object2brain.executors.pool`) and stitched into the feature store a local run writes (bit
for bit on the CPU).

- **Shards**: consecutive ranges of whole batches of ``--batch-size`` (default 8 batches), so
  every batch holds the images of the same batch of a local run; each actor holds one backbone
  (:class:`~object2brain.heads.features.BackboneFeatures`, the local code: same hook, same
  transform) and writes a shard's features ``(rows, in_features)`` float32 as one ``.npy`` file
  (no pickles) named by the store's fingerprint and the shard's rows, written atomically.
- **Stitching**: the driver writes the feature store (``<out>/<model>/features.h5``) from the
  shards in row order with :func:`~object2brain.heads.features.write_feature_store`, so its
  attributes and fingerprint are those of a local run, and removes the shard folder; the head is
  then trained from the store as in a local run.
- **Reruns**: a matching feature store is reused as in a local run; after a failure, the
  finished shard files are kept (``features.h5.shards/``) and a rerun computes only the missing
  ones. A shard that fails on every try is one error naming ``train-head`` and the shard.

Training itself (a few thousand steps of a linear layer on cached features) stays on the driver;
with ``--augment`` the features change every epoch, so there is no separate feature pass and
the whole training runs in this process.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from object2brain.data.stimuli import StimulusSet
from object2brain.devices import resolve_device
from object2brain.executors.pool import (
    PoolSettings,
    ShardActor,
    run_on_pool,
    shard_folder,
    shard_ranges,
)
from object2brain.heads.features import (
    BackboneFeatures,
    feature_fingerprint,
    read_feature_store,
    write_feature_store,
)
from object2brain.io import atomic_path
from object2brain.models.zoo import LoadedModel

__all__ = ["features_on_ray"]


@dataclasses.dataclass(frozen=True)
class _FeatureJob:
    """What every actor needs (one object-store entry)."""

    loaded: LoadedModel
    stimuli: StimulusSet
    ranges: list[tuple[int, int]]
    folder: str
    fingerprint: str
    batch_size: int
    num_workers: int
    cuda: bool


def _shard_file(job: _FeatureJob, index: int) -> Path:
    start, stop = job.ranges[index]
    return Path(job.folder) / f"{job.fingerprint[:16]}-{index:05d}-{start}-{stop}.npy"


class _FeatureActor(ShardActor):
    """One actor of the pool: one backbone on this node's device; each call computes a shard."""

    def setup(self, job: _FeatureJob) -> None:
        self.job = job
        device = resolve_device("cuda" if job.cuda else "cpu")
        self.source = BackboneFeatures(job.loaded, job.stimuli, device=device,
                                       num_workers=job.num_workers)  # fmt: skip

    def compute(self, index: int) -> None:
        start, stop = self.job.ranges[index]
        rows = np.arange(start, stop)
        blocks = [f.cpu() for _, f in self.source.batches(rows, self.job.batch_size)]
        _save(_shard_file(self.job, index), torch.cat(blocks).numpy().astype(np.float32))


def _save(path: Path, array: np.ndarray) -> None:
    """``array`` as ``path`` (.npy, no pickles), written under a temporary name then renamed."""
    with atomic_path(path) as partial, open(partial, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


class _ShardFeatures:
    """The stitched shards as a feature source (rows in order)."""

    def __init__(self, features: np.ndarray) -> None:
        self.features = features

    def batches(
        self, rows: np.ndarray, batch_size: int
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        for start in range(0, len(rows), batch_size):
            chunk = np.asarray(rows[start : start + batch_size], dtype=np.int64)
            yield chunk, torch.from_numpy(self.features[chunk])


def features_on_ray(
    loaded: LoadedModel,
    stimuli: StimulusSet,
    path: Path,
    *,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    settings: PoolSettings | None = None,
    shard_size: int | None = None,
) -> bool:
    """Write ``loaded``'s feature store ``path`` for ``stimuli`` from shards computed on a Ray
    cluster (module docstring); ``device``: the driver's resolved device (CUDA: each actor asks
    for one GPU). Returns ``False`` when a matching store was already there (nothing
    computed).

    Raises:
        ExecutorError: a shard that failed on every try (finished shards kept).
    """
    fingerprint = feature_fingerprint(loaded, stimuli)
    if read_feature_store(path, fingerprint, stimuli.ids) is not None:
        return False
    folder = shard_folder(path)
    folder.mkdir(parents=True, exist_ok=True)
    ranges = [(r.start, r.stop) for r in shard_ranges(len(stimuli), batch_size, shard_size)]
    cuda = device.type == "cuda"
    job = _FeatureJob(loaded, stimuli, ranges, str(folder), fingerprint, batch_size,
                      num_workers, cuda)  # fmt: skip

    def missing() -> list[int]:
        return [i for i in range(len(ranges)) if not _shard_file(job, i).is_file()]

    pool = dataclasses.replace(settings or PoolSettings(), gpus_per_worker=1.0 if cuda else 0.0)
    run_on_pool(_FeatureActor, job, missing(), pool, stage="train-head", total=len(ranges),
                missing=missing, folder=str(folder))  # fmt: skip
    parts = [np.load(_shard_file(job, i), allow_pickle=False) for i in range(len(ranges))]
    source = _ShardFeatures(np.concatenate(parts))
    write_feature_store(path, loaded, stimuli, source, batch_size=batch_size)
    shutil.rmtree(folder, ignore_errors=True)
    return True
