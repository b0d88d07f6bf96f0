"""Degenerate heads: flagged at training (head.json, head_metrics, a warning), recognised in heads
from elsewhere, and skipped by the study's dissect and lesion stages with the reason recorded."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from heads_helpers import tiny_model, write_rated_set
from torch import nn

from object2brain.api.train_head import train_head
from object2brain.heads.fit import FitResult, degeneracy
from object2brain.heads.io import degenerate_reason, save_head
from object2brain.tables import HEAD_METRICS


def _unrelated_table(folder: Path) -> Path:
    """Colour-coded images whose ratings are drawn independently of them."""
    frame = write_rated_set(folder, per_level=5, seed=4)
    rng = np.random.default_rng(0)
    frame["valence"] = rng.integers(-3, 4, size=len(frame)).astype(float)
    path = folder / "stimuli.csv"
    frame.to_csv(path, index=False)
    return path


def test_head_on_unrelated_labels_is_flagged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="object2brain.heads"):
        result = train_head(tiny_model(0), stimuli=_unrelated_table(tmp_path / "set"),
                            out=tmp_path / "heads", epochs=20, patience=3, lr=1e-3,
                            num_workers=0, progress=False, figures=False)  # fmt: skip
    head = result.models["tinynet"]
    meta = json.loads(head.head_path.with_suffix(".json").read_text())
    assert meta["best_epoch"] == 0 and meta["degenerate"] is True
    assert "best epoch 0" in meta["degenerate_reason"]
    assert degenerate_reason(head.head_path) == meta["degenerate_reason"]
    assert "degenerate" in caplog.text and "later stages skip" in caplog.text
    table = pd.read_csv(tmp_path / "heads" / "head_metrics.csv", keep_default_na=False)
    assert list(table.columns) == list(HEAD_METRICS.column_names)
    assert table["degenerate"].all()
    assert (table["degenerate_reason"] == meta["degenerate_reason"]).all()


def test_head_on_related_labels_is_not_flagged(small_table: Path, tmp_path: Path) -> None:
    result = train_head(tiny_model(0), stimuli=small_table, out=tmp_path / "heads", epochs=30,
                        lr=1e-2, num_workers=0, progress=False, figures=False)  # fmt: skip
    path = result.models["tinynet"].head_path
    assert json.loads(path.with_suffix(".json").read_text())["degenerate"] is False
    assert degenerate_reason(path) is None
    table = pd.read_csv(tmp_path / "heads" / "head_metrics.csv", keep_default_na=False)
    assert not table["degenerate"].any() and (table["degenerate_reason"] == "").all()


def test_degeneracy_reasons() -> None:
    rated = np.linspace(-3, 3, 20)
    zero = nn.Linear(4, 1)
    with torch.no_grad():
        zero.weight.zero_()
    fit = FitResult(head=zero, history=[{"epoch": 1}], best_epoch=0)
    reason = degeneracy(fit, np.full(20, 0.5), rated)
    assert reason is not None
    assert "best epoch 0" in reason and "weights are zero" in reason and "constant" in reason
    trained = FitResult(head=nn.Linear(4, 1), best_epoch=3)
    assert degeneracy(trained, rated * 0.1, rated) is None
    assert "constant" in str(degeneracy(trained, 0.5 + rated * 1e-6, rated))


def test_heads_from_elsewhere_are_judged_by_their_weights(tmp_path: Path) -> None:
    linear = nn.Linear(8, 1)
    save_head(linear, tmp_path / "ok" / "head.safetensors", {"arch": "tinynet"})
    assert degenerate_reason(tmp_path / "ok" / "head.safetensors") is None
    with torch.no_grad():
        linear.weight.zero_()
    save_head(linear, tmp_path / "zero" / "head.safetensors", {"arch": "tinynet"})
    assert "weights are zero" in str(degenerate_reason(tmp_path / "zero" / "head.safetensors"))
    save_head(nn.Linear(8, 1), tmp_path / "old" / "head.safetensors", {"best_epoch": 0})
    assert "best epoch 0" in str(degenerate_reason(tmp_path / "old" / "head.safetensors"))


def test_study_stages_skip_a_degenerate_model_with_the_reason(tmp_path: Path) -> None:
    """The study's dissect and lesion stages run nothing for a model whose head is degenerate
    and say why in their manifests (a head given from elsewhere, judged by its weights)."""
    from types import SimpleNamespace

    from object2brain.options import DissectOptions, LesionOptions
    from object2brain.pipeline.stages import _dissect, _lesion

    linear = nn.Linear(8, 1)
    with torch.no_grad():
        linear.weight.zero_()
    head = save_head(linear, tmp_path / "given" / "head.safetensors", {"arch": "tinynet"})
    model = SimpleNamespace(label="tinynet")
    out = tmp_path / "results"
    stale = out / "dissect" / "tinynet" / "filter_objects.csv"
    stale.parent.mkdir(parents=True)
    stale.write_text("from an earlier run\n")
    config = SimpleNamespace(dissect=DissectOptions(layer="0"), lesion=LesionOptions(),
                             models=[model])  # fmt: skip
    study = SimpleNamespace(config=config, heads={"tinynet": head}, out=out,
                            filter_tables=[stale])  # fmt: skip
    (manifest,) = _dissect(study, model)  # type: ignore[arg-type]
    assert not stale.exists()  # an earlier table must not reach the lesion stage
    skipped = json.loads(manifest.read_text())["skipped"]
    assert skipped["model"] == "tinynet" and "weights are zero" in skipped["reason"]
    (manifest,) = _lesion(study, model)  # type: ignore[arg-type]
    assert manifest == out / "lesion" / "tinynet" / "manifest.json"
    assert "degenerate valence head" in json.loads(manifest.read_text())["skipped"]["reason"]
