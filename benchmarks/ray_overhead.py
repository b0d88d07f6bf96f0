"""Benchmark: what Ray costs and what it buys, on this machine.

1. **Per-task overhead**: ``RayExecutor.map_chunks`` of a function that returns at once, over
   ``--tasks`` chunks with a shared object (put once): seconds per task beyond the work.
2. **Per-shard overhead**: ``extract_on_ray`` of ``--images`` images in shards of one batch
   against the local ``run_extraction`` of the same plan.
   Two shard counts with one worker separate the fixed cost (pool start, actor start:
   model transfer and load; stitching) from the cost of each further shard.
3. **Speed-up of the Mantel permutations** (``--n-perm`` permutations of ``--n`` stimuli, 8
   model and 8 target RDMs): measured with 1 and 2 workers of a local Ray cluster (one per CPU
   core here), and *simulated* for 4 and 8 workers from the measured numbers:
   ``T(w) = t_fixed + ceil(C / w) * (t_chunk + t_task)`` with ``C = 2 w`` chunks of
   ``blocks / C`` blocks each (the executor's rule), ``t_chunk`` the work of one chunk measured
   in this process and ``t_task`` the per-task overhead of (1). A simulation: it assumes
   one free core per worker and no memory-bandwidth contention.

4. **Dissection on Ray** (``--dissect-images`` random images with given boxes, resnet18 with
   random weights, ``layer3``, 99 null draws): the local pass against 1 worker with one shard,
   1 worker with one shard per batch and 2 workers; the tables are checked equal.
5. **Amdahl model of the image stages** from the measured parts: ``T(w) = t_serial +
   (t_parallel + S * t_shard) / w`` with ``t_parallel`` the work of all shards (the local run's
   pass), ``t_shard`` the measured cost of one more shard, ``S`` the shards, and ``t_serial``
   what only the driver does (pool and actor start, planning / detection, stitching /
   reduction) = ``T(1 worker, 1 shard) - t_parallel - t_shard``; its serial fraction
   ``f = t_serial / T(1)`` bounds the speed-up by ``1 / f``. Evaluated for 1, 2, 4, 8 workers.

The stages' actor pool (``executors.pool.run_on_pool``) is run once without work before
anything is timed, so Ray's one-time start is not charged to the first measurement.

Run: ``.venv/bin/python benchmarks/ray_overhead.py [--tasks 200] [--images 16] [--n 80]
[--n-perm 8000] [--dissect-images 16]``; writes ``benchmarks/results/<date>-ray-overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from object2brain.executors.pool import ShardActor

RESULTS = Path(__file__).resolve().parent / "results"


def _noop(shared: Any, chunk: int) -> int:
    return chunk


def task_overhead(n_tasks: int) -> dict[str, float]:
    from object2brain.executors import RayExecutor

    ex = RayExecutor()
    shared = np.zeros(1000)
    ex.map_chunks(_noop, list(range(4)), stage="warm-up", shared=shared)  # workers started
    started = time.perf_counter()
    ex.map_chunks(_noop, list(range(n_tasks)), stage="bench", shared=shared)
    seconds = time.perf_counter() - started
    return {"tasks": n_tasks, "workers": ex.workers, "seconds_per_task": seconds / n_tasks}


def shard_overhead(n_images: int, folder: Path) -> dict[str, float]:
    import pandas as pd
    from PIL import Image

    import object2brain as o2b
    from object2brain.activations.extract import plan_extraction, run_extraction
    from object2brain.executors.extraction import extract_on_ray
    from object2brain.executors.pool import PoolSettings
    from object2brain.models.zoo import load_model
    from object2brain.options import ExtractOptions, Runtime

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_images):
        path = folder / f"img{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(path)
        rows.append({"stimulus_id": f"img{i:03d}", "path": str(path)})
    pd.DataFrame(rows).to_csv(folder / "stimuli.csv", index=False)
    stimuli = o2b.load_stimuli(folder / "stimuli.csv")
    options = ExtractOptions(batch_size=2, num_workers=0)
    runtime = Runtime(seed=0, device="cpu", progress=False)
    plan = plan_extraction(load_model("resnet18", "none"), stimuli, ["layer4"], options, runtime)
    started = time.perf_counter()
    run_extraction(plan, folder / "local.h5")
    local = time.perf_counter() - started
    out: dict[str, float] = {"images": n_images, "local_seconds": local}
    # (workers, shard size): one shard vs one shard per batch separates the fixed cost (pool
    # start, actor start = model transfer and load, stitching) from the cost per shard
    for workers, size in ((1, n_images), (1, 2), (2, 2)):
        wait_idle()
        started = time.perf_counter()
        extract_on_ray(plan, folder / f"ray{workers}-{size}.h5",
                       settings=PoolSettings(workers=workers), shard_size=size)  # fmt: skip
        out[f"ray_{workers}w_{math.ceil(n_images / size)}shards_seconds"] = (
            time.perf_counter() - started
        )
    one = out["ray_1w_1shards_seconds"]
    many = out[f"ray_1w_{math.ceil(n_images / 2)}shards_seconds"]
    out["fixed_seconds"] = one - local
    out["seconds_per_shard"] = (many - one) / (math.ceil(n_images / 2) - 1)
    out["stitch_seconds"] = _stitch_seconds(plan, folder)
    out["pool_start_seconds"] = pool_start()  # a pool run without work, Ray warm
    serial = out["stitch_seconds"] + out["pool_start_seconds"]
    out["amdahl"] = amdahl(one, serial, out["seconds_per_shard"], math.ceil(n_images / 2), local)
    return out


def _stitch_seconds(plan: Any, folder: Path) -> float:
    """The driver's stitching alone: shard stores computed here, then copied into one."""
    from object2brain.activations.extract import run_extraction
    from object2brain.executors.extraction import shard_plan, shard_ranges, stitch_shards

    ranges = shard_ranges(len(plan.stimuli), plan.options.batch_size, plan.options.batch_size)
    shards = [run_extraction(shard_plan(plan, r), folder / f"shard{i}.h5")
              for i, r in enumerate(ranges)]  # fmt: skip
    started = time.perf_counter()
    stitch_shards(plan, folder / "stitched.h5", shards)
    return time.perf_counter() - started


