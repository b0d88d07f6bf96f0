"""Shared fixtures: no network, tiny real photos, seeded models."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from o2b_testing import PHOTOS, shipped_photo


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never download: offline mode and an empty torch hub cache; the user cache folder
    is a fresh temporary one."""
    monkeypatch.setenv("OBJECT2BRAIN_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch_home"))
    # the user's cache folder (shared detection cache): one per test, never ~/.cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))


@pytest.fixture(autouse=True)
def _package_log_level() -> Iterator[None]:
    """In-process CLI calls with ``--quiet`` raise the package logger's level; restore it, so a
    later test's ``caplog`` sees INFO records whatever ran before it."""
    logger = logging.getLogger("object2brain")
    level = logger.level
    yield
    logger.setLevel(level)


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of small JPEG photos (short side 96 px), one per name in PHOTOS."""
    folder = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        image = shipped_photo(name)
        image.thumbnail((144, 144))
        image.save(folder / f"{name}.jpg", quality=90)
    return folder


@pytest.fixture
def stimulus_table(photo_dir: Path, tmp_path: Path) -> Path:
    """A CSV stimulus table with relative paths, a condition and a valence column."""
    rows = [
        {
            "stimulus_id": f"s{i:02d}_{name}",
            "path": str(Path("..") / photo_dir.name / f"{name}.jpg"),
            "condition": "congruent" if i % 2 else "incongruent",
            "valence": float(i % 7 - 3),
        }
        for i, name in enumerate(PHOTOS)
    ]
    table = photo_dir.parent / f"table_{tmp_path.name}" / "stimuli.csv"
    table.parent.mkdir(exist_ok=True)
    pd.DataFrame(rows).to_csv(table, index=False)
    return table
