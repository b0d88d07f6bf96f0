"""Shared fixtures of the encoding tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import pytest

from object2brain.encoding import compute_encoding
from object2brain.options import EncodeOptions, Runtime

#: ``(perm_null, perm_stop, stimulus_ids) -> encoding table`` of each of 60 small null datasets.
NullTables = Callable[[str, int, tuple[str, ...]], list[pd.DataFrame]]


@pytest.fixture(scope="session")
def small_null_tables() -> NullTables:
    """The ``encoding`` tables of 60 null datasets (30 stimuli x 8 features, 20 pure-noise voxels,
    3 outer and 3 inner folds, 9 penalties, 99 permutations; dataset ``k`` drawn from
    ``default_rng([7, k])`` and run with seed ``k``), computed once per argument set and shared by
    the calibration tests of the permutation nulls."""
    cache: dict[tuple[str, int, tuple[str, ...]], list[pd.DataFrame]] = {}

    def tables(perm_null: str, perm_stop: int, ids: Sequence[str]) -> list[pd.DataFrame]:
        key = (perm_null, perm_stop, tuple(ids))
        if key not in cache:
            options = EncodeOptions(
                n_perm=99,
                perm_null=perm_null,  # type: ignore[arg-type]
                perm_stop=perm_stop,
                folds=3,
                inner_folds=3,
                alphas=[10.0**k for k in range(-1, 8)],
            )
            found = []
            for index in range(60):
                rng = np.random.default_rng([7, index])
                features, responses = rng.standard_normal((30, 8)), rng.standard_normal((30, 20))
                found.append(
                    compute_encoding(
                        {"l": features},
                        {("roi", "s"): responses},
                        options,
                        Runtime(seed=index, device="cpu", progress=False),
                        stimulus_ids=list(ids),
                    ).encoding
                )
            cache[key] = found
        return cache[key]

    return tables
