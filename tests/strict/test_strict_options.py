"""Counts above a sane limit, non-finite numbers, a lesioned layer that is not extracted: refused
up front by the CLI, the study config and the API alike (issue 17: 11, 12)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

import object2brain as o2b
from object2brain.cli import main
from object2brain.errors import Object2BrainError
from object2brain.options import MAX_RESAMPLES, OptionsError
from object2brain.pipeline.config import ConfigError, load_config


def run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


TOO_MANY = str(MAX_RESAMPLES + 1)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["rsa", "--activations", "a.h5", "--n-perm", "1000000000000"],
         "Invalid value for '--n-perm': Input should be less than or equal to 10000000"),
        (["rsa", "--activations", "a.h5", "--n-boot", TOO_MANY],
         "'--n-boot': Input should be less"),
        (["lesion", "--activations", "a.h5", "--filters", "f.csv", "--n-null", TOO_MANY],
         "'--n-null': Input should be less"),
        (["dissect", "--model", "resnet18", "--layer", "layer4", "--stimuli", "s.csv",
          "--threshold", "nan"], "--threshold nan: expected a finite number, got nan"),
        (["dissect", "--model", "resnet18", "--layer", "layer4", "--stimuli", "s.csv",
          "--threshold", "-inf"], "--threshold -inf: expected a finite number, got -inf"),
        (["train-head", "--model", "resnet18", "--stimuli", "s.csv", "--lr", "inf"],
         "--lr inf: expected a finite number, got inf"),
    ],
)  # fmt: skip
def test_cli_refuses(
    argv: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert run([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("section", "values", "expected"),
    [
        ("rsa", {"n_perm": 10**12}, "rsa.n_perm: Input should be less than or equal to 10000000"),
        ("lesion", {"n_null": 10**9}, "lesion.n_null: Input should be less than or equal"),
        ("dissect", {"threshold": ".nan"}, "dissect.threshold: expected a finite number, got nan"),
        ("dissect", {"threshold": "-.inf"}, "dissect.threshold: expected a finite number"),
        ("dissect", {"threshold": "nan"}, "dissect.threshold: expected a finite number, got nan"),
        ("train_head", {"lr": "1e400"}, "train_head.lr: expected a finite number, got inf"),
    ],
)
def test_config_refuses(
    study: dict[str, Any], tmp_path: Path, section: str, values: dict[str, Any], expected: str
) -> None:
    study[section].update(values)
    text = yaml.safe_dump(study).replace("'.nan'", ".nan").replace("'-.inf'", "-.inf")
    path = tmp_path / "study.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_api_refuses_before_reading_inputs(tmp_path: Path) -> None:
    """The options are validated first: the missing inputs are not even looked at."""
    missing = tmp_path / "missing.h5"
    with pytest.raises(OptionsError, match="n_perm: Input should be less than or equal"):
        o2b.rsa(missing, n_perm=10**12)
    with pytest.raises(Object2BrainError, match="threshold: expected a finite number, got nan"):
        o2b.dissect("resnet18", tmp_path / "s.csv", layer="layer4", threshold=float("nan"))
    with pytest.raises(Object2BrainError, match="threshold: expected a finite number, got -inf"):
        o2b.dissect("resnet18", tmp_path / "s.csv", layer="layer4", threshold="-inf")


@pytest.fixture
def study(stimulus_table: Path) -> dict[str, Any]:
    return {
        "device": "cpu",
        "stimuli": str(stimulus_table),
        "models": [{"arch": "resnet18", "weights": "none", "layers": ["layer3", "layer4"]}],
        "train_head": {"epochs": 3},
        "rsa": {"n_perm": 20},
        "dissect": {"layer": "layer4", "detector": "opencv"},
        "lesion": {"n_null": 10},
    }


def _write(study: dict[str, Any], tmp_path: Path) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_lesioned_layer_must_be_extracted(study: dict[str, Any], tmp_path: Path) -> None:
    """A dissect layer that was not extracted failed four stages later, naming no key."""
    load_config(_write(study, tmp_path))  # the valid study
    study["models"][0]["layers"] = ["layer3"]
    with pytest.raises(ConfigError) as info:
        load_config(_write(study, tmp_path))
    assert str(info.value) == (
        f"{tmp_path / 'study.yaml'}: dissect.layer: layer 'layer4' of model 'resnet18' is "
        "dissected and lesioned but not extracted: add it to models.0.layers (now: layer3)"
    )
    study["models"][0]["name"] = "r18"
    study["dissect"]["layer"] = {"r18": "layer4"}
    with pytest.raises(ConfigError, match=r"dissect\.layer\.r18: layer 'layer4' of model 'r18'"):
        load_config(_write(study, tmp_path))
    del study["lesion"]  # dissection alone reads no store
    load_config(_write(study, tmp_path))


def test_lesion_layers_must_be_the_dissected_one(study: dict[str, Any], tmp_path: Path) -> None:
    study["lesion"]["layers"] = ["layer3"]
    with pytest.raises(ConfigError, match=r"lesion\.layers: layer3: only the dissected layer"):
        load_config(_write(study, tmp_path))
