"""Object2Brain lesion analysis: planted truth recovered, bad input named, propagate exact."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import object2brain as o2b
from object2brain.activations.store import ActivationStore
from object2brain.api.extract import extract
from object2brain.api.lesion import lesion
from object2brain.errors import DataError, ModelError
from object2brain.heads.io import save_head
from object2brain.lesion.analysis import LayerFilters, group_filters, lesion_layer
from object2brain.lesion.engine import FilterStats
from object2brain.lesion.propagate import forward_with_mask
from object2brain.models.zoo import load_model
from object2brain.options import LesionOptions
from object2brain.rsa.targets import AnalysisSet, Target, condition_sets
from object2brain.simulate import simulate
from object2brain.tables import OBJECT2BRAIN

OBJECT2BRAIN_COLUMNS = OBJECT2BRAIN.column_names

N, K = 48, 24
GROUPS = {"Faces": range(0, 6), "Animals": range(6, 12), "Vehicles": range(12, 18)}


@pytest.fixture
def store(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "acts.h5"
    with h5py.File(path, "w") as handle:
        handle["stimulus_ids"] = np.array([f"s{i:02d}" for i in range(N)], dtype=object)
        handle.create_group("layers")["conv"] = rng.gamma(2.0, size=(N, K, 3, 3)).astype(np.float32)
        handle.attrs.update(complete=True, order=json.dumps(["conv"]), model="toy", arch="toy")
    return path


@pytest.fixture
def filter_table() -> pd.DataFrame:
    rows = []
    for k in range(K):
        group = next((g for g, members in GROUPS.items() if k in members), "Objects")
        rows.append(
            {
                "model": "toy",
                "layer": "conv",
                "filter": k,
                "group": group,
                "importance": 1.0,
                "enrichment": 2.0,
                "n_images": 10,
                "assigned": group != "Objects",
            }
        )
    return pd.DataFrame(rows)


@pytest.fixture
def brain(store: Path, tmp_path: Path) -> Path:
    faces = ",".join(str(k) for k in GROUPS["Faces"])
    result = simulate(
        store,
        [f"FACE=filters:conv:{faces};snr=3;voxels=150", "NOISE=filters:conv:0;snr=0.0001"],
        out=tmp_path / "sim",
        n_subjects=3,
        seed=2,
    )
    return result.brain_manifest


def test_planted_face_roi_is_carried_by_face_filters(
    store: Path, filter_table: pd.DataFrame, brain: Path, tmp_path: Path
) -> None:
    result = lesion(store, filter_table, brain=brain, out=tmp_path / "out", n_null=300, seed=0)
    table = result.object2brain
    assert list(table.columns) == OBJECT2BRAIN_COLUMNS
    assert set(table["group"]) == {"Faces", "Animals", "Vehicles", "unassigned"}
    face_roi = table[
        (table["target"] == "FACE")
        & (table["subject"] == "group")
        & (table["variant"] == "lesion")
        & (table["condition"] == "all")
    ].set_index("group")
    assert face_roi["delta_r"].idxmin() == "Faces"
    assert face_roi.loc["Faces", "delta_r"] < -0.1
    assert face_roi.loc["Faces", "p_null"] < 0.01
    assert face_roi.loc["Faces", "z_null"] < -3
    assert face_roi.loc["Faces", "p_perm"] < 0.01  # and beyond unrelated (permuted) targets
    for group in ("Animals", "Vehicles"):
        assert face_roi.loc[group, "p_fdr"] > 0.05
    keep = table[
        (table["target"] == "FACE") & (table["subject"] == "group") & (table["variant"] == "keep")
    ]
    assert keep.set_index("group")["delta_r"].idxmax() == "Faces"
    noise = table[(table["target"] == "NOISE") & (table["subject"] == "group")]
    assert (noise["p_fdr"] > 0.05).mean() >= 0.9  # unrelated ROI: nothing beyond the FDR rate
    assert (noise["p_perm_fdr"] > 0.05).mean() >= 0.9
    for name in (
        "object2brain.csv",
        "object2brain.parquet",
        "manifest.json",
        "figures/lesion_toy_conv.png",
        "figures/lesion_models_lesion.svg",
    ):
        assert (tmp_path / "out" / name).is_file(), name
    reread = pd.read_parquet(tmp_path / "out" / "object2brain.parquet")
    pd.testing.assert_frame_equal(reread, table.reset_index(drop=True), check_dtype=False)


def test_per_subject_rows_and_group_mean(
    store: Path, filter_table: pd.DataFrame, brain: Path
) -> None:
    table = lesion(store, filter_table, brain=brain, n_null=0, variants=("lesion",)).object2brain
    rows = table[(table["target"] == "FACE") & (table["group"] == "Faces")].set_index("subject")
    assert set(rows.index) == {"sub-01", "sub-02", "sub-03", "group"}
    assert rows.loc["group", "delta_r"] == pytest.approx(rows.drop("group")["delta_r"].mean())
    assert table["p_null"].isna().all() and (table["n_null"] == 0).all()


def test_group_filters_and_bad_tables(filter_table: pd.DataFrame) -> None:
    groups = group_filters(filter_table, "toy", "conv", K)
    assert list(groups["Faces"]) == list(range(6))
    assert list(groups["unassigned"]) == list(range(18, 24))
    with pytest.raises(DataError, match="another model or layer"):
        group_filters(filter_table, "resnet18", "layer4", K)
    with pytest.raises(DataError, match="the layer has 10 filters"):
        group_filters(filter_table, "toy", "conv", 10)


def test_bad_input_messages(store: Path, filter_table: pd.DataFrame, brain: Path) -> None:
    other = filter_table.assign(model="alexnet")
    with pytest.raises(DataError, match="no rows for model 'toy'"):
        lesion(store, other, brain=brain, n_null=0)
    with pytest.raises(DataError, match="Food have no filters"):
        lesion(store, filter_table, brain=brain, n_null=0, groups=["Faces", "Food"])
    too_many = pd.concat([filter_table, filter_table.tail(1).assign(filter=K + 5)])
    with pytest.raises(DataError, match=f"the layer has {K} filters"):
        lesion(store, too_many, brain=brain, n_null=0)
    with pytest.raises(DataError, match="missing column"):
        lesion(store, filter_table.drop(columns="assigned"), brain=brain)
    with pytest.raises(DataError, match="--n-null and --n-perm must be >= 0"):
        lesion(store, filter_table, brain=brain, n_perm=-1)
    with pytest.raises(DataError, match="--null-subsets 'sorted': use random or matched"):
        lesion(store, filter_table, brain=brain, null_subsets="sorted")  # type: ignore[arg-type]


def test_matched_null_via_the_cli(
    store: Path, filter_table: pd.DataFrame, brain: Path, tmp_path: Path
) -> None:
    """``--null-subsets matched``: the planted face group still stands out against filters of
    its own strength; the manifest records the null."""
    from object2brain.cli import main

    filter_table.to_csv(tmp_path / "filters.csv", index=False)
    main(
        [
            "lesion", "--activations", str(store), "--filters", str(tmp_path / "filters.csv"),
            "--brain", str(brain), "--null-subsets", "matched", "--n-null", "300", "--n-perm", "0",
            "--variant", "lesion", "--out", str(tmp_path / "out"), "--device", "cpu",
            "--quiet",
        ]
    )  # fmt: skip
    table = pd.read_csv(tmp_path / "out" / "object2brain.csv")
    faces = table[
        (table["target"] == "FACE") & (table["subject"] == "group") & (table["group"] == "Faces")
        & (table["condition"] == "all")
    ]  # fmt: skip
    assert faces["p_null"].iloc[0] < 0.01
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config"]["null_subsets"] == "matched"


def test_conditions_are_analysed_separately(
    store: Path, filter_table: pd.DataFrame, brain: Path, tmp_path: Path
) -> None:
    table = pd.DataFrame(
        {
            "stimulus_id": [f"s{i:02d}" for i in range(N)],
            "path": "x.png",
            "condition": ["a", "b"] * (N // 2),
        }
    )
    stimuli = tmp_path / "t.csv"
    table.to_csv(stimuli, index=False)
    result = lesion(
        store, filter_table, brain=brain, stimuli=stimuli, n_null=20, variants=("lesion",)
    )
    assert set(result.object2brain["condition"]) == {"all", "a", "b"}


def test_propagate_with_nothing_zeroed_reproduces_extraction(
    stimulus_table: Path, tmp_path: Path
) -> None:
    model = load_model("resnet18", "none", seed=3)
    out = extract(model, stimulus_table, out=tmp_path / "a.h5", batch_size=4, progress=False)
    stimuli = o2b.load_stimuli(stimulus_table)
    acts = forward_with_mask(
        model, stimuli, "layer2", np.ones(128), ["layer3", "layer4", "fc"], batch_size=4
    )
    with ActivationStore.open(out) as store:
        for name in ("layer3", "layer4", "fc"):
            np.testing.assert_array_equal(acts[name], store.read(name))
    lesioned = forward_with_mask(model, stimuli, "layer2", np.zeros(128), ["layer3"], batch_size=4)
    assert not np.allclose(lesioned["layer3"], acts["layer3"])


def test_propagate_end_to_end(stimulus_table: Path, tmp_path: Path) -> None:
    head = nn.Linear(512, 1)
    torch.nn.init.normal_(head.weight, std=0.1)
    path = save_head(head, tmp_path / "head.safetensors", {"arch": "resnet18"})
    model = load_model("resnet18", "none", seed=0, head=path)
    store = extract(
        model, stimulus_table, out=tmp_path / "v.h5", layers="layer3,layer4", progress=False
    )
    filters = pd.DataFrame(
        {
            "model": "resnet18",
            "layer": "layer3",
            "filter": range(256),
            "group": ["Faces"] * 40 + ["Objects"] * 216,
            "importance": 1.0,
            "enrichment": 1.0,
            "n_images": 5,
            "assigned": [True] * 40 + [False] * 216,
        }
    )
    result = lesion(
        store,
        filters,
        stimuli=stimulus_table,
        layers=["layer3"],
        n_null=10,
        propagate=True,
        model=model,
        batch_size=4,
        out=tmp_path / "les",
    )
    behavior = result.propagate_behavior
    assert set(behavior["method"]) == {"pearson", "spearman"}
    assert set(behavior["group"]) == {"Faces", "unassigned"}
    later = result.propagate_alignment
    assert set(later["later_layer"]) == {"layer4"}
    assert (later["target"] == "behavior").all()
    assert (tmp_path / "les" / "propagate_behavior.csv").is_file()
    assert np.isfinite(behavior["delta_r"]).all() and (behavior["delta_r"] != 0).any()
    # held-out stimuli only: r_full is the store's valence against the rating on those rows
    table = pd.read_csv(stimulus_table)
    held_out = table["stimulus_id"].tolist()[:6]
    subset = lesion(
        store, filters, stimuli=stimulus_table, layers=["layer3"], n_null=0, propagate=True,
        model=model, batch_size=4, variants=("lesion",), behavior_ids=held_out,
    ).propagate_behavior.query("condition == 'all' and method == 'pearson'")  # fmt: skip
    with ActivationStore.open(store) as handle:
        predicted = handle.read("valence", held_out)
    rated = table.set_index("stimulus_id").loc[held_out, "valence"].to_numpy()
    assert (subset["n"] == 6).all()
    expected = float(np.corrcoef(predicted, rated)[0, 1])
    assert subset["r_full"].iloc[0] == pytest.approx(expected, abs=1e-5)  # float32 forward
    other = load_model("resnet18", "none", seed=1)  # not the network that wrote the store
    with pytest.raises(ModelError, match="--propagate must run the same network"):
        lesion(store, filters, stimuli=stimulus_table, propagate=True, model=other, n_null=0)


def test_condition_sets_leave_stimuli_without_condition_in_all_only() -> None:
    sets = condition_sets(["a", "b", "c", "d"], np.asarray(["x", "", "y", "x"]))
    assert [(name, rows.tolist()) for name, rows in sets] == [
        ("all", [0, 1, 2, 3]),
        ("x", [0, 3]),
        ("y", [2]),
    ]


def test_constant_null_gives_nan_z_not_rounding_noise() -> None:
    """Keep-only of a group holding every filter: every null subset equals the full layer."""
    lesion_module = importlib.import_module("object2brain.lesion.analysis")
    null = np.empty((50, 2))
    null[:, 0] = 0.1 + 1e-17 * np.arange(50)  # equal up to a few ulps, as RDM rounding leaves
    null[:, 1] = 0.1 + np.linspace(-0.01, 0.01, 50)
    delta = np.array([0.1, 0.1])
    p, z = lesion_module._null_stats(delta, null)
    assert p[0] == 1.0 and np.isnan(z[0])
    assert np.isfinite(z[1])


def test_projected_layer_is_refused(tmp_path: Path) -> None:
    """A layer stored with --srp holds projection dimensions, not filters."""
    path = tmp_path / "srp.h5"
    with h5py.File(path, "w") as handle:
        handle["stimulus_ids"] = np.array(["a", "b", "c"], dtype=h5py.string_dtype())
        handle.create_group("layers")["conv"] = np.random.default_rng(0).normal(size=(3, 16))
        handle.attrs["complete"] = True
        handle.attrs["srp"] = json.dumps({"dim": 16, "projected_layers": ["conv"]})
    lesion_engine = importlib.import_module("object2brain.lesion.engine")
    with ActivationStore.open(path) as store:
        assert store.projected_layers == ["conv"]
        with pytest.raises(DataError, match=r"srp.h5: layer 'conv' was stored as a random proj"):
            lesion_engine.FilterStats.from_store(store, "conv")


def test_constant_rater_is_left_out_of_the_group_mean(
    store: Path, filter_table: pd.DataFrame, caplog: pytest.LogCaptureFixture
) -> None:
    """A rater who gave every stimulus the same rating has no Spearman r: their rows are NaN, the
    group row is the mean over the other raters (r, delta and the null alike), and one warning
    names the rater."""
    rng = np.random.default_rng(5)
    ids = [f"s{i:02d}" for i in range(N)]
    values = rng.integers(-3, 4, size=(3, N)).astype(float)
    values[0] = 2.0
    ratings = pd.DataFrame(
        {"subject": np.repeat(["r1", "r2", "r3"], N), "stimulus_id": ids * 3,
         "valence": values.ravel()}
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="object2brain"):
        table = lesion(store, filter_table, ratings=ratings, n_null=30, seed=1).object2brain
    warned = [r.getMessage() for r in caplog.records if "is constant" in r.getMessage()]
    assert len(warned) == 1 and "r1" in warned[0]
    for _, rows in table.groupby(["group", "variant"]):
        by_subject = rows.set_index("subject")
        assert by_subject.loc["r1", ["r_full", "r_variant", "delta_r"]].isna().all()
        for column in ("r_full", "r_variant", "delta_r"):
            expected = by_subject.loc[["r2", "r3"], column].mean()
            assert by_subject.loc["group", column] == pytest.approx(expected, abs=1e-12)
        assert np.isfinite(by_subject.loc["group", "p_null"])


def _independent_layer(
    rng: np.random.Generator, n: int = 40, k: int = 64, loud: np.ndarray | None = None
) -> np.ndarray:
    """Activations ``(n, k, 4)`` of a layer driven by a 10-d stimulus latent; ``loud`` filters
    have 3x the activation norm of the others (a group atypical of the layer)."""
    latent = rng.normal(size=(n, 10))
    acts = np.einsum("nd,dkp->nkp", latent, rng.normal(size=(10, k, 4)))
    acts += rng.normal(size=acts.shape)
    if loud is not None:
        acts[:, loud] *= 3.0
    return acts


def _lesion_rows(
    stats: FilterStats,
    groups: dict[str, np.ndarray],
    targets: list[Target],
    ids: list[str],
    *,
    seed: int,
    **options: object,
) -> list[dict[str, object]]:
    """Rows of :func:`lesion_layer` for one layer ``L`` of model ``m`` (no conditions)."""
    lesion_options = LesionOptions.model_validate(options)
    analysis = AnalysisSet.from_targets(ids, targets, compare_method=lesion_options.compare_method)
    task = LayerFilters("m", "L", stats, groups)
    return lesion_layer(task, analysis, lesion_options, seed=seed, device=torch.device("cpu"))


def test_label_permutation_p_matches_a_scipy_loop() -> None:
    """p_perm: delta_r = r(variant, target) - r(full, target) recomputed with scipy for every
    permutation of the stimulus labels (same permutations as the Mantel test), per subject and
    for the mean over subjects."""
    import scipy.stats

    from object2brain.rsa.inference import pair_permutation, permutations
    from object2brain.rsa.rdm import rdm_from_features, upper_triangle

    rng = np.random.default_rng(4)
    n, n_perm = 14, 40
    ids = [f"s{i}" for i in range(n)]
    acts = _independent_layer(rng, n=n, k=12)
    group = np.array([0, 3, 5])
    brains = torch.stack(
        [rdm_from_features(rng.normal(size=(n, 8)), device="cpu") for _ in range(2)]
    )
    targets = [Target("ROI", "roi", ["s1", "s2"], brains, brains.mean(0), False)]
    stats = FilterStats.from_activations(acts, ids, device=torch.device("cpu"))
    rows = _lesion_rows(
        stats, {"G": group}, targets, ids, seed=3, variants=["lesion", "keep"], n_null=0,
        n_perm=n_perm,
    )  # fmt: skip
    full = upper_triangle(rdm_from_features(acts.reshape(n, -1), device="cpu")).numpy()
    y = upper_triangle(brains).numpy()
    perms = np.concatenate(list(permutations(n, n_perm, 3)))
    for variant in ("lesion", "keep"):
        kept = acts.copy()
        if variant == "lesion":
            kept[:, group] = 0
        else:
            kept[:, np.setdiff1d(np.arange(12), group)] = 0
        x = upper_triangle(rdm_from_features(kept.reshape(n, -1), device="cpu")).numpy()

        def deltas(index: np.ndarray, x: np.ndarray = x) -> np.ndarray:
            per_subject = np.array(
                [scipy.stats.spearmanr(x[index], t)[0] - scipy.stats.spearmanr(full[index], t)[0]
                 for t in y]
            )  # fmt: skip
            return np.append(per_subject, per_subject.mean())

        observed = deltas(np.arange(len(full)))
        count = np.zeros(3)
        for perm in perms:
            count += (
                np.abs(deltas(pair_permutation(perm[None])[0].numpy())) >= np.abs(observed) - 1e-12
            )
        got = {r["subject"]: r for r in rows if r["variant"] == variant}
        for c, subject in enumerate(["s1", "s2", "group"]):
            assert got[subject]["delta_r"] == pytest.approx(observed[c], abs=1e-12)
            assert got[subject]["p_perm"] == pytest.approx((1 + count[c]) / (1 + n_perm))
            assert got[subject]["n_perm"] == n_perm


def test_label_permutation_p_keeps_alpha_where_the_subset_null_does_not() -> None:
    """Planted truth: a brain ROI unrelated to the model and a group of filters with 3x the
    activation norm. Random same-size subsets are a poor null for such a group (p_null <= 0.05
    in about 46% of runs in a larger simulation); permuting the target's stimulus labels keeps
    the nominal rate."""
    from object2brain.rsa.rdm import rdm_from_features

    rng = np.random.default_rng(11)
    n, reps = 40, 30
    ids = [f"s{i}" for i in range(n)]
    rejected = {"p_null": 0, "p_perm": 0}
    for rep in range(reps):
        group = np.sort(rng.choice(64, 8, replace=False))
        acts = _independent_layer(rng, n=n, loud=group)
        brain = rdm_from_features(rng.normal(size=(n, 50)), device="cpu")
        targets = [Target("ROI", "roi", ["group"], brain[None], None, True)]
        stats = FilterStats.from_activations(acts, ids, device=torch.device("cpu"))
        (row,) = _lesion_rows(
            stats, {"G": group}, targets, ids, seed=rep, variants=["lesion"], n_null=99, n_perm=99
        )
        for key in rejected:
            rejected[key] += row[key] <= 0.05
    assert rejected["p_null"] >= 7
    assert rejected["p_perm"] <= 4  # 30 draws at alpha 0.05: 4 or fewer has probability 0.94


def test_norm_matched_null_keeps_alpha_for_a_group_of_strong_filters() -> None:
    """Planted truth: a brain ROI unrelated to the model; filter strengths spread log-uniformly
    over 0.3..3 and the group drawn from the strongest quarter. Against uniform subsets the
    group's lesion looks special (p_null <= 0.05 in 26-29% of runs); against subsets matched
    on filter norm it does not (5.4% of 500 runs)."""
    from object2brain.rsa.rdm import rdm_from_features

    rng = np.random.default_rng(11)
    n, k, reps = 40, 64, 30
    ids = [f"s{i}" for i in range(n)]
    rejected = {"random": 0, "matched": 0}
    for rep in range(reps):
        scales = np.exp(rng.uniform(np.log(0.3), np.log(3.0), k))
        group = np.sort(rng.choice(np.argsort(scales)[-16:], 6, replace=False))
        latent = rng.normal(size=(n, 10))
        acts = np.einsum("nd,dkp->nkp", latent, rng.normal(size=(10, k, 4)))
        acts = (acts + rng.normal(size=acts.shape)) * scales[None, :, None]
        brain = rdm_from_features(rng.normal(size=(n, 50)), device="cpu")
        targets = [Target("ROI", "roi", ["group"], brain[None], None, True)]
        stats = FilterStats.from_activations(acts, ids, device=torch.device("cpu"))
        for null in rejected:
            (row,) = _lesion_rows(
                stats, {"G": group}, targets, ids, seed=rep, variants=["lesion"], n_null=199,
                n_perm=0, null_subsets=null,
            )  # fmt: skip
            rejected[null] += row["p_null"] <= 0.05
    assert rejected["random"] >= 5
    assert rejected["matched"] <= 4  # 30 draws at alpha 0.05: 4 or fewer has probability 0.94


@pytest.mark.parametrize("method", ["spearman", "pearson"])
def test_silent_variant_has_no_p(method: str) -> None:
    """Keeping only silent filters leaves no RDM: r, delta and both p-values are NaN (Spearman
    used to rank the NaN row and report a finite p_perm), and the figures mark nothing."""
    from object2brain.report.figures.lesion import summary_rows
    from object2brain.rsa.rdm import rdm_from_features

    rng = np.random.default_rng(2)
    ids = [f"s{i}" for i in range(12)]
    acts = _independent_layer(rng, n=12, k=10)
    acts[:, :2] = 0.0  # two silent filters
    brains = torch.stack([rdm_from_features(rng.normal(size=(12, 6)), device="cpu") for _ in "ab"])
    targets = [Target("ROI", "roi", ["a", "b"], brains, brains.mean(0), False)]
    stats = FilterStats.from_activations(acts, ids, device=torch.device("cpu"))
    rows = pd.DataFrame(
        _lesion_rows(
            stats, {"dead": np.array([0, 1]), "live": np.array([2, 3])}, targets, ids, seed=0,
            variants=["keep"], compare_method=method, n_null=20, n_perm=20,
        )
    )  # fmt: skip
    dead, live = rows[rows["group"] == "dead"], rows[rows["group"] == "live"]
    assert dead[["r_variant", "delta_r", "p_null", "p_perm"]].isna().all().all()
    assert live["p_perm"].notna().all()
    table = rows.assign(p_fdr=rows["p_null"], p_perm_fdr=rows["p_perm"])
    assert summary_rows(table).query("group == 'dead'")["q"].isna().all()


def test_label_permutation_p_does_not_depend_on_row_blocks(
    store: Path, filter_table: pd.DataFrame, brain: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Difference vectors tested a few rows at a time give the same p_perm as all at once."""
    lesion_module = importlib.import_module("object2brain.lesion.analysis")
    whole = lesion(store, filter_table, brain=brain, n_null=0, n_perm=30).object2brain
    monkeypatch.setattr(lesion_module, "DIFFERENCE_BLOCK_VALUES", 2 * 48 * 47 // 2)  # 2 rows
    blocks = lesion(store, filter_table, brain=brain, n_null=0, n_perm=30).object2brain
    assert whole["p_perm"].notna().any()
    pd.testing.assert_series_equal(whole["p_perm"], blocks["p_perm"])


def test_propagate_cross_fit_zeroes_each_folds_own_group(
    stimulus_table: Path, tmp_path: Path
) -> None:
    """Cross-fitted --propagate: fold k's group (different per fold) zeroed on fold k's
    stimuli, combined by held-out size, equals zeroing it by hand (within 1e-6); ``same``
    zeroes the all-images group on all stimuli, as before."""
    from object2brain.data.splits import condition_folds

    head = nn.Linear(512, 1)
    torch.nn.init.normal_(head.weight, std=0.1)
    path = save_head(head, tmp_path / "head.safetensors", {"arch": "resnet18"})
    model = load_model("resnet18", "none", seed=0, head=path)
    store = extract(
        model, stimulus_table, out=tmp_path / "v.h5", layers="layer3,layer4", progress=False
    )
    planted = {0: np.arange(0, 40), 1: np.arange(100, 160)}  # disjoint groups per fold
    every = np.arange(0, 60)  # the all-images assignment (the `same` group)
    base = {"model": "resnet18", "layer": "layer3", "group": "Faces", "importance": 1.0}
    base |= {"enrichment": 2.0, "n_images": 5}
    rows = [
        base | {"filter": f, "assigned": bool(np.isin(f, chosen)), "fold": fold}
        for fold, chosen in [(None, every), *planted.items()]
        for f in range(256)
    ]
    table = pd.DataFrame(rows)
    common = {"stimuli": stimulus_table, "layers": ["layer3"], "n_null": 0, "seed": 5}
    common |= {"propagate": True, "model": model, "batch_size": 4, "variants": ("lesion",)}
    cross = lesion(store, table, **common)
    same = lesion(store, table, selection="same", **common)
    frame = pd.read_csv(stimulus_table)
    ids = frame["stimulus_id"].tolist()
    rated = frame["valence"].to_numpy()
    folds = condition_folds(frame["condition"].to_numpy(), len(ids), 2, seed=5)
    stimuli = o2b.load_stimuli(stimulus_table)

    def pearson(rows: np.ndarray, filters: np.ndarray) -> float:
        mask = np.ones(256)
        mask[filters] = 0.0
        sub = stimuli.subset([ids[i] for i in rows])
        valence = forward_with_mask(model, sub, "layer3", mask, ["valence"], batch_size=4)
        return float(np.corrcoef(valence["valence"], rated[rows])[0, 1])

    parts = [np.flatnonzero(folds == k) for k in (0, 1)]
    weights = np.array([len(p) for p in parts]) / len(ids)
    full = sum(w * pearson(p, np.array([], int)) for w, p in zip(weights, parts, strict=True))
    zeroed = sum(weights[k] * pearson(parts[k], planted[k]) for k in (0, 1))
    wrong = sum(weights[k] * pearson(parts[k], planted[1 - k]) for k in (0, 1))
    row = cross.propagate_behavior.query("condition == 'all' and method == 'pearson'").iloc[0]
    assert row["selection"] == "cross_fit" and row["n"] == len(ids)
    assert row["r_full"] == pytest.approx(full, abs=1e-6)
    assert row["r_variant"] == pytest.approx(zeroed, abs=1e-6)
    assert abs(row["r_variant"] - wrong) > 1e-3  # the other fold's group gives another number
    assert set(cross.propagate_alignment["selection"]) == {"cross_fit"}
    assert set(cross.propagate_alignment["condition"]) == {"all"}  # 2 per condition and fold
    old = same.propagate_behavior.query("condition == 'all' and method == 'pearson'").iloc[0]
    everything = np.arange(len(ids))
    assert old["selection"] == "same"
    assert old["r_full"] == pytest.approx(pearson(everything, np.array([], int)), abs=1e-6)
    assert old["r_variant"] == pytest.approx(pearson(everything, every), abs=1e-6)
    assert set(same.propagate_behavior["condition"]) == {"all", "congruent", "incongruent"}
