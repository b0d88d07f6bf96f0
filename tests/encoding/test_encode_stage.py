"""The ``encode`` stage: API, CLI, NIfTI maps, ratings as voxels, study config, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

import object2brain as o2b
from object2brain.cli import main
from object2brain.errors import DataError
from object2brain.options import EncodeOptions
from object2brain.pipeline.config import ConfigError, load_config
from object2brain.tables import ENCODING, ENCODING_VOXELS

N = 48
IDS = [f"s{i:02d}" for i in range(N)]
AFFINE = np.array(
    [[2.0, 0, 0, -10.0], [0, 2.0, 0, -20.0], [0, 0, 2.5, 4.0], [0, 0, 0, 1.0]]
)  # not the identity: the map must carry the betas' affine
SHAPE = (5, 4, 3)
FAST = {"folds": 4, "inner_folds": 3, "n_perm": 200, "alphas": [0.1, 10.0, 1000.0]}


def write_store(
    path: Path, layers: dict[str, np.ndarray], ids: list[str], model: str = "tiny"
) -> Path:
    """A complete activation store with h5py (ids, layers in order, model label)."""
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "stimulus_ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype()
        )
        for name, values in layers.items():
            f.create_dataset(f"layers/{name}", data=values)
        f.attrs.update({"model": model, "arch": model, "weights": "none", "complete": True})
        f.attrs.update(
            {"weights_sha256": "none", "preprocessing": "{}", "order": json.dumps(list(layers))}
        )
        f.attrs["object2brain_version"] = "0.1.0"
    return path


def _features(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {name: rng.standard_normal((N, 6, 2, 2)) for name in ("l1", "l2", "l3")}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two stores, a NIfTI subject whose ROI ``EVC`` is generated from ``l2`` (``NOISE``: pure
    noise), the same responses as a patterns HDF5, ratings of 4 raters from ``l3``, stimuli."""
    folder = tmp_path_factory.mktemp("encode")
    rng = np.random.default_rng(3)
    features = _features(rng)
    store_a = write_store(folder / "a.h5", features, IDS, model="net_a")
    store_b = write_store(folder / "b.h5", _features(rng), IDS, model="net_b")
    evc = np.zeros(SHAPE, dtype=bool)
    evc[:2, :2, :] = True  # 12 voxels
    noise = np.zeros(SHAPE, dtype=bool)
    noise[4, :, :2] = True  # 8 voxels
    planted = features["l2"].reshape(N, -1)
    signal = planted @ rng.standard_normal((planted.shape[1], int(evc.sum())))
    betas = rng.standard_normal((*SHAPE, N)).astype(np.float32)
    betas[evc] = (signal + 0.6 * signal.std() * rng.standard_normal(signal.shape)).T
    (folder / "sub-01").mkdir()
    nib.save(nib.Nifti1Image(betas, AFFINE), folder / "sub-01" / "betas.nii.gz")
    pd.DataFrame({"stimulus_id": IDS}).to_csv(folder / "sub-01" / "betas.tsv", sep="\t")
    for name, mask in (("EVC", evc), ("NOISE", noise)):
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), AFFINE), folder / f"{name}.nii.gz")
    manifest = folder / "brain.yaml"
    manifest.write_text(
        "sources:\n  - kind: nifti\n    subject: sub-01\n    betas: sub-01/betas.nii.gz\n"
        "    stimuli: sub-01/betas.tsv\n    rois: [EVC.nii.gz, NOISE.nii.gz]\n"
    )
    patterns = _patterns(folder / "patterns.h5", {"EVC": betas[evc].T, "NOISE": betas[noise].T})
    valence = features["l3"].reshape(N, -1) @ rng.standard_normal((24, 4))
    ratings = pd.DataFrame(
        [
            {"subject": f"r{k}", "stimulus_id": sid, "valence": valence[i, k] + rng.normal()}
            for k in range(4)
            for i, sid in enumerate(IDS)
        ]
    )
    ratings.to_csv(folder / "ratings.csv", index=False)
    stimuli = pd.DataFrame({"stimulus_id": IDS, "condition": ["a", "b"] * (N // 2)})
    stimuli.to_csv(folder / "stimuli.csv", index=False)
    return {
        "folder": folder,
        "stores": [store_a, store_b],
        "brain": manifest,
        "patterns": patterns,
        "ratings": folder / "ratings.csv",
        "stimuli": folder / "stimuli.csv",
        "evc": evc,
        "noise": noise,
    }


def _patterns(path: Path, rois: dict[str, np.ndarray], ids: list[str] = IDS) -> Path:
    with h5py.File(path, "w") as f:
        f.attrs["kind"] = "patterns"
        f.create_dataset(
            "stimulus_ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype()
        )
        for roi, values in rois.items():
            f.create_dataset(f"sub-01/{roi}", data=values)
    return path


@pytest.fixture(scope="module")
def nifti_run(data: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("nifti_run") / "encode"
    result = o2b.encode(
        data["stores"][0], brain=data["brain"], out=out, progress=False, seed=2, **FAST
    )
    return {"out": out, "result": result}


def test_api_writes_tables_folds_maps_and_manifest(nifti_run: dict[str, Any]) -> None:
    out, result = nifti_run["out"], nifti_run["result"]
    encoding = pd.read_csv(out / "encoding.csv")
    voxels = pd.read_csv(out / "encoding_voxels.csv")
    assert encoding.columns.tolist() == ENCODING.column_names
    assert voxels.columns.tolist() == ENCODING_VOXELS.column_names
    assert len(encoding) == 3 * 2  # 3 layers x 2 ROIs, condition all only (no stimulus table)
    folds = pd.read_csv(out / "folds.csv")
    assert folds.columns.tolist() == ["stimulus_id", "fold"]
    assert sorted(folds["stimulus_id"]) == IDS and folds["fold"].value_counts().tolist() == [12] * 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "encode" and manifest["config"]["folds"] == 4
    listed = set(manifest["outputs"])
    assert {"encoding.csv", "folds.csv", "maps/net_a/l2/sub-01_r.nii.gz"} <= listed
    assert (out / "figures" / "encoding_net_a.png").is_file()
    assert set(result.fits) == {"net_a"} and ("l2", "EVC", "sub-01") in result.fits["net_a"]


def test_planted_layer_wins_and_noise_roi_is_not_significant(nifti_run: dict[str, Any]) -> None:
    encoding = nifti_run["result"].encoding
    evc = encoding[encoding["target"] == "EVC"].set_index("layer")
    assert evc["r_mean"].idxmax() == "l2"
    assert evc.loc["l2", "r_mean"] > 0.5 and evc.loc["l2", "p_perm"] < 0.01
    noise = encoding[encoding["target"] == "NOISE"]
    assert (noise["p_perm"] > 0.05).all()


def test_nifti_map_opens_on_the_betas_grid(nifti_run: dict[str, Any], data: dict[str, Any]) -> None:
    image = nib.load(nifti_run["out"] / "maps" / "net_a" / "l2" / "sub-01_r.nii.gz")
    assert image.shape == SHAPE
    np.testing.assert_allclose(image.affine, AFFINE)
    values = np.asarray(image.dataobj)
    voxels = nifti_run["result"].encoding_voxels
    rows = voxels[(voxels["layer"] == "l2") & (voxels["target"] == "EVC")]
    ijk = rows[["i", "j", "k"]].to_numpy(dtype=int)
    np.testing.assert_array_equal(ijk, np.argwhere(data["evc"]))  # C order of the mask
    np.testing.assert_allclose(values[ijk[:, 0], ijk[:, 1], ijk[:, 2]], rows["r"], rtol=1e-6)
    inside = data["evc"] | data["noise"]
    assert np.isnan(values[~inside]).all() and np.isfinite(values[inside]).all()


def test_patterns_file_gives_the_same_scores_without_coordinates(
    nifti_run: dict[str, Any], data: dict[str, Any], tmp_path: Path
) -> None:
    result = o2b.encode(
        data["stores"][0],
        brain=data["patterns"],
        out=tmp_path / "p",
        progress=False,
        seed=2,
        **FAST,
    )
    columns = ["layer", "target", "r_mean", "r2_mean", "p_perm"]
    pd.testing.assert_frame_equal(
        result.encoding[columns], nifti_run["result"].encoding[columns], rtol=1e-5
    )
    assert result.encoding_voxels[["i", "j", "k"]].isna().all().all()
    assert not (tmp_path / "p" / "maps").exists()


def test_cli_two_stores_conditions_and_options(data: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = ["encode", "--activations", *map(str, data["stores"]), "--brain", str(data["brain"])]
    args += ["--stimuli", str(data["stimuli"]), "--out", str(out), "--folds", "4"]
    args += ["--n-perm", "50", "--inner-folds", "3", "--alphas", "1", "--alphas", "100"]
    args += ["--layers", "l1,l2", "--banded", "l1,l2", "--n-iter", "5", "--quiet", "--seed", "5"]
    main(args)  # returns on success
    encoding = pd.read_csv(out / "encoding.csv")
    assert set(encoding["model"]) == {"net_a", "net_b"}
    assert set(encoding["layer"]) == {"l1", "l2", "banded:l1+l2"}
    bands = pd.read_csv(out / "encoding_bands.csv")
    assert set(bands["layer"]) == {"l1", "l2"} and set(bands["bands"]) == {"banded:l1+l2"}
    assert set(encoding["condition"]) == {"all", "a", "b"}
    assert (encoding["n_perm"] == 50).all() and (encoding["n_folds"] == 4).all()
    voxels = pd.read_csv(out / "encoding_voxels.csv")
    single = voxels[~voxels["layer"].str.startswith("banded:")]
    assert single["alpha"].between(1.0, 100.0).all()  # median over folds of chosen alphas
    assert voxels.loc[voxels["layer"] == "banded:l1+l2", "alpha"].isna().all()
    # folds stratified by condition: each fold holds 6 of each condition
    folds = pd.read_csv(out / "folds.csv").merge(pd.read_csv(data["stimuli"]))
    assert (folds.groupby(["fold", "condition"]).size() == 6).all()


def test_ratings_are_predicted_one_voxel_per_rater(data: dict[str, Any], tmp_path: Path) -> None:
    result = o2b.encode(
        data["stores"][0], ratings=data["ratings"], out=tmp_path / "r", progress=False, **FAST
    )
    rows = result.encoding.set_index("layer")
    assert (rows["target"] == "behavior").all() and (rows["subject"] == "group").all()
    assert (rows["n_voxels"] == 4).all()
    assert rows["r_mean"].idxmax() == "l3" and rows.loc["l3", "p_perm"] < 0.01
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["config"]["raters"] == ["r0", "r1", "r2", "r3"]


def _cli_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _base(data: dict[str, Any], out: Path) -> list[str]:
    return ["encode", "--activations", str(data["stores"][0]), "--out", str(out), "--quiet"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--folds", "60"], "48 stimuli cannot be split into 60 folds"),
        (["--layers", "one"], "1 feature(s); a ridge model needs 2 or more"),
        (["--layers", "l9"], "no layer(s) l9 in the store"),
        (["--banded", "l1"], "--banded ['l1']: give 2 or more distinct layers"),
        (["--reduce", "tsne:3"], "expected none, srp:DIM or pca:DIM"),
    ],
)
def test_bad_input_is_one_message_exit_2_nothing_written(
    data: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    rng = np.random.default_rng(0)
    store = write_store(
        tmp_path / "one.h5",
        {"l1": rng.standard_normal((N, 4)), "one": rng.standard_normal((N, 1))},
        IDS,
    )
    out = tmp_path / "out"
    args = _base(data, out)
    args[2] = str(store)
    err = _cli_error([*args, "--brain", str(data["patterns"]), *extra], capsys)
    assert message in err and err.startswith("error:")
    assert not out.exists()


def test_rdms_source_and_missing_targets_are_clear_errors(
    data: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rdms = tmp_path / "rdms.h5"
    with h5py.File(rdms, "w") as f:
        f.attrs["kind"] = "rdms"
        f.create_dataset(
            "stimulus_ids", data=np.asarray(IDS, dtype=object), dtype=h5py.string_dtype()
        )
        f.create_dataset("sub-01/EVC", data=np.ones((N, N)) - np.eye(N))
    out = tmp_path / "out"
    err = _cli_error([*_base(data, out), "--brain", str(rdms)], capsys)
    assert "an RDM has no voxels" in err and "rdms.h5" in err
    err = _cli_error(_base(data, out), capsys)
    assert "--brain" in err and "--ratings" in err
    assert not out.exists()


def test_more_folds_than_a_condition_has_stimuli(data: dict[str, Any], tmp_path: Path) -> None:
    table = pd.DataFrame({"stimulus_id": IDS, "condition": ["rare"] * 3 + ["common"] * (N - 3)})
    table.to_csv(tmp_path / "stimuli.csv", index=False)
    with pytest.raises(DataError, match="rare"):
        o2b.encode(
            data["stores"][0],
            brain=data["patterns"],
            stimuli=tmp_path / "stimuli.csv",
            out=tmp_path / "out",
            progress=False,
            **FAST,
        )
    assert not (tmp_path / "out").exists()


def test_nan_voxels_are_dropped_with_a_warning(
    data: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(1)
    values = rng.standard_normal((N, 6))
    values[5, 2] = np.nan
    patterns = _patterns(tmp_path / "nan.h5", {"V1": values})
    result = o2b.encode(data["stores"][0], brain=patterns, progress=False, layers=["l1"], **FAST)
    assert result.encoding["n_voxels"].tolist() == [5]
    assert "dropped 1 of 6 voxel(s) with NaN" in caplog.text
    empty = _patterns(tmp_path / "all_nan.h5", {"V1": np.full((N, 4), np.nan)})
    with pytest.raises(DataError, match=r"V1.*every voxel has NaN"):
        o2b.encode(data["stores"][0], brain=empty, progress=False, layers=["l1"], **FAST)


def test_unrated_stimuli_of_a_rater_are_an_error(data: dict[str, Any], tmp_path: Path) -> None:
    ratings = pd.read_csv(data["ratings"])
    ratings = ratings[~((ratings["subject"] == "r2") & (ratings["stimulus_id"] == "s07"))]
    ratings.to_csv(tmp_path / "ratings.csv", index=False)
    with pytest.raises(DataError, match=r"rater\(s\) r2 did not rate every"):
        o2b.encode(data["stores"][0], ratings=tmp_path / "ratings.csv", progress=False, **FAST)


def test_options_object_and_keywords(data: dict[str, Any]) -> None:
    options = EncodeOptions(folds=3, n_perm=0, alphas=[1.0, 10.0], inner_folds=2)
    result = o2b.encode(
        data["stores"][0], brain=data["patterns"], options=options, progress=False, folds=4
    )
    assert (result.encoding["n_folds"] == 4).all()  # the keyword overrides the model
    assert result.encoding["p_perm"].isna().all() or (result.encoding["n_perm"] == 0).all()


def test_study_config_has_an_encode_section(tmp_path: Path, stimulus_table: Path) -> None:
    payload: dict[str, Any] = {
        "stimuli": str(stimulus_table),
        "models": [{"arch": "resnet18", "weights": "none"}],
        "encode": {"folds": 3, "reduce": "pca:10", "banded": "layer1", "n_perm": 10},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(payload))
    with pytest.raises(ConfigError, match=r"encode\.banded: .*give 2 or more distinct layers"):
        load_config(path)
    payload["encode"]["banded"] = "layer1, layer2"  # as on the command line: --banded l1,l2
    path.write_text(yaml.safe_dump(payload))
    config, _ = load_config(path)
    expected = EncodeOptions(folds=3, reduce="pca:10", banded=["layer1", "layer2"], n_perm=10)
    assert config.encode == expected
    payload["encode"]["fold"] = 3
    path.write_text(yaml.safe_dump(payload))
    with pytest.raises(ConfigError, match=r"encode\.fold: unknown key"):
        load_config(path)


def test_study_runs_the_encode_stage_and_reuses_it(tmp_path: Path, stimulus_table: Path) -> None:
    from object2brain.pipeline.run import run_study

    payload: dict[str, Any] = {
        "out": str(tmp_path / "results"),
        "seed": 1,
        "device": "cpu",
        "stimuli": str(stimulus_table),
        "models": [{"arch": "resnet18", "weights": "none", "layers": ["layer3", "layer4"]}],
        "simulate": {"rois": ["EVC=layer:layer3;snr=2;voxels=30"], "n_subjects": 2},
        "extract": {"batch_size": 4},
        "rsa": None,
        "encode": {"folds": 2, "inner_folds": 2, "n_perm": 10, "reduce": "srp:64"},
        "report": False,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(payload))
    first = run_study(path, progress=False)
    assert "encode" in first.ran and "rsa" not in first.ran
    encoding = pd.read_csv(tmp_path / "results" / "encode" / "encoding.csv")
    assert set(encoding["layer"]) == {"layer3", "layer4"}  # the stored layers of the model
    rois = set(zip(encoding["target"], encoding["subject"], strict=True))
    assert rois == {("EVC", "sub-01"), ("EVC", "sub-02"), ("behavior", "group")}  # + raters
    assert (encoding["feature_dim"] == 64).all()  # SRP to 64 dimensions
    second = run_study(path, progress=False)
    assert "encode" in second.skipped


def test_report_has_the_encoding_section(nifti_run: dict[str, Any], tmp_path: Path) -> None:
    from object2brain.report.build import best_encoding_layers, build_report

    page = build_report(nifti_run["out"], out=tmp_path / "report.html").read_text()
    assert 'id="encoding"' in page
    # one figure across models (layers in network order, one line per model), drawn inline
    section = page[page.index('id="encoding"') :]
    assert 'data-figure="encoding"' in section and "net_a" in section
    best = best_encoding_layers(nifti_run["result"].encoding).set_index("target")
    assert best.loc["EVC", "layer"] == "l2"
    assert "encoding_voxels" in page  # the per-voxel table is offered for download
