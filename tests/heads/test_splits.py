"""Seeded train/val/test splits stratified by valence level, saved and reusable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from object2brain.data.splits import load_split, make_split, save_split, valence_levels
from object2brain.errors import DataError


def test_levels_round_half_up() -> None:
    assert valence_levels([-3, -2.5, -0.4, 0.5, 1.49, 3]).tolist() == [-3, -2, 0, 1, 1, 3]


def test_split_is_stratified_exact_and_seeded() -> None:
    rng = np.random.default_rng(3)
    valence = rng.choice(
        [-3, -2, -1, 0, 1, 2, 3], size=500, p=[0.05, 0.1, 0.15, 0.2, 0.2, 0.2, 0.1]
    )
    ids = [f"img{i}" for i in range(500)]
    split = make_split(ids, valence, seed=7)
    assert split["stimulus_id"].tolist() == ids
    counts = split["split"].value_counts()
    assert (counts["train"], counts["val"], counts["test"]) == (400, 50, 50)
    for level, group in split.groupby("level"):
        n = len(group)
        for name, share in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
            assert abs((group["split"] == name).sum() - share * n) <= 1.0, (level, name)
    again = make_split(ids, valence, seed=7)
    pd.testing.assert_frame_equal(split, again)
    other = make_split(ids, valence, seed=8)
    assert (other["split"] != split["split"]).any()


def test_split_saved_and_reused(tmp_path: Path) -> None:
    ids = [f"s{i}" for i in range(40)]
    valence = np.tile(np.arange(-3, 5) % 7 - 3, 5)
    split = make_split(ids, valence, seed=1)
    path = save_split(split, tmp_path / "split.csv")
    reordered = ids[::-1][:-3]  # other order, and 3 ids no longer available
    loaded = load_split(path, reordered)
    assert loaded["stimulus_id"].tolist() == reordered
    expected = split.set_index("stimulus_id").loc[reordered, "split"].tolist()
    assert loaded["split"].tolist() == expected


def test_split_file_must_cover_every_stimulus(tmp_path: Path) -> None:
    split = make_split([f"s{i}" for i in range(20)], np.zeros(20) + np.arange(20) % 3, seed=0)
    path = save_split(split, tmp_path / "split.csv")
    with pytest.raises(DataError, match=r"1 stimulus id\(s\) are not in the split file: new"):
        load_split(path, [*split["stimulus_id"], "new"])
    bad = split.assign(split="holdout")
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match="unknown split name"):
        load_split(tmp_path / "bad.csv")


def test_too_few_images_for_a_split() -> None:
    with pytest.raises(DataError, match="too few"):
        make_split(["a", "b", "c"], [0, 1, 2])
