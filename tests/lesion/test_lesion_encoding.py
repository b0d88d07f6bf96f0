"""Object2Brain on encoding models (``lesion --analysis encoding|both``): planted truth, the same
null subsets as the RSA lesion, agreement with the encoding stage, refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pytest

from object2brain.activations.store import ActivationStore
from object2brain.api.encode import encode
from object2brain.api.lesion import lesion
from object2brain.cli import app
from object2brain.encoding import predict_with_filters
from object2brain.encoding.compute import compute_encoding
from object2brain.encoding.scores import pearson_r
from object2brain.errors import DataError
from object2brain.lesion.analysis import null_subset_masks
from object2brain.lesion.encoding import _subset_masks, subset_mean_r
from object2brain.lesion.engine import random_subset_masks
from object2brain.lesion.nulls import NULL_CHUNK, RANDOM_STREAM
from object2brain.options import EncodeOptions, LesionOptions, Runtime
from object2brain.simulate import simulate
from object2brain.tables import OBJECT2BRAIN

N, K = 60, 24
GROUPS = {"Faces": range(0, 6), "Animals": range(6, 12), "Vehicles": range(12, 18)}
#: A small, fast encoding model (3 folds, a few penalties).
FAST = EncodeOptions(folds=3, inner_folds=3, alphas=[1.0, 100.0, 1e4, 1e6], n_perm=0)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "acts.h5"
    with h5py.File(path, "w") as handle:
        handle["stimulus_ids"] = np.array([f"s{i:02d}" for i in range(N)], dtype=object)
        handle.create_group("layers")["conv"] = rng.gamma(2.0, size=(N, K, 2, 2)).astype(np.float32)
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
                "assigned": group != "Objects",
            }
        )
    return pd.DataFrame(rows)


@pytest.fixture
def brain(store: Path, tmp_path: Path) -> Path:
    faces = ",".join(str(k) for k in GROUPS["Faces"])
    result = simulate(
        store,
        [f"FACE=filters:conv:{faces};snr=2;voxels=40", "NOISE=filters:conv:0;snr=0.0001;voxels=20"],
        out=tmp_path / "sim",
        n_subjects=2,
        seed=2,
    )
    return result.brain_manifest


def _rows(table: pd.DataFrame, target: str, variant: str = "lesion") -> pd.DataFrame:
    return table[
        (table["analysis"] == "encoding")
        & (table["target"] == target)
        & (table["subject"] == "group")
        & (table["variant"] == variant)
        & (table["condition"] == "all")
    ].set_index("group")


def test_planted_group_carries_the_encoding_lesion_effect(
    store: Path, filter_table: pd.DataFrame, brain: Path, tmp_path: Path
) -> None:
    result = lesion(
        store,
        filter_table,
        brain=brain,
        out=tmp_path / "out",
        analysis="encoding",
        encode_options=FAST,
        n_null=200,
        figures=False,
    )
    table = result.object2brain
    assert list(table.columns) == OBJECT2BRAIN.column_names
    assert set(table["analysis"]) == {"encoding"}
    face = _rows(table, "FACE")
    assert face.loc["Faces", "r_full"] > 0.15  # the ROI is predicted from the layer
    assert face["delta_r"].idxmin() == "Faces"
    assert face.loc["Faces", "delta_r"] < -0.2
    assert face.loc["Faces", "p_null"] < 0.01 and face.loc["Faces", "z_null"] < -3
    for group in ("Animals", "Vehicles"):  # groups the voxels do not read
        assert face.loc[group, "p_null"] > 0.05
    keep = _rows(table, "FACE", "keep")
    assert keep["delta_r"].idxmax() == "Faces"
    assert keep.loc["Faces", "p_null"] < 0.01
    noise = table[(table["target"] == "NOISE") & (table["analysis"] == "encoding")]
    assert (noise["p_fdr"] > 0.05).mean() >= 0.9
    assert table["p_perm"].isna().all() and (table["n_perm"] == 0).all()
    per_subject = table[(table["target"] == "FACE") & (table["group"] == "Faces")]
    assert {"sub-01", "sub-02", "group"} <= set(per_subject["subject"])
    written = pd.read_csv(tmp_path / "out" / "object2brain.csv")
    assert len(written) == len(table)


def test_r_full_equals_the_encode_stage_and_subsets_equal_masked_predictions(
    store: Path, brain: Path
) -> None:
    """The lesion's intact model is the encode stage's model (same folds, penalties,
    standardisation), and the affine shortcut equals predicting the masked features."""
    stage = encode(store, brain=brain, options=FAST.model_copy(update={"keep_weights": True}))
    with ActivationStore.open(store) as opened:
        features = opened.read("conv")
    roi = ("FACE", "sub-01")
    fit = stage.fits["toy"][("conv", *roi)]
    y = encode_responses(brain)[roi]
    rng = np.random.default_rng(3)
    masks = np.vstack([np.ones(K, dtype=bool), rng.random((5, K)) < 0.5])
    everything = np.ones(N, dtype=bool)
    mean_r = subset_mean_r(
        fit.ridge, features.reshape(N, K, -1).astype(np.float64), y, masks, [everything]
    )
    for mask, got in zip(masks, mean_r[:, 0], strict=True):
        expected = np.nanmean(pearson_r(y, predict_with_filters(fit, features, mask)))
        assert got == pytest.approx(expected, abs=1e-10)
    encoded = stage.encoding.set_index(["target", "subject", "condition"])
    assert mean_r[0, 0] == pytest.approx(encoded.loc[(*roi, "all"), "r_mean"], abs=1e-10)


def encode_responses(brain: Path) -> dict[tuple[str, str], np.ndarray]:
    from object2brain.api.encode import load_targets
    from object2brain.data.brain import load_brain

    return load_targets(load_brain(brain), None, [f"s{i:02d}" for i in range(N)], None).responses


def test_null_subsets_are_the_rsa_lesions() -> None:
    """Same sizes, seeds and draws as the RSA lesion's null (uniform draws): chunks of
    ``NULL_CHUNK`` subsets, chunk ``k`` seeded ``[seed + group size, RANDOM_STREAM, k]``."""
    members = np.arange(6)
    total = NULL_CHUNK + 50  # two chunks, the second shorter
    for variant in ("lesion", "keep"):
        got = null_subset_masks(K, members, None, total, 7, variant)
        draws = np.concatenate(
            [
                random_subset_masks(K, 6, NULL_CHUNK, seed=[7 + 6, RANDOM_STREAM, 0]),
                random_subset_masks(K, 6, 50, seed=[7 + 6, RANDOM_STREAM, 1]),
            ]
        )
        np.testing.assert_array_equal(got, ~draws if variant == "lesion" else draws)


def test_standardisation_never_sees_test_fold_stimuli() -> None:
    """Changing the features of the test stimuli of a fold leaves that fold's scaler as it was."""
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((30, 5)) * [1, 10, 100, 0.1, 3], rng.standard_normal((30, 4))
    result = compute_encoding(
        {"l": x},
        {("r", "s"): y},
        FAST.model_copy(update={"keep_weights": True, "standardize": True}),
        Runtime(seed=0, device="cpu", progress=False),
        stimulus_ids=[f"s{i}" for i in range(30)],
    )
    for fold in result.fits[("l", "r", "s")].ridge.folds:
        train = np.setdiff1d(np.arange(30), fold.test)
        assert fold.scaler is not None
        np.testing.assert_allclose(fold.scaler.mean, x[train].mean(axis=0))
        np.testing.assert_allclose(fold.scaler.scale, x[train].std(axis=0))


