"""The filter table's ``assigned`` column and filters in two groups (issue 17: 4, 13)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from object2brain.errors import DataError
from object2brain.lesion.analysis import group_filters, load_filter_table

K = 8


def _table(assigned: list[object]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "model": "toy",
            "layer": "conv",
            "filter": range(K),
            "group": ["Faces"] * 4 + ["Animals"] * 4,
            "importance": 1.0,
            "enrichment": 2.0,
            "n_images": 5,
            "assigned": assigned,
        }
    )


@pytest.mark.parametrize(
    "written",
    [
        ["True", "False"] * 4,
        ["true", "false"] * 4,
        ["1", "0"] * 4,
        [" TRUE ", "false"] * 4,
    ],
)
def test_booleans_read_from_true_false_1_0(tmp_path: Path, written: list[str]) -> None:
    path = tmp_path / "filter_objects.csv"
    _table(written).to_csv(path, index=False)
    table = load_filter_table(path)
    assert table.frame["assigned"].tolist() == [True, False] * 4
    groups = group_filters(table.frame, "toy", "conv", K, where=table.where)
    assert groups["Faces"].tolist() == [0, 2] and groups["Animals"].tolist() == [4, 6]
    assert groups["unassigned"].tolist() == [1, 3, 5, 7]


@pytest.mark.parametrize("bad", ["yes", "no", "2", "", "assigned"])
def test_other_values_name_file_column_and_line(tmp_path: Path, bad: str) -> None:
    """``yes``/``no`` counted every filter as assigned: every group lesioned all of them."""
    path = tmp_path / "filter_objects.csv"
    values: list[object] = ["true"] * K
    values[5] = bad
    _table(values).to_csv(path, index=False)
    with pytest.raises(DataError) as info:
        load_filter_table(path)
    shown = repr(bad) if bad else "nan"
    assert str(info.value) == (
        f"{path}: column 'assigned' must hold true/false/1/0, not {shown} (line 7)"
    )


def test_in_memory_tables_checked_too() -> None:
    frame = _table(["yes"] * K)
    with pytest.raises(DataError, match=r"^filter table: column 'assigned' must hold"):
        group_filters(frame, "toy", "conv", K)
    numeric = _table([1, 0] * 4)
    assert group_filters(numeric, "toy", "conv", K)["Faces"].tolist() == [0, 2]
    booleans = _table([np.True_, np.False_] * 4)
    assert group_filters(booleans, "toy", "conv", K)["Animals"].tolist() == [4, 6]


def test_filter_in_two_groups_refused(tmp_path: Path) -> None:
    """A filter assigned to two groups was counted twice (513 filters of 512): refused."""
    frame = _table([True] * K)
    frame = pd.concat([frame, frame.iloc[[2, 3]].assign(group="Vehicles")], ignore_index=True)
    path = tmp_path / "filter_objects.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError) as info:
        load_filter_table(path)
    assert str(info.value) == (
        f"{path}: 2 filter(s) are assigned to more than one group: toy/conv filter 2 "
        "(Faces, Vehicles), toy/conv filter 3 (Faces, Vehicles); a filter belongs to one group "
        "at most"
    )
    with pytest.raises(DataError, match="filter 2 \\(Faces, Vehicles\\)"):
        group_filters(frame, "toy", "conv", K)
    # the same filter listed for two groups but assigned to one is fine (the dissection's rows)
    frame.loc[K:, "assigned"] = False
    groups = group_filters(frame, "toy", "conv", K)
    assert sum(len(v) for v in groups.values()) == K
