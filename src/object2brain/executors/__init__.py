"""Executors: where the independent chunks of a stage run (this process, or a Ray cluster).

A stage that splits its work into independent chunks (blocks of permutations, shards of
stimuli) hands them to an :class:`Executor`; :meth:`Executor.map_chunks` returns the chunks'
results in the chunks' order, so the stage combines them exactly as a plain loop would. Every
chunk that draws random numbers seeds its own generator from the root seed and its chunk index
(:func:`chunk_seed`), never from a generator shared between chunks: results are identical for
any number of workers and identical to the local executor.

- :class:`LocalExecutor`: a plain loop in this process (the default; needs no Ray).
- :class:`RayExecutor`: one Ray task per chunk, the shared inputs put in the object store once,
  failed tasks retried by Ray (``pip install 'object2brain[ray]'``; Ray is imported only when a
  :class:`RayExecutor` is made).
"""

from __future__ import annotations

from object2brain.executors.base import (
    Executor,
    ExecutorError,
    LocalExecutor,
    chunk_seed,
    chunks_of,
)
from object2brain.executors.ray import RayExecutor, require_ray
from object2brain.options import Runtime

__all__ = [
    "Executor",
    "ExecutorError",
    "LocalExecutor",
    "RayExecutor",
    "chunk_seed",
    "chunks_of",
    "executor_for",
    "require_ray",
    "stage_runtime",
]


def executor_for(runtime: Runtime) -> Executor:
    """The executor chosen by ``runtime.executor`` (``local`` | ``ray``, at
    ``runtime.ray_address``)."""
    if runtime.executor == "local":
        return LocalExecutor()
    return RayExecutor(address=runtime.ray_address)


def stage_runtime(
    *,
    seed: int,
    device: str,
    progress: bool,
    executor: str = "local",
    ray_address: str | None = None,
) -> Runtime:
    """The :class:`~object2brain.options.Runtime` of a stage's API call; with
    ``executor="ray"`` Ray is checked first: without the extra, one :class:`ExecutorError`
    saying what to install, before any input is read."""
    runtime = Runtime(
        seed=seed, device=device, progress=progress, executor=executor, ray_address=ray_address
    )
    if runtime.executor == "ray":
        require_ray()
    return runtime