def test_refusals_and_options(
    store: Path, filter_table: pd.DataFrame, brain: Path, tmp_path: Path
) -> None:
    with pytest.raises(DataError, match=r"layer\(s\) conv .*reduce=srp:8"):
        lesion(
            store,
            filter_table,
            brain=brain,
            analysis="encoding",
            encode_options=FAST.model_copy(update={"reduce": "srp:8"}),
            n_null=0,
        )
    with pytest.raises(DataError, match="needs brain patterns"):
        lesion(store, filter_table, analysis="encoding", n_null=0, ratings=None)
    assert LesionOptions().analysis == "rsa"
    with pytest.raises(Exception, match="analysis"):
        LesionOptions.model_validate({"analysis": "ridge"})


def test_both_analyses_keep_the_rsa_rows(
    store: Path, filter_table: pd.DataFrame, brain: Path
) -> None:
    options = {"n_null": 20, "n_perm": 0, "variants": ("lesion",)}
    rsa_only = lesion(store, filter_table, brain=brain, **options).object2brain  # type: ignore[arg-type]
    both = lesion(
        store,
        filter_table,
        brain=brain,
        analysis="both",
        encode_options=FAST,
        **options,  # type: ignore[arg-type]
    ).object2brain
    assert set(rsa_only["analysis"]) == {"rsa"}
    pd.testing.assert_frame_equal(
        both[both["analysis"] == "rsa"].reset_index(drop=True), rsa_only, check_dtype=False
    )
    assert (both["analysis"] == "encoding").sum() > 0


