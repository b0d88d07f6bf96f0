"""Brain data: manifests, HDF5 patterns/RDMs, NIfTI betas + masks, and bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from object2brain.data.brain import load_brain
from object2brain.errors import DataError

IDS = [f"s{i}" for i in range(6)]


def _h5(
    path: Path, kind: str | None, data: dict[str, dict[str, np.ndarray]], ids: list[str] = IDS
) -> Path:
    with h5py.File(path, "w") as f:
        if kind:
            f.attrs["kind"] = kind
        f.create_dataset(
            "stimulus_ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype()
        )
        for subject, rois in data.items():
            for roi, values in rois.items():
                f.create_dataset(f"{subject}/{roi}", data=values)
    return path


def _patterns(seed: int = 0, n: int = 6, v: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, v))


def test_patterns_h5_direct_and_matching_by_id(tmp_path: Path) -> None:
    X = _patterns()
    path = _h5(tmp_path / "p.h5", "patterns", {"sub-01": {"EVC": X, "FFA": X * 2}})
    brain = load_brain(path)
    assert brain.subjects == ["sub-01"]
    assert brain.rois == ["EVC", "FFA"]
    order = IDS[::-1]
    aligned = brain.aligned(brain.common_ids(order))
    item = aligned.for_roi("EVC")[0]
    np.testing.assert_allclose(item.data, X[::-1])
    assert item.stimulus_ids == order
    D = item.rdm("correlation", device="cpu").numpy()
    assert D.shape == (6, 6)


def test_rdms_h5_and_manifest(tmp_path: Path) -> None:
    X = _patterns()
    D = np.abs(X[:, :1] - X[:, :1].T)
    _h5(tmp_path / "r.h5", "rdms", {"sub-02": {"EVC": D}})
    _h5(tmp_path / "p.h5", None, {"sub-01": {"EVC": X}})
    manifest = tmp_path / "brain.yaml"
    manifest.write_text(
        "sources:\n  - kind: patterns\n    path: p.h5\n  - kind: rdms\n    path: r.h5\n"
    )
    brain = load_brain(manifest)
    assert brain.subjects == ["sub-01", "sub-02"]
    rdm_item = brain.for_roi("EVC")[1]
    np.testing.assert_allclose(rdm_item.rdm(device="cpu").numpy(), D)


def test_missing_ids_listed_or_intersected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _h5(tmp_path / "p.h5", "patterns", {"sub-01": {"EVC": _patterns()}})
    brain = load_brain(path)
    wanted = [*IDS[:4], "zz1", "zz2"]
    with pytest.raises(DataError, match=r"subject 'sub-01', ROI 'EVC' lacks 2 id\(s\): zz1, zz2"):
        brain.common_ids(wanted)
    with caplog.at_level(logging.WARNING):
        assert brain.common_ids(wanted, on_missing="intersect") == IDS[:4]
    assert "not in the stimulus set are ignored: s4, s5" in caplog.text


def test_id_mismatch_reported_once_per_distinct_problem(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Extra brain ids: one warning line for the whole data set; missing ids: each distinct set
    of missing ids once, with the items lacking it described compactly."""
    X = _patterns()
    path = _h5(
        tmp_path / "p.h5",
        "patterns",
        {s: {"EVC": X, "FFA": X, "HI": X} for s in ("sub-01", "sub-02")},
    )
    brain = load_brain(path)
    with caplog.at_level(logging.INFO):
        assert brain.common_ids(IDS[:5]) == IDS[:5]
    lines = [r.getMessage() for r in caplog.records if "not in the stimulus set" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].endswith("are ignored: s5 (in all 6 subject x ROI items)")
    assert caplog.records[-1].levelno == logging.WARNING
    with pytest.raises(DataError) as error:
        brain.common_ids([*IDS, "s23"])
    message = str(error.value)
    assert message.count("s23") == 1
    assert message == (
        f"{path}: the brain data do not cover the stimulus set: each of the 6 subject x ROI items "
        "lacks 1 id(s): s23"
    )

    short = _h5(tmp_path / "short.h5", "patterns", {"sub-02": {"EVC": X[:5]}}, ids=IDS[:5])
    full = _h5(tmp_path / "full.h5", "patterns", {"sub-01": {"EVC": X, "FFA": X}}, ids=IDS)
    manifest = tmp_path / "brain.yaml"
    manifest.write_text(
        f"sources:\n  - {{kind: patterns, path: {full.name}}}\n"
        f"  - {{kind: patterns, path: {short.name}}}\n"
    )
    mixed = load_brain(manifest)
    with pytest.raises(DataError) as error:
        mixed.common_ids([*IDS, "s9"])
    assert str(error.value) == (
        f"{manifest}: the brain data do not cover the stimulus set: each of ROI 'EVC' (sub-01), "
        "ROI 'FFA' (sub-01) lacks 1 id(s): s9; subject 'sub-02', ROI 'EVC' lacks 2 id(s): s5, s9"
    )


