"""Benchmark of the cross-validated ridge (himalaya) against scikit-learn, per voxel.

Scenario A (CPU, the same data and folds for both): ``n`` stimuli x ``p`` features -> ``v``
voxels, 5 outer folds, 19 alphas (``logspace(-2, 7, 19)``), penalty per voxel.
- ours: :func:`object2brain.encoding.ridge.fit_ridge_cv` (himalaya ``RidgeCV``: one SVD per inner
  training set, all voxels and alphas at once; 5 inner folds);
- scikit-learn, same design: per outer fold and voxel, ``RidgeCV(alphas, cv=<the same 5 inner
  folds>)`` (a grid search refitting each alpha; timed on a subset of voxels and extrapolated
  linearly, said so below);
- scikit-learn, fastest: per outer fold ``RidgeCV(alphas, alpha_per_target=True)`` (efficient
  leave-one-out on all voxels at once; a different inner scheme, shown for reference).
- the permutation nulls of the ROI's mean r: the exact ``refit`` (set-up of the linear maps, then
  :func:`~object2brain.encoding.scores.refit_permutation_test`: the whole cross-validation rerun
  on relabelled responses, batched over permutations) and the fast ``predictions`` null
  (:func:`~object2brain.encoding.scores.permutation_test`), 100 permutations each.
Scenario B (``--device cuda`` only): 1,000 stimuli x 20 layers (``--features`` each) x 10,000
voxels x 5 folds x 19 alphas with himalaya's ``torch_cuda`` backend.

Run: ``PYTHONPATH=src python benchmarks/encoding.py [--quick] [--device cpu|cuda] [--json PATH]``
(``--json``: also write the result, with the machine and its load average, e.g. to
``benchmarks/results/<date>-encoding-cpu.json``).
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
import torch
from sklearn.linear_model import RidgeCV

from object2brain.encoding.folds import fold_splits, inner_splits, outer_folds
from object2brain.encoding.ridge import fit_ridge_cv, fit_smoother
from object2brain.encoding.scores import permutation_test, refit_permutation_test

ALPHAS = np.logspace(-2, 7, 19)


def machine() -> str:
    """CPU model and cores (and the GPU when one is used)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if "model name" in line]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {cores} cores available, torch threads {torch.get_num_threads()}{gpu}"


def data(n: int, p: int, v: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p))
    y = x @ rng.standard_normal((p, v)) * 0.1 + rng.standard_normal((n, v))
    return x, y


def scenario_a(n: int, p: int, v: int, sk_voxels: int) -> dict[str, Any]:
    x, y = data(n, p, v)
    folds = outer_folds(n, 5, seed=0)
    start = time.perf_counter()
    ours = fit_ridge_cv(x, y, folds, alphas=ALPHAS, inner_folds=5, seed=0)
    t_ours = time.perf_counter() - start

    start = time.perf_counter()
    chosen = np.empty((5, sk_voxels))
    for k, (train, _) in enumerate(fold_splits(folds)):
        cv = inner_splits(train.size, 5, seed=0, outer_fold=k)
        for voxel in range(sk_voxels):
            model = RidgeCV(alphas=ALPHAS, cv=cv, scoring="neg_mean_squared_error")
            chosen[k, voxel] = model.fit(x[train], y[train, voxel]).alpha_
    t_sk = (time.perf_counter() - start) * v / sk_voxels
    agree = float(np.mean(np.isclose(chosen, ours.alphas[:, :sk_voxels])))

    start = time.perf_counter()
    for train, _ in fold_splits(folds):
        RidgeCV(alphas=ALPHAS, alpha_per_target=True).fit(x[train], y[train])
    t_loo = time.perf_counter() - start
    start = time.perf_counter()
    smoother = fit_smoother(x, folds, alphas=ALPHAS, inner_folds=5, seed=0)
    t_smoother = time.perf_counter() - start
    start = time.perf_counter()
    refit_permutation_test(y, ours.predictions, smoother.predict, n_perm=100, seed=0)
    t_perm = (time.perf_counter() - start) / 100
    start = time.perf_counter()
    permutation_test(y, ours.predictions, n_perm=100, seed=0, groups=folds)
    t_fast = (time.perf_counter() - start) / 100
    return {
        "shape": f"{n} stimuli x {p} features x {v} voxels, 5 folds, 19 alphas",
        "refit_null_setup_s": round(t_smoother, 2),
        "refit_null_s_per_permutation": round(t_perm, 4),
        "predictions_null_s_per_permutation": round(t_fast, 6),
        "ours_s": round(t_ours, 2),
        "sklearn_per_voxel_same_folds_s": round(t_sk, 1),
        "sklearn_per_voxel_extrapolated_from_voxels": sk_voxels,
        "ratio_sklearn_per_voxel_over_ours": round(t_sk / t_ours, 1),
        "alphas_agree_fraction": agree,
        "sklearn_loo_all_voxels_s": round(t_loo, 2),
        "ratio_sklearn_loo_over_ours": round(t_loo / t_ours, 2),
    }


def scenario_b(features: int, layers: int) -> dict[str, Any]:
    n, v = 1000, 10_000
    rng = np.random.default_rng(0)
    y = rng.standard_normal((n, v)).astype(np.float32)
    folds = outer_folds(n, 5, seed=0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(layers):
        x = rng.standard_normal((n, features)).astype(np.float32)
        fit_ridge_cv(x, y, folds, alphas=ALPHAS, inner_folds=5, seed=0, backend="torch_cuda")
    torch.cuda.synchronize()
    return {
        "shape": f"1000 stimuli x {layers} layers x {features} features x 10000 voxels, 5 folds",
        "seconds": round(time.perf_counter() - start, 1),
    }


def run(quick: bool = False, device: str = "cpu", features: int = 1000) -> dict[str, Any]:
    n, p, v = (200, 100, 500) if quick else (500, 300, 2000)
    result: dict[str, Any] = {
        "machine": machine(),
        "load_average_1_5_15_min_before": list(os.getloadavg()),
        "A": scenario_a(n, p, v, sk_voxels=10),
        "load_average_1_5_15_min_after": list(os.getloadavg()),
    }
    if device.startswith("cuda"):
        result["B"] = scenario_b(features, layers=2 if quick else 20)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--features", type=int, default=1000, help="Scenario B: per layer.")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    result = run(args.quick, args.device, args.features)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
