"""The stages' actor pool (``executors.pool.run_on_pool``) on the session's local Ray cluster
(2 CPUs): every shard computed once, shards sent only to started actors (a pool larger than the
cluster finishes), one error naming the failed and unstarted shards with the first cause, an
actor that cannot start reported as such, and the pool's actors killed afterwards, so the CPUs
are free again and a later pool in the same Ray session gets them."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from types import ModuleType

import pytest

from object2brain.executors import ExecutorError
from object2brain.executors.pool import PoolSettings, ShardActor, run_on_pool


@dataclasses.dataclass(frozen=True)
class Job:
    folder: str
    fail: int = -1  # this shard raises
    pause: float = 0.0  # seconds each shard takes


class Writer(ShardActor):
    """Writes ``<shard>-<pid>`` for each shard it computes."""

    def setup(self, job: Job) -> None:
        self.job = job

    def compute(self, index: int) -> None:
        time.sleep(self.job.pause)
        if index == self.job.fail:
            raise RuntimeError(f"shard {index} is broken")
        (Path(self.job.folder) / f"{index}-{os.getpid()}").write_text("")


def _wait_for(folder: Path, pattern: str, count: int, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while len(list(folder.glob(pattern))) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} files {pattern} in {folder}")
        time.sleep(0.05)


class TwoAtOnce(Writer):
    """Each shard waits until two shards have started: it finishes only if two actors run."""

    def compute(self, index: int) -> None:
        meeting = Path(self.job.folder).parent
        (meeting / f"arrived-{index}").write_text("")
        _wait_for(meeting, "arrived-*", 2)
        super().compute(index)


class FailsWhileOneRuns(Writer):
    """Shard 0 fails once shard 1 has started; shard 1 then takes a second to finish."""

    def compute(self, index: int) -> None:
        marker = Path(self.job.folder).parent
        if index == 0:
            _wait_for(marker, "started-1", 1)
            raise RuntimeError("shard 0 is broken")
        if index == 1:
            (marker / "started-1").write_text("")
            time.sleep(1.0)
        super().compute(index)


class CannotStart(Writer):
    def setup(self, job: Job) -> None:
        raise OSError("no such model file on this node")


def _done(folder: Path) -> list[int]:
    return sorted(int(p.name.split("-")[0]) for p in folder.iterdir())


def _run(actor: type[ShardActor], job: Job, todo: list[int], **settings: object) -> None:
    folder = Path(job.folder)
    run_on_pool(
        actor, job, todo, PoolSettings(**settings),  # type: ignore[arg-type]
        stage="test", total=max(todo) + 1, folder=job.folder,
        missing=lambda: [i for i in todo if i not in _done(folder)],
    )  # fmt: skip


def _cpus_free(ray: ModuleType, seconds: float = 60.0) -> bool:
    """Every CPU of the cluster free again within ``seconds`` (a killed actor's process needs a
    moment to exit)."""
    total = ray.cluster_resources().get("CPU", 0)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) == total:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("workers", [1, 2, 5], ids=["1-worker", "2-workers", "5-on-2-cpus"])
def test_every_shard_once(ray_cluster: ModuleType, tmp_path: Path, workers: int) -> None:
    _run(Writer, Job(str(tmp_path)), list(range(7)), workers=workers)
    assert _done(tmp_path) == list(range(7))  # each exactly once
    assert _cpus_free(ray_cluster)


def test_failed_pool_frees_its_cpus_for_the_next_pool(
    ray_cluster: ModuleType, tmp_path: Path
) -> None:
    first = tmp_path / "first"
    first.mkdir()
    failed = r"^test: shard\(s\) \[2, 3, 4, 5\] of 6 failed \(shard 2: RuntimeError: shard 2 is"
    with pytest.raises(ExecutorError, match=failed):  # 1 worker: shards in order, 3-5 unsent
        _run(Writer, Job(str(first), fail=2), list(range(6)), workers=1, max_retries=0)
    assert _done(first) == [0, 1]
    assert _cpus_free(ray_cluster)  # the pool's actor was killed
    second = tmp_path / "second" / "shards"
    second.mkdir(parents=True)
    _run(TwoAtOnce, Job(str(second)), list(range(4)), workers=2)  # needs both CPUs
    assert _done(second) == list(range(4))
    assert _cpus_free(ray_cluster)


def test_shards_in_flight_finish_after_a_failure(ray_cluster: ModuleType, tmp_path: Path) -> None:
    # 2 workers: shard 0 fails while shard 1 runs; 1 finishes and is kept, 2 and 3 are not sent
    folder = tmp_path / "shards"
    folder.mkdir()
    with pytest.raises(ExecutorError, match=r"shard\(s\) \[0, 2, 3\] of 4 failed \(shard 0:"):
        _run(FailsWhileOneRuns, Job(str(folder)), list(range(4)), workers=2, max_retries=0)
    assert _done(folder) == [1]
    assert _cpus_free(ray_cluster)


def test_actor_that_cannot_start(ray_cluster: ModuleType, tmp_path: Path) -> None:
    cannot = r"\[0, 1\] of 2 failed \(an actor could not start: .*no such model file on this node"
    with pytest.raises(ExecutorError, match=cannot):
        _run(CannotStart, Job(str(tmp_path)), [0, 1], workers=1, max_retries=1)
    assert _done(tmp_path) == []
    assert _cpus_free(ray_cluster)
