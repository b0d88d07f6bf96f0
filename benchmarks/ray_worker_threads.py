"""Benchmark: why a Mantel task on Ray can take many times the driver's time on a loaded machine.

Times the Mantel permutation blocks (``--n-perm`` permutations of ``--n`` stimuli, 8 model and 8
target RDMs, as ``benchmarks/ray_overhead.py``) in this process (torch on one thread) and on a
local Ray cluster of 2 CPUs, as tasks of 2 CPUs, then of 1 CPU, then of 2 CPUs again. Each chunk
reports, from inside its worker, the worker's process id, ``torch.get_num_threads()``, the
``OMP_NUM_THREADS`` Ray gave the worker, and its wall and CPU seconds, so the work of the
chunks is compared with the same work in the driver per CPU-second, apart from task overheads.

Run: ``.venv/bin/python benchmarks/ray_worker_threads.py [--n 80] [--n-perm 8000]
[--omp-wait-policy PASSIVE]`` (the workers' OpenMP threads sleep instead of spinning while they
wait); writes ``benchmarks/results/<date>-ray-worker-threads[-omp-passive].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _timed_chunk(job: Any, blocks: range) -> dict[str, Any]:
    """One chunk of permutation blocks, timed inside the worker."""
    import torch

    from object2brain.rsa import inference

    wall, cpu = time.perf_counter(), time.process_time()
    inference._count_blocks(job, blocks)
    return {
        "pid": os.getpid(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "blocks": len(blocks),
        "wall_seconds": time.perf_counter() - wall,
        "cpu_seconds": time.process_time() - cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=80)
    parser.add_argument("--n-perm", type=int, default=8000)
    parser.add_argument("--omp-wait-policy", choices=["PASSIVE", "ACTIVE"], default=None,
                        help="OMP_WAIT_POLICY of the Ray workers (default: not set)")  # fmt: skip
    args = parser.parse_args()
    import ray
    import torch

    from object2brain.executors import RayExecutor
    from object2brain.rsa import inference
    from object2brain.rsa.inference import mantel_test

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {"PYTHONPATH": src}
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})  # fmt: skip
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    m = args.n * (args.n - 1) // 2
    models, targets = rng.normal(size=(8, m)), rng.normal(size=(8, m))
    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "load_average_1min_at_start": os.getloadavg()[0],
    }
    report: dict[str, Any] = {"machine": machine, "n": args.n, "n_perm": args.n_perm,
                              "omp_wait_policy": args.omp_wait_policy}  # fmt: skip
    wall, cpu = time.perf_counter(), time.process_time()
    mantel_test(models, targets, "spearman", args.n_perm, 0, "cpu")
    report["driver"] = {"wall_seconds": time.perf_counter() - wall,
                        "cpu_seconds": time.process_time() - cpu, "torch_threads": 1}  # fmt: skip
    print("driver", report["driver"], flush=True)
    runs = []
    for cpus in (2, 1, 2):
        executor = RayExecutor(num_cpus=cpus)
        chunks: list[dict[str, Any]] = []
        real = executor.map_chunks

        def timed(
            fn: Any,
            parts: Any,
            *,
            stage: str,
            shared: Any = None,
            real: Any = real,
            chunks: list[dict[str, Any]] = chunks,
        ) -> list[Any]:
            chunks.extend(real(_timed_chunk, parts, stage=stage, shared=shared))
            return [torch.zeros_like(shared.bound, dtype=torch.int64) for _ in parts]

        executor.map_chunks = timed  # type: ignore[method-assign]
        wall = time.perf_counter()
        mantel_test(models, targets, "spearman", args.n_perm, 0, "cpu", executor=executor)
        run = {"cpus_per_task": cpus, "wall_seconds": time.perf_counter() - wall,
               "load_average_1min": os.getloadavg()[0], "chunks": chunks}  # fmt: skip
        print(run, flush=True)
        runs.append(run)
    report["ray"] = runs
    blocks = -(-args.n_perm // inference.PERM_BLOCK)
    per_block = {"driver_1_thread": report["driver"]["cpu_seconds"] / blocks}
    for threads in (1, 2):
        mine = [c for r in runs for c in r["chunks"] if c["torch_threads"] == threads]
        if mine:
            per_block[f"ray_worker_{threads}_threads"] = sum(c["cpu_seconds"] for c in mine) / sum(
                c["blocks"] for c in mine
            )
    report["cpu_seconds_per_block"] = per_block
    report["machine"]["load_average_1min_at_end"] = os.getloadavg()[0]
    print("CPU seconds per block of 1,000 permutations", per_block)
    RESULTS.mkdir(exist_ok=True)
    tag = f"-omp-{args.omp_wait_policy.lower()}" if args.omp_wait_policy else ""
    path = RESULTS / f"{time.strftime('%Y-%m-%d-%H%M')}-ray-worker-threads{tag}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    ray.shutdown()


if __name__ == "__main__":
    main()
