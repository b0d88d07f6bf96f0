"""The one actor pool of the sharded image stages (extraction, dissection, the train-head
feature pass): shards of a stage computed by a pool of Ray actors, each actor holding the stage's
job (and so one model) and writing each shard into its own file on the shared folder.

- **Shards**: consecutive ranges of whole batches (:func:`shard_ranges`), so every batch holds the
  images of the same batch of a local run; ``shard-NNNNN.h5`` in ``<out>.shards/``.
- **Actors**: ``workers`` Ray actors of one :class:`ShardActor` subclass, made by
  :func:`run_on_pool`; the job is put in the object store once and each actor gets it in its
  constructor (:meth:`ShardActor.setup`), then computes one shard per call
  (:meth:`ShardActor.compute`). A shard is sent only to an actor that has started, so a pool
  larger than the cluster never queues a shard behind an actor that cannot be placed.
- **Faults**: an actor whose process dies is restarted and its shard retried (Ray's
  ``max_restarts`` / ``max_task_retries``, ``max_retries`` each). A shard that fails on every
  try (or an actor that cannot start) stops the pool: no further shard is started, the shards in
  flight finish (their files kept), and one :class:`ExecutorError` names the stage, every shard
  whose file is missing and the first cause.
- **Resources**: the pool owns its actors and kills them in a ``finally`` (success, failure,
  interrupt), so their CPUs and GPUs are free for the next Ray use in the same process.
- **Placement**: an actor that no alive node of the cluster can hold (more CPUs or GPUs than any
  node has) is refused before any actor starts; and when no actor of the pool has started
  within the placement timeout (:func:`placement_timeout`: the cluster is busy, or its nodes
  were lost), the pool stops. Both are one :class:`ExecutorError` naming the stage, what each
  actor asks for and what the cluster has (in all and free); nothing was computed, so an empty
  shard folder is removed. With a timeout set explicitly (:data:`PLACEMENT_TIMEOUT_ENV` or
  :attr:`PoolSettings.placement_timeout`) an actor that no node holds yet is waited for instead
  of refused (an autoscaling cluster adds the node).

Ray is imported only when a pool runs (the optional extra).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from object2brain.executors.base import ExecutorError, chunks_of
from object2brain.executors.ray import connect, describe_failure

log = logging.getLogger("object2brain.executors.pool")

__all__ = [
    "BATCHES_PER_SHARD",
    "PLACEMENT_TIMEOUT",
    "PLACEMENT_TIMEOUT_ENV",
    "PoolSettings",
    "ShardActor",
    "placement_timeout",
    "run_on_pool",
    "shard_folder",
    "shard_path",
    "shard_ranges",
]

#: Default shard size in batches.
BATCHES_PER_SHARD = 8
#: Seconds the pool waits for its first actor to start (placed on a node and its ``setup`` run:
#: a worker process started, torch imported, the job and model loaded) before it stops.
PLACEMENT_TIMEOUT = 300.0
#: Environment variable overriding :data:`PLACEMENT_TIMEOUT` (seconds) for every pool of the
#: process, e.g. on an autoscaling cluster whose GPU nodes take minutes to join.
PLACEMENT_TIMEOUT_ENV = "OBJECT2BRAIN_RAY_PLACEMENT_TIMEOUT"


def shard_folder(out: Path) -> Path:
    """``acts.h5`` -> ``acts.h5.shards/``, ``results/dissect`` -> ``results/dissect.shards/``
    (next to the output, so it lies on the same shared filesystem and survives a staged swap)."""
    return out.with_name(out.name + ".shards")


def shard_path(folder: Path, index: int) -> Path:
    """Shard ``index``'s file: ``folder/shard-NNNNN.h5``."""
    return folder / f"shard-{index:05d}.h5"


