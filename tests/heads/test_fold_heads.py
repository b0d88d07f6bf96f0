"""Selection fold heads (``train-head --selection-folds K``): one head per condition-stratified
selection fold, fitted without that fold's stimuli, saved with a sidecar naming them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from heads_helpers import tiny_model, write_rated_set

from object2brain.api.train_head import train_head
from object2brain.data.splits import condition_folds
from object2brain.data.stimuli import load_stimuli
from object2brain.heads.io import fold_head_name, load_fold_heads, load_head
from object2brain.heads.train import load_rated, split_rated
from object2brain.options import TrainHeadOptions


def test_fold_heads_are_saved_on_the_selection_folds(tmp_path: Path) -> None:
    frame = write_rated_set(tmp_path / "images", per_level=4)  # 28 stimuli
    frame["condition"] = ["a" if i % 4 else "b" for i in range(len(frame))]
    frame["path"] = [str(tmp_path / "images" / p) for p in frame["path"]]
    table = tmp_path / "stimuli.csv"
    frame.to_csv(table, index=False)
    options = TrainHeadOptions(epochs=3, selection_folds=2, num_workers=0)
    result = train_head(tiny_model(), stimuli=table, out=tmp_path / "heads", options=options,
                        seed=3, progress=False, figures=False)  # fmt: skip
    folder = tmp_path / "heads" / "tinynet"
    stimuli = load_stimuli(table)
    folds = condition_folds(stimuli.conditions, len(stimuli), 2, seed=3)  # dissect's folds
    heads = load_fold_heads(tiny_model(), folder)
    assert heads.n_folds == 2 and heads.layer == "4"
    assert np.array_equal(heads.fold_of(list(stimuli.ids)), folds)
    labels = np.asarray(stimuli.conditions)
    for label in ("a", "b"):  # stratified by condition: each spread over the folds
        counts = np.bincount(folds[labels == label], minlength=2)
        assert counts.max() - counts.min() <= 1
    # head k is the fit on the stimuli outside fold k (the main head's validation rows stop it)
    data = load_rated(None, None, table, (-3.0, 3.0))
    rated = split_rated(data, tmp_path / "heads" / "split.csv", options, seed=3, in_study=False)
    assert rated.selection is not None and np.array_equal(rated.selection, folds)
    assert "tinynet" in result.models
    for k in (0, 1):
        linear, meta = load_head(folder / fold_head_name(k))
        assert meta["fold"] == k and meta["n_folds"] == 2
        assert meta["held_out"] == [s for s, f in zip(stimuli.ids, folds, strict=True) if f == k]
        assert linear.in_features == 8
    main, _ = load_head(folder / "head.safetensors")
    first, _ = load_head(folder / fold_head_name(0))
    assert not torch.equal(main.weight, first.weight)  # another fit, on fewer stimuli
    manifest = json.loads((tmp_path / "heads" / "manifest.json").read_text())
    assert manifest["config"]["selection_folds"] == 2
    written = set(pd.Series(manifest["outputs"]).astype(str))
    assert any("head.fold1.safetensors" in w for w in written)
    # head 0 never saw fold 0: other ratings there (same split) leave it as it was
    changed = frame.copy()
    changed.loc[folds == 0, "valence"] = -changed.loc[folds == 0, "valence"]
    changed.to_csv(table, index=False)
    train_head(tiny_model(), stimuli=table, out=tmp_path / "again", options=options, seed=3,
               split=tmp_path / "heads" / "split.csv", progress=False, figures=False)  # fmt: skip
    again, _ = load_head(tmp_path / "again" / "tinynet" / fold_head_name(0))
    other, _ = load_head(tmp_path / "again" / "tinynet" / fold_head_name(1))
    assert torch.equal(again.weight, first.weight) and torch.equal(again.bias, first.bias)
    assert not torch.equal(other.weight, load_head(folder / fold_head_name(1))[0].weight)
    frame.to_csv(table, index=False)
    # a rerun without selection folds removes the stale fold heads
    train_head(tiny_model(), stimuli=table, out=tmp_path / "heads", epochs=3, num_workers=0,
               seed=3, progress=False, figures=False)  # fmt: skip
    assert not list(folder.glob("head.fold*"))
