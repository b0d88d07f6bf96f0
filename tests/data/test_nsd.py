"""NSD reader on tiny files in the published layout, checked against an independent computation."""

from __future__ import annotations

from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from scipy.io import savemat

from object2brain.data.brain import load_brain
from object2brain.data.nsd import nsd_stimulus_id
from object2brain.errors import DataError

GRID_XYZ = (6, 5, 4)  # NIfTI (X, Y, Z); the h5py betas are (750, Z, Y, X)
SESSIONS = (1, 2, 3)


def _release(root: Path, seed: int = 0, order_max: int = 300) -> dict[str, np.ndarray]:
    """Write design, 3 sessions of betas for subjects 1 and 2, and ROI volumes; return them."""
    rng = np.random.default_rng(seed)
    order = rng.integers(1, order_max + 1, size=30000)  # 40 sessions x 750 trials
    subjectim = np.stack([rng.permutation(73000)[:10000] + 1 for _ in range(8)])
    design = root / "nsddata/experiments/nsd"
    design.mkdir(parents=True)
    savemat(
        design / "nsd_expdesign.mat",
        {"masterordering": order[None, :].astype(np.float64), "subjectim": subjectim},
    )
    written: dict[str, np.ndarray] = {"order": order, "subjectim": subjectim}
    for subject in (1, 2):
        folder = root / f"nsddata_betas/ppdata/subj{subject:02d}/func1pt8mm"
        folder = folder / "betas_fithrf_GLMdenoise_RR"
        folder.mkdir(parents=True)
        for session in SESSIONS:
            betas = rng.integers(-900, 900, size=(750, *GRID_XYZ[::-1]), dtype=np.int16)
            with h5py.File(folder / f"betas_session{session:02d}.hdf5", "w") as f:
                f.create_dataset("betas", data=betas, chunks=(750, 1, 1, 1))
            written[f"{subject}/{session}"] = betas
        rois = root / f"nsddata/ppdata/subj{subject:02d}/func1pt8mm/roi"
        rois.mkdir(parents=True)
        general = rng.choice([-1, 0, 1], size=GRID_XYZ).astype(np.int16)
        visual = rng.choice([-1, 0, 1, 2, 3, 4], size=GRID_XYZ).astype(np.int16)
        for name, volume in (("nsdgeneral", general), ("prf-visualrois", visual)):
            nib.save(nib.Nifti1Image(volume, np.eye(4)), rois / f"{name}.nii.gz")
            written[f"{subject}/{name}"] = volume
    return written