def test_nan_voxels_dropped_and_constant_pattern_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    X = _patterns()
    X[:, 1] = np.nan
    X[3] = 1.0
    with caplog.at_level(logging.WARNING):
        brain = load_brain(_h5(tmp_path / "p.h5", "patterns", {"sub-01": {"V1": X}}))
    assert "dropped 1 of 5 voxel" in caplog.text
    item = brain.items[0]
    assert item.data.shape == (6, 4)
    with pytest.raises(DataError, match=r"sub-01.*V1.*zero-variance.*s3"):
        item.rdm("correlation", device="cpu")
    assert item.rdm("euclidean", device="cpu").shape == (6, 6)


@pytest.mark.parametrize(
    ("kind", "data", "message"),
    [
        ("rdms", np.ones((6, 5)), "must be square"),
        ("rdms", np.full((6, 6), np.nan), "NaN or infinite dissimilarities"),
        ("rdms", np.triu(np.ones((6, 6)), 1), "not symmetric"),
        ("patterns", np.ones((4, 3)), "expected 6"),
        ("patterns", np.full((6, 3), np.nan), "every voxel"),
        ("bogus", np.ones((6, 3)), "root attribute 'kind'"),
    ],
)
def test_bad_h5(tmp_path: Path, kind: str, data: np.ndarray, message: str) -> None:
    path = _h5(tmp_path / "x.h5", kind, {"sub": {"roi": data}})
    with pytest.raises(DataError, match=message):
        load_brain(path)


@pytest.mark.parametrize("kind", ["patterns", "rdms"])
def test_nested_groups_rejected(tmp_path: Path, kind: str) -> None:
    path = _h5(tmp_path / "n.h5", kind, {"sub-01": {"a/b": np.eye(6)}})
    with pytest.raises(
        DataError,
        match=r"n\.h5: /sub-01/a is a group \(containing b\), not a dataset: the layout must be "
        r"/<subject>/<roi> datasets",
    ):
        load_brain(path)


def test_non_numeric_dataset(tmp_path: Path) -> None:
    path = _h5(tmp_path / "t.h5", "patterns", {})
    with h5py.File(path, "a") as f:
        f.create_dataset(
            "sub-01/EVC", data=np.asarray(IDS, dtype=object), dtype=h5py.string_dtype()
        )
    with pytest.raises(DataError, match=r"t\.h5: /sub-01/EVC: dataset of type .* is not numeric"):
        load_brain(path)


def test_all_nan_stimulus_rows_named(tmp_path: Path) -> None:
    """A stimulus with no finite value makes every voxel droppable: name the stimulus."""
    X = _patterns()
    X[3] = np.nan
    X[5, 2] = np.inf
    X[5, :2] = np.nan
    X[5, 3:] = -np.inf
    path = _h5(tmp_path / "p.h5", "patterns", {"sub-02": {"HI": X}})
    with pytest.raises(
        DataError, match=r"/sub-02/HI: stimulus id\(s\) s3, s5 have no finite voxel"
    ):
        load_brain(path)
    Y = _patterns()
    Y[0, :3] = np.nan
    Y[1, 3:] = np.nan
    path = _h5(tmp_path / "q.h5", "patterns", {"sub-02": {"HI": Y}})
    with pytest.raises(
        DataError, match=r"every voxel has NaN or infinite values \(for stimulus id\(s\) s0, s1\)"
    ):
        load_brain(path)
    path = _h5(tmp_path / "e.h5", "patterns", {"sub-02": {"HI": np.ones((6, 0))}})
    with pytest.raises(DataError, match="has no voxels"):
        load_brain(path)


