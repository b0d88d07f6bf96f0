"""The simulator plants the structure it reports in truth.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr

from object2brain.data.brain import load_brain
from object2brain.errors import DataError, Object2BrainError, StoreError
from object2brain.simulate import RoiSpec, read_truth, simulate


@pytest.fixture
def store(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    n = 30
    path = tmp_path / "acts.h5"
    with h5py.File(path, "w") as handle:
        handle["stimulus_ids"] = np.array([f"s{i:02d}" for i in range(n)], dtype=object)
        layers = handle.create_group("layers")
        layers["early"] = rng.normal(size=(n, 8, 4, 4)).astype(np.float32)
        layers["late"] = rng.normal(size=(n, 16)).astype(np.float32)
        handle.attrs.update(complete=True, order=json.dumps(["early", "late"]), model="toy")
    return path


@pytest.fixture
def table(tmp_path: Path) -> Path:
    n = 30
    frame = pd.DataFrame(
        {
            "stimulus_id": [f"s{i:02d}" for i in range(n)],
            "path": ["unused.png"] * n,
            "condition": ["congruent" if i % 2 else "incongruent" for i in range(n)],
            "valence": np.linspace(-3, 3, n),
        }
    )
    path = tmp_path / "stimuli.csv"
    frame.to_csv(path, index=False)
    return path


def rdm_of(x: np.ndarray) -> np.ndarray:
    return pdist(x.reshape(x.shape[0], -1), "correlation")


def test_outputs_and_planted_structure(store: Path, table: Path, tmp_path: Path) -> None:
    result = simulate(
        store,
        ["EVC=layer:early;snr=4;voxels=300", "VAL=valence;snr=4", "F=filters:early:1,2"],
        out=tmp_path / "sim",
        stimuli=table,
        n_subjects=3,
        seed=1,
    )
    manifest = yaml.safe_load(result.brain_manifest.read_text())
    assert manifest == {"sources": [{"kind": "patterns", "path": "patterns.h5"}]}
    with h5py.File(result.patterns, "r") as handle, h5py.File(store, "r") as acts:
        assert handle.attrs["kind"] == "patterns"
        assert sorted(handle.keys()) == ["stimulus_ids", "sub-01", "sub-02", "sub-03"]
        evc = handle["sub-01"]["EVC"][()]
        assert evc.shape == (30, 300)
        early, late = acts["layers"]["early"][()], acts["layers"]["late"][()]
        filters = early[:, [1, 2]]
        for subject in ("sub-01", "sub-02", "sub-03"):
            roi = rdm_of(handle[subject]["EVC"][()])
            assert spearmanr(roi, rdm_of(early))[0] > 0.5
            assert abs(spearmanr(roi, rdm_of(late))[0]) < 0.3
            f_roi = rdm_of(handle[subject]["F"][()])
            assert spearmanr(f_roi, rdm_of(filters))[0] > spearmanr(f_roi, rdm_of(early))[0]
            val = rdm_of(handle[subject]["VAL"][()])
            assert spearmanr(val, pdist(np.linspace(-3, 3, 30)[:, None]))[0] > 0.6
    ratings = pd.read_csv(result.ratings)
    assert set(ratings.columns) == {"subject", "stimulus_id", "valence"}
    assert ratings["valence"].between(-3, 3).all()
    assert set(ratings["valence"]) <= set(range(-3, 4))
    means = ratings.groupby("stimulus_id")["valence"].mean().loc[result.stimulus_ids]
    assert np.corrcoef(means, result.true_valence)[0, 1] > 0.8
    truth = read_truth(tmp_path / "sim")
    assert truth["valence_origin"] == "stimulus table"
    assert [roi["source"] for roi in truth["rois"]] == [
        "layer:early",
        "valence",
        "filters:early:1,2",
    ]


def test_seeded_and_condition_gain(store: Path, table: Path, tmp_path: Path) -> None:
    spec = RoiSpec("VAL", "valence", snr=1e6, condition_gain={"incongruent": 0.0})
    a = simulate(store, [spec], out=tmp_path / "a", stimuli=table, n_subjects=2, seed=5)
    b = simulate(store, [spec], out=tmp_path / "b", stimuli=table, n_subjects=2, seed=5)
    with h5py.File(a.patterns, "r") as ha, h5py.File(b.patterns, "r") as hb:
        x = ha["sub-01"]["VAL"][()]
        np.testing.assert_array_equal(x, hb["sub-01"]["VAL"][()])
    incongruent = np.arange(30) % 2 == 0
    assert np.abs(x[incongruent]).max() < 1e-2 * np.abs(x[~incongruent]).max()


def test_valence_from_layer_when_table_has_none(store: Path, tmp_path: Path) -> None:
    result = simulate(
        store, ["R=layer:late"], out=tmp_path / "s", n_subjects=1, continuous_ratings=True
    )
    assert read_truth(tmp_path / "s")["valence_origin"] == "layer:late"
    assert result.true_valence.std() == pytest.approx(1.5, rel=0.2)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("X=layer:nope", "no layer 'nope'"),
        ("X=filters:early:99", "no such filters"),
        ("X=condition:happy", "no condition 'happy'"),
        ("X=blob", "use layer:<name>"),
        ("X=valence;snr=abc", "bad value for 'snr'"),
        ("X=valence;colour=red", "unknown option 'colour'"),
        ("no-equals-sign", "expected NAME=SOURCE"),
        ("a/b=layer:early", r"ROI spec 'a/b=layer:early': ROI names cannot contain '/'"),
        ("=layer:early", r"ROI spec '=layer:early': the ROI name is empty"),
        (".=layer:early", "cannot contain '/' or be '.'"),
        ("X=", "the source is empty"),
        ("X=layer:early;voxels=0", "voxels must be at least 1, got 0"),
        ("X=layer:early;voxels=-5", "voxels must be at least 1, got -5"),
        ("X=layer:early;voxels=2.5", "bad value for 'voxels'"),
        ("X=layer:early;snr=0", r"snr must be a finite number > 0, got 0\.0"),
        ("X=layer:early;snr=-1", "snr must be a finite number > 0"),
        ("X=layer:early;snr=nan", "snr must be a finite number > 0, got nan"),
        ("X=layer:early;snr=inf", "snr must be a finite number > 0, got inf"),
        ("X=layer:early;gain.congruent=-1", "gain.congruent must be a finite number >= 0"),
        ("X=layer:early;gain.congruent=nan", "gain.congruent must be a finite number >= 0"),
        ("X=layer:early;gain.=2", "a gain needs a condition name"),
        ("X=layer:early;gain.sad=2", "no condition 'sad' for its gain"),
    ],
)
def test_bad_specs(store: Path, table: Path, tmp_path: Path, spec: str, message: str) -> None:
    """Every bad spec is one DataError naming it, raised before --out (and its parents) exist."""
    out = tmp_path / "new" / "bad"
    with pytest.raises(DataError, match=message):
        simulate(store, ["OK=layer:late", spec], out=out, stimuli=table)
    assert not (tmp_path / "new").exists()


def test_spec_objects_validated() -> None:
    with pytest.raises(DataError, match=r"ROI 'a/b': ROI names cannot contain '/'"):
        RoiSpec("a/b", "valence")
    with pytest.raises(DataError, match=r"ROI 'X': snr must be .*; voxels must be at least 1"):
        RoiSpec("X", "valence", n_voxels=0, snr=-1.0)
    with pytest.raises(DataError, match=r"gain\.c must be a finite number >= 0"):
        RoiSpec("X", "valence", condition_gain={"c": float("inf")})
    assert RoiSpec.parse(" EVC = layer:a ; voxels=3 ; gain. c =0") == RoiSpec(
        "EVC", "layer:a", n_voxels=3, condition_gain={"c": 0.0}
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rois": ["X=late"]}, "use layer:<name>"),
        ({"rois": ["X=layer:late", "X=layer:early"]}, "ROI names must be unique: X given"),
        ({"rois": []}, "at least one ROI"),
        ({"n_subjects": 0}, "--subjects must be at least 1"),
        ({"rating_noise": -1.0}, "--rating-noise must be a finite number >= 0"),
        ({"n_basis": 0}, "n_basis must be at least 1"),
        ({"valence_source": "late"}, "use layer:<name> or valence"),
        ({"valence_source": "layer:nope"}, "no layer 'nope'"),
    ],
)
def test_bad_arguments_leave_no_folder(
    store: Path, tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    arguments: dict[str, object] = {"rois": ["X=layer:late"], **kwargs}
    with pytest.raises(Object2BrainError, match=message):
        simulate(store, out=tmp_path / "bad", **arguments)  # type: ignore[arg-type]
    assert not (tmp_path / "bad").exists()


def test_table_missing_store_ids_names_table(store: Path, table: Path, tmp_path: Path) -> None:
    frame = pd.read_csv(table)
    frame[frame["stimulus_id"] != "s07"].to_csv(table, index=False)
    with pytest.raises(
        DataError, match=r"stimuli\.csv: 1 stimulus id\(s\) of the activation store "
    ):
        simulate(store, ["X=valence"], out=tmp_path / "bad", stimuli=table)
    assert not (tmp_path / "bad").exists()


def test_out_is_a_file(store: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("x")
    with pytest.raises(StoreError, match="taken: the output folder"):
        simulate(store, ["X=layer:late"], out=tmp_path / "taken")


def test_existing_out_folder_is_kept(store: Path, tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError, match="no layer"):
        simulate(store, ["X=layer:nope"], out=tmp_path / "mine")
    assert (tmp_path / "mine").is_dir()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({3: "high"}, r"stimuli\.csv: column valence: 1 stimulus id\(s\) .*: s03 \('high'\)"),
        ({3: None}, r"stimuli\.csv: column valence: 1 stimulus id\(s\) .*: s03 \(missing\)"),
        (
            {3: "high", 8: None, 9: "inf"},
            r"3 stimulus id\(s\).*s03 \('high'\), s08 \(missing\), s09",
        ),
    ],
)
def test_bad_table_valence(
    store: Path, table: Path, tmp_path: Path, values: dict[int, object], message: str
) -> None:
    frame = pd.read_csv(table).astype({"valence": object})
    for row, value in values.items():
        frame.loc[row, "valence"] = value
    frame.to_csv(table, index=False)
    with pytest.raises(DataError, match=message):
        simulate(store, ["X=valence"], out=tmp_path / "bad", stimuli=table)
    assert not (tmp_path / "bad").exists()


def test_empty_valence_column_is_simulated(
    store: Path, table: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    frame = pd.read_csv(table)
    frame["valence"] = np.nan
    frame.to_csv(table, index=False)
    with caplog.at_level(logging.WARNING):
        simulate(store, ["X=valence"], out=tmp_path / "s", stimuli=table, n_subjects=1)
    assert "the valence column is empty" in caplog.text
    assert read_truth(tmp_path / "s")["valence_origin"] == "layer:late"


def test_output_loads_as_brain_data(store: Path, table: Path, tmp_path: Path) -> None:
    result = simulate(
        store,
        ["EVC=layer:early;voxels=1", "V=valence"],
        out=tmp_path / "s",
        stimuli=table,
        n_subjects=2,
    )
    brain = load_brain(result.brain_manifest)
    assert brain.rois == ["EVC", "V"]
    assert brain.for_roi("EVC")[0].data.shape == (30, 1)


def test_cli(store: Path, table: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from object2brain.cli import main

    out = tmp_path / "sim"
    argv = ["simulate", "--activations", str(store), "--stimuli", str(table),
            "--roi", "EVC=layer:early;snr=2;voxels=20", "--subjects", "3", "--out", str(out),
            "--quiet"]  # fmt: skip
    main(argv)
    assert "wrote" in capsys.readouterr().out
    assert load_brain(out / "brain.yaml").subjects == ["sub-01", "sub-02", "sub-03"]
    with pytest.raises(SystemExit) as info:
        main([*argv[:-3], "--out", str(tmp_path / "bad"), "--roi", "a/b=layer:early"])
    assert info.value.code == 2 and "error: " in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
