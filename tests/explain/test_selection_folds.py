"""Per-fold dissection (``filter_objects`` rows with ``fold = k``) and dissect -> lesion
cross-fitted end to end."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

import object2brain as o2b
from object2brain.data.splits import condition_folds
from object2brain.data.stimuli import load_stimuli
from object2brain.explain.dissect import fdr_over_layer

from .helpers import FACE, FACE_POSITIONS, make_composites, planted_model

N = 12
SEED = 5


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("folds")
    paths = make_composites(folder, n=N)
    ids = [p.stem for p in paths]
    stimuli = folder / "stimuli.csv"
    conditions = ["a" if i % 3 else "b" for i in range(N)]  # 8 a, 4 b: stratified folds
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
    return {"folder": folder, "stimuli": stimuli, "boxes": boxes}


def _dissect(study: dict[str, Path], stimuli: object, out: Path | None, **kw: object) -> object:
    settings: dict[str, object] = {"n_null_assign": 99} | kw
    return o2b.dissect(planted_model(), stimuli, layer="features", out=out, device="cpu",
                       detector=f"boxes:{study['boxes']}", min_images=2, seed=SEED,
                       figures=False, progress=False, **settings)  # fmt: skip


def test_fold_rows_equal_a_dissection_without_the_fold(study: dict[str, Path]) -> None:
    result = _dissect(study, study["stimuli"], None)
    table = result.table  # type: ignore[attr-defined]
    everything = table[table["fold"].isna()].reset_index(drop=True)
    # the all-images rows are those of a run without selection folds, to the bit
    plain = _dissect(study, study["stimuli"], None, selection_folds=0).table  # type: ignore[attr-defined]
    assert plain["fold"].isna().all()
    pd.testing.assert_frame_equal(everything, plain)
    stimuli = load_stimuli(study["stimuli"])
    folds = condition_folds(stimuli.conditions, N, 2, seed=SEED)
    labels = np.asarray(stimuli.conditions)
    for k in (0, 1):  # stratified by condition: 4 a and 2 b in each fold
        assert sorted(labels[folds == k].tolist()) == ["a"] * 4 + ["b"] * 2
    measures = ["importance", "enrichment", "n_images"]
    for k in (0, 1):
        rows = table[table["fold"] == k].reset_index(drop=True)
        kept = stimuli.subset([s for s, f in zip(stimuli.ids, folds, strict=True) if f != k])
        alone = _dissect(study, kept, None, selection_folds=0).table  # type: ignore[attr-defined]
        # scores from the other fold's images only: those of a dissection of those images
        np.testing.assert_allclose(rows[measures].to_numpy(float),
                                   alone[measures].to_numpy(float), rtol=1e-6)  # fmt: skip
        assert set(rows["n_images"]) == {0, 6}  # 6 images with faces and buildings, others 0
        assert (rows.loc[rows["group"] == "Faces", "n_images"] == 6).all()
        # the fold's own null and its own BH over the layer's filters x groups
        p = rows["p_assign"].to_numpy(float)
        assert np.nanmin(p) >= 1 / 100 and np.nanmax(p) <= 1
        np.testing.assert_allclose(rows["p_assign_fdr"], fdr_over_layer(p), equal_nan=True)
        # the planted face filter carries the Faces boxes without this fold too
        faces = rows[rows["group"] == "Faces"].set_index("filter")["enrichment"]
        assert faces.idxmax() == 2
    assert result.summary["selection_folds"] == 2  # type: ignore[attr-defined]
    assert result.summary["fold_sizes"] == [6, 6]  # type: ignore[attr-defined]
    assert result.notes and "fold heads" in result.notes[0]  # type: ignore[attr-defined]


def test_dissect_then_lesion_is_cross_fitted(study: dict[str, Path], tmp_path: Path) -> None:
    # 6 images per selection: p_assign of the face filter needs more draws to pass BH
    dissected = _dissect(study, study["stimuli"], tmp_path / "dissect", n_null_assign=999)
    manifest = json.loads((tmp_path / "dissect" / "manifest.json").read_text())
    assert manifest["config"]["selection_folds"] == 2
    assert manifest["summary"]["fold_sizes"] == [6, 6]
    assert "valence head" in " ".join(manifest["selection_notes"])
    written = pd.read_csv(tmp_path / "dissect" / "filter_objects.csv")
    assert sorted(written["fold"].dropna().unique()) == [0, 1]
    assert len(written) == len(dissected.table)  # type: ignore[attr-defined]
    for k in (0, 1):  # the planted face filter is assigned without either fold
        chosen = written[(written["fold"] == k) & written["assigned"]]
        assert chosen[["filter", "group"]].values.tolist() == [[2, "Faces"]]
    # the same features; a model without valence head (the planted head has no file to hash)
    store = o2b.extract(planted_model(outputs=2), study["stimuli"], out=tmp_path / "acts.h5",
                        layers=["features"], device="cpu", progress=False)  # fmt: skip
    rng = np.random.default_rng(0)
    patterns = tmp_path / "patterns.h5"
    ids = load_stimuli(study["stimuli"]).ids
    with h5py.File(patterns, "w") as handle:
        handle.attrs["kind"] = "patterns"
        handle["stimulus_ids"] = np.array(ids, dtype=object)
        handle["sub-01/ROI"] = rng.normal(size=(N, 20))
    result = o2b.lesion(store, tmp_path / "dissect" / "filter_objects.csv", brain=patterns,
                        stimuli=study["stimuli"], out=tmp_path / "lesion", n_null=19, n_perm=19,
                        n_group_null=19, seed=SEED, device="cpu")  # fmt: skip
    frame = result.object2brain
    assert not frame.empty
    assert set(frame["selection"]) == {"cross_fit"}
    lesion_manifest = json.loads((tmp_path / "lesion" / "manifest.json").read_text())
    assert "selection_notes" not in lesion_manifest  # no fallback to same
    # the report counts the all-images assignment and shows the dissection's selection note
    from object2brain.report.build import build_report

    (tmp_path / "acts.h5").unlink()
    page = build_report(tmp_path, out=tmp_path / "report").read_text()
    assert "Selection notes" in page and "not from fold heads" in page
    assert "1 of 4" in page  # filters assigned: the all-images rows only, not 3 x the folds