def test_duplicate_subject_roi(tmp_path: Path) -> None:
    _h5(tmp_path / "a.h5", None, {"sub": {"roi": _patterns()}})
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "sources:\n  - {kind: patterns, path: a.h5}\n  - {kind: patterns, path: a.h5}\n"
    )
    with pytest.raises(DataError, match="defined twice"):
        load_brain(manifest)


def test_reserved_subject_names(tmp_path: Path) -> None:
    """``group`` may be an ROI's only subject (a group-level RDM), never beside other subjects;
    ``group_rdm`` never."""
    D = np.abs(_patterns()[:, :1] - _patterns()[:, :1].T)
    alone = load_brain(_h5(tmp_path / "g.h5", "rdms", {"group": {"EVC": D}}))
    assert alone.subjects == ["group"]
    for name, subjects in [("mixed", ["sub-01", "group"]), ("grdm", ["group_rdm"])]:
        path = _h5(tmp_path / f"{name}.h5", "rdms", {s: {"EVC": D} for s in subjects})
        with pytest.raises(DataError, match=f"{name}.h5: ROI 'EVC' has subject.*reserved"):
            load_brain(path)


def test_bad_manifests(tmp_path: Path) -> None:
    m = tmp_path / "m.yaml"
    m.write_text("foo: 1\n")
    with pytest.raises(DataError, match="'sources:' list"):
        load_brain(m)
    m.write_text("sources:\n  - {kind: fmri, path: x}\n")
    with pytest.raises(DataError, match="unknown kind 'fmri'"):
        load_brain(m)
    m.write_text("sources:\n  - {kind: patterns, path: missing.h5}\n")
    with pytest.raises(DataError, match=r"missing\.h5 not found"):
        load_brain(m)


# --- NIfTI --------------------------------------------------------------------------------


def _nifti_subject(tmp_path: Path, ids: list[str] = IDS) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    betas = rng.normal(size=(4, 4, 4, len(ids))).astype(np.float32)
    (tmp_path / "sub-01").mkdir()
    nib.save(nib.Nifti1Image(betas, affine), tmp_path / "sub-01" / "betas.nii.gz")
    pd.DataFrame({"stimulus_id": ids}).to_csv(
        tmp_path / "sub-01" / "betas.tsv", sep="\t", index=False
    )
    (tmp_path / "rois").mkdir()
    mask = np.zeros((4, 4, 4), dtype=np.uint8)
    mask[:2, :2, :2] = 1
    nib.save(nib.Nifti1Image(mask, affine), tmp_path / "rois" / "EVC.nii.gz")
    return betas, mask


def _manifest(tmp_path: Path, rois: str) -> Path:
    m = tmp_path / "brain.yaml"
    m.write_text(
        "sources:\n  - kind: nifti\n    subject: sub-01\n    betas: sub-01/betas.nii.gz\n"
        f"    stimuli: sub-01/betas.tsv\n{rois}"
    )
    return m


def test_nifti_masks_same_grid_and_resampled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    betas, mask = _nifti_subject(tmp_path)
    # the same ROI on a grid of 1 mm voxels (8^3), covering the same space
    fine = np.zeros((8, 8, 8), dtype=np.uint8)
    fine[:4, :4, :4] = 1
    nib.save(
        nib.Nifti1Image(fine, np.diag([1.0, 1.0, 1.0, 1.0]) @ np.eye(4)),
        tmp_path / "rois" / "FINE.nii.gz",
    )
    m = _manifest(tmp_path, "    rois: [rois/EVC.nii.gz, rois/FINE.nii.gz]\n")
    with caplog.at_level(logging.INFO):
        brain = load_brain(m)
    assert "FINE.nii.gz: on another grid" in caplog.text
    evc = brain.for_roi("EVC")[0]
    np.testing.assert_allclose(evc.data, betas[mask.astype(bool)].T)
    assert evc.data.shape == (6, 8)
    assert brain.for_roi("FINE")[0].data.shape[1] >= 1


