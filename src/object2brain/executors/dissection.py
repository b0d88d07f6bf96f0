"""The Grad-CAM pass of a dissection in shards of images: in this process or on a Ray cluster
(the stages' actor pool, :mod:`object2brain.executors.pool`), with the ``filter_objects`` table
of a local run.

The pass of :func:`~object2brain.explain.dissect.compute_dissection` only adds: per (group,
filter) sums over boxes (``sum I``, ``sum E``, counts), the assignment null's sums per draw and
group, and, per selection fold, the same again. Sums over images split into sums over shards of
images, so:

- **Shards**: the images with a used box (in stimulus order) cut into consecutive ranges of
  ``batches_per_shard`` whole batches of ``--batch-size``: every batch holds the images of the
  same batch of a local run, so each batch's maps (and its contribution to every sum) are
  bit for bit those of the local run on the same device.
- **Workers**: every shard gets all images' boxes and the null's donor permutations (the null
  pairs image ``i``'s maps with the boxes of image ``pi_r(i)``, which may lie in any shard) with
  the model, once per actor (object store), and returns its *sufficient statistics*: the sums
  above, started from zero, and the top-image lists of the galleries. One shard's statistics are
  written as one HDF5 file ``shard-NNNNN.h5`` (plain arrays and a fingerprint attribute; no
  pickles) into the shard folder.
- **Reduction**: the driver adds the shards' sums in shard order (never in the order they
  finished), so the result is the same for any number of workers. Against the local pass,
  which adds batch after batch into one running sum, the totals differ only by the rounding of
  float64 additions (relative 1e-15; the tests check 1e-12). The p-values are identical: an
  observed sum and a null draw that pair an image with its own boxes are built from the same
  additions in the same order in both, so ties stay ties, and counts are integers.
- **Faults and reruns**: a shard file carries the fingerprint of its inputs (model weights,
  layer, target, options of the pass, boxes, donor permutations, selection folds, its range); a
  rerun reuses every complete shard file with the same fingerprint and computes only the
  missing ones. An actor whose process dies is restarted and its shard retried by Ray (up
  to ``max_retries`` times); a shard that fails on every try is one
  :class:`~object2brain.executors.base.ExecutorError` naming the stage and the shard, the
  finished shard files kept.

What stays on the driver: detection (with its cache), the probing forward pass, the reduction,
the assignment, the table and the gallery pass (a few images per group).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from object2brain.devices import resolve_device
from object2brain.executors.base import Executor
from object2brain.executors.pool import (
    BATCHES_PER_SHARD,
    PoolSettings,
    ShardActor,
    run_on_pool,
    shard_path,
    shard_ranges,
)
from object2brain.executors.pool import shard_folder as dissect_shard_folder
from object2brain.explain.dissect import (
    AssignmentNull,
    GroupAccumulator,
    PreparedBoxes,
    SelectionFolds,
    _accumulate,
    _CamPass,
    _Stimuli,
)
from object2brain.io import atomic_path
from object2brain.models.inputs import uses_device_decoding
from object2brain.models.zoo import state_dict_sha256
from object2brain.options import DissectOptions

log = logging.getLogger("object2brain.executors.dissection")

__all__ = ["DissectShards", "dissect_shard_folder", "read_shard", "shard_path"]

#: The running sums of a :class:`GroupAccumulator` (the top lists are merged, not added).
_SUMS = ("sum_importance", "sum_enrichment", "n_enrichment", "n_boxes")


@dataclasses.dataclass(frozen=True)
class _Job:
    """What every shard needs (one object-store entry): the Grad-CAM setting, all boxes, the
    stimulus lists, the options, empty null and fold templates, the shards' image positions and
    their fingerprints."""

    cams: _CamPass
    prepared: PreparedBoxes
    stimuli: _Stimuli
    options: DissectOptions
    null: AssignmentNull  # sums stripped: each shard starts from zeros
    folds: SelectionFolds | None
    n_filters: int
    positions: list[int]
    ranges: list[tuple[int, int]]
    fingerprints: list[str]
    folder: str


@dataclasses.dataclass(frozen=True)
class DissectShards:
    """The pass of :func:`~object2brain.explain.dissect.compute_dissection` in shards (module
    docstring): pass it as ``compute_dissection(..., accumulate=DissectShards(...))``.

    Attributes:
        executor: a :class:`~object2brain.executors.base.LocalExecutor` (shards one after the
            other in this process) or a :class:`~object2brain.executors.RayExecutor` (shards
            on the stages' actor pool at its address, one model per actor).
        folder: where the shard files go (a filesystem every node sees).
        key: more identity of the run for the shard fingerprints (e.g. the stimuli's content
            fingerprint; the model's weights are hashed here).
        batches_per_shard: shard size in batches of ``--batch-size``.
        workers: actors (``None``: one per CPU of the cluster, at most one per shard).
        cpus_per_worker: CPUs each actor asks for (an actor on a CUDA run also asks one GPU).
        max_retries: tries of a shard after its actor died.
    """

    executor: Executor
    folder: Path
    key: str = ""
    batches_per_shard: int = BATCHES_PER_SHARD
    workers: int | None = None
    cpus_per_worker: float = 1.0
    max_retries: int = 3

    def __call__(
        self,
        cams: _CamPass,
        prepared: PreparedBoxes,
        stimuli: _Stimuli,
        options: DissectOptions,
        on_device_decode: bool,
        null: AssignmentNull,
        *,
        progress: bool,
        folds: SelectionFolds | None = None,
    ) -> tuple[GroupAccumulator, np.ndarray]:
        """The sums of the pass over all shards, into ``null`` and ``folds`` (as the local
        pass), and the images per group ``(G,)``."""
        job = self._job(cams, prepared, stimuli, options, null, folds)
        folder = Path(job.folder)
        folder.mkdir(parents=True, exist_ok=True)
        todo = _missing(job)
        log.info("dissect: %d of %d shards to compute", len(todo), len(job.ranges))
        if todo and self.executor.name == "ray":
            self._on_ray(job, todo)
        elif todo:
            self.executor.map_chunks(compute_shard, todo, stage="dissect", shared=job)
        accumulator = GroupAccumulator(null.n_groups, job.n_filters, top=options.gallery_images)
        for index in range(len(job.ranges)):  # shard order: the same sums for any workers
            _add_shard(read_shard(shard_path(folder, index)), accumulator, null, folds)
        return accumulator, _images_per_group(prepared, null.n_groups)

    def _job(
        self,
        cams: _CamPass,
        prepared: PreparedBoxes,
        stimuli: _Stimuli,
        options: DissectOptions,
        null: AssignmentNull,
        folds: SelectionFolds | None,
    ) -> _Job:
        positions = sorted(prepared.by_image)
        size = self.batches_per_shard * options.batch_size
        ranges = [(r.start, r.stop) for r in shard_ranges(len(positions), options.batch_size, size)]
        base = _fingerprint_base(self.key, cams, prepared, options, null, folds)
        prints = [_digest(f"{base}:{start}:{stop}".encode()) for start, stop in ranges]
        return _Job(
            cams=cams, prepared=prepared, stimuli=stimuli, options=options,
            null=_stripped(null), folds=_empty_folds(folds), n_filters=int(null.sum.shape[1]),
            positions=positions, ranges=ranges, fingerprints=prints, folder=str(self.folder),
        )  # fmt: skip

    def _on_ray(self, job: _Job, todo: list[int]) -> None:
        """The shards ``todo`` on the stages' actor pool."""
        settings = PoolSettings(
            address=getattr(self.executor, "address", None),
            workers=self.workers,
            cpus_per_worker=self.cpus_per_worker,
            gpus_per_worker=1.0 if job.cams.device.type == "cuda" else 0.0,
            max_retries=self.max_retries,
        )
        run_on_pool(
            _ShardActor, job, todo, settings, stage="dissect", total=len(job.ranges),
            missing=lambda: _missing(job), folder=job.folder,
        )  # fmt: skip


class _ShardActor(ShardActor):
    """One actor of the pool: holds the job (and so one model, on this node's device)."""

    def setup(self, job: _Job) -> None:
        device = resolve_device("cuda" if job.cams.device.type == "cuda" else "cpu")
        network = job.cams.network.to(device).eval()
        cams = dataclasses.replace(job.cams, network=network, device=device)
        self.job = dataclasses.replace(job, cams=cams)

    def compute(self, index: int) -> None:
        compute_shard(self.job, index)


def compute_shard(job: _Job, index: int) -> int:
    """Run the pass over the images of shard ``index`` from zero sums and write its statistics
    to ``shard-NNNNN.h5`` (atomically: a shard file is complete or absent). Returns ``index``."""
    start, stop = job.ranges[index]
    mine = {p: job.prepared.by_image[p] for p in job.positions[start:stop]}
    part = dataclasses.replace(job.prepared, by_image=mine)
    null = _zeroed(job.null, job.n_filters)
    folds = _fresh_folds(job.folds, job.n_filters)
    decode = uses_device_decoding(job.options.decode, job.cams.device)
    accumulator, _ = _accumulate(job.cams, part, job.stimuli, job.options, decode, null,
                                 progress=False, folds=folds)  # fmt: skip
    _write_shard(shard_path(Path(job.folder), index), _state(accumulator, null, folds),
                 job.fingerprints[index])  # fmt: skip
    return index


# ----------------------------------------------------------------------------------------------
# statistics of a shard


def _state(
    accumulator: GroupAccumulator, null: AssignmentNull, folds: SelectionFolds | None
) -> dict[str, np.ndarray]:
    """The shard's statistics as named arrays."""
    state = {f"pass/{name}": _numpy(getattr(accumulator, name)) for name in _SUMS}
    state["pass/top_values"] = _numpy(accumulator.top_values)
    state["pass/top_images"] = _numpy(accumulator.top_images)
    state["null/sum"], state["null/count"] = _numpy(null.sum), _numpy(null.count)
    for k, (part, fold_null) in enumerate(zip(*_fold_parts(folds), strict=True)):
        for name in _SUMS:
            state[f"fold{k}/{name}"] = _numpy(getattr(part, name))
        state[f"fold{k}/null_sum"] = _numpy(fold_null.sum)
        state[f"fold{k}/null_count"] = _numpy(fold_null.count)
    return state


def _add_shard(
    state: dict[str, np.ndarray],
    accumulator: GroupAccumulator,
    null: AssignmentNull,
    folds: SelectionFolds | None,
) -> None:
    """Add one shard's statistics into the driver's sums (top lists merged as the pass merges
    a batch: the ``top`` largest, ``-1`` where fewer)."""
    for name in _SUMS:
        getattr(accumulator, name).add_(torch.from_numpy(state[f"pass/{name}"]))
    values = torch.cat([accumulator.top_values, torch.from_numpy(state["pass/top_values"])], 2)
    owners = torch.cat([accumulator.top_images, torch.from_numpy(state["pass/top_images"])], 2)
    keep = values.topk(accumulator.top_values.shape[2], dim=2)
    accumulator.top_values = keep.values
    accumulator.top_images = torch.where(
        torch.isfinite(keep.values), owners.gather(2, keep.indices), -1
    )
    null.sum.add_(torch.from_numpy(state["null/sum"]))
    null.count.add_(torch.from_numpy(state["null/count"]))
    for k, (part, fold_null) in enumerate(zip(*_fold_parts(folds), strict=True)):
        for name in _SUMS:
            getattr(part, name).add_(torch.from_numpy(state[f"fold{k}/{name}"]))
        fold_null.sum.add_(torch.from_numpy(state[f"fold{k}/null_sum"]))
        fold_null.count.add_(torch.from_numpy(state[f"fold{k}/null_count"]))


def _fold_parts(
    folds: SelectionFolds | None,
) -> tuple[list[GroupAccumulator], list[AssignmentNull]]:
    return ([], []) if folds is None else (folds.parts, folds.nulls)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().cpu().numpy())


def _write_shard(path: Path, state: dict[str, np.ndarray], fingerprint: str) -> None:
    """``state`` into the HDF5 file ``path`` (written under a temporary name, then renamed)."""
    import h5py

    with atomic_path(path) as partial, h5py.File(partial, "w") as h5:
        for name, array in state.items():
            h5.create_dataset(name, data=array)
        h5.attrs["fingerprint"] = fingerprint


def read_shard(path: Path) -> dict[str, np.ndarray]:
    """A shard file's statistics as named arrays (``pass/sum_importance``, ``null/sum`` ...)."""
    import h5py

    state: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as h5:
        h5.visititems(
            lambda name, item: (
                state.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None
            )
        )
    return state


def _missing(job: _Job) -> list[int]:
    """The shards without a complete file."""
    return [i for i in range(len(job.ranges)) if not _complete(job, i)]


def _complete(job: _Job, index: int) -> bool:
    """Shard ``index`` has a file with its fingerprint."""
    import h5py

    path = shard_path(Path(job.folder), index)
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as h5:
            return bool(h5.attrs.get("fingerprint") == job.fingerprints[index])
    except OSError:  # a damaged file is redone
        return False


# ----------------------------------------------------------------------------------------------
# templates and fingerprints


def _stripped(null: AssignmentNull) -> AssignmentNull:
    """``null`` without its sums (the donors and boxes only), to ship to the workers."""
    template = copy.copy(null)
    template.sum = template.count = torch.zeros(0, dtype=torch.float64)
    return template


def _zeroed(template: AssignmentNull, n_filters: int) -> AssignmentNull:
    """A copy of ``template`` with zero sums ``(R * G, K)``."""
    null = copy.copy(template)
    shape = (template.n_draws * template.n_groups, n_filters)
    null.sum = torch.zeros(shape, dtype=torch.float64)
    null.count = torch.zeros(shape, dtype=torch.float64)
    return null


def _empty_folds(folds: SelectionFolds | None) -> SelectionFolds | None:
    if folds is None:
        return None
    template = copy.copy(folds)
    template.parts = []
    template.nulls = [_stripped(n) for n in folds.nulls]
    return template


def _fresh_folds(template: SelectionFolds | None, n_filters: int) -> SelectionFolds | None:
    """A copy of the fold template with zero sums."""
    if template is None:
        return None
    folds = copy.copy(template)
    groups = template.nulls[0].n_groups
    folds.parts = [GroupAccumulator(groups, n_filters, top=1) for _ in range(template.n_folds)]
    folds.nulls = [_zeroed(n, n_filters) for n in template.nulls]
    return folds


def _images_per_group(prepared: PreparedBoxes, n_groups: int) -> np.ndarray:
    """Images ``(G,)`` in which each group was detected (as the local pass counts them)."""
    n_images = np.zeros(n_groups, dtype=np.int64)
    for _, gids in prepared.by_image.values():
        n_images[np.unique(gids)] += 1
    return n_images


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fingerprint_base(
    key: str,
    cams: _CamPass,
    prepared: PreparedBoxes,
    options: DissectOptions,
    null: AssignmentNull,
    folds: SelectionFolds | None,
) -> str:
    """What a shard's statistics depend on, hashed: the model's weights, the Grad-CAM setting,
    the options of the pass, every image's boxes, the donor permutations, the selection folds."""
    digest = hashlib.sha256()
    setting = (
        key, cams.layer, cams.target, cams.direction, options.batch_size, options.decode,
        options.gallery_images, repr(cams.preprocessing), str(cams.device.type),
    )  # fmt: skip
    digest.update(repr(setting).encode())
    digest.update(state_dict_sha256(cams.network).encode())
    for position in sorted(prepared.by_image):
        boxes, groups = prepared.by_image[position]
        digest.update(f"{position}:".encode())
        digest.update(np.ascontiguousarray(boxes, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(groups, dtype=np.int64).tobytes())
    nulls: Sequence[AssignmentNull] = [null, *(folds.nulls if folds is not None else [])]
    for each in nulls:
        digest.update(np.ascontiguousarray(each.donors, dtype=np.int64).tobytes())
    if folds is not None:
        digest.update(np.ascontiguousarray(folds.fold_of, dtype=np.int64).tobytes())
    return digest.hexdigest()
