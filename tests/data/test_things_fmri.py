"""THINGS-fMRI reader on small files in the published table layout, checked independently."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from object2brain.data.brain import load_brain
from object2brain.errors import DataError

N_VOXELS = 40


def _fixed_frame(path: Path, responses: np.ndarray, voxel_ids: np.ndarray) -> None:
    """What ``DataFrame.to_hdf(path, key="ResponseData")`` writes for a table with a ``voxel_id``
    column and trial columns 0..n-1 (pandas' fixed format, written here with h5py)."""
    n_voxels, n_trials = responses.shape
    with h5py.File(path, "w") as f:
        group = f.create_group("ResponseData")
        group.attrs["pandas_type"] = np.bytes_("frame")
        group.attrs["ndim"] = 2
        group.attrs["nblocks"] = 2
        group.create_dataset("axis1", data=np.arange(n_voxels))
        group.create_dataset("block0_items", data=np.arange(n_trials))
        values = group.create_dataset("block0_values", data=responses)  # (n_rows, n_items)
        values.attrs["transposed"] = True
        group.create_dataset("block1_items", data=np.array([b"voxel_id"]))
        ids = group.create_dataset("block1_values", data=voxel_ids[None, :])  # (n_items, n_rows)
        ids.attrs["transposed"] = False


def _subject(root: Path, subject: int, seed: int) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    concepts = ["aardvark", "banana", "cello", "dog", "egg"]
    rows = []
    for session in (1, 2, 3):
        for run, concept in enumerate(concepts, start=1):
            rows.append((f"{concept}_01b.jpg", concept, session, run, "test"))  # repeated
            rows.append((f"{concept}_{session + 1:02d}s.jpg", concept, session, run, "train"))
        rows.append(("catch_01.jpg", "catch", session, 1, "catch"))
    stimuli = pd.DataFrame(rows, columns=["stimulus", "concept", "session", "run", "trial_type"])
    responses = rng.normal(size=(N_VOXELS, len(stimuli)))
    voxel_ids = np.arange(N_VOXELS) + 1000
    voxels = pd.DataFrame(
        {
            "voxel_id": voxel_ids,
            "voxel_x": rng.integers(0, 50, N_VOXELS),
            "V1": (np.arange(N_VOXELS) < 15).astype(int),
            "lFFA": (np.arange(N_VOXELS) % 7 == 0).astype(int),
            "rFFA": (np.arange(N_VOXELS) % 5 == 1).astype(int),
        }
    )
    stem = root / f"sub-{subject:02d}"
    _fixed_frame(Path(f"{stem}_ResponseData.h5"), responses, voxel_ids)
    voxels.to_csv(f"{stem}_VoxelMetadata.csv", index=False)
    stimuli.to_csv(f"{stem}_StimulusMetadata.csv", index=False)
    return {"responses": responses, "voxels": voxels, "stimuli": stimuli}


def _manifest(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "brain.yaml"
    path.write_text("sources:\n  - kind: things_fmri\n    root: betas_csv\n" + body)
    return path


def test_things_patterns_per_roi_mean_and_runs(tmp_path: Path) -> None:
    root = tmp_path / "betas_csv"
    root.mkdir()
    data = {s: _subject(root, s, seed=s) for s in (1, 2)}
    rois = "    rois: [V1, {name: FFA, columns: [lFFA, rFFA]}]\n"
    brain = load_brain(_manifest(tmp_path, "    subjects: [1, sub-02]\n" + rois))
    assert brain.subjects == ["sub-01", "sub-02"] and brain.rois == ["V1", "FFA"]

    for subject in (1, 2):
        responses = data[subject]["responses"]
        voxels = data[subject]["voxels"]
        stimuli = data[subject]["stimuli"]
        assert isinstance(responses, np.ndarray) and isinstance(voxels, pd.DataFrame)
        assert isinstance(stimuli, pd.DataFrame)
        kept = stimuli[stimuli["trial_type"] != "catch"]
        names = sorted({s[:-4] for s in kept["stimulus"]})
        for roi, inside in (
            ("V1", voxels["V1"] == 1),
            ("FFA", (voxels["lFFA"] == 1) | (voxels["rFFA"] == 1)),
        ):
            item = next(i for i in brain.for_roi(roi) if i.subject == f"sub-{subject:02d}")
            assert item.stimulus_ids == names and item.runs is None
            expected = np.stack(
                [
                    responses[inside.to_numpy()][
                        :, kept.index[kept["stimulus"] == n + ".jpg"]
                    ].mean(axis=1)
                    for n in names
                ]
            )
            np.testing.assert_allclose(item.data, expected, atol=1e-12)

    runs = load_brain(
        _manifest(
            tmp_path,
            "    subjects: [1]\n    rois: [V1]\n    repetitions: runs\n    trial_types: [test]\n",
        )
    ).items[0]
    stimuli = data[1]["stimuli"]
    responses = data[1]["responses"]
    assert isinstance(stimuli, pd.DataFrame) and isinstance(responses, np.ndarray)
    test = stimuli[stimuli["trial_type"] == "test"]
    order = sorted(test.index, key=lambda i: (test.loc[i, "stimulus"], test.loc[i, "session"]))
    assert runs.stimulus_ids == [test.loc[i, "stimulus"][:-4] for i in order]
    assert runs.runs is not None and runs.runs.tolist() == [
        int(test.loc[i, "session"]) for i in order
    ]
    np.testing.assert_allclose(runs.data, responses[:15][:, order].T, atol=1e-12)


def test_things_plain_dataset_and_bad_input(tmp_path: Path) -> None:
    root = tmp_path / "betas_csv"
    root.mkdir()
    data = _subject(root, 1, seed=3)
    responses = data["responses"]
    assert isinstance(responses, np.ndarray)
    with h5py.File(root / "sub-01_ResponseData.h5", "w") as f:
        f.create_dataset("responses", data=responses)
    item = load_brain(_manifest(tmp_path, "    subjects: [1]\n    rois: [V1]\n")).items[0]
    assert item.data.shape == (20, 15)  # 5 repeated test + 15 train images, no catch

    with pytest.raises(DataError) as error:
        load_brain(
            _manifest(tmp_path, "    subjects: [1]\n    rois: [V1, {name: FFA, columns: [FFA]}]\n")
        )
    message = str(error.value)
    assert "sub-01_VoxelMetadata.csv: missing ROI column(s) FFA asked for ROI 'FFA'" in message
    assert "(found: voxel_id, voxel_x, V1, lFFA, rFFA)" in message

    with pytest.raises(DataError, match=r"sub-02_ResponseData\.h5: THINGS-fMRI file"):
        load_brain(_manifest(tmp_path, "    subjects: [2]\n    rois: [V1]\n"))