def test_nifti_label_image(tmp_path: Path) -> None:
    betas, _ = _nifti_subject(tmp_path)
    labels = np.zeros((4, 4, 4), dtype=np.int16)
    labels[0] = 1
    labels[3] = 2
    nib.save(nib.Nifti1Image(labels, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "atlas.nii.gz")
    pd.DataFrame({"index": [1, 2], "name": ["A", "B"]}).to_csv(
        tmp_path / "atlas.tsv", sep="\t", index=False
    )
    brain = load_brain(_manifest(tmp_path, "    labels: atlas.nii.gz\n    labels_tsv: atlas.tsv\n"))
    assert brain.rois == ["A", "B"]
    np.testing.assert_allclose(brain.for_roi("B")[0].data, betas[3].reshape(-1, 6).T)
    both = "    rois: [atlas.nii.gz]\n    labels: atlas.nii.gz\n    labels_tsv: atlas.tsv\n"
    with pytest.raises(DataError, match="either 'rois' or 'labels' \\+ 'labels_tsv', not both"):
        load_brain(_manifest(tmp_path, both))


def test_nifti_empty_and_non_overlapping_masks(tmp_path: Path) -> None:
    _nifti_subject(tmp_path)
    nib.save(
        nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0])),
        tmp_path / "rois" / "EMPTY.nii.gz",
    )
    with pytest.raises(
        DataError, match=r"EMPTY.nii.gz: ROI 'EMPTY' of subject 'sub-01' has no voxels"
    ):
        load_brain(_manifest(tmp_path, "    rois: [rois/EMPTY.nii.gz]\n"))
    far = np.diag([2.0, 2.0, 2.0, 1.0])
    far[:3, 3] = 500.0  # another grid, far away: nothing left after resampling
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), far), tmp_path / "rois" / "FAR.nii.gz")
    with pytest.raises(DataError, match="does not overlap"):
        load_brain(_manifest(tmp_path, "    rois: [rois/FAR.nii.gz]\n"))


def test_nifti_sidecar_mismatch(tmp_path: Path) -> None:
    _nifti_subject(tmp_path)
    pd.DataFrame({"stimulus_id": IDS[:4]}).to_csv(
        tmp_path / "sub-01" / "betas.tsv", sep="\t", index=False
    )
    with pytest.raises(DataError, match=r"4 rows but betas\.nii\.gz has 6 volumes"):
        load_brain(_manifest(tmp_path, "    rois: [rois/EVC.nii.gz]\n"))
    nib.save(
        nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)),
        tmp_path / "sub-01" / "betas.nii.gz",
    )
    with pytest.raises(DataError, match="expected a 4D beta image"):
        load_brain(_manifest(tmp_path, "    rois: [rois/EVC.nii.gz]\n"))


def test_nifti_damaged_files_and_bad_sidecars(tmp_path: Path) -> None:
    """One DataError each, naming the file (a truncated .nii.gz used to exit with a blank line)."""
    _nifti_subject(tmp_path)
    m = _manifest(tmp_path, "    rois: [rois/EVC.nii.gz]\n")
    betas = tmp_path / "sub-01" / "betas.nii.gz"
    whole = betas.read_bytes()
    betas.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"betas\.nii\.gz: cannot read the image data, the file is"):
        load_brain(m)
    betas.write_bytes(whole)
    tsv = tmp_path / "sub-01" / "betas.tsv"
    tsv.write_text("stimulus_id\tonset\ns0\t0\ns1\t1\n\t2\ns3\t3\ns4\t4\ns5\t5\n")  # blank id
    with pytest.raises(DataError, match=r"betas\.tsv: empty stimulus_id in row\(s\) 3"):
        load_brain(m)


