"""Calibration of the encoding permutation test under the null (no relation of features to voxels).

Each null dataset: ``n`` stimuli, one layer of ``p`` Gaussian features, an ROI of ``v`` Gaussian
voxels independent of them; :func:`object2brain.encoding.compute_encoding` (5 outer folds, the
default alpha grid, 5 inner folds) gives ``p_perm`` of the ROI's mean r, once with each
``perm_null``. Over ``--datasets`` such datasets the fraction with ``p_perm <= 0.05`` must lie in
the 95% binomial interval around 0.05. For comparison the same out-of-fold predictions are also
tested with permutations across folds (``groups=None``), which the encoding stage does not use.

What it shows (recorded in ``encoding_null.json``): ``refit`` (relabel the responses, rerun the
whole cross-validation, alpha choice included) is exact; permuting fixed predictions is valid
but conservative. Under
the null, out-of-fold ridge predictions correlate *negatively* with the held-out responses on
average (a property of cross-validated predictions: the fold intercepts move against the held-out
values, and the per-voxel r's normalisation by the prediction's own spread skews it further),
while permuting fixed predictions gives a null centred at 0. Permuting within the outer folds
removes the intercept part; the rest remains.

Run: ``PYTHONPATH=src python validation/encoding_null.py [--datasets 200] [--n-perm 1000]``;
writes ``validation/encoding_null.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from object2brain.encoding import compute_encoding
from object2brain.encoding.folds import outer_folds
from object2brain.encoding.ridge import fit_ridge_cv
from object2brain.encoding.scores import permutation_test
from object2brain.options import EncodeOptions, Runtime

LEVEL = 0.05


def null_dataset(index: int, n: int, p: int, v: int) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(n, p)`` and independent voxel responses ``(n, v)`` of null dataset ``index``."""
    rng = np.random.default_rng([2024, index])
    return rng.standard_normal((n, p)), rng.standard_normal((n, v))


def run(datasets: int, n_perm: int, n: int, p: int, v: int) -> dict[str, Any]:
    """Rejection rates at 0.05 of the stage's two tests (``perm_null = refit``: exact;
    ``predictions``: within-fold permutations of the predictions) and of permutations across
    folds (for comparison), and the 95% binomial interval around 0.05."""
    p_values: dict[str, list[float]] = {"refit": [], "predictions": [], "across_folds": []}
    start = time.perf_counter()
    for index in range(datasets):
        features, responses = null_dataset(index, n, p, v)
        runtime = Runtime(seed=index, device="cpu", progress=False)
        for null in ("refit", "predictions"):
            result = compute_encoding(
                {"layer": features},
                {("roi", "sub-01"): responses},
                EncodeOptions(n_perm=n_perm, perm_null=null),
                runtime,
                stimulus_ids=[f"s{i}" for i in range(n)],
            )
            p_values[null].append(float(result.encoding["p_perm"].iloc[0]))
        options = EncodeOptions()
        folds = outer_folds(n, options.folds, seed=index)
        fit = fit_ridge_cv(
            features, responses, folds, alphas=options.alphas, inner_folds=5, seed=index
        )
        p_values["across_folds"].append(
            permutation_test(responses, fit.predictions, n_perm=n_perm, seed=index).p
        )
    low, high = (bound / datasets for bound in stats.binom.interval(0.95, datasets, LEVEL))
    rates = {k: float(np.mean(np.asarray(ps) <= LEVEL)) for k, ps in p_values.items()}
    return {
        "datasets": datasets,
        "n_perm": n_perm,
        "n_stimuli": n,
        "n_features": p,
        "n_voxels": v,
        "folds": 5,
        "level": LEVEL,
        "binomial_95_interval": [low, high],
        "rejection_rate": rates,
        "inside_interval": {k: bool(low <= r <= high) for k, r in rates.items()},
        "ks_uniform_p": {
            k: float(stats.kstest(ps, "uniform").pvalue) for k, ps in p_values.items()
        },
        "seconds": round(time.perf_counter() - start, 1),
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", type=int, default=200)
    parser.add_argument("--n-perm", type=int, default=1000)
    parser.add_argument("--stimuli", type=int, default=60)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--voxels", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("encoding_null.json"))
    args = parser.parse_args()
    result = run(args.datasets, args.n_perm, args.stimuli, args.features, args.voxels)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
