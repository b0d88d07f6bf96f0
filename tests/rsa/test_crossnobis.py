"""Cross-validated brain RDMs (crossnobis, cross-validated Euclidean) of run-wise patterns:
equal to rsatoolbox's ``calc_rdm(method='crossnobis', cv_descriptor='runs', noise=...)`` within
1e-9, read from run-wise HDF5 and NIfTI sources, refused without runs (exit 2, nothing written)."""

from __future__ import annotations

from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import rsatoolbox
import torch
from rsa_helpers import write_store
from rsatoolbox.data import Dataset
from rsatoolbox.data.noise import prec_from_measurements

from object2brain.cli import main
from object2brain.data.brain import load_brain
from object2brain.errors import DataError
from object2brain.rsa.rdm import crossvalidated_rdm, upper_triangle

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _runwise(
    seed: int, n: int = 8, runs: int = 4, voxels: int = 15
) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Run-wise patterns ``(n * runs, voxels)`` with correlated noise, each run in its own
    random stimulus order: (patterns, ids, runs, true means)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(n, voxels))
    mixing = rng.normal(size=(voxels, voxels)) / np.sqrt(voxels)
    ids = [f"s{i:02d}" for i in range(n)]
    rows, row_ids, row_runs = [], [], []
    for run in range(runs):
        for i in rng.permutation(n):
            rows.append(means[i] + rng.normal(size=voxels) @ mixing)
            row_ids.append(ids[i])
            row_runs.append(run + 1)
    return np.asarray(rows), row_ids, np.asarray(row_runs), means


def _rsatoolbox(patterns: np.ndarray, ids: list[str], runs: np.ndarray, noise: bool) -> object:
    data = Dataset(patterns, obs_descriptors={"stimulus": ids, "runs": runs})
    precision = (
        prec_from_measurements(data, obs_desc="stimulus", method="shrinkage_diag")
        if noise
        else None
    )
    return rsatoolbox.rdm.calc_rdm(
        data, method="crossnobis", descriptor="stimulus", cv_descriptor="runs", noise=precision
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["crossnobis", "crossvalidated_euclidean"])
@pytest.mark.parametrize(("seed", "runs"), [(0, 2), (1, 4), (2, 6)])
def test_equals_rsatoolbox(method: str, seed: int, runs: int, device: str) -> None:
    patterns, ids, run_labels, _ = _runwise(seed, runs=runs)
    ref = _rsatoolbox(patterns, ids, run_labels, noise=method == "crossnobis")
    order = list(ref.pattern_descriptors["stimulus"])  # type: ignore[attr-defined]
    ours = crossvalidated_rdm(patterns, ids, run_labels, order, method, device)
    expected = ref.get_vectors()[0]  # type: ignore[attr-defined]
    np.testing.assert_allclose(upper_triangle(ours).cpu().numpy(), expected, rtol=0, atol=1e-9)


def test_unbiased_where_the_plain_distance_is_not() -> None:
    # Two stimuli with the same true pattern (0) and independent noise in each run: the
    # cross-validated distance is 0 on average, the distance of the noisy mean patterns is not.
    cv, plain = [], []
    ids = ["a", "b"] * 3
    runs = np.repeat([1, 2, 3], 2)
    for seed in range(60):
        patterns = np.random.default_rng(seed).normal(size=(6, 10))
        rdm = crossvalidated_rdm(patterns, ids, runs, ["a", "b"], "crossvalidated_euclidean")
        cv.append(float(rdm[0, 1]))
        means = patterns.reshape(3, 2, 10).mean(axis=0)
        plain.append(float(((means[0] - means[1]) ** 2).mean()))
    assert abs(np.mean(cv)) < 3 * np.std(cv) / np.sqrt(len(cv))
    assert np.mean(plain) > 10 * np.std(plain) / np.sqrt(len(plain))


def _write_runwise_h5(path: Path, seed: int = 0, *, with_runs: bool = True) -> list[str]:
    patterns, ids, runs, _ = _runwise(seed)
    with h5py.File(path, "w") as f:
        f.attrs["kind"] = "patterns"
        f.create_dataset(
            "stimulus_ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype()
        )
        if with_runs:
            f.create_dataset("runs", data=np.asarray([f"run-{r}" for r in runs], dtype="S"))
        f.create_dataset("sub-01/EVC", data=patterns)
        f.create_dataset("sub-02/EVC", data=patterns[::-1] * 1.5)
    return ids


def test_runwise_h5_item_rdm(tmp_path: Path) -> None:
    _write_runwise_h5(tmp_path / "brain.h5")
    patterns, ids, runs, _ = _runwise(0)
    brain = load_brain(tmp_path / "brain.h5")
    item = brain.for_roi("EVC")[0]
    assert item.runs is not None and sorted(set(item.runs.tolist())) == [0, 1, 2, 3]
    order = sorted(set(ids))
    aligned = brain.aligned(order).for_roi("EVC")[0]
    got = aligned.rdm(brain_rdm="crossnobis", device="cpu")
    ref = _rsatoolbox(patterns, ids, runs, noise=True).get_vectors()[0]  # type: ignore[attr-defined]
    np.testing.assert_allclose(upper_triangle(got).numpy(), ref, rtol=1e-11, atol=1e-12)


