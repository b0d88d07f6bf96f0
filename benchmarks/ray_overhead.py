"""Benchmark: what Ray costs and what it buys, on this machine.

1. **Per-task overhead**: ``RayExecutor.map_chunks`` of a function that returns at once, over
   ``--tasks`` chunks with a shared object (put once): seconds per task beyond the work.
2. **Per-shard overhead**: ``extract_on_ray`` of ``--images`` images in shards of one batch
   against the local ``run_extraction`` of the same plan.
   Two shard counts with one worker separate the fixed cost (Ray Data start, actor start:
   model transfer and load; stitching) from the cost of each further shard.
3. **Speed-up of the Mantel permutations** (``--n-perm`` permutations of ``--n`` stimuli, 8
   model and 8 target RDMs): measured with 1 and 2 workers of a local Ray cluster (one per CPU
   core here), and *simulated* for 4 and 8 workers from the measured numbers:
   ``T(w) = t_fixed + ceil(C / w) * (t_chunk + t_task)`` with ``C = 2 w`` chunks of
   ``blocks / C`` blocks each (the executor's rule), ``t_chunk`` the work of one chunk measured
   in this process and ``t_task`` the per-task overhead of (1). A simulation: it assumes
   one free core per worker and no memory-bandwidth contention.

Run: ``.venv/bin/python benchmarks/ray_overhead.py [--tasks 200] [--images 16] [--n 80]
[--n-perm 8000]``; writes ``benchmarks/results/<date>-ray-overhead.json``.
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
    from object2brain.executors.extraction import RaySettings, extract_on_ray
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
    # (workers, shard size): one shard vs one shard per batch separates the fixed cost (Ray
    # Data start, actor start = model transfer and load, stitching) from the cost per shard
    for workers, size in ((1, n_images), (1, 2), (2, 2)):
        started = time.perf_counter()
        extract_on_ray(plan, folder / f"ray{workers}-{size}.h5",
                       settings=RaySettings(workers=workers, shard_size=size))  # fmt: skip
        out[f"ray_{workers}w_{math.ceil(n_images / size)}shards_seconds"] = (
            time.perf_counter() - started
        )
    one = out["ray_1w_1shards_seconds"]
    many = out[f"ray_1w_{math.ceil(n_images / 2)}shards_seconds"]
    out["fixed_seconds"] = one - local
    out["seconds_per_shard"] = (many - one) / (math.ceil(n_images / 2) - 1)
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
        ex = RayExecutor(num_cpus=cpus)
        mantel_test(models, targets, "spearman", PERM_BLOCK, 0, "cpu", executor=ex)  # warm
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
    args = parser.parse_args()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    src = str(Path(__file__).resolve().parents[1] / "src")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": src}})  # fmt: skip
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
    report["task_overhead"] = task_overhead(args.tasks)
    print("task overhead", report["task_overhead"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        report["shard_overhead"] = shard_overhead(args.images, Path(tmp))
    print("shard overhead", report["shard_overhead"], flush=True)
    per_task = report["task_overhead"]["seconds_per_task"]
    report["mantel"] = permutation_speedup(args.n, args.n_perm, per_task)
    print("mantel", report["mantel"], flush=True)
    report["seconds"] = round(time.time() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{time.strftime('%Y-%m-%d-%H%M')}-ray-overhead.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    ray.shutdown()


if __name__ == "__main__":
    main()
