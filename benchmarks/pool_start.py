"""Benchmark: the fixed cost of the image stages' actor pool, ours against Ray Data's actor pool.

The sharded stages (extract, dissect, train-head feature pass) ran on a Ray Data actor pool
(``Dataset.map_batches`` with an actor class, ``batch_size=1``, ``concurrency=workers``, the
retry arguments) until ``executors.pool.run_on_pool`` took over with plain Ray actors that it
owns. This script runs the same jobs both ways in one process and one local Ray cluster:

1. **Pool cost**: ``--shards`` shards of ``--work`` seconds each (a sleep: no CPU, so the
   numbers measure the pool, not the machine's load) on 1 and 2 workers; wall seconds of the
   whole call, ``--reps`` interleaved repetitions, best and median, ratio peer / ours. Ray Data
   is warmed up first (its one-time start reported apart).
2. **CPUs back after a failed pool**: a pool of 2 workers whose second shard raises, each in a
   fresh local Ray session; seconds from the error until the cluster's CPUs are all available
   again, ``null`` when not within ``--free-limit`` seconds (ours: the actors are killed in a
   ``finally``; the peer: the dataset dropped and ``gc.collect()``, as the old code did, after
   the exception was dropped, or with ``--peer-clean-up inside`` while the exception and its
   traceback are still alive, as when a caller or a test holds on to the error).

Run: ``nice -n 10 .venv/bin/python benchmarks/pool_start.py [--shards 2 16] [--reps 3]``;
writes ``benchmarks/results/<date>-pool-start.json``. The peer needs Ray Data
(``pip install "ray[data]"``; the ``ray`` extra is Ray core only).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from object2brain.executors.base import ExecutorError
from object2brain.executors.pool import PoolSettings, ShardActor, run_on_pool

RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Job:
    folder: str
    work: float
    fail: int = -1


def _compute(job: Job, index: int) -> None:
    time.sleep(job.work)
    if index == job.fail:
        raise RuntimeError(f"shard {index} is broken")
    (Path(job.folder) / f"{index}").write_text("")


class Ours(ShardActor):
    def setup(self, job: Job) -> None:
        self.job = job

    def compute(self, index: int) -> None:
        _compute(self.job, index)


class Peer:
    """The same shard on Ray Data's actor pool, as the stages' actors were written before."""

    def __init__(self, job_ref: list[Any]) -> None:
        import ray

        self.job: Job = ray.get(job_ref[0])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for index in batch["shard"].tolist():
            _compute(self.job, int(index))
        return batch


def run_ours(job: Job, shards: int, workers: int) -> None:
    run_on_pool(Ours, job, list(range(shards)), PoolSettings(workers=workers, max_retries=0),
                stage="bench", total=shards, missing=list, folder=job.folder)  # fmt: skip


PEER_CLEAN_UP = {"where": "after"}


def run_peer(job: Job, shards: int, workers: int) -> None:
    """The removed ``executors.pool.run_on_pool`` on Ray Data (same arguments)."""
    import ray
    import ray.data

    job_ref = [ray.put(job)]
    dataset = ray.data.from_items([{"shard": i} for i in range(shards)],
                                  override_num_blocks=shards)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        mapped = dataset.map_batches(
            Peer, fn_constructor_args=(job_ref,), batch_size=1,
            concurrency=min(workers, shards), num_cpus=1.0, num_gpus=0.0,
            max_restarts=0, max_task_retries=0,
        )  # fmt: skip
    failure = None
    try:
        mapped.take_all()
    except Exception as exc:  # as the old code: the exception dropped before the clean-up
        failure = str(exc).splitlines()[0]
        if PEER_CLEAN_UP["where"] == "inside":
            del mapped, dataset
            gc.collect()
            raise ExecutorError(failure) from None
    if failure is not None:
        del mapped, dataset
        gc.collect()  # the failed run's executor and actors are freed (their CPUs, GPUs)
        raise ExecutorError(failure)


def seconds_until_cpus_free(limit: float = 120.0) -> float | None:
    """Seconds until every CPU of the cluster is available; ``None`` if not within ``limit``."""
    import ray

    started = time.perf_counter()
    total = ray.cluster_resources().get("CPU", 0)
    while ray.available_resources().get("CPU", 0) < total:
        if time.perf_counter() - started > limit:
            return None
        time.sleep(0.05)
    return time.perf_counter() - started


def start_ray() -> Any:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": src}})  # fmt: skip
    return ray


def timed(run: Any, job: Job, shards: int, workers: int) -> float:
    seconds_until_cpus_free()
    started = time.perf_counter()
    run(job, shards, workers)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--work", type=float, default=0.2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--free-limit", type=float, default=30.0)
    parser.add_argument("--peer-clean-up", choices=["after", "inside"], default="after")
    args = parser.parse_args()
    PEER_CLEAN_UP["where"] = args.peer_clean_up
    ray = start_ray()
    report: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "ray": ray.__version__,
            "ray_cluster_cpus": ray.cluster_resources().get("CPU"),
            "load_average_1min_at_start": os.getloadavg()[0],
        },
        "work_seconds_per_shard": args.work,
        "peer_clean_up": args.peer_clean_up,
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)

        def fresh() -> Job:
            for path in folder.iterdir():
                path.unlink()
            return Job(str(folder), args.work)

        report["ray_data_first_start_seconds"] = timed(run_peer, fresh(), 2, 1)
        report["ours_first_start_seconds"] = timed(run_ours, fresh(), 2, 1)
        rows = []
        for shards in args.shards:
            for workers in (1, 2):
                times: dict[str, list[float]] = {"ours": [], "peer": []}
                for _ in range(args.reps):  # interleaved
                    times["ours"].append(timed(run_ours, fresh(), shards, workers))
                    assert len(list(folder.iterdir())) == shards
                    times["peer"].append(timed(run_peer, fresh(), shards, workers))
                    assert len(list(folder.iterdir())) == shards
                row = {"shards": shards, "workers": workers, "seconds": times,
                       "best_ours": min(times["ours"]), "best_peer": min(times["peer"]),
                       "median_ours": statistics.median(times["ours"]),
                       "median_peer": statistics.median(times["peer"])}  # fmt: skip
                row["ratio_peer_over_ours_best"] = row["best_peer"] / row["best_ours"]
                row["ratio_peer_over_ours_median"] = row["median_peer"] / row["median_ours"]
                print(json.dumps({k: v for k, v in row.items() if k != "seconds"}), flush=True)
                rows.append(row)
        report["pool"] = rows
        ray.shutdown()
        freed: dict[str, list[float | None]] = {"ours": [], "peer": []}
        for _ in range(args.reps):
            for name, run in (("ours", run_ours), ("peer", run_peer)):
                start_ray()  # a fresh session: a leaked actor of one run cannot slow the next
                job = dataclasses.replace(fresh(), work=0.0, fail=1)
                try:
                    run(job, 4, 2)
                except ExecutorError:
                    freed[name].append(seconds_until_cpus_free(args.free_limit))
                else:
                    raise AssertionError("the failing pool did not fail")
                finally:
                    ray.shutdown()
                print(name, "cpus free after", freed[name][-1], flush=True)
        report["cpus_free_after_failure_seconds"] = freed
        print("cpus free after a failed pool", freed, flush=True)
    report["machine"]["load_average_1min_at_end"] = os.getloadavg()[0]
    RESULTS.mkdir(exist_ok=True)
    tail = "" if args.peer_clean_up == "after" else "-peer-clean-up-inside"
    path = RESULTS / f"{time.strftime('%Y-%m-%d-%H%M')}-pool-start{tail}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
