"""The stages' actor pool (``executors.pool.run_on_pool``) on the session's local Ray cluster
(2 CPUs): every shard computed once, shards sent only to started actors (a pool larger than the
cluster finishes), one error naming the failed and unstarted shards with the first cause, an
actor that cannot start reported as such, and the pool's actors killed afterwards, so the CPUs
are free again and a later pool in the same Ray session gets them. An actor that no node can hold
is refused at once, and a pool none of whose actors is placed within the placement timeout
stops: one message naming what was asked and what the cluster has, nothing left behind."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from types import ModuleType

import pytest

from object2brain.executors import ExecutorError
from object2brain.executors.pool import (
    PLACEMENT_TIMEOUT,
    PLACEMENT_TIMEOUT_ENV,
    PoolSettings,
    ShardActor,
    placement_timeout,
    run_on_pool,
)


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


def test_actor_no_node_can_hold_is_refused_at_once(
    ray_cluster: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 3 CPUs or 1 GPU per actor on a 2-CPU, 0-GPU cluster: refused before any actor starts,
    # naming what was asked and what the cluster has; the empty shard folder is removed
    monkeypatch.delenv(PLACEMENT_TIMEOUT_ENV, raising=False)
    folder = tmp_path / "shards"
    for asked, named in (({"cpus_per_worker": 3.0}, "3 CPUs, 0 GPUs"),
                         ({"gpus_per_worker": 1.0}, "1 CPU, 1 GPU")):  # fmt: skip
        folder.mkdir()
        started = time.monotonic()
        message = rf"^test: no node of the Ray cluster can hold one actor of the pool: each actor asks for {named}; the Ray cluster has 2 CPUs, 0 GPUs \(.* free now\), its largest node 2 CPUs, 0 GPUs \(1 node\(s\)\).*nothing was computed$"  # noqa: E501
        with pytest.raises(ExecutorError, match=message):
            _run(Writer, Job(str(folder)), [0, 1], **asked)
        assert time.monotonic() - started < 5.0  # no waiting for a placement
        assert not folder.exists()
    assert _cpus_free(ray_cluster)


class Holder:
    """Holds the CPUs it was placed with until killed."""

    def ping(self) -> bool:
        return True


def test_no_actor_placed_within_the_timeout(ray_cluster: ModuleType, tmp_path: Path) -> None:
    # both CPUs held by another actor: the pool's actor (1 CPU) can be placed by no node now,
    # but could later, so the placement timeout stops it; then a pool gets the CPUs again
    holder = ray_cluster.remote(num_cpus=2)(Holder).remote()
    ray_cluster.get(holder.ping.remote())
    folder = tmp_path / "shards"
    folder.mkdir()
    try:
        message = (r"^test: no actor of the pool started within 1 s \(placement timeout; "
                   r"OBJECT2BRAIN_RAY_PLACEMENT_TIMEOUT\): each actor asks for 1 CPU, 0 GPUs; "
                   r"the Ray cluster has 2 CPUs, 0 GPUs \(0 CPUs, 0 GPUs free now\); nothing "
                   r"was computed$")  # fmt: skip
        started = time.monotonic()
        with pytest.raises(ExecutorError, match=message):
            _run(Writer, Job(str(folder)), [0, 1, 2], workers=2, placement_timeout=1.0)
        assert 1.0 <= time.monotonic() - started < 10.0
        assert not folder.exists()  # nothing half-written
    finally:
        ray_cluster.kill(holder)
    assert _cpus_free(ray_cluster)  # the pool's pending actors left nothing behind
    folder.mkdir()
    _run(Writer, Job(str(folder)), [0, 1], workers=2)
    assert _done(folder) == [0, 1]


def test_explicit_timeout_waits_for_a_node_that_fits(
    ray_cluster: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # set explicitly (an autoscaling cluster), an actor no node holds now is waited for, then
    # refused by the timeout; a bad value is one clear error
    monkeypatch.setenv(PLACEMENT_TIMEOUT_ENV, "0.5")
    assert placement_timeout(PoolSettings()) == (0.5, True)
    assert placement_timeout(PoolSettings(placement_timeout=7)) == (7.0, True)
    folder = tmp_path / "shards"
    folder.mkdir()
    with pytest.raises(ExecutorError, match=r"within 0.5 s .* asks for 1 CPU, 1 GPU; the Ray"):
        _run(Writer, Job(str(folder)), [0], gpus_per_worker=1.0)
    assert not folder.exists()
    for bad in ("soon", "0", "-3", "inf"):
        monkeypatch.setenv(PLACEMENT_TIMEOUT_ENV, bad)
        with pytest.raises(ExecutorError, match=rf"^{PLACEMENT_TIMEOUT_ENV}='{bad}': expected"):
            placement_timeout(PoolSettings())
    monkeypatch.delenv(PLACEMENT_TIMEOUT_ENV)
    assert placement_timeout(PoolSettings()) == (PLACEMENT_TIMEOUT, False)
    assert _cpus_free(ray_cluster)
