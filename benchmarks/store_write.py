"""The activation store's write, per batch, against what the CPU peer does with the same batch.

One batch = 32 images of resnet18's canonical layers (maxpool, layer1-4, avgpool, fc: 74 MB of
float32; random values), written ``--batches`` times into a fresh store of ``32 x --batches``
rows. Measured per batch, after the first (which creates the datasets): CPU seconds of this
process (user and system apart: the kernel's share of writing 74 MB to a file is system time),
wall seconds, and minor page faults. Variants, interleaved over ``--repeats`` rounds (best kept):

- ``store``: :meth:`StoreWriter.write_rows` as ``extract`` calls it (chunks dividing the batch,
  one flush + fsync per batch, a CRC-32 per row, Fletcher-32 per chunk);
- ``store_before``: the same writer with the protocol of the previous version emulated: chunks of
  up to 4 MB regardless of the batch (so a chunk straddles two batches and HDF5 reads it back,
  checks and rewrites it) and two flush + fsync per batch (rows and digests, then ``n_done``);
- ``h5py_plain``: h5py's own file driver, no checksum, no digest, no sync (the floor of an HDF5
  file of the same chunks);
- ``numpy_copy``: the peer (``create_feature_extractor`` + ``DataLoader``): the batch copied into
  preallocated in-memory arrays, nothing written.

Run: ``PYTHONPATH=src nice -n 10 python benchmarks/store_write.py [--batches 16] [--repeats 3]
[--json benchmarks/results/DATE-store-write.json]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from object2brain.activations import store as S

SHAPES = {
    "maxpool": (64, 56, 56),
    "layer1": (64, 56, 56),
    "layer2": (128, 28, 28),
    "layer3": (256, 14, 14),
    "layer4": (512, 7, 7),
    "avgpool": (512, 1, 1),
    "fc": (1000,),
}
BATCH = 32


class _Before(S.StoreWriter):
    """The previous version's protocol: rows and digests synced, then ``n_done`` synced."""

    def write_rows(self, start: int, blocks: Any) -> None:
        digests = S.row_digests(blocks)
        stop = start + len(digests)
        for name, block in blocks.items():
            self._file["layers"][name][start:stop] = block
        self._file[S.DIGESTS][start:stop] = digests
        self._commit()
        self._file.attrs["n_done"] = stop
        self._commit()


def _usage() -> tuple[float, float, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime, usage.ru_minflt


def _timed(write: Callable[[int], None], batches: int) -> dict[str, float]:
    """Per-batch user/system CPU, wall and minor faults of ``write(start)`` for batches 1.."""
    write(0)
    user0, sys0, faults0 = _usage()
    wall0 = time.perf_counter()
    for index in range(1, batches):
        write(index * BATCH)
    user1, sys1, faults1 = _usage()
    n = batches - 1
    return {
        "user_s": (user1 - user0) / n,
        "sys_s": (sys1 - sys0) / n,
        "cpu_s": (user1 - user0 + sys1 - sys0) / n,
        "wall_s": (time.perf_counter() - wall0) / n,
        "minor_faults": (faults1 - faults0) / n,
    }


def run_store(
    folder: Path, blocks: list[dict[str, np.ndarray]], batches: int, *, before: bool
) -> dict[str, float]:
    n = BATCH * batches
    out = folder / ("before.h5" if before else "store.h5")
    writer = (_Before if before else S.StoreWriter).create(out, [f"s{i}" for i in range(n)], {},
                                                           "fingerprint")  # fmt: skip
    for name, block in blocks[0].items():
        writer.ensure_layer(name, n, tuple(block.shape[1:]), block.dtype,
                            None if before else BATCH)  # fmt: skip
    try:
        return _timed(lambda start: writer.write_rows(start, blocks[start // BATCH % 2]),
                      batches)  # fmt: skip
    finally:
        writer.close()
        S.partial_path(out).unlink(missing_ok=True)


def run_h5py_plain(
    folder: Path, blocks: list[dict[str, np.ndarray]], batches: int
) -> dict[str, float]:
    n = BATCH * batches
    out = folder / "plain.h5"
    with h5py.File(out, "w") as handle:
        datasets = {}
        for name, block in blocks[0].items():
            rows = S.chunk_rows(n, tuple(block.shape[1:]), block.dtype, BATCH)
            datasets[name] = handle.create_dataset(name, shape=(n, *block.shape[1:]),
                                                   dtype=block.dtype,
                                                   chunks=(rows, *block.shape[1:]))  # fmt: skip

        def write(start: int) -> None:
            for name, block in blocks[start // BATCH % 2].items():
                datasets[name][start : start + BATCH] = block

        result = _timed(write, batches)
    out.unlink()
    return result


def run_numpy_copy(blocks: list[dict[str, np.ndarray]], batches: int) -> dict[str, float]:
    n = BATCH * batches
    arrays = {k: np.empty((n, *b.shape[1:]), dtype=b.dtype) for k, b in blocks[0].items()}
    # not touched before: the peer's arrays get their pages as it fills them (page faults)

    def write(start: int) -> None:
        for name, block in blocks[start // BATCH % 2].items():
            arrays[name][start : start + BATCH] = block

    return _timed(write, batches)


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    blocks = [{k: rng.standard_normal((BATCH, *s), dtype=np.float32) for k, s in SHAPES.items()}
              for _ in range(2)]  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="o2b_store_write_", dir=args.workdir))
    variants: dict[str, Callable[[], dict[str, float]]] = {
        "store": lambda: run_store(folder, blocks, args.batches, before=False),
        "store_before": lambda: run_store(folder, blocks, args.batches, before=True),
        "h5py_plain": lambda: run_h5py_plain(folder, blocks, args.batches),
        "numpy_copy": lambda: run_numpy_copy(blocks, args.batches),
    }
    best: dict[str, dict[str, float]] = {}
    loads = []
    try:
        for repeat in range(args.repeats):
            for name, run in variants.items():
                loads.append(os.getloadavg()[0])
                result = run()
                print(f"  [{repeat}] {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                         result.items()), flush=True)  # fmt: skip
                if name not in best or result["cpu_s"] < best[name]["cpu_s"]:
                    best[name] = result
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rounded = {name: {k: round(v, 4) for k, v in r.items()} for name, r in best.items()}
    results = {
        "benchmark": "store_write",
        "command": " ".join(["benchmarks/store_write.py", *(argv or sys.argv[1:])]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": _cpu_name(),
            "cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "h5py": h5py.__version__,
            "hdf5": h5py.version.hdf5_version,
            "load_1min": [round(x, 2) for x in (min(loads), max(loads))],
        },
        "batch_mb": round(sum(b.nbytes for b in blocks[0].values()) / 1e6, 1),
        "batches": args.batches,
        "per_batch_best_of_repeats": rounded,
        "cpu_ratio_store_before_vs_store": round(
            best["store_before"]["cpu_s"] / best["store"]["cpu_s"], 3
        ),
        "cpu_ratio_store_vs_numpy_copy": round(
            best["store"]["cpu_s"] / best["numpy_copy"]["cpu_s"], 3
        ),
    }
    summary = ("per_batch_best_of_repeats", "cpu_ratio_store_before_vs_store",
               "cpu_ratio_store_vs_numpy_copy")  # fmt: skip
    print(json.dumps({k: results[k] for k in summary}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