def test_nifti_mask_values(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    betas, mask = _nifti_subject(tmp_path)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    with_nan = np.where(mask == 1, 1.0, np.nan).astype(np.float32)  # NaN outside: not inside
    nib.save(nib.Nifti1Image(with_nan, affine), tmp_path / "rois" / "NAN.nii.gz")
    smooth = np.where(mask == 1, 0.9, 0.2).astype(np.float32)  # probabilistic: all nonzero
    nib.save(nib.Nifti1Image(smooth, affine), tmp_path / "rois" / "PROB.nii.gz")
    m = _manifest(tmp_path, "    rois: [rois/NAN.nii.gz, rois/PROB.nii.gz]\n")
    with caplog.at_level(logging.WARNING):
        brain = load_brain(m)
    np.testing.assert_allclose(brain.for_roi("NAN")[0].data, betas[mask.astype(bool)].T)
    assert brain.for_roi("PROB")[0].data.shape == (6, 64)
    assert "PROB.nii.gz: mask values other than 0 and 1 (0.2 to 0.9)" in caplog.text
    assert "NAN.nii.gz: mask values" not in caplog.text


def test_nifti_mask_geometry_warnings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    betas, _ = _nifti_subject(tmp_path)
    # a 2 mm mask whose last two slices along x lie beyond the betas (x = 8, 10 mm)
    shifted = np.diag([2.0, 2.0, 2.0, 1.0])
    shifted[0, 3] = 4.0
    nib.save(
        nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), shifted), tmp_path / "rois" / "EDGE.nii.gz"
    )
    # the betas' shape, but saved with an identity affine (1 mm): resampled, so warned about
    nib.save(
        nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), tmp_path / "rois" / "ID.nii.gz"
    )
    m = _manifest(tmp_path, "    rois: [rois/EDGE.nii.gz, rois/ID.nii.gz]\n")
    with caplog.at_level(logging.WARNING):
        brain = load_brain(m)
    assert "EDGE.nii.gz: 32 of 64 voxels of ROI 'EDGE' (50%) lie outside the field of view" in (
        caplog.text
    )
    np.testing.assert_allclose(brain.for_roi("EDGE")[0].data, betas[2:].reshape(-1, 6).T)
    assert "ID.nii.gz: same shape as" in caplog.text and "another affine" in caplog.text
    assert "ID.nii.gz: 0 of" not in caplog.text  # its 1 mm cube lies inside the betas


