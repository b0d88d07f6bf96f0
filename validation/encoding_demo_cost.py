"""Cost of the encode stage's permutation nulls on a demo folder: ``predictions`` against the
sequential ``refit`` test (``perm_stop`` 10), one layer, the demo's encode options.

The folder needs the demo's activation store, ``simulation/brain.yaml`` (+ patterns),
``simulation/ratings.csv`` and ``stimuli.csv`` (e.g. the ``results`` of ``object2brain demo``).
Prints and writes ``encoding_demo_cost.json``: seconds per null, rows, the mean ``n_perm``
actually used, the fraction of rows that ran all permutations, and the rejection rate.

Run: ``PYTHONPATH=src nice python validation/encoding_demo_cost.py DEMO_FOLDER [--layer L]
[--n-perm 200] [--reduce pca:256] [--nulls predictions:0,refit_tail:10:59] [--out F]``
(``--reduce pca:256`` with ``--n-perm 1000``: the full demo's options for one layer; the
store may also be the stage's ``activations/<model>.h5`` copied into the folder).

``--estimate-full`` (no folder needed) estimates the refit null of the *full* demo's encode
stage instead: CPU seconds (``time.process_time``) per refit of 200 voxels at its shape (260
stimuli, ``pca:256`` -> 172 dimensions per fold, 3 folds, 3 inner folds, 9 alphas, the ``all``
row and 3 conditions scored from each refit), for the dense numpy maps
(:func:`object2brain.encoding.ridge.fit_smoother`) and the torch spectral maps the stage uses
(:func:`object2brain.encoding.smoother.fit_torch_smoother`), times the full demo's refits if
every test runs all 1,000 (99% do: planted effects): 8 layers x (24 ROIs of 200 voxels + 8
raters) x 1,000. Writes ``encoding_demo_cost_full.json``. Also timed the same way: the
``fixed_alpha`` null (:func:`object2brain.encoding.smoother.fit_fixed_alpha_smoother`, bound to
the alphas a ridge fit chose on the responses; setup = the maps of one layer, bind = per ROI)
and the ``predictions`` null (per test of 200 voxels and 4 masks, the stage's path);
``refit_tail`` with ``n_perm`` 59 is the torch refit's estimate scaled to 59 refits per test.
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
from object2brain.encoding.folds import outer_folds
from object2brain.encoding.ridge import fit_ridge_cv, fit_smoother, reduce_folds
from object2brain.encoding.scores import permutation_test, refit_permutation_tests
from object2brain.encoding.smoother import fit_fixed_alpha_smoother, fit_torch_smoother

#: The full demo's encode stage (``object2brain.demo``): layers, ROIs x voxels, raters,
#: permutations, and its measured seconds with ``predictions`` (quiet machine, last session).
FULL_DEMO = {"layers": 8, "rois": 24, "voxels": 200, "raters": 8, "n_perm": 1000}
FULL_DEMO_STAGE_S = 147.0
#: ``n_perm`` of ``perm_null = refit_tail`` in the estimate (60 = 59 + 1: 0.05 is attainable).
TAIL_REFITS = 59


def run(
    folder: Path, layer: str, n_perm: int, null: str, stop: int, reduce: str = "srp:256"
) -> dict[str, Any]:
    store = next(p for p in folder.glob("*.h5") if not p.name.endswith(".backbone.h5"))
    with tempfile.TemporaryDirectory() as out:
        began, cpu = time.perf_counter(), time.process_time()
        o2b.encode(
            store,
            brain=folder / "simulation" / "brain.yaml",
            ratings=folder / "simulation" / "ratings.csv",
            stimuli=folder / "stimuli.csv",
            out=Path(out) / "encode",
            folds=3,
            inner_folds=3,
            reduce=reduce,
            layers=[layer],
            alphas=[10.0**k for k in range(-1, 8)],
            n_perm=n_perm,
            perm_null=null,
            perm_stop=stop,
            progress=False,
            figures=False,
            device="cpu",
        )
        seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
        table = pd.read_csv(Path(out) / "encode" / "encoding.csv")
    return {
        "perm_null": null,
        "perm_stop": stop,
        "n_perm": n_perm,
        "reduce": reduce,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1),
        "rows": len(table),
        "n_stimuli": int(table["n_stimuli"].max()),
        "mean_n_perm_used": float(table["n_perm"].mean()),
        "rows_with_all_permutations": float((table["n_perm"] == n_perm).mean()),
        "rejected_at_0.05": float((table["p_perm"] <= 0.05).mean()),
        "load_average": os.getloadavg()[0],
    }


def estimate_full(n_perm: int) -> dict[str, Any]:
    """CPU seconds per refit at the full demo's shape (dense vs torch maps) and the full demo's
    refit null extrapolated from them (see the module docstring)."""
    rng = np.random.default_rng(0)
    n, v = 260, FULL_DEMO["voxels"]
    x = rng.standard_normal((n, 400))
    y = x @ rng.standard_normal((400, v)) * 0.05 + rng.standard_normal((n, v))
    folds = outer_folds(n, 3, seed=0)
    reductions = reduce_folds(x, folds, pca_dim=256, standardize=False)
    args = {"alphas": [10.0**k for k in range(-1, 8)], "inner_folds": 3, "seed": 0}
    conditions = rng.integers(0, 3, n)
    masks = [np.ones(n, dtype=bool)] + [conditions == c for c in range(3)]
    out: dict[str, Any] = {
        "shape": f"{n} stimuli, {reductions[0].pca.components.shape[1] if reductions[0].pca else 0}"
        f" PCA dimensions, 3 folds, 3 inner folds, 9 alphas, {v} voxels, 4 masks",
        "torch_threads": torch.get_num_threads(),
        "load_average_before": os.getloadavg()[0],
        "refits_timed": n_perm,
    }
    total_columns = (
        FULL_DEMO["layers"] * FULL_DEMO["n_perm"] * (FULL_DEMO["rois"] * v + FULL_DEMO["raters"])
    )
    for name, fit in (("dense", fit_smoother), ("torch", fit_torch_smoother)):
        began = time.process_time()
        smoother = fit(x, folds, reductions=reductions, **args)
        setup = time.process_time() - began
        predictions = smoother.predict(y)
        began = time.process_time()
        # as the stage calls them: the torch maps relabel, refit and score themselves
        refit = smoother if name == "torch" else smoother.predict
        refit_permutation_tests(y, predictions, refit, masks, n_perm=n_perm, seed=0)
        per_refit = (time.process_time() - began) / n_perm
        refit_s = per_refit * total_columns / v
        out[name] = {
            "setup_cpu_s": round(setup, 3),
            "cpu_s_per_refit_200_voxels": round(per_refit, 5),
            "full_demo_refit_null_cpu_s": round(refit_s),
            "full_demo_stage_estimate_s": round(FULL_DEMO_STAGE_S + refit_s),
            "ratio_to_stage_with_predictions": round(1 + refit_s / FULL_DEMO_STAGE_S, 1),
        }
        if name == "torch":  # refit_tail with n_perm 59: 59 of the same refits per test
            tail_s = refit_s * TAIL_REFITS / FULL_DEMO["n_perm"]
            out[f"refit_tail_{TAIL_REFITS}"] = {
                "full_demo_refit_null_cpu_s": round(tail_s),
                "full_demo_stage_estimate_s": round(FULL_DEMO_STAGE_S + tail_s),
                "ratio_to_stage_with_predictions": round(1 + tail_s / FULL_DEMO_STAGE_S, 2),
            }
    ridge = fit_ridge_cv(x, y, folds, reductions=reductions, keep_weights=False, **args)
    fixed_perm = 5 * n_perm  # cheaper refits: more of them for a stable time
    tests = FULL_DEMO["layers"] * (FULL_DEMO["rois"] + 1)  # the raters' ROI: one test more
    began = time.process_time()
    fixed = fit_fixed_alpha_smoother(x, folds, alphas=args["alphas"], reductions=reductions)
    setup = time.process_time() - began
    began = time.process_time()
    null = fixed.bind(ridge.alphas)
    bind = time.process_time() - began
    began = time.process_time()
    refit_permutation_tests(y, ridge.predictions, null, masks, n_perm=fixed_perm, seed=0)
    per_refit = (time.process_time() - began) / fixed_perm
    refit_s = per_refit * total_columns / v + FULL_DEMO["layers"] * setup + tests * bind
    out["fixed_alpha"] = {
        "setup_cpu_s": round(setup, 4),
        "bind_cpu_s": round(bind, 4),
        "refits_timed": fixed_perm,
        "cpu_s_per_refit_200_voxels": round(per_refit, 6),
        "full_demo_refit_null_cpu_s": round(refit_s),
        "full_demo_stage_estimate_s": round(FULL_DEMO_STAGE_S + refit_s),
        "ratio_to_stage_with_predictions": round(1 + refit_s / FULL_DEMO_STAGE_S, 2),
    }
    began = time.process_time()
    for mask in masks:
        permutation_test(
            y[mask], ridge.predictions[mask], n_perm=FULL_DEMO["n_perm"], seed=0, groups=folds[mask]
        )
    per_test = time.process_time() - began
    out["predictions"] = {
        "cpu_s_per_test_200_voxels_4_masks": round(per_test, 4),
        "full_demo_null_cpu_s": round(per_test * tests, 1),
    }
    out["load_average_after"] = os.getloadavg()[0]
    out["full_demo"] = FULL_DEMO | {"stage_s_with_predictions": FULL_DEMO_STAGE_S}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path, nargs="?")
    parser.add_argument("--estimate-full", action="store_true")
    parser.add_argument("--layer", default="_blocks.7")
    parser.add_argument("--n-perm", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    parser.add_argument("--reduce", default="srp:256", help="pca:256 for the full demo's options")
    parser.add_argument(
        "--nulls",
        default="predictions:0,refit:10",
        help="comma-separated perm_null:perm_stop[:n_perm] (e.g. predictions:0,refit_tail:10:59)",
    )
    args = parser.parse_args()
    if args.estimate_full:
        estimate = estimate_full(min(args.n_perm, 40))
        path = args.out.with_name(args.out.stem + "_full.json")
        path.write_text(json.dumps(estimate, indent=2) + "\n")
        print(json.dumps(estimate, indent=2))
        return
    if args.folder is None:
        parser.error("a demo folder is needed (or --estimate-full)")
    result = {
        "folder": str(args.folder),
        "layer": args.layer,
        "n_perm": args.n_perm,
        "machine": f"{os.cpu_count()} cores (shared, loaded)",
        "torch_threads": torch.get_num_threads(),
        "runs": [
            run(
                args.folder,
                args.layer,
                int(f[2]) if len(f) > 2 else args.n_perm,
                f[0],
                int(f[1]),
                args.reduce,
            )
            for f in (null.split(":") for null in args.nulls.split(","))
        ],
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
