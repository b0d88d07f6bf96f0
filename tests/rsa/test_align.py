"""End-to-end alignment runs on planted-truth data written directly as HDF5."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import rsatoolbox
from rsa_helpers import write_store

from object2brain.activations.store import ActivationStore
from object2brain.api.rsa import rsa
from object2brain.errors import DataError, StoreError
from object2brain.tables import ALIGNMENT, BEHAVIOR_DIRECT

ALIGNMENT_COLUMNS = ALIGNMENT.column_names
BEHAVIOR_DIRECT_COLUMNS = BEHAVIOR_DIRECT.column_names

N = 24
IDS = [f"img{i:02d}" for i in range(N)]


def _planted(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    layers = {f"layer{k}": rng.normal(size=(N, 3, 4)).astype(np.float32) for k in range(4)}
    valence = rng.normal(size=N)
    layers["valence"] = valence.astype(np.float32)
    store = write_store(tmp_path / "acts.h5", layers, IDS, model="tiny")
    planted = layers["layer2"].reshape(N, -1).astype(np.float64)
    with h5py.File(tmp_path / "patterns.h5", "w") as f:
        f.attrs["kind"] = "patterns"
        # stored in another order: matching must be by id
        order = rng.permutation(N)
        f.create_dataset(
            "stimulus_ids",
            data=np.asarray([IDS[i] for i in order], dtype=object),
            dtype=h5py.string_dtype(),
        )
        for s in range(3):
            roi = planted @ rng.normal(size=(12, 40)) + 0.5 * rng.normal(size=(N, 40))
            f.create_dataset(f"sub-{s}/planted", data=roi[order])
            f.create_dataset(f"sub-{s}/noise", data=rng.normal(size=(N, 40)))
    ratings = pd.DataFrame(
        [
            {"subject": f"r{s}", "stimulus_id": sid, "valence": v + rng.normal() * 0.5}
            for s in range(4)
            for sid, v in zip(IDS, valence, strict=True)
        ]
    )
    ratings.to_csv(tmp_path / "ratings.csv", index=False)
    stimuli = pd.DataFrame(
        {"stimulus_id": IDS, "path": "x.jpg", "condition": ["congruent", "incongruent"] * (N // 2)}
    )
    stimuli.to_csv(tmp_path / "stimuli.csv", index=False)
    return {
        "store": store,
        "brain": tmp_path / "patterns.h5",
        "ratings": tmp_path / "ratings.csv",
        "stimuli": tmp_path / "stimuli.csv",
    }


def test_planted_truth_end_to_end(tmp_path: Path) -> None:
    files = _planted(tmp_path)
    out = tmp_path / "out"
    result = rsa(
        [files["store"]],
        brain=files["brain"],
        ratings=files["ratings"],
        stimuli=files["stimuli"],
        out=out,
        n_perm=199,
        n_boot=30,
        device="cpu",
        progress=False,
    )
    table = result.alignment
    assert list(table.columns) == ALIGNMENT_COLUMNS
    assert list(result.behavior_direct.columns) == BEHAVIOR_DIRECT_COLUMNS
    assert set(table["condition"]) == {"all", "congruent", "incongruent"}
    assert set(table["target"]) == {"planted", "noise", "behavior"}
    assert {"sub-0", "group", "group_rdm"} <= set(table["subject"])
    # 5 layers x (2 ROIs x (3 subjects + group_rdm + group) + behaviour (4 + 2)) x 3 conditions
    assert len(table) == 5 * (2 * 5 + 6) * 3
    group = table[(table["subject"] == "group") & (table["condition"] == "all")]
    planted = group[group["target"] == "planted"].set_index("layer")
    assert planted["r"].idxmax() == "layer2"
    assert planted.loc["layer2", "p_fdr"] < 0.05
    assert (
        planted.loc["layer2", "ci_low"]
        < planted.loc["layer2", "r"]
        < planted.loc["layer2", "ci_high"]
    )
    assert planted.loc["layer2", "nc_low"] <= planted.loc["layer2", "nc_high"]
    assert list(planted["layer_index"]) == [0, 1, 2, 3, 4]
    behavior = group[group["target"] == "behavior"].set_index("layer")
    assert behavior["r"].idxmax() == "valence"
    assert behavior.loc["valence", "p_fdr"] < 0.05
    assert table["p_perm"].between(1 / 200, 1).all()
    # group r is the mean of subject r
    rows = table[
        (table["layer"] == "layer2")
        & (table["target"] == "planted")
        & (table["condition"] == "all")
    ]
    subjects = rows[rows["subject"].str.startswith("sub-")]["r"].mean()
    assert rows[rows["subject"] == "group"]["r"].iloc[0] == pytest.approx(subjects)
    # group_rdm: vs the subjects' RDMs pooled on ranks over all stimuli (rsatoolbox's pool_rdm),
    # restricted to a condition's stimuli for its rows; checked with scipy
    from rsatoolbox.util.pooling import pool_rdm
    from scipy.spatial.distance import pdist, squareform
    from scipy.stats import spearmanr

    with h5py.File(files["brain"]) as f:
        order = [s.decode() for s in f["stimulus_ids"][()]]
        rows_by_id = [order.index(i) for i in IDS]
        subject_rdms = [
            pdist(f[f"sub-{s}/planted"][()][rows_by_id], "correlation") for s in range(3)
        ]
    pooled = squareform(
        pool_rdm(rsatoolbox.rdm.RDMs(np.stack(subject_rdms)), "spearman").get_vectors()[0]
    )
    with ActivationStore.open(files["store"]) as store:
        layer = squareform(pdist(store.read("layer2", IDS).reshape(N, -1), "correlation"))
    for condition, members in [("all", np.arange(N)), ("incongruent", np.arange(1, N, 2))]:
        expected = spearmanr(
            squareform(layer[np.ix_(members, members)], checks=False),
            squareform(pooled[np.ix_(members, members)], checks=False),
        ).statistic
        got = table[
            (table["layer"] == "layer2")
            & (table["target"] == "planted")
            & (table["condition"] == condition)
            & (table["subject"] == "group_rdm")
        ]["r"]
        assert got.iloc[0] == pytest.approx(expected, abs=1e-9), condition

    direct = result.behavior_direct
    assert set(direct["method"]) == {"pearson", "spearman"}
    assert (direct[direct["condition"] == "all"]["r"] > 0.5).all()
    contrast = result.condition_contrast
    assert set(contrast["condition_a"]) == {"congruent"}
    assert contrast["p_perm"].between(0, 1).all()
    assert not result.alignment_group.empty

    for name in ["alignment", "behavior_direct", "condition_contrast", "alignment_group"]:
        assert (out / f"{name}.csv").is_file()
        assert (out / f"{name}.parquet").is_file()
    pd.testing.assert_frame_equal(pd.read_parquet(out / "alignment.parquet"), table)
    assert (out / "figures" / "alignment_tiny.png").is_file()
    assert (out / "figures" / "alignment_tiny.svg").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert str(files["store"]) in manifest["inputs"]
    assert len(manifest["inputs"][str(files["store"])]) == 64
    assert manifest["config"]["n_perm"] == 199
    assert "torch" in manifest["versions"]


def test_behaviour_from_stimulus_table_and_defaults(tmp_path: Path) -> None:
    files = _planted(tmp_path)
    stimuli = pd.read_csv(files["stimuli"]).drop(columns="condition")
    stimuli["valence"] = np.linspace(-1, 1, N)
    result = rsa(
        files["store"],
        stimuli=stimuli,
        n_perm=20,
        n_boot=0,
        device="cpu",
        progress=False,
        rdm_metric="euclidean",
        compare_method="pearson",
        layers=["layer1", "valence"],
    )
    table = result.alignment
    assert set(table["subject"]) == {"group"}
    assert set(table["layer"]) == {"layer1", "valence"}
    assert table["ci_low"].isna().all()
    assert table["nc_low"].isna().all()
    assert set(result.behavior_direct["condition"]) == {"all"}
    assert result.condition_contrast.empty


def test_kendall_small(tmp_path: Path) -> None:
    files = _planted(tmp_path)
    result = rsa(
        files["store"],
        brain=files["brain"],
        n_perm=9,
        n_boot=2,
        device="cpu",
        progress=False,
        compare_method="kendall_tau_a",
        layers=["layer2"],
    )
    assert result.alignment["r"].notna().all()


def test_missing_ids_are_reported(tmp_path: Path) -> None:
    files = _planted(tmp_path)
    stimuli = pd.read_csv(files["stimuli"])
    extra = pd.concat([stimuli, pd.DataFrame({"stimulus_id": ["ghost"], "path": ["x.jpg"]})])
    with pytest.raises(DataError, match=r"lacks 1 id.*ghost"):
        rsa(
            files["store"],
            brain=files["brain"],
            stimuli=extra,
            n_perm=0,
            n_boot=0,
            device="cpu",
            progress=False,
        )
    result = rsa(
        files["store"],
        brain=files["brain"],
        stimuli=extra,
        n_perm=0,
        n_boot=0,
        device="cpu",
        progress=False,
        on_missing="intersect",
        layers=["layer0"],
    )
    all_rows = result.alignment[result.alignment["condition"] == "all"]
    assert set(all_rows["n_stimuli"]) == {N}
    extra["valence"] = 1.0 * np.arange(N + 1)
    with pytest.raises(StoreError, match="not in store: ghost"):
        rsa(files["store"], stimuli=extra, n_perm=0, n_boot=0, device="cpu", progress=False)


def test_nothing_to_align(tmp_path: Path) -> None:
    files = _planted(tmp_path)
    with pytest.raises(DataError, match="nothing to align to"):
        rsa(files["store"], n_perm=0, n_boot=0, device="cpu", progress=False)
    with pytest.raises(DataError, match="unknown RDM metric"):
        rsa(files["store"], brain=files["brain"], rdm_metric="manhattan", progress=False)


def test_cli_rsa(tmp_path: Path) -> None:
    import subprocess
    import sys

    files = _planted(tmp_path)
    out = tmp_path / "cli_out"
    cmd = [
        sys.executable, "-c", "from object2brain.cli import main; main()", "rsa",
        "--activations", str(files["store"]), "--brain", str(files["brain"]),
        "--ratings", str(files["ratings"]), "--stimuli", str(files["stimuli"]),
        "--out", str(out), "--n-perm", "19", "--n-boot", "5", "--device", "cpu", "--quiet",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert (out / "alignment.csv").is_file()
    bad = subprocess.run([*cmd, "--rdm", "manhattan"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2
    assert "unknown RDM metric 'manhattan'" in bad.stderr
    missing = tmp_path / "nowhere.csv"
    no_split = subprocess.run(
        [*cmd[:-1], "--held-out", str(missing), "--quiet"], capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    assert no_split.returncode == 2
    assert f"{missing}: split file not found" in no_split.stderr
    assert "Traceback" not in no_split.stderr


@pytest.mark.parametrize("method", ["spearman", "kendall_tau_a"])
def test_rater_constant_within_a_condition_is_explained(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, method: str
) -> None:
    """A rater who gave every stimulus of condition A one rating: warn, naming the rater and the
    condition; under Spearman that rater has no r and the group row is the mean of the others
    (as ``alignment_group``); tau-a is 0 for that rater and enters the mean."""
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(10)]
    store = write_store(tmp_path / "m.h5", {"l": rng.normal(size=(10, 12))}, ids)
    ratings = rng.integers(-3, 4, size=(3, 10)).astype(float)
    ratings[0, :5] = 1.0
    frame = pd.DataFrame(
        {"subject": np.repeat(["r1", "r2", "r3"], 10), "stimulus_id": ids * 3,
         "valence": ratings.ravel()}
    )  # fmt: skip
    stimuli = pd.DataFrame({"stimulus_id": ids, "condition": ["A"] * 5 + ["B"] * 5})
    with caplog.at_level("WARNING", logger="object2brain"):
        result = rsa(
            store, ratings=frame, stimuli=stimuli, compare_method=method, n_perm=9, n_boot=0,
            device="cpu", progress=False, figures=False,
        )  # fmt: skip
    warned = [r.getMessage() for r in caplog.records if "is constant" in r.getMessage()]
    assert len(warned) == 1 and "condition 'A'" in warned[0] and "r1" in warned[0]
    rows_a = result.alignment.query("condition == 'A'").set_index("subject")["r"]
    assert np.isnan(rows_a["r1"]) == (method == "spearman")
    defined = ["r2", "r3"] if method == "spearman" else ["r1", "r2", "r3"]
    assert rows_a["group"] == pytest.approx(rows_a[defined].mean(), abs=1e-12)
    summary = result.alignment_group.query("condition == 'A'").iloc[0]
    assert summary["n_subjects"] == len(defined)
    assert summary["mean_r"] == pytest.approx(rows_a["group"], abs=1e-12)


def test_direct_behaviour_on_held_out_stimuli(tmp_path: Path) -> None:
    """``behavior_ids`` restricts predicted-vs-rated valence to those stimuli (scipy on the same
    rows), per condition; fewer than 3 in a condition give NaN; unknown ids are named."""
    import scipy.stats

    files = _planted(tmp_path)
    held_out = IDS[:9]  # conditions alternate: 5 congruent, 4 incongruent
    result = rsa(
        files["store"], ratings=files["ratings"], stimuli=files["stimuli"], n_perm=0, n_boot=0,
        device="cpu", progress=False, figures=False, behavior_ids=held_out,
    )  # fmt: skip
    with ActivationStore.open(files["store"]) as store:
        predicted = store.read("valence", held_out)
    rated = pd.read_csv(files["ratings"]).groupby("stimulus_id")["valence"].mean()[held_out]
    direct = result.behavior_direct.set_index(["condition", "method"])
    assert direct.loc[("all", "pearson"), "n"] == 9
    expected = scipy.stats.pearsonr(predicted, rated.to_numpy()).statistic
    assert direct.loc[("all", "pearson"), "r"] == pytest.approx(expected, abs=1e-12)
    assert direct.loc[("incongruent", "spearman"), "n"] == 4
    few = rsa(
        files["store"], ratings=files["ratings"], stimuli=files["stimuli"], n_perm=0, n_boot=0,
        device="cpu", progress=False, figures=False, behavior_ids=IDS[:3],
    ).behavior_direct.set_index(["condition", "method"])  # fmt: skip
    assert np.isnan(few.loc[("incongruent", "pearson"), "r"])
    assert np.isfinite(few.loc[("all", "pearson"), "r"])
    with pytest.raises(DataError, match="held-out stimuli not in the stimulus set: nope"):
        rsa(
            files["store"], ratings=files["ratings"], stimuli=files["stimuli"], n_perm=0,
            n_boot=0, device="cpu", progress=False, behavior_ids=["nope"],
        )  # fmt: skip


def test_alignment_group_t_test_across_subjects(tmp_path: Path) -> None:
    """alignment_group: mean, SEM and a one-sided one-sample t-test of the per-subject r across
    subjects (random effects), equal to scipy; BH-FDR per model and condition."""
    import scipy.stats

    from object2brain.rsa.inference import fdr_bh

    files = _planted(tmp_path)
    result = rsa(
        files["store"], brain=files["brain"], stimuli=files["stimuli"], n_perm=0, n_boot=0,
        device="cpu", progress=False, figures=False,
    )  # fmt: skip
    group = result.alignment_group
    rows = result.alignment[result.alignment["subject"].str.startswith("sub-")]
    for _, summary in group.iterrows():
        r = rows[
            (rows["layer"] == summary["layer"]) & (rows["target"] == summary["target"])
            & (rows["condition"] == summary["condition"])
        ]["r"].to_numpy()  # fmt: skip
        test = scipy.stats.ttest_1samp(r, 0.0, alternative="greater")
        assert summary["n_subjects"] == 3
        assert summary["t"] == pytest.approx(test.statistic, rel=1e-12)
        assert summary["p_t"] == pytest.approx(test.pvalue, rel=1e-9)
    for _, family in group.groupby(["model", "condition"]):
        np.testing.assert_allclose(family["p_t_fdr"], fdr_bh(family["p_t"].to_numpy()))
    planted = group.query("layer == 'layer2' and target == 'planted' and condition == 'all'")
    assert planted["p_t"].iloc[0] < 0.05


def test_group_inference_stimuli_p_is_the_alignment_group_p_perm(tmp_path: Path) -> None:
    """``--bootstrap stimuli``: the ``p`` of ``group_inference`` is the relabelling test of the
    subject mean with the run's relabellings, i.e. the ``group`` row's Mantel ``p_perm`` of
    ``alignment`` (same seed), for every layer, ROI, behaviour target and condition."""
    files = _planted(tmp_path)
    result = rsa(
        files["store"], brain=files["brain"], ratings=files["ratings"],
        stimuli=files["stimuli"], n_perm=199, n_boot=20, bootstrap="stimuli", seed=4,
        device="cpu", progress=False, figures=False,
    )  # fmt: skip
    group = result.group_inference
    assert set(group["bootstrap"]) == {"stimuli"}
    keys = ["layer", "target", "condition"]
    perm = result.alignment.query("subject == 'group'").set_index(keys)["p_perm"]
    p = group.set_index(keys)["p"]
    assert len(p) == len(perm) == 5 * 3 * 3
    np.testing.assert_array_equal(p.sort_index().to_numpy(), perm.sort_index().to_numpy())
    assert p.loc[("layer2", "planted", "all")] == 1 / 200


def test_contrast_relative_to_the_noise_ceiling(tmp_path: Path) -> None:
    """contrast_scale noise_ceiling: delta_r = r_a / nc_a - r_b / nc_b with each condition's
    upper ceiling (the nc_high of the alignment rows), r_a and r_b raw, p_perm NaN, and the
    interval that of the raw contrast's resamples divided by the ceilings."""
    from object2brain.rsa.inference import condition_difference_bootstrap

    files = _planted(tmp_path)
    kwargs = {"brain": files["brain"], "stimuli": files["stimuli"], "n_perm": 20, "n_boot": 50,
              "device": "cpu", "progress": False, "figures": False}  # fmt: skip
    raw = rsa(files["store"], **kwargs)
    scaled = rsa(files["store"], contrast_scale="noise_ceiling", **kwargs)
    assert set(raw.condition_contrast["contrast_scale"]) == {"raw"}
    table = scaled.condition_contrast
    assert set(table["contrast_scale"]) == {"noise_ceiling"} and table["p_perm"].isna().all()
    ceiling = raw.alignment.set_index(["layer", "target", "subject", "condition"])["nc_high"]
    brain_rows = table[table["target_kind"] == "roi"]
    assert len(brain_rows) > 0
    for _, row in brain_rows.iterrows():
        key = (row["layer"], row["target"], row["subject"])
        nc_a, nc_b = ceiling[(*key, row["condition_a"])], ceiling[(*key, row["condition_b"])]
        expected = row["r_a"] / nc_a - row["r_b"] / nc_b
        np.testing.assert_allclose(row["delta_r"], expected, rtol=1e-12)
    # the bootstrap: resamples divided by the divisors (uncorrected path: percentile of them)
    rng = np.random.default_rng(0)
    import torch

    model = torch.as_tensor(rng.normal(size=(1, 12, 12)))
    model = model + model.transpose(1, 2)
    target = model + 0.5 * torch.as_tensor(rng.normal(size=(1, 12, 12)))
    target = target + target.transpose(1, 2)
    labels = ["a", "b"] * 6
    shared = {"n_boot": 40, "device": "cpu"}
    plain = condition_difference_bootstrap(model, target, labels, "a", "b", corrected=False,
                                           **shared)  # fmt: skip
    ones = (np.ones(1), np.ones(1))
    same = condition_difference_bootstrap(model, target, labels, "a", "b", corrected=False,
                                          ceilings=ones, **shared)  # fmt: skip
    np.testing.assert_array_equal(plain.low, same.low)
    halves = (np.full(1, 0.5), np.full(1, 0.5))
    halved = condition_difference_bootstrap(model, target, labels, "a", "b", ceilings=halves,
                                            **shared)  # fmt: skip
    full = condition_difference_bootstrap(model, target, labels, "a", "b", n_boot=40, device="cpu")
    np.testing.assert_allclose(halved.high - halved.low, 2 * (full.high - full.low), rtol=1e-9)
    np.testing.assert_allclose(halved.p, full.p, rtol=1e-9)
