"""One detection cache (image content x detector settings) shared by the API, the command line
and ``object2brain run``: detections made once are not made again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from object2brain.api.dissect import dissect
from object2brain.explain.detectors import default_detection_cache
from object2brain.options import DissectOptions

from .helpers import make_composites, planted_model, stimulus_csv


@pytest.fixture(scope="module")
def composites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("composites")
    return stimulus_csv(make_composites(folder, n=4), folder)


def test_default_cache_is_the_users(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_detection_cache() == tmp_path / "xdg" / "object2brain" / "detections"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_detection_cache() == tmp_path / "home" / ".cache" / "object2brain" / "detections"


def test_a_second_analysis_elsewhere_detects_nothing_again(
    composites: Path, tmp_path: Path
) -> None:
    kwargs: dict[str, Any] = {"layer": "features", "device": "cpu", "figures": False,
                              "progress": False}  # fmt: skip
    first = dissect(planted_model(), composites, out=tmp_path / "a", **kwargs)
    assert first.summary["cache_hits"] == 0
    # another output folder (another study, the command line): the same shared cache
    again = dissect(planted_model(), composites, out=tmp_path / "b", **kwargs)
    assert again.summary["cache_hits"] == 4
    assert len(list(default_detection_cache().rglob("*.json"))) == 4
    # a configured location is used instead of the default
    options = DissectOptions(layer="features", detection_cache=tmp_path / "mine")
    moved = dissect(planted_model(), composites, out=tmp_path / "c", options=options, **kwargs)
    assert moved.summary["cache_hits"] == 0
    assert len(list((tmp_path / "mine").rglob("*.json"))) == 4


def test_the_study_dissection_uses_the_configured_cache(
    composites: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run`` passes the config's ``dissect.detection_cache`` (relative to the config file)
    and no folder of its own: the API then finds a study's detections."""
    import object2brain.api.dissect as api_dissect
    from object2brain.pipeline.config import load_config
    from object2brain.pipeline.run import new_study
    from object2brain.pipeline.stages import DISSECT

    config_path = tmp_path / "study.yaml"
    config_path.write_text(yaml.safe_dump({
        "stimuli": str(composites), "device": "cpu",
        "models": [{"arch": "resnet18", "weights": "none", "head": str(composites)}],
        "dissect": {"layer": "layer4", "detection_cache": "shared_cache"},
    }))  # fmt: skip
    config, _ = load_config(config_path)
    assert config.dissect is not None
    assert config.dissect.detection_cache == tmp_path / "shared_cache"
    seen: dict[str, Any] = {}

    def fake(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(api_dissect, "dissect", fake)
    study = new_study(config, progress=False)
    study.heads["resnet18"] = None  # no head file to check
    with pytest.raises(RuntimeError, match="stop"):
        DISSECT.run(study, config.models[0])
    assert "cache_dir" not in seen
    assert seen["options"].detection_cache == tmp_path / "shared_cache"