def test_cli_analysis_flag(
    store: Path, filter_table: pd.DataFrame, brain: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    table = tmp_path / "filters.csv"
    filter_table.to_csv(table, index=False)
    out = tmp_path / "cli"
    args = ["lesion", "--activations", str(store), "--filters", str(table), "--brain", str(brain)]
    args += ["--out", str(out), "--analysis", "encoding", "--n-null", "10", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    written = pd.read_csv(out / "object2brain.csv")
    assert set(written["analysis"]) == {"encoding"}


def test_subset_masks_share_nulls_by_size(filter_table: pd.DataFrame, store: Path) -> None:
    from object2brain.lesion.analysis import load_filter_table, load_layer

    with ActivationStore.open(store) as opened:
        task = load_layer(
            opened,
            "conv",
            "toy",
            load_filter_table(filter_table),
            None,
            None,
            "cpu",  # type: ignore[arg-type]
        )
    subsets = _subset_masks(task, LesionOptions(n_null=10, variants=["lesion"]), seed=0)
    # Faces, Animals, Vehicles (6 filters each) share one null; unassigned (6) too
    assert len(subsets.null_rows) == 1
    assert subsets.masks.shape == (1 + 4 + 10, K)


def test_study_lesion_uses_the_encode_section_only_for_encoding() -> None:
    """The pipeline passes its ``encode`` section as the lesion's encoding model (and keys the
    cached lesion on it) only when the lesion analyses encoding."""
    from types import SimpleNamespace

    from object2brain.pipeline.stages import _lesion_encoding

    section = EncodeOptions(folds=3)

    def study(analysis: str, encode: EncodeOptions | None) -> Any:
        lesion = LesionOptions(analysis=analysis)  # type: ignore[arg-type]
        return SimpleNamespace(config=SimpleNamespace(lesion=lesion, encode=encode))

    assert _lesion_encoding(study("rsa", section)) is None
    assert _lesion_encoding(study("both", section)) is section
    assert _lesion_encoding(study("encoding", None)) == EncodeOptions()


def _lesion_p(index: int, planted: bool, n_null: int = 200) -> float:
    """``p_null`` of lesioning a 4-filter group of a 12-filter layer (validation/
    encoding_lesion_null.py, reduced): voxels read every filter (null: the group is a random
    set) or only the group (planted)."""
    from object2brain.encoding.folds import outer_folds
    from object2brain.encoding.ridge import fit_ridge_cv
    from object2brain.lesion.analysis import null_p_z

    rng = np.random.default_rng([11, index, int(planted)])
    n, C = 40, 12
    features = rng.standard_normal((n, C, 2))
    group = np.sort(rng.choice(C, 4, replace=False))
    read = group if planted else np.arange(C)
    signal = features[:, read].reshape(n, -1) @ rng.standard_normal((2 * len(read), 10))
    y = signal + signal.std() * rng.standard_normal(signal.shape)
    fit = fit_ridge_cv(
        features.reshape(n, -1),
        y,
        outer_folds(n, 3, seed=index),
        alphas=FAST.alphas,
        inner_folds=3,
        seed=index,
    )
    mask = np.ones(C, dtype=bool)
    mask[group] = False
    nulls = null_subset_masks(C, group, None, n_null, index, "lesion")
    masks = np.vstack([np.ones(C, dtype=bool), mask, nulls])
    r = subset_mean_r(fit, features, y, masks, [np.ones(n, dtype=bool)])[:, 0]
    return float(null_p_z(np.array([r[1] - r[0]]), (r[2:] - r[0])[:, None])[0][0])


def test_encoding_lesion_null_keeps_alpha_and_finds_a_planted_group() -> None:
    """Reduced: 80 null datasets reject at most 12 times at 0.05 (P < 0.001 for a valid test;
    the full run, 400 datasets: 6.0%, inside [3, 7.25]%), 15 planted groups all found."""
    rejections = sum(_lesion_p(i, planted=False) <= 0.05 for i in range(80))
    assert 1 <= rejections <= 12
    assert all(_lesion_p(i, planted=True) <= 0.05 for i in range(15))