def amdahl(
    one: float, serial: float, per_shard: float, shards: int, local: float
) -> dict[str, Any]:
    """``T(w) = t_serial + (t_parallel + S t_shard) / w`` (module docstring) for 1-8 workers:
    ``serial`` measured directly (pool start, stitching or reduction, driver-only steps),
    ``t_parallel = one - serial - per_shard`` from ``one`` = T(1 worker, 1 shard); speed-ups
    against 1 worker and against ``local`` (the whole local run)."""
    per_shard = max(0.0, per_shard)  # noise can make the difference of two runs negative
    parallel = max(0.0, one - serial - per_shard)
    work = parallel + shards * per_shard
    times = {w: serial + work / w for w in (1, 2, 4, 8)}
    return {
        "t_serial": serial,
        "t_parallel": parallel,
        "t_shard": per_shard,
        "shards": shards,
        "serial_fraction": serial / times[1],
        "max_speedup": times[1] / serial if serial > 0 else math.inf,
        "seconds": times,
        "speedup_vs_1_worker": {w: times[1] / t for w, t in times.items()},
        "speedup_vs_local": {w: local / t for w, t in times.items()},
    }


def wait_idle(limit: float = 120.0) -> None:
    """Wait until every CPU of the Ray cluster is free (the actors of an earlier actor pool
    are released asynchronously; a task needing their CPUs would wait for them)."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    deadline = time.time() + limit
    while ray.available_resources().get("CPU", 0) < total and time.time() < deadline:
        time.sleep(0.5)


class _Idle(ShardActor):
    """An actor of the stages' pool that does nothing."""

    def setup(self, job: Any) -> None:
        pass

    def compute(self, index: int) -> None:
        pass


