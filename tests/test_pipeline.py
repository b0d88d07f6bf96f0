"""Study configs: validation with key paths; staged runs that reuse, re-run and resume."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from object2brain.activations.store import ActivationStore
from object2brain.pipeline.config import ConfigError, load_config
from object2brain.pipeline.run import run_study


def write_config(folder: Path, payload: dict[str, Any]) -> Path:
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(payload))
    return path


@pytest.fixture
def study(stimulus_table: Path, tmp_path: Path) -> dict[str, Any]:
    # Each photo gets a bright patch at its own place, and its "face" box on the patch: filters
    # that respond to the patch are enriched in their own image's box, not in other images'
    # boxes, so the assignment test (boxes shuffled across images) can assign them.
    frame = pd.read_csv(stimulus_table)
    folder = tmp_path / "patched"
    folder.mkdir()
    rows, paths = [], []
    for i, (sid, source) in enumerate(zip(frame["stimulus_id"], frame["path"], strict=True)):
        image = Image.open(stimulus_table.parent / source).convert("RGB")
        # x1 stays below 90: a test below moves every box's right edge to 90
        x0, y0 = 8 + (i * 23) % 50, 6 + (i * 11) % max(1, image.height - 40)
        image.paste((255, 255, 255), (x0, y0, x0 + 32, y0 + 32))
        image.save(folder / f"{sid}.png")
        paths.append(str(folder / f"{sid}.png"))
        rows.append({"stimulus_id": sid, "x0": x0, "y0": y0, "x1": x0 + 32, "y1": y0 + 32})
    frame.assign(path=paths).to_csv(stimulus_table, index=False)
    boxes = pd.DataFrame(rows).assign(label="face")
    boxes.to_csv(tmp_path / "boxes.csv", index=False)
    return {
        "out": "results",
        "seed": 1,
        "device": "cpu",
        "stimuli": str(stimulus_table),
        "models": [{"arch": "resnet18", "weights": "none", "layers": ["layer3", "layer4"]}],
        "simulate": {"rois": ["EVC=layer:layer3;snr=2;voxels=50"], "n_subjects": 3},
        "extract": {"batch_size": 4},
        "train_head": {"epochs": 3, "patience": 2, "batch_size": 4},
        "rsa": {"n_perm": 20, "n_boot": 10},
        "dissect": {
            "layer": "layer4",
            "detector": f"boxes:{tmp_path / 'boxes.csv'}",
            "min_images": 1,
            "direction": "abs",
            "threshold": 1.2,
        },
        "lesion": {"n_null": 10, "variants": ["lesion"]},
    }


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(colour="red"), "colour: unknown key"),
        (lambda c: c["rsa"].update(n_permutations=5), "rsa.n_permutations: unknown key"),
        (lambda c: c["rsa"].update(n_perm="many"), "rsa.n_perm: Input should be a valid integer"),
        (lambda c: c["rsa"].update(n_perm=True), "rsa.n_perm: expected a number, got true"),
        (
            lambda c: c["models"][0].update(arch="resnet19"),
            "models.0.arch: unknown model 'resnet19'",
        ),
        (lambda c: c.update(stimuli="nowhere.csv"), "stimuli: file not found"),
        (lambda c: c.pop("dissect"), "lesion needs the dissect section"),
        (lambda c: c.update(models=[]), "models: List should have at least 1 item"),
        (
            lambda c: c["extract"].update(dtype="int8"),
            "extract.dtype: Input should be 'float32' or 'float16'",
        ),
        # semantic checks, before any stage runs
        (
            lambda c: c["models"][0].update(layers=["layer9"]),
            "models.0.layers: unknown layer(s) for resnet18: 'layer9'",  # was "for ResNet"
        ),
        (lambda c: c["dissect"].update(layer="layer9"), "dissect.layer: unknown layer"),
        (
            lambda c: c["dissect"].update(layer={"vgg": "layer4"}),
            "dissect.layer.vgg: no model named 'vgg' (models: resnet18)",
        ),
        (
            lambda c: c["dissect"].update(layer={}),
            "dissect.layer: no layer given for model 'resnet18'",
        ),
        (lambda c: c["dissect"].update(detector="yolo"), "dissect.detector: unknown detector"),
        (lambda c: c["dissect"].update(detector="boxes:b.csv"), "dissect.detector: file not"),
        (lambda c: c.pop("train_head"), "dissect: model 'resnet18' has no valence head"),
        (lambda c: c.update(device="cuda:99"), "device: "),
        (
            lambda c: c["train_head"].update(cross_fit=1),
            "train_head.cross_fit: use 0 (off) or 2 or more folds",
        ),
    ],
)
def test_config_mistakes_name_the_key(
    study: dict[str, Any], tmp_path: Path, edit: Any, message: str
) -> None:
    edit(study)
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, study))
    assert message in str(info.value)
    assert str(tmp_path / "study.yaml") in str(info.value)


def test_more_folds_than_stimuli_fail_before_any_stage(
    study: dict[str, Any], tmp_path: Path
) -> None:
    study["train_head"]["cross_fit"] = 9  # the table has 8 stimuli
    with pytest.raises(ConfigError, match=r"train_head\.cross_fit: 9 folds for 8 stimuli"):
        run_study(write_config(tmp_path, study), progress=False)
    assert not (tmp_path / "results" / "activations").exists()


def test_config_paths_resolve_relative_to_file(study: dict[str, Any], tmp_path: Path) -> None:
    config, base = load_config(write_config(tmp_path, study))
    assert base == tmp_path.resolve()
    assert config.out == tmp_path.resolve() / "results"
    assert config.models[0].label == "resnet18"


def test_run_reuses_and_reruns_only_what_changed(study: dict[str, Any], tmp_path: Path) -> None:
    path = write_config(tmp_path, study)
    first = run_study(path, progress=False)
    out = tmp_path / "results"
    assert {"simulate", "train_head", "rsa", "lesion"} <= set(first.ran)
    for name in (
        "rsa/alignment.csv",
        "dissect/resnet18/filter_objects.csv",
        "lesion/resnet18/object2brain.csv",
        "simulation/truth.json",
        "report.html",
        "manifest.json",
        "heads/resnet18/head.safetensors",
    ):
        assert (out / name).is_file(), name
    alignment = pd.read_csv(out / "rsa" / "alignment.csv")
    assert "valence" in set(alignment["layer"])  # the trained head's output was extracted
    assert {"EVC", "behavior"} <= set(alignment["target"])
    lesion = pd.read_csv(out / "lesion" / "resnet18" / "object2brain.csv")
    # dissect writes per-fold assignments, so the lesion is cross-fitted (the default) end to
    # end. This study has 8 stimuli, 4 per selection fold: a permutation p_assign is >= 1/24
    # there, so no filter is assigned without either fold and there is nothing to lesion (on
    # all 8 images Faces is assigned; the circular analysis would have lesioned it)
    filters = pd.read_csv(out / "dissect" / "resnet18" / "filter_objects.csv")
    assert sorted(filters["fold"].dropna().unique()) == [0, 1]
    per_fold = filters[filters["fold"].notna()]
    # (about 1/24: 1 + the draws equal to the identity of 4 images, of 1,000; fold heads' draws)
    assert not per_fold["assigned"].any() and per_fold["p_assign"].min() > 1 / 30
    assert filters.loc[filters["fold"].isna() & (filters["group"] == "Faces"), "assigned"].any()
    assert lesion.empty
    dissected = json.loads((out / "dissect" / "resnet18" / "manifest.json").read_text())
    # the study fitted selection fold heads and the dissection used them for the fold rows
    assert "fold head k" in " ".join(dissected["selection_notes"])
    assert dissected["summary"]["fold_heads"] is True
    for k in (0, 1):
        assert (out / "heads" / "resnet18" / f"head.fold{k}.safetensors").is_file()
    assert (out / "dissect" / "resnet18" / "folds.csv").is_file()
    page = (out / "report.html").read_text()
    assert "Planted truth vs recovered" in page and "Simulated data" in page
    assert "predicted by a cross-fitted head that was not fitted on it" in page
    # heads trained on the study's stimuli: the 'valence' layer holds the out-of-fold
    # predictions of the cross-fitted heads, so the direct correlation uses every stimulus
    out_of_fold = pd.read_csv(out / "heads" / "resnet18" / "out_of_fold.csv", dtype={0: str})
    assert sorted(out_of_fold["fold"].unique()) == [0, 1, 2, 3, 4]
    with ActivationStore.open(out / "activations" / "resnet18.h5") as store:
        stored = store.read("valence", out_of_fold["stimulus_id"].tolist())
        assert store.attrs["valence_source"] == "supplied"
    np.testing.assert_allclose(stored, out_of_fold["predicted"], rtol=1e-6)
    direct = pd.read_csv(out / "rsa" / "behavior_direct.csv")
    assert (direct.loc[direct["condition"] == "all", "n"] == len(out_of_fold)).all()

    again = run_study(path, progress=False)
    assert again.ran == [] and set(again.skipped) == set(first.ran)

    study["rsa"]["n_perm"] = 30
    edited = run_study(write_config(tmp_path, study), progress=False)
    assert edited.ran == ["rsa"]
    assert (pd.read_csv(out / "rsa" / "alignment.csv")["n_perm"] == 30).all()

    # without cross-fitting the store holds the main head's outputs, and behavior_direct uses
    # its held-out test split only; the main head is unchanged, so is its dissection
    study["train_head"]["cross_fit"] = 0
    plain = run_study(write_config(tmp_path, study), progress=False)
    assert {"train_head", "extract:resnet18", "rsa", "lesion"} <= set(plain.ran)
    assert "dissect:resnet18" in plain.skipped
    assert not (out / "heads" / "resnet18" / "out_of_fold.csv").exists()
    with ActivationStore.open(out / "activations" / "resnet18.h5") as store:
        assert store.attrs["valence_source"] == "head"
    split = pd.read_csv(out / "heads" / "split.csv")
    direct = pd.read_csv(out / "rsa" / "behavior_direct.csv")
    assert (direct.loc[direct["condition"] == "all", "n"] == (split["split"] == "test").sum()).all()


def test_edited_inputs_rerun_the_stages_that_read_them(
    study: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Inputs enter stage keys by content: an edited stimulus-table column, box file or simulated
    brain data re-runs what reads them; touched images do not, edited ones re-extract (each stage
    replaces its own store); a store left without its manifest gets one; the run manifest lists
    inputs and every output, and the report shows only those."""
    import json
    import logging
    import os
    import shutil

    from PIL import Image

    table_path = tmp_path / "stimuli.csv"  # a private copy of the images: one gets edited
    table = pd.read_csv(study["stimuli"])
    (tmp_path / "images").mkdir()
    for i, image in enumerate(table["path"]):
        shutil.copy(Path(study["stimuli"]).parent / image, tmp_path / "images" / f"{i}.jpg")
    table["path"] = [f"images/{i}.jpg" for i in range(len(table))]
    table.to_csv(table_path, index=False)
    study["stimuli"] = str(table_path)
    path = write_config(tmp_path, study)
    run_study(path, progress=False)
    out = tmp_path / "results"

    table["condition"] = table["condition"].replace({"incongruent": "other"})
    table.to_csv(table_path, index=False)
    edited = run_study(path, progress=False)
    assert {"simulate", "rsa", "lesion"} <= set(edited.ran)  # simulate: gain.COND may read it
    assert "dissect:resnet18" not in edited.ran and "train_head" not in edited.ran  # valence only
    assert "other" in set(pd.read_csv(out / "rsa" / "alignment.csv")["condition"])

    boxes = pd.read_csv(tmp_path / "boxes.csv")
    boxes["x1"] = 90
    boxes.to_csv(tmp_path / "boxes.csv", index=False)
    assert {"dissect:resnet18", "lesion"} <= set(run_study(path, progress=False).ran)

    study["simulate"]["rois"] = ["EVC=layer:layer3;snr=0.5;voxels=50"]
    before = pd.read_csv(out / "rsa" / "alignment.csv")
    resimulated = run_study(write_config(tmp_path, study), progress=False)
    assert {"simulate", "rsa", "lesion"} <= set(resimulated.ran)
    after = pd.read_csv(out / "rsa" / "alignment.csv")
    assert not np.allclose(before["r"], after["r"], equal_nan=True)

    image = tmp_path / "images" / "0.jpg"
    os.utime(image, (image.stat().st_atime, image.stat().st_mtime + 10))
    assert run_study(path, progress=False).ran == []  # same bytes, newer mtime: images unchanged
    flipped = Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    flipped.save(image, quality=90)
    edited_image = run_study(path, progress=False)  # used to stop: "already exists ... --overwrite"
    assert {"extract_backbone:resnet18", "extract:resnet18"} <= set(edited_image.ran)

    # a store completed by a run that stopped before writing its manifest gets one
    (out / "activations" / "resnet18.manifest.json").unlink()
    (out / "activations" / ".resnet18" / ".stage.json").unlink()
    run_study(path, progress=False)
    assert (out / "activations" / "resnet18.manifest.json").is_file()

    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("weights:resnet18", "head:resnet18", "stimulus_table", "brain:patterns.h5"):
        assert key in manifest["inputs"], key
    for name in ("rsa/alignment.csv", "lesion/resnet18/object2brain.csv", "report.html"):
        assert name in manifest["outputs"], name

    # renamed model: the old model's folders stay on disk but out of the report
    study["models"][0]["name"] = "renamed"
    # groups chosen on all 8 stimuli: 4 per selection fold assign no filter (p_assign >= 1/24),
    # and an empty lesion table draws no figure to look for
    study["lesion"]["selection"] = "same"
    with caplog.at_level(logging.WARNING, logger="object2brain"):
        run_study(write_config(tmp_path, study), progress=False)
    assert (out / "lesion" / "resnet18" / "object2brain.csv").is_file()
    page = (out / "report.html").read_text()
    # the lesion figures' captions name model and layer
    assert re.search(r"renamed / [\w.]+: delta r per object group", page)
    assert not re.search(r"resnet18 / [\w.]+: delta r per object group", page)
    assert "Valence heads" in page and "predicted_vs_rated_renamed" not in page  # caption only
    for table_name in ("alignment_group.csv", "head_metrics.csv", "detections.csv"):
        assert table_name in page, table_name
    assert any("does not list as outputs of the run" in r.getMessage() for r in caplog.records)


