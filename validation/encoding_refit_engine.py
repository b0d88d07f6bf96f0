"""The ``refit`` null's engines on a demo store: the torch spectral maps the stage uses
(:mod:`object2brain.encoding.smoother`, scoring on their device) against the dense numpy maps
they replaced (:func:`object2brain.encoding.ridge.fit_smoother`, scoring on the host), same data,
options and permutations: the ``encoding`` tables must agree (p-values and permutation counts
equal, every other number within 1e-10).

The folder is the one of ``validation/encoding_demo_cost.py`` (the demo's store,
``simulation/brain.yaml`` + patterns, ``simulation/ratings.csv``, ``stimuli.csv``). Writes
``encoding_refit_engine.json``.

Run: ``PYTHONPATH=src nice python validation/encoding_refit_engine.py DEMO_FOLDER [--layer L]
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

import numpy as np
import pandas as pd
import torch

import object2brain as o2b
from object2brain.encoding import compute
from object2brain.encoding.ridge import fit_smoother


def _dense_refit(study: Any, inputs: np.ndarray, reductions: Any) -> Any:
    """``compute._refit`` with the dense numpy maps (host scoring)."""
    if study.options.perm_null != "refit" or study.options.n_perm == 0:
        return None
    kind, dim = study.options.reduction()
    return fit_smoother(
        inputs,
        study.folds,
        alphas=study.options.alphas,
        inner_folds=study.options.inner_folds,
        seed=study.seed,
        pca_dim=dim if kind == "pca" else None,
        standardize=study.options.standardize,
        reductions=reductions,
    ).predict


def encode(folder: Path, layer: str, n_perm: int) -> tuple[pd.DataFrame, float]:
    """The ``encoding`` table of one layer with the sequential ``refit`` null, and seconds."""
    store = next(folder.glob("*.h5"))
    with tempfile.TemporaryDirectory() as out:
        began = time.process_time()
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
            perm_null="refit",
            progress=False,
            figures=False,
            device="cpu",
        )
        seconds = time.process_time() - began
        return pd.read_csv(Path(out) / "encode" / "encoding.csv"), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--layer", default="_blocks.7")
    parser.add_argument("--n-perm", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = parser.parse_args()
    torch_table, torch_s = encode(args.folder, args.layer, args.n_perm)
    original = compute._refit
    compute._refit = _dense_refit  # type: ignore[assignment]
    try:
        dense_table, dense_s = encode(args.folder, args.layer, args.n_perm)
    finally:
        compute._refit = original
    numeric = [c for c in torch_table.columns if pd.api.types.is_float_dtype(torch_table[c])]
    difference = {
        c: float(np.nanmax(np.abs(torch_table[c].to_numpy() - dense_table[c].to_numpy())))
        for c in numeric
        if torch_table[c].notna().any()
    }
    result = {
        "folder": str(args.folder),
        "layer": args.layer,
        "n_perm": args.n_perm,
        "rows": len(torch_table),
        "p_perm_equal": bool((torch_table["p_perm"] == dense_table["p_perm"]).all()),
        "n_perm_equal": bool((torch_table["n_perm"] == dense_table["n_perm"]).all()),
        "max_abs_difference": difference,
        "ok": bool(
            (torch_table["p_perm"] == dense_table["p_perm"]).all()
            and (torch_table["n_perm"] == dense_table["n_perm"]).all()
            and max(difference.values()) < 1e-10
        ),
        "stage_cpu_s": {"torch": round(torch_s, 1), "dense": round(dense_s, 1)},
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
