"""The Ray executor: one Ray task per chunk (Ray imported here, lazily, only when used)."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, TypeVar

from object2brain.errors import Object2BrainError
from object2brain.executors.base import ExecutorError

Result = TypeVar("Result")

INSTALL_HINT = "pip install 'object2brain[ray]'"


def require_ray() -> ModuleType:
    """The ``ray`` module, or one clear :class:`ExecutorError` saying what to install."""
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise ExecutorError(
            f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}"
        ) from None


def connect(address: str | None = None, *, num_cpus: int | None = None) -> ModuleType:
    """Ray, connected: an already initialised Ray is used as it is; else ``ray.init(address)``
    (``None``: start a local cluster of ``num_cpus`` CPUs; ``auto``: the cluster this machine
    belongs to, started by ``ray start`` / ``ray up`` / KubeRay; ``ray://host:10001``: a remote
    cluster through Ray Client)."""
    ray = require_ray()
    if not ray.is_initialized():
        try:
            ray.init(
                address=address,
                num_cpus=num_cpus if address is None else None,
                include_dashboard=False,
                log_to_driver=False,
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ExecutorError(f"cannot connect to a Ray cluster at {address!r}: {exc}") from None
    return ray


class RayExecutor:
    """Runs each chunk as a Ray task (``num_cpus`` CPUs and ``num_gpus`` GPUs each), retried up
    to ``max_retries`` times when its worker process dies (a lost node, a killed process, out of
    memory). ``shared`` goes to the object store once; its reference is an argument of every task
    (Ray hands each task the stored value, numpy arrays without a copy).

    Errors: a chunk that still fails after its retries raises :class:`ExecutorError` naming the
    stage and the chunk (the chunks not yet finished are cancelled); a user error raised by the
    chunk itself (an :class:`~object2brain.errors.Object2BrainError`) is raised as it is.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: float = 1,
        num_gpus: float = 0,
        max_retries: int = 3,
        local_cpus: int | None = None,
    ) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.max_retries = max_retries
        self._ray = connect(address, num_cpus=local_cpus)

    @property
    def workers(self) -> int:
        """How many tasks of ``num_cpus`` CPUs the cluster runs at once."""
        cpus = float(self._ray.cluster_resources().get("CPU", 1))
        return max(1, int(cpus // max(self.num_cpus, 1e-9)))

    def map_chunks(
        self,
        fn: Callable[..., Result],
        chunks: Sequence[Any],
        *,
        stage: str,
        shared: Any = None,
    ) -> list[Result]:
        ray = self._ray
        remote = ray.remote(
            num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=self.max_retries
        )(_call)
        shared_ref = ray.put(shared) if shared is not None else None
        refs = [remote.remote(fn, shared_ref, chunk) for chunk in chunks]
        results: list[Result] = []
        for index, ref in enumerate(refs):
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayError as exc:
                for other in refs[index + 1 :]:
                    ray.cancel(other)
                cause = getattr(exc, "cause", None)
                if isinstance(cause, Object2BrainError):
                    raise cause from None
                raise ExecutorError(_failure(stage, index, len(chunks), exc, self)) from None
        return results

    def __repr__(self) -> str:
        return f"RayExecutor(address={self.address!r}, num_cpus={self.num_cpus})"


def _call(fn: Callable[..., Any], shared: Any, chunk: Any) -> Any:
    """One task: ``fn(chunk)`` or ``fn(shared, chunk)``."""
    return fn(chunk) if shared is None else fn(shared, chunk)


def describe_failure(ray: ModuleType, exc: Exception) -> str:
    """``Type: message`` of a failed Ray task or actor call: the exception raised by the code
    itself (a :class:`ray.exceptions.RayTaskError`'s cause; for an actor whose constructor
    raised, the last line of that traceback), else Ray's own error (a dead worker or actor) by
    its first line, terminal colour codes removed."""
    cause = getattr(exc, "cause", None) if isinstance(exc, ray.exceptions.RayTaskError) else None
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines()]
    lines = [line for line in lines if line]
    if getattr(exc, "actor_init_failed", False):  # the constructor's traceback: its last line
        return lines[-1] if lines else type(exc).__name__
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _failure(stage: str, index: int, total: int, exc: Exception, executor: RayExecutor) -> str:
    """One line naming the stage, the chunk and what went wrong."""
    what = describe_failure(executor._ray, exc)
    if isinstance(exc, executor._ray.exceptions.RayTaskError):
        return f"{stage}: chunk {index} of {total} failed: {what}"
    return f"{stage}: chunk {index} of {total} failed after {executor.max_retries} retries ({what})"
