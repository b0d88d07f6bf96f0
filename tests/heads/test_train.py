"""Training valence heads: accuracy on a known colour->valence set, checkpoints, cache, CLI."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from heads_helpers import run_cli, tiny_model

from object2brain.activations.store import ActivationStore
from object2brain.api.extract import extract
from object2brain.api.train_head import TrainHeadResult, train_head
from object2brain.data.stimuli import load_stimuli
from object2brain.errors import DataError, ModelError, StoreError
from object2brain.heads.features import FEATURE_LAYER
from object2brain.heads.io import load_head, save_head
from object2brain.heads.loss import level_weights
from object2brain.models.zoo import load_model

LITE0 = "efficientnet_lite0"


def test_lite0_head_learns_colour_valence(lite0_run: TrainHeadResult) -> None:
    result = lite0_run
    head = result.models[LITE0]
    assert head.metrics["test"]["spearman"] >= 0.9
    assert head.metrics["test"]["n"] == 12
    assert head.metrics["test"]["r2"] > 0.5
    out = result.out
    for name in ("split.csv", "manifest.json", "head_metrics.csv", "head_metrics.parquet"):
        assert (out / name).is_file(), name
    for name in ("head.safetensors", "head.json", "metrics.json", "predictions.csv", "features.h5"):
        assert (out / LITE0 / name).is_file(), name
    for fmt in ("png", "svg"):
        assert (out / "figures" / f"predicted_vs_rated_{LITE0}.{fmt}").is_file()
    metrics = json.loads((out / LITE0 / "metrics.json").read_text())
    assert set(metrics["test"]) >= {"mae", "rmse", "pearson", "spearman", "r2"}
    assert set(metrics["val"]) >= {"mae", "rmse", "pearson", "spearman", "r2"}
    assert set(metrics["per_level"]["test"]) == {"-3", "-2", "-1", "0", "1", "2", "3"}
    # the weights used are those of the training split, computed by hand
    split = pd.read_csv(out / "split.csv")
    expected = level_weights(split.loc[split["split"] == "train", "level"].to_numpy())
    assert metrics["training"]["level_weights"] == pytest.approx(
        {str(k): v for k, v in expected.items()}
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "train-head" and manifest["n_images"] == 63


def test_sidecar_records_backbone_and_split(lite0_run: TrainHeadResult) -> None:
    from object2brain.manifest import file_sha256

    linear, meta = load_head(lite0_run.models[LITE0].head_path)
    assert linear.in_features == 1280 and meta["feature_dim"] == 1280
    assert meta["arch"] == LITE0 and meta["replaced_layer"] == "_fc"
    assert meta["backbone_weights_sha256"] == load_model(LITE0).weights_sha256
    assert meta["split_sha256"] == file_sha256(lite0_run.split_path)
    assert meta["loss"] == "weighted_mse"
    assert meta["metrics"]["test"]["spearman"] >= 0.9


def test_head_loads_and_extraction_writes_valence(
    lite0_run: TrainHeadResult, rated_table: Path, tmp_path: Path
) -> None:
    head_path = lite0_run.models[LITE0].head_path
    loaded = load_model(LITE0, "default", head=head_path)
    assert loaded.has_head
    predictions = pd.read_csv(lite0_run.out / LITE0 / "predictions.csv", dtype={"stimulus_id": str})
    chosen = predictions[predictions["split"] == "test"]["stimulus_id"].tolist()[:6]
    stimuli = load_stimuli(rated_table).subset(chosen)
    store_path = extract(
        loaded,
        stimuli,
        out=tmp_path / "acts.h5",
        layers="_avg_pooling",
        progress=False,
        num_workers=0,
    )
    with ActivationStore.open(store_path) as store:
        assert "valence" in store.layers
        valence = store.read("valence")
        pooled = store.read("_avg_pooling").reshape(len(chosen), -1)
    expected = predictions.set_index("stimulus_id").loc[chosen, "predicted"].to_numpy()
    np.testing.assert_allclose(valence, expected, atol=1e-4)
    # the cached penultimate features are what the backbone gives before the replaced layer;
    # they are an activation store (layer 'penultimate')
    features_path = lite0_run.models[LITE0].features_path
    assert features_path is not None
    with ActivationStore.open(features_path) as features:
        cached = features.read(FEATURE_LAYER, chosen)
    np.testing.assert_allclose(pooled, cached, atol=1e-4)


def test_head_for_another_architecture_is_refused(lite0_run: TrainHeadResult) -> None:
    with pytest.raises(ModelError, match="head was trained for efficientnet_lite0, not resnet18"):
        load_model("resnet18", "none", head=lite0_run.models[LITE0].head_path)


def test_head_for_other_backbone_weights_is_refused(tmp_path: Path) -> None:
    """A head fits the features of the backbone it was trained on, not another seed's."""
    backbone = load_model("resnet18", "none", seed=0)
    meta = {
        "arch": "resnet18",
        "backbone_weights": "none",
        "backbone_weights_sha256": backbone.weights_sha256,
    }
    path = save_head(torch.nn.Linear(512, 1), tmp_path / "head.safetensors", meta)
    assert load_model("resnet18", "none", seed=0, head=path).has_head
    with pytest.raises(ModelError, match="head was trained on 'none' backbone weights"):
        load_model("resnet18", "none", seed=1, head=path)