def pool_start() -> float:
    """One run of the stages' actor pool without work (1 actor, 2 shards), in seconds: what a
    pool costs beyond its shards (actor process start, dispatch, kill)."""
    from object2brain.executors.pool import PoolSettings, run_on_pool

    wait_idle()
    started = time.perf_counter()
    run_on_pool(_Idle, None, [0, 1], PoolSettings(workers=1), stage="bench", total=2,
                missing=list, folder="")  # fmt: skip
    return time.perf_counter() - started


def dissect_overhead(n_images: int, folder: Path) -> dict[str, Any]:
    """The dissection pass locally and on Ray (1 worker: 1 shard / 1 per batch; 2 workers)."""
    import pandas as pd
    from PIL import Image

    import object2brain as o2b
    from object2brain.api.dissect import _detector_and_groups
    from object2brain.executors import LocalExecutor, RayExecutor
    from object2brain.executors.dissection import DissectShards
    from object2brain.explain import dissect as dissect_module
    from object2brain.explain.dissect import compute_dissection
    from object2brain.models.zoo import load_model
    from object2brain.options import DissectOptions, Runtime

    rng = np.random.default_rng(1)
    rows, boxes = [], []
    for i in range(n_images):
        path = folder / f"d{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(path)
        rows.append({"stimulus_id": f"d{i:03d}", "path": str(path)})
        for label in ("Human face", "Building"):
            x, y = rng.integers(0, 150, 2)
            boxes.append([f"d{i:03d}", x, y, x + 60, y + 60, label])
    pd.DataFrame(rows).to_csv(folder / "d.csv", index=False)
    columns = ["stimulus_id", "x0", "y0", "x1", "y1", "label"]
    pd.DataFrame(boxes, columns=columns).to_csv(folder / "boxes.csv", index=False)
    stimuli = o2b.load_stimuli(folder / "d.csv")
    options = DissectOptions(layer="layer3", detector=f"boxes:{folder / 'boxes.csv'}",
                             n_null_assign=99, selection_folds=0, batch_size=2,
                             num_workers=0, target=0)  # fmt: skip
    runtime = Runtime(seed=0, device="cpu", progress=False)
    model = load_model("resnet18", "none")
    detector, groups = _detector_and_groups(options.detector, None, options, runtime)
    pass_seconds: list[float] = []

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return dissect_module._accumulate(*args, **kwargs)
        finally:
            pass_seconds.append(time.perf_counter() - started)

    def run(accumulate: Any) -> tuple[float, Any]:
        started = time.perf_counter()
        result = compute_dissection(model, stimuli, detector, groups, options, runtime,
                                    accumulate=accumulate)  # fmt: skip
        return time.perf_counter() - started, result.table

    local, table = run(timed)
    out: dict[str, Any] = {"images": n_images, "local_seconds": local,
                           "local_pass_seconds": pass_seconds[0]}  # fmt: skip
    shards = math.ceil(n_images / 2)
    for workers, per in ((1, shards), (1, 1), (2, 1)):
        ex = RayExecutor()
        sharded = DissectShards(ex, folder / f"s{workers}-{per}", workers=workers,
                                batches_per_shard=per)  # fmt: skip
        wait_idle()
        seconds, other = run(sharded)
        count = math.ceil(shards / per)
        out[f"ray_{workers}w_{count}shards_seconds"] = seconds
        same = other["p_assign"].equals(table["p_assign"]) and np.allclose(
            other["enrichment"], table["enrichment"], rtol=1e-12, atol=0, equal_nan=True
        )
        out[f"ray_{workers}w_{count}shards_equal_local"] = bool(same)
    started = time.perf_counter()
    run(DissectShards(LocalExecutor(), folder / "s-local", batches_per_shard=1))
    out["local_shards_seconds"] = time.perf_counter() - started
    one, many = out["ray_1w_1shards_seconds"], out[f"ray_1w_{shards}shards_seconds"]
    out["seconds_per_shard"] = (many - one) / (shards - 1)
    # serial: the pool start and the driver-only part of a run (detection, probe, reduction,
    # assignment, table: the local run without its pass)
    out["pool_start_seconds"] = pool_start()
    serial = out["pool_start_seconds"] + (local - pass_seconds[0])
    out["amdahl"] = amdahl(one, serial, out["seconds_per_shard"], shards, local)
    return out


