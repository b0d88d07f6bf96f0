"""``object2brain dissect``: outputs, and one-line errors with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from object2brain.cli import main
from object2brain.explain.dissect import FILTER_OBJECTS_COLUMNS


def run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _boxes(tmp_path: Path) -> Path:
    path = tmp_path / "boxes.csv"
    rows = [f"s{i:02d}_{n},10,10,60,60,person" for i, n in enumerate(["coffee", "chelsea"])]
    path.write_text("stimulus_id,x0,y0,x1,y1,label\n" + "\n".join(rows) + "\n")
    return path


def test_cli_dissect_with_target(stimulus_table: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["dissect", "--model", "resnet18", "--weights", "none", "--layer", "layer4",
            "--stimuli", str(stimulus_table), "--detector", f"boxes:{_boxes(tmp_path)}",
            "--target", "281", "--min-images", "1", "--out", str(out), "--device", "cpu",
            "--decode", "torch", "--quiet"]  # fmt: skip
    assert run(argv) == 0
    table = pd.read_csv(out / "filter_objects.csv")
    assert tuple(table.columns) == FILTER_OBJECTS_COLUMNS
    assert set(table["model"]) == {"resnet18"} and table["filter"].nunique() == 512
    assert (out / "manifest.json").is_file() and (out / "figures").is_dir()
    assert json.loads((out / "manifest.json").read_text())["config"]["decode"] == "torch"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], "--target INDEX"),
        (["--target", "0", "--layer", "fc"], "not spatial maps"),
    ],
)
def test_cli_dissect_errors(
    stimulus_table: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    extra: list[str], expected: str,
) -> None:  # fmt: skip
    argv = ["dissect", "--model", "resnet18", "--weights", "none", "--layer", "layer4",
            "--stimuli", str(stimulus_table), "--detector", f"boxes:{_boxes(tmp_path)}",
            "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet", *extra]  # fmt: skip
    assert run(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