def shard_ranges(n: int, batch_size: int, shard_size: int | None = None) -> list[range]:
    """Rows of each shard of ``n`` rows: ``shard_size`` rounded up to a multiple of
    ``batch_size`` (default ``BATCHES_PER_SHARD`` batches), so shards hold whole batches of a
    local run."""
    size = shard_size if shard_size is not None else BATCHES_PER_SHARD * batch_size
    size = max(batch_size, -(-size // batch_size) * batch_size)
    return chunks_of(n, size)


@dataclasses.dataclass(frozen=True)
class PoolSettings:
    """The cluster ``address`` (``None``: the running Ray, else a local one), ``workers``
    actors (``None``: as many as the cluster's CPUs hold at ``cpus_per_worker``; never more
    than the shards), ``cpus_per_worker``, ``gpus_per_worker``, ``max_retries`` per shard
    (and restarts of a dead actor) and ``placement_timeout`` in seconds (``None``:
    :func:`placement_timeout`'s)."""

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_retries: int = 3
    placement_timeout: float | None = None


def placement_timeout(settings: PoolSettings) -> tuple[float, bool]:
    """Seconds the pool waits for its first actor and whether they were set explicitly:
    ``settings.placement_timeout``, else the environment's :data:`PLACEMENT_TIMEOUT_ENV`, else
    :data:`PLACEMENT_TIMEOUT` (not explicit).

    Raises:
        ExecutorError: the environment variable is not a positive number of seconds.
    """
    if settings.placement_timeout is not None:
        return float(settings.placement_timeout), True
    text = os.environ.get(PLACEMENT_TIMEOUT_ENV, "").strip()
    if not text:
        return PLACEMENT_TIMEOUT, False
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or not math.isfinite(seconds):
        raise ExecutorError(f"{PLACEMENT_TIMEOUT_ENV}={text!r}: expected a positive number of "
                            "seconds")  # fmt: skip
    return seconds, True


class ShardActor:
    """Base of a pool's actor. A subclass implements :meth:`setup` (once per actor process:
    keep the job, load the model on this node's device) and :meth:`compute` (one shard into its
    file). The constructor receives the job's object-store reference in a list (a reference
    nested in an argument is not resolved by Ray, so the actor's arguments stay small)."""

    def __init__(self, job_ref: list[Any]) -> None:
        import ray

        self.setup(ray.get(job_ref[0]))

    def setup(self, job: Any) -> None:
        raise NotImplementedError

    def compute(self, index: int) -> None:
        raise NotImplementedError

    def ready(self) -> bool:
        """Answers once the constructor has run (the pool sends shards only after it)."""
        return True


def run_on_pool(
    actor: type[ShardActor],
    job: Any,
    todo: list[int],
    settings: PoolSettings,
    *,
    stage: str,
    total: int,
    missing: Callable[[], list[int]],
    folder: str,
) -> None:
    """Compute the shards ``todo`` (of ``total``) on a pool of ``actor`` (module docstring):
    ``setup(job)`` once per actor, ``compute(i)`` once per shard ``i``. Returns when every shard
    is computed; the actors are killed before it returns or raises.

    Raises:
        ExecutorError: a shard that failed on every try, or an actor that could not start,
            naming ``stage`` and the shards still ``missing()`` (their files absent); the
            finished shards' files stay in ``folder``. Or an actor that no node can hold, or
            no actor started within the placement timeout (module docstring): naming what
            each actor asks for and what the cluster has; ``folder`` removed if empty.
    """
    if not todo:
        return
    ray = connect(settings.address)
    seconds, explicit = placement_timeout(settings)
    unplaceable = _unplaceable(ray, settings)
    if unplaceable is not None and explicit:  # a node that fits may still join
        log.warning("%s: %s; waiting up to %g s for one", stage, unplaceable, seconds)
    elif unplaceable is not None:
        _remove_if_empty(folder)
        raise ExecutorError(f"{stage}: {unplaceable}; nothing was computed")
    remote = ray.remote(
        num_cpus=settings.cpus_per_worker,
        num_gpus=settings.gpus_per_worker,
        max_restarts=settings.max_retries,  # a dead actor's process is started again
        max_task_retries=settings.max_retries,  # and its shard retried
    )(actor)
    job_ref = [ray.put(job)]  # once in the object store (alive until the actors are killed)
    actors = [remote.remote(job_ref) for _ in range(_pool_size(ray, settings, len(todo)))]
    try:
        failure = _dispatch(ray, actors, list(todo), seconds)
    except _NotPlacedError:
        _remove_if_empty(folder)
        raise ExecutorError(
            f"{stage}: no actor of the pool started within {seconds:g} s (placement timeout; "
            f"{PLACEMENT_TIMEOUT_ENV}): {_resources(ray, settings)}; nothing was computed"
        ) from None
    finally:
        for handle in actors:  # their CPUs and GPUs are free for the next use of Ray
            ray.kill(handle, no_restart=True)
    if failure is not None:
        raise ExecutorError(
            f"{stage}: shard(s) {missing()} of {total} failed ({failure}); the finished "
            f"shards are kept in {folder}: rerun the same command to redo the rest"
        )


def _pool_size(ray: Any, settings: PoolSettings, shards: int) -> int:
    """``settings.workers``, else the actors the cluster's CPUs hold; at most ``shards``."""
    if settings.workers is not None:
        return max(1, min(settings.workers, shards))
    cpus = float(ray.cluster_resources().get("CPU", 1))
    return max(1, min(shards, int(cpus // max(settings.cpus_per_worker, 1e-9))))


def _amounts(resources: Mapping[str, float]) -> str:
    """``2 CPUs, 0 GPUs`` of a Ray resource mapping."""
    words = []
    for name in ("CPU", "GPU"):
        value = float(resources.get(name, 0.0))
        words.append(f"{value:g} {name}{'' if value == 1 else 's'}")
    return ", ".join(words)


def _asked(settings: PoolSettings) -> dict[str, float]:
    return {"CPU": settings.cpus_per_worker, "GPU": settings.gpus_per_worker}


def _resources(ray: Any, settings: PoolSettings) -> str:
    """What each actor asks for and what the cluster has, in all and free now."""
    return (
        f"each actor asks for {_amounts(_asked(settings))}; the Ray cluster has "
        f"{_amounts(ray.cluster_resources())} ({_amounts(ray.available_resources())} free now)"
    )


def _unplaceable(ray: Any, settings: PoolSettings) -> str | None:
    """Why no alive node of the cluster can hold one actor (its CPUs and GPUs on one node), or
    ``None`` when one can (or Ray does not tell: then the placement timeout decides)."""
    try:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    except Exception:  # Ray Client or an older Ray without node details: not checked here
        return None
    asked = _asked(settings)
    if any(all(float(node.get(k, 0.0)) >= v for k, v in asked.items()) for node in nodes):
        return None
    largest: Mapping[str, float] = max(
        nodes, key=lambda n: (float(n.get("GPU", 0)), float(n.get("CPU", 0))), default={}
    )
    return (
        f"no node of the Ray cluster can hold one actor of the pool: "
        f"{_resources(ray, settings)}, its largest node {_amounts(largest)} ({len(nodes)} "
        f"node(s)); run on a device the cluster has, ask for fewer CPUs per worker, or add a "
        f"node (an autoscaling cluster: set {PLACEMENT_TIMEOUT_ENV} to wait for one)"
    )


def _remove_if_empty(folder: str) -> None:
    """Remove the shard ``folder`` if it holds nothing (made by the stage for this pool)."""
    try:
        if folder and not any(Path(folder).iterdir()):
            Path(folder).rmdir()
    except OSError:
        pass


class _NotPlacedError(Exception):
    """No actor of the pool started within the placement timeout."""


def _dispatch(ray: Any, actors: list[Any], queue: list[int], timeout: float) -> str | None:
    """Send the shards of ``queue`` (in order) to the actors as they start and finish; after
    the first failure send no more and let the shards in flight finish. Returns the first
    failure's description, or ``None`` when every shard finished.

    Raises:
        _NotPlacedError: no actor started (answered ``ready``) within ``timeout`` seconds.
    """
    starting = {handle.ready.remote(): k for k, handle in enumerate(actors)}
    running: dict[Any, tuple[int, int]] = {}  # reference -> (actor, shard)
    idle: list[int] = []
    failure: str | None = None
    deadline = time.monotonic() + timeout
    placed = False  # an actor has started: from then on no clock (shards take what they take)
    while True:
        while failure is None and queue and idle:
            k, shard = idle.pop(0), queue.pop(0)
            running[actors[k].compute.remote(shard)] = (k, shard)
        if not running and (failure is not None or not queue):
            return failure  # actors still starting are killed by the caller
        # here an actor is starting or running: without a failure every actor is starting,
        # running or idle, and none is idle while shards wait
        wait = None if placed or failure is not None else max(0.0, deadline - time.monotonic())
        done = ray.wait([*running, *starting], num_returns=1, timeout=wait)[0]
        if not done:
            raise _NotPlacedError
        ref = done[0]
        k, sent = running.pop(ref) if ref in running else (starting.pop(ref), None)
        try:
            ray.get(ref)
        except ray.exceptions.RayError as exc:
            what = describe_failure(ray, exc)
            where = "an actor could not start" if sent is None else f"shard {sent}"
            failure = failure or f"{where}: {what}"
            continue  # this actor gets no more shards
        placed = True
        idle.append(k)
