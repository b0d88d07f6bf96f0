"""CPU lanes: one forward pass over all of torch's intra-op threads vs batches side by side.

What extraction's CPU lanes (``activations.extract.cpu_lanes``) rest on, measured on the forward
pass alone: resnet18 with random weights (``o2b.load_model("resnet18", "none", seed=0)``), a
batch of ``--batch`` (32) random inputs of 224 x 224, ``inference_mode``, in both memory layouts:

- ``one_batch``: ``--passes`` passes one after the other with all ``torch.get_num_threads()``
  intra-op threads (extraction before 2026-12-06);
- ``lanes``: the same passes split over ``--lanes`` (2) threads, each with
  ``threads // lanes`` intra-op threads (extraction's CPU lanes).

Reported per batch: CPU seconds of the process (user + system; on a shared machine the honest
measure, as spinning at an operator's barrier while a thread is descheduled counts here) and
wall seconds, best of ``--repeats`` interleaved rounds, with the 1-min load average; and whether
the network's outputs of both modes are equal bit for bit.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/cpu_lanes.py [--json FILE]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import threading
import time
from pathlib import Path
from typing import Any


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--lanes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    import torch

    import object2brain as o2b

    threads = torch.get_num_threads()
    per_lane = max(1, threads // args.lanes)
    network = o2b.load_model("resnet18", "none", seed=0).module.eval()
    inputs = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    outputs: dict[str, torch.Tensor] = {}

    def one_batch(x: torch.Tensor) -> None:
        for _ in range(args.passes):
            outputs["one_batch"] = network(x)

    def lanes(x: torch.Tensor) -> None:
        def lane(count: int) -> None:
            torch.set_num_threads(per_lane)
            with torch.inference_mode():
                for _ in range(count):
                    outputs["lanes"] = network(x)

        counts = [args.passes // args.lanes + (i < args.passes % args.lanes)
                  for i in range(args.lanes)]  # fmt: skip
        workers = [threading.Thread(target=lane, args=(c,)) for c in counts]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        torch.set_num_threads(threads)

    modes = {"one_batch": one_batch, "lanes": lanes}
    results: dict[str, dict[str, Any]] = {}
    equal: dict[str, bool] = {}
    for layout, fmt in (("contiguous", torch.contiguous_format),
                        ("channels_last", torch.channels_last)):  # fmt: skip
        network.to(memory_format=fmt)
        x = inputs.contiguous(memory_format=fmt)
        with torch.inference_mode():
            network(x)  # warm-up (kernels chosen, memory allocated)
            for repeat in range(args.repeats):
                for name, run in modes.items():
                    cpu, wall = cpu_seconds(), time.perf_counter()
                    run(x)
                    cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
                    row = results.setdefault(f"{layout}/{name}", {"cpu_s": [], "wall_s": [],
                                                                  "load_1min": []})  # fmt: skip
                    row["cpu_s"].append(round(cpu / args.passes, 4))
                    row["wall_s"].append(round(wall / args.passes, 4))
                    row["load_1min"].append(round(os.getloadavg()[0], 2))
                    print(f"[{repeat}] {layout} {name}: {cpu / args.passes:.3f} CPU-s, "
                          f"{wall / args.passes:.3f} s per batch (load {os.getloadavg()[0]:.1f})",
                          flush=True)  # fmt: skip
        equal[layout] = bool(torch.equal(outputs["one_batch"], outputs["lanes"]))
    summary = {
        key: {
            "best_cpu_s_per_batch": min(row["cpu_s"]),
            "best_wall_s_per_batch": min(row["wall_s"]),
        }
        for key, row in results.items()
    }
    for layout in ("contiguous", "channels_last"):
        one, two = summary[f"{layout}/one_batch"], summary[f"{layout}/lanes"]
        summary[f"{layout}/lanes_cpu_saving"] = round(
            1 - two["best_cpu_s_per_batch"] / one["best_cpu_s_per_batch"], 3
        )
    out = {
        "benchmark": "cpu_lanes",
        "command": " ".join(["benchmarks/cpu_lanes.py", *(argv or [])]),
        "machine": {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "cpu": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)),
            "torch_threads": threads,
            "threads_per_lane": per_lane,
            "torch": torch.__version__,
        },
        "batch": args.batch,
        "passes": args.passes,
        "lanes": args.lanes,
        "runs": results,
        "summary": summary,
        "outputs_equal_bit_for_bit": equal,
    }
    print(json.dumps({"summary": summary, "equal": equal}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
