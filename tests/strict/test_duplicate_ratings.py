"""Issue 17, item 8: repeated ``(subject, stimulus_id)`` rating rows are an error by default; the
option ``duplicate_ratings: mean`` (``--duplicate-ratings mean``), declared once, averages them
in every stage that reads ratings (rsa, lesion, encode, a study's train-head)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from object2brain.api.encode import load_targets
from object2brain.cli import main
from object2brain.options import EncodeOptions, LesionOptions, RatingsOptions, RsaOptions
from object2brain.pipeline.config import RunConfig

N = 10
IDS = [f"img{i}" for i in range(N)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A store, ratings with two repeated rows, and the same ratings averaged by hand."""
    folder = tmp_path_factory.mktemp("dup")
    rng = np.random.default_rng(2)
    with h5py.File(folder / "acts.h5", "w") as handle:
        handle.create_dataset("stimulus_ids", data=np.asarray(IDS, dtype=object),
                              dtype=h5py.string_dtype())  # fmt: skip
        handle.create_group("layers").create_dataset(
            "fc", data=rng.normal(size=(N, 6)).astype(np.float32)
        )
        for key in ("model", "arch", "weights", "weights_sha256"):
            handle.attrs[key] = "tiny"
        handle.attrs["preprocessing"] = "{}"
        handle.attrs["order"] = json.dumps(["fc"])
        handle.attrs["complete"] = True
    rows = [
        {"subject": f"s{s}", "stimulus_id": i, "valence": float(rng.integers(-3, 4))}
        for s in range(3)
        for i in IDS
    ]
    repeats = [
        {"subject": "s0", "stimulus_id": "img0", "valence": 3.0},
        {"subject": "s2", "stimulus_id": "img5", "valence": -3.0},
    ]
    frame = pd.DataFrame(rows + repeats)
    frame.to_csv(folder / "ratings.csv", index=False)
    averaged = frame.groupby(["subject", "stimulus_id"], sort=False)["valence"].mean()
    averaged.reset_index().to_csv(folder / "averaged.csv", index=False)
    return {"store": folder / "acts.h5", "ratings": folder / "ratings.csv",
            "averaged": folder / "averaged.csv"}  # fmt: skip


def rsa(inputs: dict[str, Path], ratings: Path, out: Path, *more: str) -> int:
    try:
        main(["rsa", "--activations", str(inputs["store"]), "--ratings", str(ratings),
              "--out", str(out), "--n-perm", "9", "--n-boot", "3", "--device", "cpu",
              "--quiet", *more])  # fmt: skip
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_repeats_are_an_error_naming_the_switch(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert rsa(inputs, inputs["ratings"], tmp_path / "res") == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1
    assert str(inputs["ratings"]) in lines[0] and "(s0, img0)" in lines[0]
    assert "--duplicate-ratings mean" in lines[0]
    assert not (tmp_path / "res").exists()


def test_the_switch_averages_as_a_pre_averaged_table(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    assert rsa(inputs, inputs["ratings"], tmp_path / "a", "--duplicate-ratings", "mean") == 0
    assert rsa(inputs, inputs["averaged"], tmp_path / "b") == 0
    a = pd.read_csv(tmp_path / "a" / "alignment.csv")
    b = pd.read_csv(tmp_path / "b" / "alignment.csv")
    pd.testing.assert_frame_equal(a, b)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert "mean" in json.dumps(manifest)  # the choice is recorded with the results


def test_an_unknown_policy_names_the_flag(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert rsa(inputs, inputs["ratings"], tmp_path / "r", "--duplicate-ratings", "sum") == 2
    assert "--duplicate-ratings" in capsys.readouterr().err


def test_declared_once_and_shared_by_the_stages_that_read_ratings() -> None:
    for model in (RsaOptions, LesionOptions, EncodeOptions):
        assert issubclass(model, RatingsOptions)
        assert model.model_fields["duplicate_ratings"].default == "error"
    assert RsaOptions(duplicate_ratings="mean").duplicate_ratings == "mean"


def test_encode_targets_average_repeats_when_asked(inputs: dict[str, Path]) -> None:
    with pytest.raises(Exception, match="more than once"):
        load_targets(None, inputs["ratings"], IDS, None)
    averaged = load_targets(None, inputs["ratings"], IDS, None, duplicates="mean")
    expected = load_targets(None, inputs["averaged"], IDS, None)
    for key, value in expected.responses.items():
        np.testing.assert_array_equal(averaged.responses[key], value)


def test_a_study_takes_the_rsa_sections_choice(tmp_path: Path) -> None:
    base = {"stimuli": tmp_path / "s.csv", "models": [{"arch": "resnet18"}]}
    config = RunConfig.model_validate(
        base
        | {
            "rsa": {"duplicate_ratings": "mean"},
            "encode": {},
            "lesion": {},
            "dissect": {"layer": "layer4"},
        }
    )
    assert config.duplicate_ratings() == "mean"
    assert config.encode is not None and config.encode.duplicate_ratings == "mean"
    assert config.lesion is not None and config.lesion.duplicate_ratings == "mean"
    own = RunConfig.model_validate(
        base | {"rsa": {"duplicate_ratings": "mean"}, "encode": {"duplicate_ratings": "error"}}
    )
    assert own.encode is not None and own.encode.duplicate_ratings == "error"
    assert RunConfig.model_validate(base).duplicate_ratings() == "error"
