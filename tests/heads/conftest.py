"""Fixtures of the valence-head tests: generated rated sets and one real efficientnet_lite0 run."""

from __future__ import annotations

from pathlib import Path

import pytest
from heads_helpers import write_table

from object2brain.api.train_head import TrainHeadResult, train_head


@pytest.fixture(scope="session")
def rated_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """63 colour-coded images (9 per valence level -3..3) and their stimulus table."""
    return write_table(tmp_path_factory.mktemp("rated"), per_level=9)


@pytest.fixture(scope="session")
def small_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """35 colour-coded images (5 per level) for the tiny-backbone tests."""
    return write_table(tmp_path_factory.mktemp("small"), per_level=5, seed=1)


@pytest.fixture(scope="session")
def lite0_run(rated_table: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainHeadResult:
    """A head trained once on the real efficientnet_lite0 backbone (bundled ImageNet weights)."""
    with pytest.MonkeyPatch.context() as patch:  # session scope: the autouse fixture is not on
        patch.setenv("OBJECT2BRAIN_OFFLINE", "1")
        return train_head(
            "efficientnet_lite0",
            stimuli=rated_table,
            out=tmp_path_factory.mktemp("lite0") / "heads",
            fractions=(0.6, 0.2, 0.2),
            lr=1e-2,
            epochs=100,
            num_workers=0,
            progress=False,
        )
