"""Outer and inner folds over stimuli."""

from __future__ import annotations

import numpy as np
import pytest

from object2brain.encoding.folds import fold_splits, folds_table, inner_splits, outer_folds
from object2brain.errors import DataError


def test_outer_folds_are_balanced_seeded_and_cover_every_stimulus() -> None:
    folds = outer_folds(23, 5, seed=3)
    assert sorted(np.bincount(folds).tolist()) == [4, 4, 5, 5, 5]
    np.testing.assert_array_equal(folds, outer_folds(23, 5, seed=3))
    assert not np.array_equal(folds, outer_folds(23, 5, seed=4))
    tests = np.concatenate([test for _, test in fold_splits(folds)])
    assert sorted(tests.tolist()) == list(range(23))


def test_outer_folds_are_stratified_by_condition() -> None:
    conditions = np.array(["a"] * 12 + ["b"] * 8)
    folds = outer_folds(20, 4, seed=0, conditions=conditions)
    for condition in ("a", "b"):
        counts = np.bincount(folds[conditions == condition], minlength=4)
        assert counts.max() - counts.min() <= 1
    assert np.bincount(folds).tolist() == [5, 5, 5, 5]


def test_inner_splits_stay_inside_the_training_set() -> None:
    splits = inner_splits(16, 4, seed=1, outer_fold=2)
    assert len(splits) == 4
    for train, validation in splits:
        assert set(train).isdisjoint(validation)
        assert set(train) | set(validation) == set(range(16))
    assert [v.tolist() for _, v in splits] != [
        v.tolist() for _, v in inner_splits(16, 4, seed=1, outer_fold=3)
    ]


def test_folds_table() -> None:
    table = folds_table(["x", "y", "z"], np.array([0, 1, 0]))
    assert table.columns.tolist() == ["stimulus_id", "fold"]
    assert table["fold"].tolist() == [0, 1, 0]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: outer_folds(4, 5, seed=0), "4 stimuli cannot be split into 5 folds"),
        (lambda: outer_folds(10, 1, seed=0), "at least 2 folds"),
        (
            lambda: outer_folds(10, 4, seed=0, conditions=["a"] * 7 + ["b"] * 3),
            "condition(s) b have fewer stimuli than the 4 folds (b: 3)",
        ),
        (lambda: inner_splits(3, 5, seed=0, outer_fold=0), "3 training stimuli"),
    ],
)
def test_bad_fold_requests_raise_one_clear_error(call: object, message: str) -> None:
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()  # type: ignore[operator]
