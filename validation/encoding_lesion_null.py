"""Calibration and power of the encoding lesion's ``p_null`` (group vs random filter subsets).

Each dataset: ``n`` stimuli, a layer of ``C`` filters x 2 positions (Gaussian), an ROI of ``v``
voxels reading a random linear map of *every* filter plus noise (SNR 1). The encoding model is
fitted as the lesion fits it (:func:`object2brain.encoding.ridge.fit_ridge_cv`, 3 folds, 4
penalties). Null: the lesioned "group" is a random set of ``size`` filters drawn independently
of the data, so it is exchangeable with the null subsets and the fraction of datasets with
``p_null <= 0.05`` must lie in the 95% binomial interval around 0.05 (lesion and keep). Power:
the voxels read only the group's filters (the planted truth), the group is lesioned.

Run: ``PYTHONPATH=src python validation/encoding_lesion_null.py [--datasets 200]``; writes
``validation/encoding_lesion_null.json``.
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

from object2brain.encoding.folds import outer_folds
from object2brain.encoding.ridge import fit_ridge_cv
from object2brain.lesion.analysis import null_p_z, null_subset_masks
from object2brain.lesion.encoding import subset_mean_r

LEVEL = 0.05
ALPHAS = [1.0, 100.0, 1e4, 1e6]


def dataset_p(index: int, n: int, C: int, v: int, size: int, n_null: int, planted: bool) -> dict:
    """``p_null`` of the lesion and keep variants of one dataset's group."""
    rng = np.random.default_rng([11, index, int(planted)])
    features = rng.standard_normal((n, C, 2))
    group = np.sort(rng.choice(C, size, replace=False))
    read = group if planted else np.arange(C)
    signal = features[:, read].reshape(n, -1) @ rng.standard_normal((2 * len(read), v))
    y = signal + signal.std() * rng.standard_normal(signal.shape)
    folds = outer_folds(n, 3, seed=index)
    fit = fit_ridge_cv(features.reshape(n, -1), y, folds, alphas=ALPHAS, inner_folds=3, seed=index)
    out = {}
    for variant in ("lesion", "keep"):
        mask = np.full(C, variant == "lesion")
        mask[group] = variant == "keep"
        nulls = null_subset_masks(C, group, None, n_null, index, variant)
        r = subset_mean_r(
            fit, features, y, np.vstack([np.ones(C, bool), mask, nulls]), [np.ones(n, dtype=bool)]
        )[:, 0]
        p, _ = null_p_z(np.array([r[1] - r[0]]), (r[2:] - r[0])[:, None])
        out[variant] = float(p[0])
    return out


def run(datasets: int, n: int, C: int, v: int, size: int, n_null: int) -> dict[str, Any]:
    start = time.perf_counter()
    null = [dataset_p(i, n, C, v, size, n_null, planted=False) for i in range(datasets)]
    power = [dataset_p(i, n, C, v, size, n_null, planted=True) for i in range(datasets // 4)]
    low, high = (b / datasets for b in stats.binom.interval(0.95, datasets, LEVEL))
    rates = {k: float(np.mean([d[k] <= LEVEL for d in null])) for k in ("lesion", "keep")}
    return {
        "datasets": datasets,
        "n_stimuli": n,
        "n_filters": C,
        "group_size": size,
        "n_voxels": v,
        "n_null": n_null,
        "level": LEVEL,
        "binomial_95_interval": [low, high],
        "rejection_rate": rates,
        "inside_interval": {k: bool(low <= r <= high) for k, r in rates.items()},
        "power_planted_lesion": float(np.mean([d["lesion"] <= LEVEL for d in power])),
        "power_datasets": len(power),
        "seconds": round(time.perf_counter() - start, 1),
        "machine": f"{platform.machine()}, Python {platform.python_version()}, shared 2 cores",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", type=int, default=200)
    parser.add_argument("--n-null", type=int, default=200)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("encoding_lesion_null.json")
    )
    args = parser.parse_args()
    result = run(args.datasets, 40, 12, 10, 4, args.n_null)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