def test_a_moved_study_reuses_every_stage(study: dict[str, Any], tmp_path: Path) -> None:
    """Stage keys and store fingerprints hold contents, not paths: a study folder (config,
    images, tables, results) moved elsewhere re-runs nothing."""
    import shutil

    first = tmp_path / "first"
    (first / "images").mkdir(parents=True)
    table = pd.read_csv(study["stimuli"])
    for i, image in enumerate(table["path"]):
        shutil.copy(Path(study["stimuli"]).parent / image, first / "images" / f"{i}.jpg")
    table["path"] = [f"images/{i}.jpg" for i in range(len(table))]
    table.to_csv(first / "stimuli.csv", index=False)
    shutil.copy(tmp_path / "boxes.csv", first / "boxes.csv")
    study.update(stimuli="stimuli.csv")
    study["dissect"]["detector"] = "boxes:boxes.csv"
    ran = run_study(write_config(first, study), progress=False).ran
    assert "rsa" in ran and "lesion" in ran
    moved = shutil.move(first, tmp_path / "moved")
    again = run_study(Path(moved) / "study.yaml", progress=False)
    assert again.ran == [] and set(again.skipped) == set(ran)


def test_stage_outputs_outside_the_output_folder_are_not_reused(tmp_path: Path) -> None:
    """A ``.stage.json`` of an older run recorded absolute outputs: copied into another output
    folder it would point at the original's files (which its report then cannot show)."""
    import json
    import shutil

    from object2brain.pipeline.stages import StageCache, digest

    first = tmp_path / "first"
    (first / "rsa").mkdir(parents=True)
    (first / "rsa" / "alignment.csv").write_text("x\n")
    marker = {
        "key": digest({"stage": "rsa"}),
        "outputs": [str(first / "rsa" / "alignment.csv")],
    }
    (first / "rsa" / ".stage.json").write_text(json.dumps(marker))
    copy = Path(shutil.copytree(first, tmp_path / "copy"))
    ran: list[str] = []

    def work() -> list[Path]:
        ran.append("rsa")
        return [copy / "rsa" / "alignment.csv"]

    StageCache(copy).run("rsa", copy / "rsa", {"stage": "rsa"}, work)
    assert ran == ["rsa"]
    assert json.loads((copy / "rsa" / ".stage.json").read_text())["outputs"] == [
        "rsa/alignment.csv"
    ]
    StageCache(first).run("rsa", first / "rsa", {"stage": "rsa"}, work)
    assert ran == ["rsa"]  # in its own folder the old marker is still reused


