"""Cost of the encode stage's permutation nulls on a demo folder: ``predictions`` against the
sequential ``refit`` test (``perm_stop`` 10), one layer, the demo's encode options.

The folder needs the demo's activation store, ``simulation/brain.yaml`` (+ patterns),
``simulation/ratings.csv`` and ``stimuli.csv`` (e.g. the ``results`` of ``object2brain demo``).
Prints and writes ``encoding_demo_cost.json``: seconds per null, rows, the mean ``n_perm``
actually used, the fraction of rows that ran all permutations, and the rejection rate.

Run: ``PYTHONPATH=src nice python validation/encoding_demo_cost.py DEMO_FOLDER [--layer L]
[--n-perm 200]``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

import object2brain as o2b


def run(folder: Path, layer: str, n_perm: int, null: str, stop: int) -> dict[str, Any]:
    store = next(folder.glob("*.h5"))
    with tempfile.TemporaryDirectory() as out:
        began = time.perf_counter()
        o2b.encode(
            store,
            brain=folder / "simulation" / "brain.yaml",
            ratings=folder / "simulation" / "ratings.csv",
            stimuli=folder / "stimuli.csv",
            out=Path(out) / "encode",
            folds=3,
            inner_folds=3,
            reduce="srp:256",
            layers=[layer],
            alphas=[10.0**k for k in range(-1, 8)],
            n_perm=n_perm,
            perm_null=null,
            perm_stop=stop,
            progress=False,
            figures=False,
            device="cpu",
        )
        seconds = time.perf_counter() - began
        table = pd.read_csv(Path(out) / "encode" / "encoding.csv")
    return {
        "perm_null": null,
        "perm_stop": stop,
        "seconds": round(seconds, 1),
        "rows": len(table),
        "n_stimuli": int(table["n_stimuli"].max()),
        "mean_n_perm_used": float(table["n_perm"].mean()),
        "rows_with_all_permutations": float((table["n_perm"] == n_perm).mean()),
        "rejected_at_0.05": float((table["p_perm"] <= 0.05).mean()),
        "load_average": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--layer", default="_blocks.7")
    parser.add_argument("--n-perm", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = parser.parse_args()
    result = {
        "folder": str(args.folder),
        "layer": args.layer,
        "n_perm": args.n_perm,
        "machine": f"{os.cpu_count()} cores (shared, loaded)",
        "runs": [run(args.folder, args.layer, args.n_perm, *null) for null in
                 (("predictions", 0), ("refit", 10))],
    }  # fmt: skip
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