def test_rerun_reuses_cached_features_and_cli(
    lite0_run: TrainHeadResult,
    rated_table: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "again"
    shutil.copytree(lite0_run.out, out)
    old_split = (out / "split.csv").read_text()
    code = run_cli(
        [
            "train-head",
            "--model",
            LITE0,
            "--stimuli",
            str(rated_table),
            "--out",
            str(out),
            "--split",
            str(lite0_run.split_path),
            "--epochs",
            "3",
            "--quiet",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"{LITE0}: test spearman" in captured.out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["models"][LITE0]["features_reused"] is True
    assert (out / "split.csv").read_text() == old_split
    assert json.loads((out / LITE0 / "metrics.json").read_text())["training"]["epochs_run"] <= 3


def test_cached_and_uncached_give_the_same_head(small_table: Path, tmp_path: Path) -> None:
    """Uncached: every batch of every epoch (train and val) goes through the frozen backbone."""
    model = tiny_model()
    calls = []
    model.module.register_forward_hook(lambda *_: calls.append(1))
    common = {
        "stimuli": small_table,
        "epochs": 6,
        "patience": 100,
        "lr": 1e-2,
        "batch_size": 8,
        "seed": 3,
        "num_workers": 0,
        "progress": False,
        "figures": False,
    }
    cached = train_head(model, out=tmp_path / "cached", **common)  # type: ignore[arg-type]
    n_cached = len(calls)
    uncached = train_head(model, out=tmp_path / "uncached", cache=False, **common)  # type: ignore[arg-type]
    n_uncached = len(calls) - n_cached
    assert n_cached == 5  # ceil(35 / 8) batches, once
    # 6 epochs x (3 train batches of 28 + 1 val batch of 3) + initial val + final prediction
    assert n_uncached == 6 * (4 + 1) + 1 + 1
    a, _ = load_head(cached.models["tinynet"].head_path)
    b, _ = load_head(uncached.models["tinynet"].head_path)
    torch.testing.assert_close(a.weight, b.weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.bias, b.bias, atol=1e-5, rtol=1e-4)
    assert (tmp_path / "cached" / "tinynet" / "features.h5").is_file()
    assert not (tmp_path / "uncached" / "tinynet" / "features.h5").exists()
    split_a = (tmp_path / "cached" / "split.csv").read_text()
    assert split_a == (tmp_path / "uncached" / "split.csv").read_text()


def test_augment_disables_cache(
    small_table: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="object2brain"):
        result = train_head(
            tiny_model(),
            stimuli=small_table,
            out=tmp_path / "aug",
            augment=True,
            epochs=2,
            num_workers=0,
            progress=False,
            figures=False,
            loss="mse",
        )
    assert "not cached" in caplog.text
    assert result.models["tinynet"].features_path is None
    assert not (tmp_path / "aug" / "tinynet" / "features.h5").exists()
    assert result.models["tinynet"].metrics["training"]["level_weights"] == {}


def test_several_models_share_one_split(small_table: Path, tmp_path: Path) -> None:
    result = train_head(
        [tiny_model(0), tiny_model(1)],
        stimuli=small_table,
        out=tmp_path / "two",
        epochs=2,
        num_workers=0,
        progress=False,
        figures=False,
    )
    assert list(result.models) == ["tinynet_1", "tinynet_2"]
    metrics = pd.read_csv(tmp_path / "two" / "head_metrics.csv")
    assert sorted(set(metrics["model"])) == ["tinynet_1", "tinynet_2"]
    for name in result.models:
        _, meta = load_head(result.models[name].head_path)
        assert meta["split_file"] == str(result.split_path.resolve())


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_columns", "missing column(s) valence"),
        ("out_of_range", "outside the declared range -3..3"),
        ("no_images", "none of its 7 images were found"),
        ("unknown_model", "unknown model 'resnet19'"),
        ("both_sources", "give exactly one rated image set"),
    ],
)
def test_bad_input_fails_cleanly_via_cli(
    case: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from heads_helpers import write_findingemo

    ann = write_findingemo(tmp_path / "fe", per_level=1, n_absent=0)
    root = tmp_path / "fe" / "images"
    frame = pd.read_csv(ann)
    model = LITE0
    extra: list[str] = []
    if case == "missing_columns":
        frame.drop(columns=["valence"]).to_csv(ann, index=False)
    elif case == "out_of_range":
        frame.assign(valence=frame["valence"] * 2).to_csv(ann, index=False)
    elif case == "no_images":
        root = tmp_path / "empty"
        root.mkdir()
    elif case == "unknown_model":
        model = "resnet19"
    elif case == "both_sources":
        extra = ["--stimuli", str(ann)]
    out = tmp_path / "out"
    argv = [
        "train-head",
        "--model",
        model,
        "--findingemo",
        str(ann),
        "--image-root",
        str(root),
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]
    code = run_cli(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert expected in captured.err
    assert not out.exists()


def test_output_folder_must_be_creatable(small_table: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    with pytest.raises(StoreError, match="afile exists and is not a folder"):
        train_head(tiny_model(), stimuli=small_table, out=tmp_path / "afile" / "such" / "out")
    with pytest.raises(DataError, match="loss 'l1'"):
        train_head(tiny_model(), stimuli=small_table, out=tmp_path / "o", loss="l1")  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"learning rate 0\.0: must be positive"):
        train_head(tiny_model(), stimuli=small_table, out=tmp_path / "o", lr=0.0)
    assert not (tmp_path / "o").exists()
