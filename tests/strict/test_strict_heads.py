"""Head metrics that cannot be computed, or say nothing, say why (issue 17: 14)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from object2brain.cli import main
from object2brain.heads.fit import metric_reasons, regression_metrics


def test_numbers_unchanged_and_no_reasons_when_all_defined() -> None:
    rng = np.random.default_rng(3)
    y = rng.normal(size=40)
    p = y + rng.normal(size=40)
    m = regression_metrics(p, y)
    assert "reasons" not in m
    assert m["pearson"] == pytest.approx(stats.pearsonr(p, y).statistic, abs=1e-12)
    assert m["spearman"] == pytest.approx(stats.spearmanr(p, y).statistic, abs=1e-12)
    ss = np.sum((y - y.mean()) ** 2)
    assert m["r2"] == pytest.approx(1 - np.sum((p - y) ** 2) / ss, abs=1e-12)
    assert m["mae"] == pytest.approx(np.mean(np.abs(p - y)), abs=1e-12)


@pytest.mark.parametrize(
    ("p", "y", "undefined", "why"),
    [
        ([], [], {"mae", "rmse", "pearson", "spearman", "r2"}, "no images in this split"),
        ([1.0], [2.0], {"pearson", "spearman", "r2"}, "1 image: needs at least 2"),
        ([1.0, 2.0, 3.0], [2.0, 2.0, 2.0], {"pearson", "spearman", "r2"},
         "the rated valence is the same (2) for every image"),
        ([0.5, 0.5, 0.5], [1.0, 2.0, 3.0], {"pearson", "spearman"},
         "the head predicts the same value for every image"),
    ],
)  # fmt: skip
def test_undefined_metrics_have_a_reason(
    p: list[float], y: list[float], undefined: set[str], why: str
) -> None:
    m = regression_metrics(np.array(p), np.array(y))
    assert {k for k in ("mae", "rmse", "pearson", "spearman", "r2") if m[k] is None} == undefined
    assert m["reasons"] == dict.fromkeys(undefined, why)


def test_two_images_keep_their_value_with_a_reason() -> None:
    """A 2-image test set printed -1.000 as if it were a result."""
    m = regression_metrics(np.array([1.0, 0.0]), np.array([-1.0, 1.0]))
    assert m["spearman"] == pytest.approx(-1.0) and m["pearson"] == pytest.approx(-1.0)
    assert m["reasons"]["spearman"] == "2 images: any correlation of 2 points is +1 or -1"
    assert "r2" not in m["reasons"]
    assert metric_reasons(np.arange(3.0), np.arange(3.0)) == {}


def test_train_head_prints_why(
    stimulus_table: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = pd.read_csv(stimulus_table, dtype=str, keep_default_na=False)["stimulus_id"].tolist()
    split = tmp_path / "split.csv"
    names = ["train"] * (len(ids) - 4) + ["val", "val", "test", "test"]
    pd.DataFrame({"stimulus_id": ids, "split": names}).to_csv(split, index=False)
    argv = ["train-head", "--model", "resnet18", "--weights", "none", "--stimuli",
            str(stimulus_table), "--split", str(split), "--out", str(tmp_path / "h"),
            "--epochs", "1", "--quiet"]  # fmt: skip
    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = captured.out
    # the untrained backbone may give one prediction for both test images: either reason is true
    why = r"\((2 images: any correlation of 2 points is \+1 or -1|the head predicts the same value)"
    for key in ("spearman", "pearson"):
        assert re.search(rf"{key} (n/a|-?1\.000) {why}", out), out
