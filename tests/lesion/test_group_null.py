"""The test of the group itself (p_group, the starred rule) and cross-fitted selection.

Reduced versions of ``validation/object2brain_null.py``: a group atypical of the layer in norm
(3x) with a target built from the whole layer must not be starred (the random-subset null,
``p_null``, rejects there: the test would fail on it), a planted group-specific target must be,
and a group chosen on the stimuli it is tested on must show a manufactured effect that the
cross-fitted analysis does not report.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import pdist, squareform

from object2brain.api.lesion import lesion
from object2brain.lesion.analysis import LayerFilters, lesion_layer, selection_folds
from object2brain.lesion.engine import FilterStats, alignment_bins, swap_subset_masks
from object2brain.options import LesionOptions
from object2brain.rsa.targets import AnalysisSet, Target

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def _validation() -> object:
    spec = importlib.util.spec_from_file_location(
        "object2brain_null", ROOT / "validation" / "object2brain_null.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["object2brain_null"] = module
    spec.loader.exec_module(module)
    return module


def _rates(case: str, datasets: int, draws: int) -> dict[str, float]:
    sim = _validation()
    options = LesionOptions(n_null=draws, n_perm=draws, n_group_null=draws, selection="same")
    counts: dict[str, int] = {}
    for seed in range(datasets):
        for key, value in sim.one(case, seed, options, 64, 40, 8).items():  # type: ignore[attr-defined]
            counts[key] = counts.get(key, 0) + int(value)
    return {key: value / datasets for key, value in counts.items()}


def test_atypical_group_is_not_starred_where_the_random_null_rejects() -> None:
    rates = _rates("c", 30, 39)
    # binomial 95% upper limit around 0.05 with 40 datasets is about 0.17
    assert rates["lesion_starred"] <= 0.17 and rates["keep_starred"] <= 0.17, rates
    assert rates["lesion_p_null"] >= 0.5 and rates["keep_p_null"] >= 0.5, rates  # broken null


def test_planted_group_specific_effect_is_starred() -> None:
    rates = _rates("d", 12, 39)
    assert rates["keep_starred"] >= 0.8, rates


def test_swap_draws_keep_norms_and_bins() -> None:
    rng = np.random.default_rng(1)
    norms = np.exp(rng.normal(scale=0.25, size=64))
    alignment = rng.normal(size=64)
    group = np.arange(8)
    norms[group] *= 3.0
    bins = alignment_bins(alignment, group)
    masks = swap_subset_masks(norms, bins, group, 50, seed=0)
    assert (masks.sum(axis=1) == 8).all()
    # no other filter is within the caliper of a 3x group: the null is the group itself
    assert masks[:, group].all()
    typical = np.arange(20, 28)
    norms2 = np.exp(rng.normal(scale=0.25, size=64))
    masks2 = swap_subset_masks(norms2, alignment_bins(alignment, typical), typical, 50, seed=0)
    assert len({m.tobytes() for m in masks2}) > 40  # draws vary for a typical group


def _noise_study(seed: int, n: int = 40, k: int = 48) -> tuple[np.ndarray, AnalysisSet]:
    rng = np.random.default_rng(seed)
    acts = rng.normal(size=(n, k, 4))
    roi = squareform(pdist(rng.normal(size=(n, 30)), "correlation"))
    ids = [f"s{i}" for i in range(n)]
    labels = np.array(["x" if i % 2 else "y" for i in range(n)])
    target = Target("NOISE", "roi", ["group"], torch.as_tensor(roi)[None], group_only=True)
    return acts, AnalysisSet.from_targets(ids, [target], labels)


def _top_aligned(stats: FilterStats, analysis: AnalysisSet, rows: np.ndarray, g: int) -> np.ndarray:
    """Select the g filters whose single-filter RDM best matches the noise ROI on ``rows``: a
    selection fitted to noise."""
    from object2brain.lesion.analysis import _Scorer

    task = LayerFilters("m", "L", stats, {})
    scorer = _Scorer.of(task, analysis, rows, LesionOptions(), CPU)
    return np.sort(np.argsort(-scorer.alignment()[:, 0])[:g])


def test_cross_fitting_removes_an_effect_manufactured_by_selection() -> None:
    options = LesionOptions(n_null=99, n_perm=99, n_group_null=0, variants=["keep"])
    same_hits = cross_hits = 0
    seeds = range(6)
    for seed in seeds:
        acts, analysis = _noise_study(seed)
        ids = analysis.ids
        stats = FilterStats.from_activations(acts, ids)
        everything = np.arange(len(ids))
        groups = {"G": _top_aligned(stats, analysis, everything, 6)}
        same = lesion_layer(
            LayerFilters("m", "L", stats, groups), analysis, options, seed=seed, device=CPU
        )
        folds = selection_folds(analysis, 2, seed)
        fold_groups = tuple(
            {"G": _top_aligned(stats, analysis, np.flatnonzero(folds != f), 6)} for f in (0, 1)
        )
        task = LayerFilters("m", "L", stats, {}, folds=folds, fold_groups=fold_groups)
        crossed = lesion_layer(task, analysis, options, seed=seed, device=CPU)
        pick = next(r for r in same if r["condition"] == "all")
        picked = next(r for r in crossed if r["condition"] == "all")
        assert pick["selection"] == "same" and picked["selection"] == "cross_fit"
        same_hits += pick["p_null"] < 0.05 and pick["delta_r"] > 0
        cross_hits += picked["p_null"] < 0.05 and picked["delta_r"] > 0
    assert same_hits >= 4, same_hits  # selecting on the tested stimuli manufactures an effect
    assert cross_hits <= 1, cross_hits  # cross-fitted: not reported


def test_fold_table_through_the_api(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n, k = 24, 12
    ids = [f"s{i:02d}" for i in range(n)]
    import h5py

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
    rows = [
        base | {"filter": f, "group": "Faces", "assigned": f < 3 + fold, "fold": fold}
        for fold in (0, 1)
        for f in range(k)
    ]
    table = pd.DataFrame(rows)
    common = {"brain": patterns, "n_null": 19, "n_perm": 19, "n_group_null": 19, "seed": 1}
    result = lesion(store, table, out=tmp_path / "cf", **common)
    frame = result.object2brain
    assert set(frame["selection"]) == {"cross_fit"}
    assert {"p_group", "p_group_fdr", "n_group_null", "significant"} <= set(frame.columns)
    assert frame["p_group"].notna().all()
    plain = table[table["fold"] == 0].drop(columns="fold")
    result = lesion(store, plain, out=tmp_path / "same", **common)
    assert set(result.object2brain["selection"]) == {"same"}
    manifest = json.loads((tmp_path / "same" / "manifest.json").read_text())
    assert "circular" in " ".join(manifest["selection_notes"])
    with pytest.raises(Exception, match=r"folds 0\.\.2"):
        lesion(store, table, selection_folds=3, **common)