def _manifest(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "brain.yaml"
    path.write_text("sources:\n  - kind: nsd\n    root: nsd\n" + body)
    return path


def _expected(
    written: dict[str, np.ndarray], subject: int, mask_xyz: np.ndarray, sessions: tuple[int, ...]
) -> dict[int, list[np.ndarray]]:
    """73k image -> its trials' patterns, straight from the arrays (betas transposed to X, Y, Z)."""
    trials: dict[int, list[np.ndarray]] = {}
    for session in sessions:
        volume = written[f"{subject}/{session}"].transpose(0, 3, 2, 1) / 300.0
        for trial in range(750):
            ten_k = written["order"][(session - 1) * 750 + trial]
            image = int(written["subjectim"][subject - 1, ten_k - 1])
            trials.setdefault(image, []).append(volume[trial][mask_xyz])
    return trials


def _canonical(patterns: np.ndarray) -> np.ndarray:
    """Columns (voxels) in a fixed order, so that voxel order does not matter."""
    return patterns[:, np.lexsort(patterns[::-1])]


def test_nsd_mean_and_runs_match_an_independent_computation(tmp_path: Path) -> None:
    written = _release(tmp_path / "nsd")
    manifest = _manifest(
        tmp_path,
        "    subjects: [1, subj02]\n    sessions: [1, 3]\n"
        "    rois: [nsdgeneral, {name: V1, file: prf-visualrois, labels: [1, 2]}]\n",
    )
    brain = load_brain(manifest)
    assert brain.subjects == ["subj01", "subj02"]
    assert brain.rois == ["nsdgeneral", "V1"]

    for subject in (1, 2):
        for roi, mask in (
            ("nsdgeneral", written[f"{subject}/nsdgeneral"] > 0),
            ("V1", np.isin(written[f"{subject}/prf-visualrois"], [1, 2])),
        ):
            trials = _expected(written, subject, mask, (1, 3))
            images = sorted(trials)
            item = next(i for i in brain.for_roi(roi) if i.subject == f"subj{subject:02d}")
            assert item.stimulus_ids == [f"nsd-{i:05d}" for i in images]
            assert item.runs is None
            expected = np.stack([np.mean(trials[i], axis=0) for i in images])
            np.testing.assert_allclose(_canonical(item.data), _canonical(expected), atol=1e-12)
    assert max(len(v) for v in trials.values()) >= 3  # the design repeats images

    runs = load_brain(
        _manifest(
            tmp_path,
            "    subjects: [1]\n    rois: [nsdgeneral]\n    repetitions: runs\n",
        )
    )
    item = runs.items[0]
    trials = _expected(written, 1, written["1/nsdgeneral"] > 0, SESSIONS)  # every session found
    rows = [(i, r) for i in sorted(trials) for r in range(len(trials[i]))]
    assert item.stimulus_ids == [nsd_stimulus_id(i) for i, _ in rows]
    assert item.runs is not None and item.runs.tolist() == [r + 1 for _, r in rows]
    expected = np.stack([trials[i][r] for i, r in rows])
    np.testing.assert_allclose(_canonical(item.data), _canonical(expected), atol=1e-12)

    # matching by id keeps every run; the RDM comes from the per-image means
    chosen = [nsd_stimulus_id(i) for i in sorted(trials, key=lambda i: -len(trials[i]))[:5]]
    taken = item.take(chosen)
    assert taken.stimulus_ids == [s for s in chosen for _ in trials[int(s[4:])]]
    ids, means = taken.mean_patterns()
    assert ids == chosen
    mean_rows = np.stack([np.mean(trials[int(s[4:])], axis=0) for s in chosen])
    np.testing.assert_allclose(_canonical(means), _canonical(mean_rows), atol=1e-12)
    assert taken.rdm(device="cpu").shape == (5, 5)


def test_nsd_bad_input_names_the_file(tmp_path: Path) -> None:
    root = tmp_path / "nsd"
    _release(root)
    missing = _manifest(
        tmp_path, "    subjects: [1]\n    sessions: [1, 4]\n    rois: [nsdgeneral]\n"
    )
    with pytest.raises(DataError, match=r"betas_session04\.hdf5: betas of subject 1 session 4"):
        load_brain(missing)

    nib.save(
        nib.Nifti1Image(np.ones((4, 5, 7), dtype=np.int16), np.eye(4)),
        root / "nsddata/ppdata/subj01/func1pt8mm/roi/other.nii.gz",
    )
    wrong = _manifest(tmp_path, "    subjects: [1]\n    rois: [other]\n")
    with pytest.raises(DataError, match=r"other\.nii\.gz: ROI volume of shape \(4, 5, 7\)"):
        load_brain(wrong)

    design = root / "nsddata/experiments/nsd/nsd_expdesign.mat"
    order = np.ones((1, 30000))
    order[0, 17] = 10001
    savemat(design, {"masterordering": order, "subjectim": np.ones((8, 10000))})
    with pytest.raises(DataError, match=r"nsd_expdesign\.mat: masterordering points past .* 18"):
        load_brain(_manifest(tmp_path, "    subjects: [1]\n    rois: [nsdgeneral]\n"))
    subjectim = np.ones((8, 10000))
    subjectim[0, 0] = 73001
    savemat(design, {"masterordering": np.ones((1, 30000)), "subjectim": subjectim})
    with pytest.raises(DataError, match=r"nsd_expdesign\.mat: subjectim row 1 points past"):
        load_brain(_manifest(tmp_path, "    subjects: [1]\n    rois: [nsdgeneral]\n"))
