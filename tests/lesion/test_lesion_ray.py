"""The lesion statistics on a local Ray cluster: the object2brain table of 1 and 2 Ray workers
equals the local one (p-values identical, r within 1e-12), and a chunk whose worker dies on
every try is one error naming the stage and the chunk."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from object2brain.errors import Object2BrainError
from object2brain.executors import ExecutorError, LocalExecutor, RayExecutor
from object2brain.lesion.nulls import NullJob, NullRequest, run_nulls

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_null_chunks import lesion_table, same_table  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[ModuleType]:
    """The session's Ray cluster when one runs (``tests/executors``), else a local one of 2
    CPUs for this module."""
    ray = __import__("ray") if os.environ.get("CI") else pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        paths = [str(HERE), str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")]
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}},
        )
    # the test module's classes go to the workers by value (the workers may not see this folder)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.parametrize("cross_fit", [False, True], ids=["same", "cross_fit"])
@pytest.mark.parametrize("cpus_per_task", [2, 1], ids=["1-worker", "2-workers"])
def test_lesion_table_on_ray_equals_local(
    ray_cluster: ModuleType, cpus_per_task: int, cross_fit: bool
) -> None:
    executor = RayExecutor(num_cpus=cpus_per_task)
    assert executor.workers == 2 // cpus_per_task
    local = lesion_table(LocalExecutor(), cross_fit=cross_fit)
    same_table(lesion_table(executor, cross_fit=cross_fit), local)


class _DyingScorer:
    """A scorer whose worker process exits in every chunk (a killed worker, a lost node)."""

    def correlations(self, masks: np.ndarray) -> np.ndarray:
        os._exit(1)

    def on_cpu(self) -> _DyingScorer:
        return self


class _BrokenScorer(_DyingScorer):
    def correlations(self, masks: np.ndarray) -> np.ndarray:
        raise Object2BrainError("bad statistics in this layer")


def test_failed_chunk_is_one_error_naming_stage_and_chunk(ray_cluster: ModuleType) -> None:
    members = np.arange(3)
    request = NullRequest("random", 1, 40, 10, members, lesion=True)
    job = NullJob(_DyingScorer(), np.zeros(2))  # type: ignore[arg-type]
    executor = RayExecutor(max_retries=1)
    with pytest.raises(ExecutorError, match=r"^lesion m/L nulls: chunk 0 of 1 failed after 1 "):
        run_nulls(job, [request], executor, stage="lesion m/L nulls")
    # an error of the input itself is raised as it is (not retried, not wrapped)
    broken = NullJob(_BrokenScorer(), np.zeros(2))  # type: ignore[arg-type]
    with pytest.raises(Object2BrainError, match="bad statistics in this layer"):
        run_nulls(broken, [request], executor, stage="lesion m/L nulls")