def test_nifti_run_column(tmp_path: Path) -> None:
    patterns, ids, runs, _ = _runwise(3, n=5, runs=3, voxels=8)
    affine = np.eye(4)
    betas = np.zeros((2, 2, 2, len(ids)), dtype=np.float32)
    betas.reshape(8, len(ids))[:] = patterns.T
    (tmp_path / "sub-01").mkdir()
    nib.save(nib.Nifti1Image(betas, affine), tmp_path / "sub-01" / "betas.nii.gz")
    pd.DataFrame({"stimulus_id": ids, "run": runs}).to_csv(
        tmp_path / "sub-01" / "betas.tsv", sep="\t", index=False
    )
    nib.save(nib.Nifti1Image(np.ones((2, 2, 2), dtype=np.uint8), affine), tmp_path / "V1.nii.gz")
    manifest = tmp_path / "brain.yaml"
    manifest.write_text(
        "sources:\n  - kind: nifti\n    subject: sub-01\n    betas: sub-01/betas.nii.gz\n"
        "    stimuli: sub-01/betas.tsv\n    rois: [V1.nii.gz]\n"
    )
    item = load_brain(manifest).items[0]
    assert item.runs is not None and item.data.shape == (15, 8)
    got = item.rdm(brain_rdm="crossvalidated_euclidean", device="cpu")
    order = list(dict.fromkeys(item.stimulus_ids))
    stored = item.data  # float32 betas, as read
    ref = _rsatoolbox(stored, item.stimulus_ids, item.runs, noise=False)
    ref_square = ref.get_matrices()[0]  # type: ignore[attr-defined]
    index = [list(ref.pattern_descriptors["stimulus"]).index(s) for s in order]  # type: ignore[attr-defined]
    np.testing.assert_allclose(
        got.numpy(), ref_square[np.ix_(index, index)], rtol=1e-11, atol=1e-12
    )
    # a stimulus twice in one run is refused, naming the file
    pd.DataFrame({"stimulus_id": ids, "run": [1] * len(ids)}).to_csv(
        tmp_path / "sub-01" / "betas.tsv", sep="\t", index=False
    )
    with pytest.raises(DataError, match=r"betas\.tsv: stimulus id\(s\) repeated within a run"):
        load_brain(manifest)


def test_missing_run_of_a_stimulus_is_named() -> None:
    patterns, ids, runs, _ = _runwise(4, n=5, runs=3)
    keep = ~((np.asarray(ids) == "s02") & (runs == 2))
    with pytest.raises(DataError, match=r"'s02' in run 2"):
        crossvalidated_rdm(
            patterns[keep], list(np.asarray(ids)[keep]), runs[keep], sorted(set(ids))
        )


def test_without_runs_a_clear_error(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "brain.h5", "w") as f:
        f.attrs["kind"] = "patterns"
        ids = [f"s{i:02d}" for i in range(6)]
        f.create_dataset("stimulus_ids", data=np.asarray(ids, dtype="S"))
        f.create_dataset("sub-01/EVC", data=np.random.default_rng(0).normal(size=(6, 5)))
    item = load_brain(tmp_path / "brain.h5").items[0]
    with pytest.raises(DataError, match="needs run-wise patterns"):
        item.rdm(brain_rdm="crossnobis")


def test_cli_brain_rdm_without_runs_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = [f"s{i:02d}" for i in range(8)]
    rng = np.random.default_rng(0)
    store = write_store(tmp_path / "acts.h5", {"fc": rng.normal(size=(8, 6))}, ids)
    with h5py.File(tmp_path / "brain.h5", "w") as f:
        f.attrs["kind"] = "patterns"
        f.create_dataset("stimulus_ids", data=np.asarray(ids, dtype="S"))
        f.create_dataset("sub-01/EVC", data=rng.normal(size=(8, 5)))
    out = tmp_path / "out"
    argv = ["rsa", "--activations", str(store), "--brain", str(tmp_path / "brain.h5")]
    argv += ["--out", str(out), "--brain-rdm", "crossnobis", "--n-perm", "0", "--n-boot", "0"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "needs run-wise patterns" in err and "sub-01" in err and "EVC" in err
    assert not out.exists() or not any(out.iterdir())


def test_rsa_with_crossnobis_brain_rdms(tmp_path: Path) -> None:
    from object2brain.api.rsa import rsa

    ids = _write_runwise_h5(tmp_path / "brain.h5")
    order = sorted(set(ids))
    rng = np.random.default_rng(1)
    store = write_store(tmp_path / "acts.h5", {"fc": rng.normal(size=(8, 6))}, order)
    result = rsa(
        store, brain=tmp_path / "brain.h5", brain_rdm="crossnobis", n_perm=20, n_boot=0,
        progress=False, figures=False, compare_method="cosine_cov",
    )  # fmt: skip
    table = result.alignment
    assert set(table["compare_method"]) == {"cosine_cov"}
    assert table["r"].between(-1, 1).all()
    assert table["p_perm"].between(0, 1).all()
