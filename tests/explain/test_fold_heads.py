"""Dissection with selection fold heads (``dissect --fold-heads``): fold k's Grad-CAM maps come
from the head fitted without fold k, and the selection folds are the heads' folds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import object2brain as o2b
from object2brain.data.stimuli import load_stimuli
from object2brain.errors import DataError
from object2brain.heads.io import fold_head_name, save_head

from .helpers import FACE, FACE_POSITIONS, make_composites, planted_model

N = 12
SEED = 5
MEASURES = ["importance", "enrichment", "n_images"]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("foldheads")
    paths = make_composites(folder, n=N)
    ids = [p.stem for p in paths]
    stimuli = folder / "stimuli.csv"
    conditions = ["a" if i % 3 else "b" for i in range(N)]
    pd.DataFrame({"stimulus_id": ids, "path": [str(p) for p in paths],
                  "condition": conditions}).to_csv(stimuli, index=False)  # fmt: skip
    rows = []
    for i, sid in enumerate(ids):
        x, y = FACE_POSITIONS[i % len(FACE_POSITIONS)]
        rows.append([sid, x, y, x + FACE, y + FACE, "Human face"])
        rows.append([sid, 0, 0, 60 + 10 * (i % 4), 50, "Building"])
    boxes = folder / "boxes.csv"
    pd.DataFrame(rows, columns=["stimulus_id", "x0", "y0", "x1", "y1", "label"]).to_csv(
        boxes, index=False
    )
    # two fold heads on a fold split of our own (not condition_folds: the heads' folds rule)
    heads = folder / "heads"
    held = {0: [sid for i, sid in enumerate(ids) if i % 2 == 0],
            1: [sid for i, sid in enumerate(ids) if i % 2 == 1]}  # fmt: skip
    for k, weights in enumerate(([0.1, 0.1, 5.0, 0.1], [2.0, 3.0, -0.5, 0.1])):
        linear = nn.Linear(4, 1)
        with torch.no_grad():
            linear.weight.copy_(torch.tensor([weights]))
            linear.bias.zero_()
        meta = {"arch": "planted", "backbone_weights_sha256": "0" * 64,
                "replaced_layer": "fc", "fold": k, "n_folds": 2, "held_out": held[k]}  # fmt: skip
        save_head(linear, heads / fold_head_name(k), meta)
    return {"folder": folder, "stimuli": stimuli, "boxes": boxes, "heads": heads}


def _dissect(study: dict[str, Path], model: object, stimuli: object, **kw: object) -> object:
    settings: dict[str, object] = {"n_null_assign": 199, "out": None} | kw
    return o2b.dissect(model, stimuli, layer="features", device="cpu",  # type: ignore[arg-type]
                       detector=f"boxes:{study['boxes']}", min_images=2, seed=SEED,
                       figures=False, progress=False, **settings)  # fmt: skip


def _with_head(path: Path) -> object:
    """The planted model with the head at ``path`` in place of its valence head."""
    from object2brain.heads.io import load_head

    model = planted_model()
    linear, _ = load_head(path)
    model.module.set_submodule("fc", linear.requires_grad_(False))
    return model


def test_fold_rows_equal_a_dissection_with_the_fold_head(
    study: dict[str, Path], tmp_path: Path
) -> None:
    result = _dissect(study, planted_model(), study["stimuli"], fold_heads=study["heads"],
                      out=tmp_path / "d")  # fmt: skip
    table = result.table  # type: ignore[attr-defined]
    # the all-images rows still come from the valence head: as without fold heads, to the bit
    plain = _dissect(study, planted_model(), study["stimuli"], selection_folds=0).table  # type: ignore[attr-defined]
    pd.testing.assert_frame_equal(table[table["fold"].isna()].reset_index(drop=True), plain)
    stimuli = load_stimuli(study["stimuli"])
    assigned: list[list[object]] = []
    for k in (0, 1):
        rows = table[table["fold"] == k].reset_index(drop=True)
        others = [sid for i, sid in enumerate(stimuli.ids) if i % 2 != k]  # the heads' folds
        alone = _dissect(
            study,
            _with_head(study["heads"] / fold_head_name(k)),
            stimuli.subset(others),
            selection_folds=0,
        ).table  # type: ignore[attr-defined]
        np.testing.assert_allclose(rows[MEASURES].to_numpy(float),
                                   alone[MEASURES].to_numpy(float), rtol=1e-9)  # fmt: skip
        for column in ("p_assign", "p_assign_fdr", "assigned"):  # the same null draws too
            assert rows[column].equals(alone[column].reset_index(drop=True)), column
        assigned.append(rows.loc[rows["assigned"], ["filter", "group"]].values.tolist())
        if k == 1:  # head 1 weighs the face filter negatively: other maps
            main = _dissect(study, planted_model(), stimuli.subset(others), selection_folds=0).table  # type: ignore[attr-defined]
            differs = ~np.isclose(rows["enrichment"], main["enrichment"], equal_nan=True)
            assert differs.any()
    assert assigned[0] == [[2, "Faces"]]  # head 0 is the planted face head
    assert [2, "Faces"] not in assigned[1]  # head 1's face maps are negative: none positive
    folds = pd.read_csv(tmp_path / "d" / "folds.csv", dtype={"stimulus_id": str})
    assert folds["fold"].tolist() == [i % 2 for i in range(N)]
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert "fold head k" in manifest["selection_notes"][0]
    assert manifest["summary"]["fold_heads"] is True
    assert {"fold_head:0", "fold_head:1"} <= set(manifest["inputs"])


def test_fold_heads_that_do_not_cover_the_stimuli_are_refused(study: dict[str, Path]) -> None:
    stimuli = load_stimuli(study["stimuli"])
    heads = study["folder"] / "partial"
    for k in (0, 1):
        linear = nn.Linear(4, 1)
        meta = {"arch": "planted", "backbone_weights_sha256": "0" * 64, "replaced_layer": "fc",
                "fold": k, "n_folds": 2, "held_out": list(stimuli.ids[k : 6 : 2])}  # fmt: skip
        save_head(linear, heads / fold_head_name(k), meta)
    with pytest.raises(DataError, match=f"{stimuli.ids[6]!r}.*held out by none"):
        _dissect(study, planted_model(), study["stimuli"], fold_heads=heads)
    with pytest.raises(DataError, match="--selection-folds 2"):
        _dissect(study, planted_model(), study["stimuli"], fold_heads=study["heads"],
                 selection_folds=3)  # fmt: skip


def test_the_manifest_says_whether_the_one_head_saw_these_stimuli(tmp_path: Path) -> None:
    from object2brain.explain.dissect import head_saw_stimuli, selection_notes
    from object2brain.options import DissectOptions

    split = tmp_path / "split.csv"
    pd.DataFrame({"stimulus_id": ["a", "b", "c"], "split": ["train", "val", "test"]}).to_csv(
        split, index=False
    )
    model = planted_model()
    options = DissectOptions(layer="features")
    model.head = {"split_file": str(split)}
    assert head_saw_stimuli(model, ["b", "z"]) is True  # fitted (val: early stopping) on b
    assert "was fitted on these stimuli" in selection_notes(model, options, None, True)[0]
    assert head_saw_stimuli(model, ["c", "z"]) is False  # c was its test split only
    assert "fitted on other stimuli" in selection_notes(model, options, None, False)[0]
    model.head = {"planted": True}  # no split file: unknown
    assert head_saw_stimuli(model, ["a"]) is None
    assert "may have been fitted" in selection_notes(model, options, None, None)[0]
