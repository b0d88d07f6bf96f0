"""Cost and results of the demo's encode stage with the fold PCA shared by the ROIs.

Runs the ``encode`` stage (:func:`object2brain.encode`, the demo's options: 3 outer / 3 inner
folds, penalties 10^-1 ... 10^7, 1,000 permutations) on a finished demo folder (``object2brain
demo --out DIR``: its store, simulated brain data and ratings) and records, per run, the wall
time and the CPU time of the process (all threads), the EVC layer profile (mean over subjects
of ``r_mean``, all stimuli) and the other planted ROIs' best layers. ``--mode``:

- ``shared``: this code (each outer fold's PCA fitted once per layer, shared by the ROIs);
- ``per_roi``: the same code with the cache switched off (every ROI fits its own PCA: the cost
  before the change);
- with ``PYTHONPATH`` pointing at an older checkout (no ``ReductionCache``) the mode is
  ``before`` whatever is asked.

``--save`` writes the ``encoding`` table (CSV) so that two runs can be compared exactly
(``--compare A.csv B.csv``: max abs difference of every numeric column).

Usage (from the repository root)::

    PYTHONPATH=src nice -n 10 python validation/encoding_pca_shared.py --demo /tmp/demo \
        --reduce pca:256 --mode shared --layers _blocks.14,_blocks.15 --save /tmp/a.csv

Results: ``validation/encoding_pca_shared.md``.
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
import pandas as pd


def _compare(a: Path, b: Path) -> None:
    left, right = pd.read_csv(a), pd.read_csv(b)
    assert left.shape == right.shape, (left.shape, right.shape)
    numeric = left.select_dtypes("number").columns
    worst = {
        c: float(np.nanmax(np.abs(left[c].to_numpy() - right[c].to_numpy())))
        if left[c].notna().any()
        else 0.0
        for c in numeric
    }
    same_nan = all((left[c].isna() == right[c].isna()).all() for c in numeric)
    text = (left.select_dtypes(exclude="number") == right.select_dtypes(exclude="number")).all()
    print(json.dumps({"max_abs_diff": worst, "same_nan": same_nan, "text_equal": bool(text.all())}))


def _profile(table: pd.DataFrame) -> dict[str, Any]:
    rows = table[(table["condition"] == "all") & ~table["layer"].str.startswith("banded:")]
    out: dict[str, Any] = {}
    for target, part in rows.groupby("target", sort=False):
        profile = part.groupby("layer", sort=False)["r_mean"].mean()
        out[str(target)] = {
            "best": str(profile.idxmax()),
            "r": {k: round(float(v), 4) for k, v in profile.items()},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--demo", type=Path)
    parser.add_argument("--reduce", default="pca:256")
    parser.add_argument("--mode", choices=["shared", "per_roi"], default="shared")
    parser.add_argument("--layers", default=None, help="comma-separated (default: all)")
    parser.add_argument("--n-perm", type=int, default=1000)
    parser.add_argument("--save", type=Path)
    parser.add_argument("--record", type=Path, help="append the run's JSON line here")
    parser.add_argument("--compare", type=Path, nargs=2)
    args = parser.parse_args()
    if args.compare:
        _compare(*args.compare)
        return

    import object2brain as o2b
    from object2brain.options import EncodeOptions

    mode = args.mode
    try:
        from object2brain.encoding.ridge import ReductionCache
    except ImportError:
        mode = "before"
    else:
        if mode == "per_roi":
            ReductionCache.reductions = lambda *_a: None  # type: ignore[method-assign,assignment]
    results = args.demo / "results"
    options = EncodeOptions(
        folds=3,
        inner_folds=3,
        reduce=args.reduce,
        alphas=[10.0**k for k in range(-1, 8)],
        n_perm=args.n_perm,
        layers=args.layers.split(",") if args.layers else None,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    result = o2b.encode(
        sorted((results / "activations").glob("efficientnet_lite0.h5")),
        brain=results / "simulation" / "brain.yaml",
        ratings=results / "simulation" / "ratings.csv",
        stimuli=args.demo / "stimuli" / "stimuli.csv",
        options=options,
        seed=0,
        device="cpu",
        progress=False,
        figures=False,
    )
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if args.save:
        result.encoding.to_csv(args.save, index=False)
    record = {
        "mode": mode,
        "reduce": args.reduce,
        "layers": args.layers or "all",
        "n_perm": args.n_perm,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1),
        "load_avg": [round(x, 1) for x in os.getloadavg()],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "profiles": _profile(result.encoding),
    }
    print(json.dumps(record))
    if args.record:
        with args.record.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