def test_interrupted_run_completes_identically(
    study: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference_dir = tmp_path / "ref"
    reference_dir.mkdir()
    run_study(write_config(reference_dir, study), progress=False)

    # the pipeline calls the stage through its API module: patch the function there
    lesion_module = importlib.import_module("object2brain.api.lesion")

    original = lesion_module.lesion

    def killed(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(lesion_module, "lesion", killed)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    path = write_config(resumed_dir, study)
    with pytest.raises(KeyboardInterrupt):
        run_study(path, progress=False)
    assert not (resumed_dir / "results" / "lesion" / ".stage.json").exists()
    monkeypatch.setattr(lesion_module, "lesion", original)
    result = run_study(path, progress=False)
    assert result.ran == ["lesion"]
    for table in (
        "rsa/alignment.csv",
        "lesion/resnet18/object2brain.csv",
        "dissect/resnet18/filter_objects.csv",
    ):
        a = pd.read_csv(reference_dir / "results" / table)
        b = pd.read_csv(resumed_dir / "results" / table)
        pd.testing.assert_frame_equal(a, b)
    assert np.isfinite(pd.read_csv(resumed_dir / "results" / "rsa" / "alignment.csv")["r"]).any()


def test_example_config_is_valid() -> None:
    from object2brain.pipeline.config import RunConfig

    example = Path(__file__).resolve().parents[1] / "examples" / "study.yaml"
    config = RunConfig.model_validate(yaml.safe_load(example.read_text()))
    assert [m.label for m in config.models] == [
        "resnet18",
        "resnet18_places365",
        "efficientnet_lite0",
    ]
    assert (
        config.dissect is not None
        and config.dissect.layer_for("efficientnet_lite0") == "_blocks.14"
    )


def test_cli_run_and_report_bad_input(
    study: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from object2brain.cli import main

    study["models"][0]["arch"] = "resnet19"
    with pytest.raises(SystemExit) as info:
        main(["run", str(write_config(tmp_path, study))])
    assert info.value.code == 2
    assert "models.0.arch: unknown model 'resnet19'" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()  # nothing written before validation passes
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as info:
        main(["report", str(tmp_path / "empty")])
    assert info.value.code == 2
    assert "no result tables found" in capsys.readouterr().err
    assert not (tmp_path / "empty" / "report.html").exists()


def test_stage_sections_are_the_options_models(study: dict[str, Any], tmp_path: Path) -> None:
    """``rsa: {rdm, compare}`` (aliases) still reads; lesions follow the rsa section's metric
    unless their own section names one; a study cross-fits its heads with 5 folds."""
    from object2brain.options import LesionOptions, RsaOptions

    study["rsa"].update(rdm="euclidean", compare="pearson")
    config, _ = load_config(write_config(tmp_path, study))
    assert isinstance(config.rsa, RsaOptions) and isinstance(config.lesion, LesionOptions)
    assert (config.rsa.rdm_metric, config.rsa.compare_method) == ("euclidean", "pearson")
    assert (config.lesion.rdm_metric, config.lesion.compare_method) == ("euclidean", "pearson")
    assert config.train_head is not None and config.train_head.folds(in_study=True) == 5
    study["lesion"]["rdm"] = "cosine"
    config, _ = load_config(write_config(tmp_path, study))
    assert config.lesion is not None and config.lesion.rdm_metric == "cosine"
    assert config.rsa is not None and config.rsa.rdm_metric == "euclidean"
