"""``null_low`` / ``null_high`` (quantiles of the random-subset null, against brute force) and the
lesion's check of the dissection's recorded selection folds (``folds.csv``)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import pdist, squareform
from scipy.stats import spearmanr

from object2brain.api.lesion import lesion
from object2brain.errors import DataError
from object2brain.lesion.analysis import (
    LayerFilters,
    lesion_layer,
    null_subset_masks,
    selection_folds,
)
from object2brain.lesion.engine import FilterStats
from object2brain.options import LesionOptions
from object2brain.rsa.targets import AnalysisSet, Target

CPU = torch.device("cpu")
N, K, SEED, N_NULL = 24, 16, 3, 59


def _study() -> tuple[np.ndarray, np.ndarray, AnalysisSet]:
    rng = np.random.default_rng(7)
    acts = rng.gamma(2.0, size=(N, K, 3))
    roi = squareform(pdist(rng.normal(size=(N, 10)), "correlation"))
    labels = np.array(["x" if i % 2 else "y" for i in range(N)])
    target = Target("ROI", "roi", ["group"], torch.as_tensor(roi)[None], group_only=True)
    return acts, roi, AnalysisSet.from_targets([f"s{i}" for i in range(N)], [target], labels)


def _r(acts: np.ndarray, roi: np.ndarray, rows: np.ndarray, keep: np.ndarray) -> float:
    """Spearman r of the RDM (1 - Pearson) of the layer with the other filters zeroed with the
    ROI RDM, on ``rows``."""
    patterns = (acts[rows] * keep[None, :, None]).reshape(len(rows), -1)
    target = squareform(roi[np.ix_(rows, rows)], checks=False)
    return float(spearmanr(pdist(patterns, "correlation"), target)[0])


@pytest.mark.parametrize("selection", ["same", "cross_fit"])
def test_null_interval_is_the_quantiles_of_brute_force_draws(selection: str) -> None:
    acts, roi, analysis = _study()
    stats = FilterStats.from_activations(acts, analysis.ids)
    group = np.array([1, 4, 9])
    options = LesionOptions(n_null=N_NULL, n_perm=0, n_group_null=0, variants=["lesion"])
    if selection == "same":
        task = LayerFilters("m", "L", stats, {"G": group})
        parts = [(np.arange(N), 1.0, 0)]
    else:
        folds = selection_folds(analysis, 2, SEED)
        task = LayerFilters("m", "L", stats, {}, folds=folds, fold_groups=({"G": group},) * 2)
        parts = [(np.flatnonzero(folds == k), (folds == k).mean(), 100_003 * (k + 1))
                 for k in (0, 1)]  # fmt: skip
    rows = lesion_layer(task, analysis, options, seed=SEED, device=CPU)
    row = next(r for r in rows if r["condition"] == "all" and r["group"] == "G")
    combined = np.zeros(N_NULL)
    for test, weight, shift in parts:  # each fold's draws, as the lesion seeds them
        # the lesion's chunk-seeded draws (True: kept), root seed SEED + size + shift
        draws = null_subset_masks(K, group, None, N_NULL, SEED + shift, "lesion")
        full = _r(acts, roi, test, np.ones(K, bool))
        combined += weight * np.array([_r(acts, roi, test, d) - full for d in draws])
    low, high = np.quantile(combined, [0.025, 0.975])
    assert row["null_low"] == pytest.approx(low, abs=1e-9)
    assert row["null_high"] == pytest.approx(high, abs=1e-9)
    # p_null counts the draws at least as far from the null's centre as delta_r
    centre = combined.mean()
    extreme = np.abs(combined - centre) >= abs(row["delta_r"] - centre) - 1e-12
    assert row["p_null"] == pytest.approx((1 + extreme.sum()) / (1 + N_NULL))


@pytest.fixture
def toy(tmp_path: Path) -> dict[str, object]:
    rng = np.random.default_rng(0)
    n, k = 24, 12
    ids = [f"s{i:02d}" for i in range(n)]
    store = tmp_path / "acts.h5"
    with h5py.File(store, "w") as handle:
        handle["stimulus_ids"] = np.array(ids, dtype=object)
        handle.create_group("layers")["conv"] = rng.gamma(2.0, size=(n, k, 2, 2))
        handle.attrs.update(complete=True, order=json.dumps(["conv"]), model="toy", arch="toy")
    patterns = tmp_path / "patterns.h5"
    with h5py.File(patterns, "w") as handle:
        handle.attrs["kind"] = "patterns"
        handle["stimulus_ids"] = np.array(ids, dtype=object)
        handle["sub-01/ROI"] = rng.normal(size=(n, 20))
    base = {"model": "toy", "layer": "conv", "importance": 1.0, "enrichment": 2.0, "n_images": 5}
    table = pd.DataFrame(
        [base | {"filter": f, "group": "Faces", "assigned": f < 3 + fold, "fold": fold}
         for fold in (0, 1) for f in range(k)]
    )  # fmt: skip
    folder = tmp_path / "dissect"
    folder.mkdir()
    table.to_csv(folder / "filter_objects.csv", index=False)
    common = {"brain": patterns, "n_null": 19, "n_perm": 19, "n_group_null": 19, "seed": 1}
    return {"store": store, "table": folder / "filter_objects.csv", "ids": ids, "common": common}


def test_lesion_uses_the_dissections_recorded_folds(toy: dict[str, object]) -> None:
    ids = list(toy["ids"])  # type: ignore[call-overload]
    table = Path(toy["table"])  # type: ignore[arg-type]
    common: dict = toy["common"]  # type: ignore[assignment,type-arg]
    drawn = lesion(toy["store"], table, **common).object2brain  # type: ignore[arg-type]
    # a recorded split other than the one the lesion would draw: the lesion follows it
    recorded = pd.DataFrame({"stimulus_id": ids, "fold": [i // 12 for i in range(24)]})
    recorded.to_csv(table.parent / "folds.csv", index=False)
    followed = lesion(toy["store"], table, **common).object2brain  # type: ignore[arg-type]
    assert not np.allclose(followed["delta_r"], drawn["delta_r"])
    alone = lesion(toy["store"], pd.read_csv(table), folds=table.parent / "folds.csv",
                   **common).object2brain  # type: ignore[arg-type]  # fmt: skip
    pd.testing.assert_frame_equal(followed, alone)
    # a stimulus the dissection did not fold: one error naming the file and the stimulus
    recorded[recorded["stimulus_id"] != "s05"].to_csv(table.parent / "folds.csv", index=False)
    with pytest.raises(DataError, match=r"folds\.csv: the lesion measures stimulus 's05'"):
        lesion(toy["store"], table, **common)  # type: ignore[arg-type]
    recorded.assign(fold=[i % 3 for i in range(24)]).to_csv(table.parent / "folds.csv",
                                                             index=False)  # fmt: skip
    with pytest.raises(DataError, match="3 selection folds, but --selection-folds 2"):
        lesion(toy["store"], table, **common)  # type: ignore[arg-type]


def test_null_interval_skips_undefined_draws() -> None:
    from object2brain.lesion.analysis import null_interval

    rng = np.random.default_rng(0)
    null = rng.normal(size=(200, 3))
    null[::7, 1] = np.nan  # silent subsets: no r
    null[:, 2] = np.nan
    low, high = null_interval(null, 3)
    for c in (0, 1):
        finite = null[np.isfinite(null[:, c]), c]
        assert (low[c], high[c]) == tuple(np.quantile(finite, [0.025, 0.975]))
    assert np.isnan(low[2]) and np.isnan(high[2])
    assert np.isnan(null_interval(None, 2)[0]).all()  # --n-null 0 (the encoding lesion too)
