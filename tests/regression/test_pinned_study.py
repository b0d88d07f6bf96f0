"""The pinned study's six result tables are unchanged (within 1e-12) by refactoring.

``filter_objects`` comes from float32 convolutions of a random-weight network, whose last digits
may differ between CPU instruction sets: it is compared at a relative 1e-5 (its float64 means of
float32 maps), every other table at 1e-12.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pin_study import PINNED, TABLES, run_study

TOLERANCE = {"filter_objects": 1e-5}


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pd.DataFrame]:
    return run_study(tmp_path_factory.mktemp("pinned_study"))


@pytest.mark.parametrize("name", list(TABLES))
def test_table_equals_its_pin(name: str, tables: dict[str, pd.DataFrame]) -> None:
    pinned = pd.read_csv(PINNED / f"{name}.csv", keep_default_na=False, na_values=[""])
    table = tables[name]
    assert list(table.columns) == list(pinned.columns)
    assert len(table) == len(pinned)
    tolerance = TOLERANCE.get(name, 1e-12)
    for column in pinned.columns:
        expected, got = pinned[column], table[column]
        if pd.api.types.is_numeric_dtype(expected) and pd.api.types.is_numeric_dtype(got):
            np.testing.assert_allclose(
                got.to_numpy(float),
                expected.to_numpy(float),
                rtol=tolerance,
                atol=tolerance,
                equal_nan=True,
                err_msg=f"{name}.{column}",
            )
        else:
            assert got.astype(str).tolist() == expected.astype(str).tolist(), f"{name}.{column}"


def test_pins_exist() -> None:
    assert sorted(p.stem for p in Path(PINNED).glob("*.csv")) == sorted(TABLES)
