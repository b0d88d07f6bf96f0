"""Shards of an image stage on an actor pool of Ray Data: one actor per worker holds the stage's
job (and so one model), each call computes one shard into its own file on the shared folder."""

from __future__ import annotations

import dataclasses
import gc
import importlib
import warnings
from collections.abc import Callable
from typing import Any

from object2brain.executors.base import ExecutorError
from object2brain.executors.extraction import _first_line
from object2brain.executors.ray import connect


@dataclasses.dataclass(frozen=True)
class PoolSettings:
    """The cluster ``address`` (``None``: the running Ray, else a local one), ``workers``
    actors (``None``: one per CPU of the cluster), ``cpus_per_worker``, ``gpus_per_worker``
    and ``max_retries`` per shard (and restarts of a dead actor)."""

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_retries: int = 3


def run_on_pool(
    actor: type,
    job: Any,
    todo: list[int],
    settings: PoolSettings,
    *,
    stage: str,
    total: int,
    missing: Callable[[], list[int]],
    folder: str,
) -> None:
    """Run the shards ``todo`` (of ``total``) on a pool of ``actor``: ``actor([job_ref])`` once
    per actor (the job put in the object store once), then ``actor({"shard": [i]})`` per shard,
    returning ``{"shard": [i]}``.

    Raises:
        ExecutorError: a shard that failed on every try, naming ``stage`` and the shards still
            ``missing()`` (their files absent); the finished shards' files stay in ``folder``.
    """
    ray = connect(settings.address)
    data = importlib.import_module("ray.data")
    workers = settings.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    job_ref = [ray.put(job)]
    dataset = data.from_items([{"shard": i} for i in todo], override_num_blocks=len(todo))
    with warnings.catch_warnings():  # max_restarts / max_task_retries: no named parameter
        warnings.simplefilter("ignore", DeprecationWarning)
        mapped = dataset.map_batches(
            actor,
            fn_constructor_args=(job_ref,),
            batch_size=1,
            concurrency=min(workers, len(todo)),
            num_cpus=settings.cpus_per_worker,
            num_gpus=settings.gpus_per_worker,
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
        raise ExecutorError(
            f"{stage}: shard(s) {missing()} of {total} failed ({failure}); the finished "
            f"shards are kept in {folder}: rerun the same command to redo the rest"
        )
    if finished != sorted(todo):
        raise ExecutorError(f"{stage}: shards {sorted(set(todo) - set(finished))} did not run")
