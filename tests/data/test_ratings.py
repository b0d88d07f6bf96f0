"""Ratings table: loading, group means and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from object2brain.data.ratings import load_ratings
from object2brain.errors import DataError


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "subject": ["s1", "s1", "s2", "s2", "s3"],
            "stimulus_id": ["a", "b", "a", "b", "a"],
            "valence": [1.0, -1.0, 3.0, 0.0, 2.0],
        }
    )


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_load_formats_and_group_mean(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"ratings{suffix}"
    frame = _frame()
    if suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, sep="\t" if suffix == ".tsv" else ",", index=False)
    ratings = load_ratings(path, stimulus_ids=["a", "b", "c"])
    assert ratings.subjects == ["s1", "s2", "s3"]
    np.testing.assert_allclose(ratings.group_mean(["b", "a"]), [-0.5, 2.0])
    m = ratings.matrix(["a", "b"])
    assert m.shape == (3, 2)
    assert np.isnan(m[2, 1])
    assert ratings.complete_subjects(["a", "b"]) == ["s1", "s2"]
    with pytest.raises(DataError, match="no rating: c"):
        ratings.group_mean(["a", "c"])


def test_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    _frame().drop(columns="subject").to_csv(path, index=False)
    with pytest.raises(DataError, match=r"r\.csv.*missing required column\(s\) subject"):
        load_ratings(path)


def test_nan_and_non_numeric_valence_listed() -> None:
    frame = _frame().astype({"valence": object})
    frame.loc[1, "valence"] = np.nan
    frame.loc[3, "valence"] = "happy"
    with pytest.raises(DataError) as info:
        load_ratings(frame)
    assert "NaN) valence on line(s) 3" in str(info.value)
    assert "non-numeric valence on line(s) 5 ('happy')" in str(info.value)
    frame.loc[1, "valence"], frame.loc[3, "valence"] = 1.0, -np.inf
    with pytest.raises(DataError, match=r"infinite valence on line\(s\) 5$"):
        load_ratings(frame)


def test_unknown_stimulus_ids_listed() -> None:
    with pytest.raises(DataError, match=r"2 stimulus id.*not in the stimulus set: a, b"):
        load_ratings(_frame(), stimulus_ids=["x"])


def test_repeats_averaged() -> None:
    frame = pd.concat([_frame(), _frame().iloc[:1].assign(valence=3.0)])
    ratings = load_ratings(frame, duplicates="mean")  # repeats are an error by default
    assert ratings.matrix(["a"])[0, 0] == 2.0


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_ratings(tmp_path / "nope.csv")


def test_reserved_subject_names_refused() -> None:
    """``group`` / ``group_rdm`` name the derived rows of the result tables."""
    frame = _frame()
    frame.loc[[0, 1], "subject"] = "group"
    frame.loc[4, "subject"] = "group_rdm"
    with pytest.raises(
        DataError, match=r"subject name\(s\) group, group_rdm \(line\(s\) 2, 3, 6\)"
    ):
        load_ratings(frame)