def permutation_speedup(n: int, n_perm: int, per_task: float) -> dict[str, Any]:
    import torch

    from object2brain.executors import RayExecutor
    from object2brain.rsa.inference import PERM_BLOCK, mantel_test

    torch.set_num_threads(1)  # one core per worker, the driver as one worker
    rng = np.random.default_rng(0)
    m = n * (n - 1) // 2
    models, targets = rng.normal(size=(8, m)), rng.normal(size=(8, m))
    started = time.perf_counter()
    local = mantel_test(models, targets, "spearman", n_perm, 0, "cpu")
    serial = time.perf_counter() - started
    measured = {}
    for cpus in (2, 1):  # a task per 2 CPUs: 1 worker; per CPU: 2 workers
        wait_idle()
        ex = RayExecutor(num_cpus=cpus)
        # warm: as many chunks as the timed call, so every worker process it uses has started
        # and imported torch (one block warmed one worker only)
        warm = min(n_perm, 2 * ex.workers * PERM_BLOCK)
        mantel_test(models, targets, "spearman", warm, 0, "cpu", executor=ex)
        started = time.perf_counter()
        res = mantel_test(models, targets, "spearman", n_perm, 0, "cpu", executor=ex)
        measured[ex.workers] = time.perf_counter() - started
        assert np.array_equal(res.p, local.p)
    blocks = math.ceil(n_perm / PERM_BLOCK)
    t_fixed = max(0.0, measured[1] - serial)  # put + gather beyond the work
    simulated = {}
    for w in (1, 2, 4, 8):
        chunks = min(blocks, 2 * w)
        per_chunk = serial / chunks
        simulated[w] = t_fixed + math.ceil(chunks / w) * (per_chunk + per_task)
    return {
        "n": n,
        "n_perm": n_perm,
        "local_seconds": serial,
        "measured_seconds": measured,
        "measured_speedup": {w: serial / t for w, t in measured.items()},
        "simulated_seconds": simulated,
        "simulated_speedup": {w: serial / t for w, t in simulated.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--n", type=int, default=80)
    parser.add_argument("--n-perm", type=int, default=8000)
    parser.add_argument("--dissect-images", type=int, default=16)
    args = parser.parse_args()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    src = str(Path(__file__).resolve().parents[1] / "src")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": src}})  # fmt: skip
    import torch

    torch.set_num_threads(1)  # the driver's local runs on one core, as one Ray worker
    started = time.time()
    report: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "ray": ray.__version__,
            "ray_cluster_cpus": ray.cluster_resources().get("CPU"),
            "load_average_1min_at_start": os.getloadavg()[0],
        },
    }
    report["first_pool_start_seconds"] = pool_start()
    print("first pool start", report["first_pool_start_seconds"], flush=True)
    report["task_overhead"] = task_overhead(args.tasks)
    print("task overhead", report["task_overhead"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        report["shard_overhead"] = shard_overhead(args.images, Path(tmp))
    print("shard overhead", report["shard_overhead"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        report["dissect"] = dissect_overhead(args.dissect_images, Path(tmp))
    print("dissect", report["dissect"], flush=True)
    per_task = report["task_overhead"]["seconds_per_task"]
    report["mantel"] = permutation_speedup(args.n, args.n_perm, per_task)
    print("mantel", report["mantel"], flush=True)
    report["seconds"] = round(time.time() - started, 1)
    report["machine"]["load_average_1min_at_end"] = os.getloadavg()[0]
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{time.strftime('%Y-%m-%d-%H%M')}-ray-overhead.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    ray.shutdown()


if __name__ == "__main__":
    main()
