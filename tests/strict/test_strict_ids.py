"""Ids are strings exactly as written; padded ids, repeated ratings are refused (issue 17: 7, 8)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from object2brain.data.ratings import load_ratings
from object2brain.data.splits import load_split
from object2brain.data.stimuli import load_stimuli, read_table
from object2brain.errors import DataError, StimulusError

NA_WORDS = ["NA", "null", "NaN", "None", "n/a", "nan"]


def test_na_words_are_ids_in_every_table(tmp_path: Path) -> None:
    """``NA``, ``null``, ``NaN`` ... were read as missing ids; they are ids like any other."""
    stimuli = tmp_path / "stimuli.csv"
    pd.DataFrame({"stimulus_id": NA_WORDS, "valence": range(6)}).to_csv(stimuli, index=False)
    assert load_stimuli(stimuli, check="table").ids == NA_WORDS
    tsv = tmp_path / "stimuli.tsv"
    tsv.write_text("stimulus_id\tvalence\n" + "".join(f"{w}\t1\n" for w in NA_WORDS))
    assert load_stimuli(tsv, check="table").ids == NA_WORDS

    ratings = tmp_path / "ratings.csv"
    rows = [{"subject": "NA", "stimulus_id": w, "valence": 1.0} for w in NA_WORDS]
    rows += [{"subject": "null", "stimulus_id": "NaN", "valence": 2.0}]
    pd.DataFrame(rows).to_csv(ratings, index=False)
    loaded = load_ratings(ratings, NA_WORDS)
    assert loaded.subjects == ["NA", "null"]
    assert loaded.stimulus_ids == NA_WORDS
    assert loaded.matrix(["NaN"]).tolist() == [[1.0], [2.0]]

    split = tmp_path / "split.csv"
    pd.DataFrame({"stimulus_id": NA_WORDS, "split": ["train"] * 4 + ["val", "test"]}).to_csv(
        split, index=False
    )
    assert load_split(split, NA_WORDS)["stimulus_id"].tolist() == NA_WORDS


def test_other_columns_still_parsed(tmp_path: Path) -> None:
    """Only id columns are kept as text: a missing valence is still missing."""
    path = tmp_path / "t.csv"
    path.write_text("stimulus_id,valence\nNA,\nnull,1.5\n")
    frame = read_table(path)
    assert frame["stimulus_id"].tolist() == ["NA", "null"]
    assert frame["valence"].isna().tolist() == [True, False]


def test_empty_ids_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "stimuli.csv"
    path.write_text("stimulus_id,valence\na,1\n,2\n")
    with pytest.raises(StimulusError, match=r"empty stimulus_id on line\(s\) 3"):
        load_stimuli(path, check="table")


@pytest.mark.parametrize("padded", [" a", "a ", "\ta"])
def test_padded_ids_refused_with_lines(tmp_path: Path, padded: str) -> None:
    """Leading/trailing whitespace was stripped silently; now an error naming the lines."""
    stimuli = tmp_path / "stimuli.csv"
    pd.DataFrame({"stimulus_id": ["x", padded], "valence": [1, 2]}).to_csv(stimuli, index=False)
    with pytest.raises(StimulusError, match=r"leading or trailing spaces on line\(s\) 3") as info:
        load_stimuli(stimuli, check="table")
    assert repr(padded) in str(info.value) and str(stimuli) in str(info.value)

    ratings = pd.DataFrame({"subject": ["s1", padded], "stimulus_id": ["x", "x"], "valence": 1})
    with pytest.raises(DataError, match=r"subject with leading or trailing spaces on line\(s\) 3"):
        load_ratings(ratings)
    ratings = pd.DataFrame({"subject": ["s1", "s1"], "stimulus_id": ["x", padded], "valence": 1})
    with pytest.raises(DataError, match=r"stimulus_id with leading or trailing spaces"):
        load_ratings(ratings)

    split = tmp_path / "split.csv"
    pd.DataFrame({"stimulus_id": ["x", padded], "split": ["train", "test"]}).to_csv(
        split, index=False
    )
    with pytest.raises(DataError, match=r"leading or trailing spaces on line\(s\) 3"):
        load_split(split)


def _ratings() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "subject": ["s1", "s1", "s2", "s1", "s2"],
            "stimulus_id": ["a", "b", "a", "a", "a"],
            "valence": [1.0, 2.0, 3.0, 5.0, 4.0],
        }
    )


def test_repeated_ratings_refused_by_default(tmp_path: Path) -> None:
    """Repeats were averaged silently; now an error naming each pair and its lines."""
    path = tmp_path / "ratings.csv"
    _ratings().to_csv(path, index=False)
    with pytest.raises(DataError) as info:
        load_ratings(path)
    message = str(info.value)
    assert message.startswith(f"{path}: 2 (subject, stimulus_id) pair(s) are rated more than once")
    assert "(s1, a) on line(s) 2, 5" in message and "(s2, a) on line(s) 4, 6" in message
    assert "--duplicate-ratings mean" in message


def test_repeated_ratings_averaged_when_asked() -> None:
    ratings = load_ratings(_ratings(), duplicates="mean")
    assert ratings.matrix(["a"]).ravel().tolist() == [3.0, 3.5]
    # a loaded Ratings object (already averaged) is re-validated without complaint
    assert load_ratings(ratings).matrix(["a"]).ravel().tolist() == [3.0, 3.5]
    with pytest.raises(DataError, match="duplicates='sum'"):
        load_ratings(_ratings(), duplicates="sum")  # type: ignore[arg-type]
