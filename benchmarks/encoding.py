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
Scenario R (CPU; ``--device cuda`` adds the GPU): the ``refit`` null's cost per refit (one
relabelled copy of every voxel), ours (:func:`~object2brain.encoding.smoother.fit_torch_smoother`,
float64 torch) against the dense numpy maps it replaced
(:func:`~object2brain.encoding.ridge.fit_smoother`) and against refitting with himalaya
(:func:`~object2brain.encoding.ridge.fit_ridge_cv` on the relabelled copies), on the same
permutations: CPU seconds (``time.process_time``) per refit, the ratios, and the largest difference
of the null statistics. Shapes: the full demo's encode (260 stimuli, ``pca:256``, 3 folds, 3 inner
folds, 9 alphas, 200 voxels), the default options (5 folds, 5 inner folds, 19 alphas) and a
narrow layer (``pca:32``). Also timed there: the ``fixed_alpha`` null's refit of the same copies
(:func:`~object2brain.encoding.smoother.fit_fixed_alpha_smoother`, bound to the alphas a fit of
the unrelabelled responses chose; predictions only, as for the others).
Scenario B (``--device cuda`` only): 1,000 stimuli x 20 layers (``--features`` each) x 10,000
voxels x 5 folds x 19 alphas with himalaya's ``torch_cuda`` backend.

Run: ``PYTHONPATH=src python benchmarks/encoding.py [--quick] [--device cpu|cuda] [--json PATH]
[--only-refit]`` (one BLAS thread: ``OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1``)
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
from object2brain.encoding.smoother import fit_fixed_alpha_smoother, fit_torch_smoother

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


#: Scenario R's shapes: (label, stimuli, features, pca_dim, folds, inner folds, alphas, voxels).
REFIT_SHAPES = (
    ("full demo encode", 260, 400, 256, 3, 3, np.logspace(-1, 7, 9), 200),
    ("default options", 260, 400, 256, 5, 5, ALPHAS, 200),
    ("narrow layer (pca:32)", 260, 400, 32, 5, 5, ALPHAS, 200),
)


def _cpu_seconds(fn: Any, repeats: int) -> tuple[float, Any]:
    """Best CPU seconds of ``repeats`` calls of ``fn`` (a first call warms up) and its value."""
    value = fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        value = fn()
        best = min(best, time.process_time() - start)
    return best, value


def _refit_row(shape: tuple[Any, ...], n_perm: int, device: str) -> dict[str, Any]:
    """One shape of :func:`scenario_refit`."""
    label, n, p, dim, k, inner, alphas, v = shape
    x, y = data(n, p, v)
    folds = outer_folds(n, k, seed=0)
    args = {"alphas": alphas, "inner_folds": inner, "seed": 0, "pca_dim": dim}
    rng = np.random.default_rng(1)
    copies = np.hstack([y[rng.permutation(n)] for _ in range(n_perm)])  # (n, n_perm v)
    setup_ours, ours = _cpu_seconds(lambda: fit_torch_smoother(x, folds, **args), 1)
    setup_dense, dense = _cpu_seconds(lambda: fit_smoother(x, folds, **args), 1)
    t_ours, p_ours = _cpu_seconds(lambda: ours.predict(copies), 3)
    t_dense, p_dense = _cpu_seconds(lambda: dense.predict(copies), 3)
    few = copies[:, : 4 * v]  # himalaya: 4 refits
    t_hima, p_hima = _cpu_seconds(
        lambda: fit_ridge_cv(x, few, folds, keep_weights=False, **args).predictions, 1
    )
    # the fixed_alpha null: each copy refitted with its voxel's alphas chosen on y
    chosen = fit_ridge_cv(x, y, folds, keep_weights=False, **args).alphas
    fixed = fit_fixed_alpha_smoother(x, folds, alphas=alphas, pca_dim=dim)
    bound = fixed.bind(np.tile(chosen, n_perm))
    t_fixed, _ = _cpu_seconds(lambda: bound.predict(copies), 3)
    row: dict[str, Any] = {
        "shape": f"{label}: {n} stimuli, pca:{dim} of {p} features, {k} folds, {inner} "
        f"inner folds, {len(alphas)} alphas, {v} voxels, {n_perm} refits",
        "ours_torch_cpu_s_per_refit": round(t_ours / n_perm, 5),
        "dense_numpy_s_per_refit": round(t_dense / n_perm, 5),
        "himalaya_refit_s_per_refit": round(t_hima / 4, 4),
        "ratio_dense_over_ours": round(t_dense / t_ours, 2),
        "ratio_himalaya_over_ours": round(t_hima / 4 / (t_ours / n_perm), 1),
        "fixed_alpha_s_per_refit": round(t_fixed / n_perm, 5),
        "ratio_ours_over_fixed_alpha": round(t_ours / t_fixed, 2),
        "setup_s_ours": round(setup_ours, 3),
        "setup_s_dense": round(setup_dense, 3),
        "max_abs_difference_vs_dense": float(np.abs(p_ours - p_dense).max()),
        "max_abs_difference_vs_himalaya": float(np.abs(p_ours[:, : 4 * v] - p_hima).max()),
    }
    if device.startswith("cuda"):
        gpu = fit_torch_smoother(x, folds, device=device, **args)
        many = np.hstack([copies] * 25)  # 25 n_perm refits
        gpu.predict(many)
        torch.cuda.synchronize()
        start = time.perf_counter()
        p_gpu = gpu.predict(many)
        seconds = time.perf_counter() - start
        row["ours_cuda_wall_s_per_refit"] = round(seconds / (25 * n_perm), 6)
        row["max_abs_difference_cuda_vs_cpu"] = float(
            np.abs(p_gpu[:, : p_ours.shape[1]] - p_ours).max()
        )
    return row


def scenario_refit(quick: bool, device: str) -> list[dict[str, Any]]:
    """The ``refit`` null per refit: ours (torch) vs the dense maps vs himalaya refits."""
    n_perm = 10 if quick else 40
    return [_refit_row(shape, n_perm, device) for shape in REFIT_SHAPES]


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


def run(
    quick: bool = False, device: str = "cpu", features: int = 1000, only_refit: bool = False
) -> dict[str, Any]:
    n, p, v = (200, 100, 500) if quick else (500, 300, 2000)
    result: dict[str, Any] = {
        "machine": machine(),
        "load_average_1_5_15_min_before": list(os.getloadavg()),
    }
    if not only_refit:
        result["A"] = scenario_a(n, p, v, sk_voxels=10)
    result["R"] = scenario_refit(quick, device)
    result["load_average_1_5_15_min_after"] = list(os.getloadavg())
    if only_refit:
        return result
    if device.startswith("cuda"):
        result["B"] = scenario_b(features, layers=2 if quick else 20)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--features", type=int, default=1000, help="Scenario B: per layer.")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--only-refit", action="store_true", help="scenario R only")
    args = parser.parse_args()
    result = run(args.quick, args.device, args.features, args.only_refit)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
