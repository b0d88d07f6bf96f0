"""Calibration and power of the encoding lesion's ``p_null`` under cross-fitted selection
(``lesion --analysis encoding --selection cross_fit``), through
:func:`object2brain.lesion.encoding.compute_encoding_lesion` itself.

Each dataset: ``n`` stimuli, a layer of ``C`` filters x 2 positions (Gaussian, written as an
activation store), an ROI of ``v`` voxels reading a random linear map of *every* filter plus
noise (SNR 1), two selection folds (recorded). Null: fold ``k``'s group is a random set of
``size`` filters drawn independently of the data (one per fold), so each fold's group is
exchangeable with that fold's null subsets and the combined (fold-size weighted, draw by draw)
statistic with the combined null: the fraction of datasets with ``p_null <= 0.05`` must lie in
the 95% binomial interval around 0.05 (lesion and keep). Power: the voxels read only one group's
filters, the same group chosen in both folds, lesioned.

Run: ``PYTHONPATH=src python validation/encoding_lesion_cross_fit.py [--datasets 400]``;
writes ``validation/encoding_lesion_cross_fit.json`` (and the progress as it goes).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
from scipy import stats

from object2brain.activations.store import ActivationStore
from object2brain.lesion.analysis import FilterTable
from object2brain.lesion.encoding import EncodingLesionData, compute_encoding_lesion
from object2brain.options import EncodeOptions, LesionOptions, Runtime

LEVEL = 0.05
ENCODE = EncodeOptions(folds=3, inner_folds=3, alphas=[1.0, 100.0, 1e4, 1e6], n_perm=0)


def dataset_p(
    index: int, n: int, C: int, v: int, size: int, n_null: int, planted: bool, folder: Path
) -> dict[str, float]:
    """``p_null`` of the lesion and keep rows of one dataset's group ``G`` (cross-fitted)."""
    rng = np.random.default_rng([13, index, int(planted)])
    features = rng.standard_normal((n, C, 2)).astype(np.float32)
    groups = [np.sort(rng.choice(C, size, replace=False)) for _ in range(2)]
    if planted:
        groups[1] = groups[0]
    read = groups[0] if planted else np.arange(C)
    flat = features.astype(np.float64)[:, read].reshape(n, -1)
    signal = flat @ rng.standard_normal((flat.shape[1], v))
    y = signal + signal.std() * rng.standard_normal(signal.shape)
    ids = [f"s{i:03d}" for i in range(n)]
    path = folder / f"acts{index}_{int(planted)}.h5"
    with h5py.File(path, "w") as handle:
        handle["stimulus_ids"] = np.array(ids, dtype=object)
        handle.create_group("layers")["conv"] = features
        handle.attrs.update(complete=True, order=json.dumps(["conv"]), model="m", arch="m")
    rows = [
        {"model": "m", "layer": "conv", "filter": f, "group": "G" if f in groups[k] else "x",
         "assigned": bool(f in groups[k]), "fold": fold}
        for k, fold in ((0, np.nan), (0, 0), (1, 1))
        for f in range(C)
    ]  # fmt: skip
    fold_of = rng.permutation(np.arange(n) % 2)
    table = FilterTable(
        pd.DataFrame(rows), "sim", pd.DataFrame({"stimulus_id": ids, "fold": fold_of}), "sim"
    )
    data = EncodingLesionData(ids, {("ROI", "sub-01"): y})
    options = LesionOptions(n_null=n_null, selection="cross_fit", groups=["G"])
    with ActivationStore.open(path) as store:
        out = compute_encoding_lesion([store], table, data, options, ENCODE, Runtime(seed=index))
    path.unlink()
    assert set(out["selection"]) == {"cross_fit"}
    return {str(r.variant): float(r.p_null) for r in out.itertuples() if r.group == "G"}


def run(datasets: int, n: int, C: int, v: int, size: int, n_null: int, out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    null, power = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(datasets):
            null.append(dataset_p(i, n, C, v, size, n_null, False, Path(tmp)))
            if i % 50 == 49:
                print(f"{i + 1}/{datasets} null datasets, {time.perf_counter() - start:.0f} s")
        for i in range(datasets // 4):
            power.append(dataset_p(i, n, C, v, size, n_null, True, Path(tmp)))
    low, high = (b / datasets for b in stats.binom.interval(0.95, datasets, LEVEL))
    rates = {k: float(np.mean([d[k] <= LEVEL for d in null])) for k in ("lesion", "keep")}
    return {
        "datasets": datasets,
        "n_stimuli": n,
        "n_filters": C,
        "group_size": size,
        "n_voxels": v,
        "n_null": n_null,
        "selection_folds": 2,
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
    parser.add_argument("--datasets", type=int, default=400)
    parser.add_argument("--n-null", type=int, default=200)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("encoding_lesion_cross_fit.json")
    )
    args = parser.parse_args()
    result = run(args.datasets, 40, 12, 10, 4, args.n_null, args.out)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