def test_nifti_label_table_problems(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _nifti_subject(tmp_path)
    labels = np.zeros((4, 4, 4), dtype=np.int16)
    labels[0] = 1
    nib.save(nib.Nifti1Image(labels, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "atlas.nii.gz")
    m = _manifest(tmp_path, "    labels: atlas.nii.gz\n    labels_tsv: atlas.tsv\n")
    tsv = tmp_path / "atlas.tsv"
    tsv.write_text("index\tname\nV1\tEVC\n")
    with pytest.raises(DataError, match=r"atlas\.tsv: column 'index' must hold integer labels"):
        load_brain(m)
    tsv.write_text("index\tname\n1\tA\n7\tGhost\n")
    with pytest.raises(DataError, match=r"atlas\.tsv: label 7 \('Ghost'\) does not occur in"):
        load_brain(m)
    tsv.write_text("index\tname\n0\tBackground\n1\tA\n")
    with caplog.at_level(logging.WARNING):
        assert load_brain(m).rois == ["A"]
    assert "label 0 is the background" in caplog.text


def test_voxels_constant_across_stimuli_are_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(1)
    patterns = rng.normal(size=(6, 10))
    padded = np.c_[patterns, np.zeros((6, 3)), np.full((6, 1), 7.0)]  # e.g. outside the brain
    path = _h5(tmp_path / "p.h5", "patterns", {"sub": {"A": padded, "Z": np.ones((6, 4))}})
    with pytest.raises(DataError, match=r"/sub/Z: every voxel has the same value"):
        load_brain(path)
    path = _h5(tmp_path / "p.h5", "patterns", {"sub": {"A": padded}})
    with caplog.at_level(logging.WARNING):
        item = load_brain(path).for_roi("A")[0]
    np.testing.assert_array_equal(item.data, patterns)
    assert "dropped 4 of 14 voxel(s) whose value is the same for every stimulus" in caplog.text


def test_nifti_sidecar_ids_and_scaled_label_images(tmp_path: Path) -> None:
    """Integer ids from a Parquet sidecar are ids (not blanks); an int16 atlas saved with a
    scale factor reads back as 1.0000000149 and still matches label 1; absurd indices are
    named."""
    betas, _ = _nifti_subject(tmp_path)
    pd.DataFrame({"stimulus_id": np.arange(101, 107)}).to_parquet(tmp_path / "sub-01" / "b.parquet")
    labels = np.zeros((4, 4, 4), dtype=np.int16)
    labels[0], labels[3] = 1, 2
    image = nib.Nifti1Image((10 * labels).astype(np.int16), np.diag([2.0, 2.0, 2.0, 1.0]))
    image.header.set_slope_inter(0.1, 0)  # 10 x 0.1 reads back as 1.0000000149
    nib.save(image, tmp_path / "atlas.nii.gz")
    assert not np.array_equal(np.asarray(nib.load(tmp_path / "atlas.nii.gz").dataobj), labels)
    pd.DataFrame({"index": [1, 2], "name": ["A", "B"]}).to_csv(
        tmp_path / "atlas.tsv", sep="\t", index=False
    )
    m = _manifest(tmp_path, "    labels: atlas.nii.gz\n    labels_tsv: atlas.tsv\n")
    m.write_text(m.read_text().replace("betas.tsv", "b.parquet"))
    brain = load_brain(m)
    assert brain.for_roi("A")[0].stimulus_ids == [str(i) for i in range(101, 107)]
    np.testing.assert_allclose(brain.for_roi("B")[0].data, betas[3].reshape(-1, 6).T)
    (tmp_path / "atlas.tsv").write_text("index\tname\n1e20\tHuge\n")
    with pytest.raises(DataError, match=r"atlas\.tsv: column 'index' must hold integer labels"):
        load_brain(m)


def test_runs_items_match_by_id_and_average_for_the_rdm() -> None:
    """Patterns kept per repetition (``runs``): ids repeat; matching by id keeps every run of a
    stimulus; the RDM is computed from each stimulus' mean pattern."""
    from object2brain.data.brain import BrainData, BrainItem

    X = _patterns(n=6, v=4)
    item = BrainItem(
        "sub-01", "EVC", "patterns", X, ["a", "b", "a", "b", "c", "c"], "src",
        runs=np.array([1, 1, 2, 2, 1, 2]),
    )  # fmt: skip
    assert BrainData([item]).common_ids(["a", "b", "c"]) == ["a", "b", "c"]
    taken = item.take(["c", "a"])
    assert taken.stimulus_ids == ["c", "c", "a", "a"]
    assert taken.runs is not None and taken.runs.tolist() == [1, 2, 1, 2]
    np.testing.assert_array_equal(taken.data, X[[4, 5, 0, 2]])
    ids, means = taken.mean_patterns()
    assert ids == ["c", "a"]
    np.testing.assert_allclose(means, [(X[4] + X[5]) / 2, (X[0] + X[2]) / 2])
    plain = BrainItem("sub-01", "EVC", "patterns", means, ids, "src")
    np.testing.assert_allclose(
        taken.rdm("correlation", device="cpu").numpy(),
        plain.rdm("correlation", device="cpu").numpy(),
    )


def test_brain_files_lists_the_files_of_published_sources(tmp_path: Path) -> None:
    from object2brain.data.brain import brain_files

    nsd = tmp_path / "nsd"
    design = nsd / "nsddata/experiments/nsd/nsd_expdesign.mat"
    betas = nsd / "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR"
    roi = nsd / "nsddata/ppdata/subj01/func1pt8mm/roi/nsdgeneral.nii.gz"
    things = tmp_path / "betas_csv"
    named = [
        design,
        betas / "betas_session01.hdf5",
        betas / "betas_session02.hdf5",
        roi,
        things / "sub-01_ResponseData.h5",
        things / "sub-01_VoxelMetadata.csv",
        things / "sub-01_StimulusMetadata.csv",
    ]
    for path in named:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    manifest = tmp_path / "brain.yaml"
    manifest.write_text(
        "sources:\n"
        "  - {kind: nsd, root: nsd, subjects: [1], rois: [nsdgeneral]}\n"
        "  - {kind: things_fmri, root: betas_csv, subjects: [1], rois: [V1]}\n"
        "  - {kind: things_fmri, root: betas_csv, subjects: [2], rois: [V1]}\n"  # absent: skipped
    )
    assert sorted(brain_files(manifest)) == sorted([manifest, *named])
