"""FindingEmo-format annotations with a partial image root; bad annotation files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from heads_helpers import tiny_model, write_findingemo

from object2brain.api.train_head import train_head
from object2brain.data.findingemo import (
    FINDINGEMO_COLUMNS,
    default_annotations,
    load_findingemo,
    load_rated_stimuli,
)
from object2brain.errors import DataError


def test_package_annotations_have_the_documented_columns(tmp_path: Path) -> None:
    path = default_annotations()
    header = pd.read_csv(path, nrows=5)
    assert tuple(header.columns) == FINDINGEMO_COLUMNS
    with pytest.raises(DataError, match=r"none of its 25869 images were found under"):
        load_findingemo("default", tmp_path, check="exists")


def test_partial_image_root_trains_on_what_exists(tmp_path: Path) -> None:
    ann = write_findingemo(tmp_path, per_level=4, n_absent=3)
    root = tmp_path / "images"
    broken = root / "Run_1" / "Generated scenes" / "v+0_00.png"
    broken.write_bytes(broken.read_bytes()[:40])  # a truncated download
    data = load_findingemo(ann, root)
    assert len(data.stimuli) == 7 * 4 - 1
    assert len(data.missing) == 4
    assert data.stimuli.ids[0] == "Run_1/Generated scenes/v-3_00.png"

    out = tmp_path / "out"
    result = train_head(
        tiny_model(),
        findingemo=ann,
        image_root=root,
        out=out,
        epochs=5,
        progress=False,
        num_workers=0,
    )
    assert result.n_images == 27 and result.n_missing == 4
    assert result.missing_path == out / "missing_images.csv"
    missing = pd.read_csv(result.missing_path)
    assert sorted(missing["reason"].str.split(":").str[0]) == ["missing"] * 3 + ["unreadable"]
    assert "Run_1/Generated scenes/v+0_00.png" in set(missing["stimulus_id"])
    assert set(missing["line"]) >= {30, 31, 32}  # the three absent rows at the end of the file
    split = pd.read_csv(out / "split.csv")
    assert len(split) == 27 and set(split["split"]) == {"train", "val", "test"}
    assert (out / "tinynet" / "head.safetensors").is_file()


def test_missing_columns(tmp_path: Path) -> None:
    ann = write_findingemo(tmp_path, per_level=1, n_absent=0)
    frame = pd.read_csv(ann).drop(columns=["valence"])
    frame.to_csv(ann, index=False)
    with pytest.raises(DataError, match=r"annotations_single.ann: missing column\(s\) valence"):
        load_findingemo(ann, tmp_path / "images")


def test_valence_outside_range(tmp_path: Path) -> None:
    ann = write_findingemo(tmp_path, per_level=1, n_absent=0)
    frame = pd.read_csv(ann)
    frame.loc[2, "valence"] = 5
    frame.loc[4, "valence"] = -4
    frame.to_csv(ann, index=False)
    with pytest.raises(
        DataError,
        match=r"2 valence value\(s\) outside the declared range -3..3: "
        r"line 4 \(5\), line 6 \(-4\)",
    ):
        load_findingemo(ann, tmp_path / "images")
    frame["valence"] = frame["valence"].astype(object)
    frame.loc[2, "valence"] = "high"
    frame.loc[4, "valence"] = None
    frame.to_csv(ann, index=False)
    with pytest.raises(DataError, match=r"2 missing or non-numeric valence value\(s\): line 4"):
        load_findingemo(ann, tmp_path / "images")


def test_stimulus_table_needs_valence(tmp_path: Path, stimulus_table: Path) -> None:
    frame = pd.read_csv(stimulus_table).drop(columns=["valence"])
    frame.to_csv(stimulus_table, index=False)
    with pytest.raises(DataError, match="no 'valence' column"):
        load_rated_stimuli(stimulus_table)
