"""``rdms.h5`` (every RDM of an alignment) and its export to rsatoolbox's own file format."""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from rsa_helpers import write_store

from object2brain.api.rdms import export_rsatoolbox, load_rdms, to_rsatoolbox
from object2brain.api.rsa import rsa
from object2brain.cli import main
from object2brain.errors import DataError
from object2brain.rdm_file import RDM_FILE, Rdm, RdmSet, read_rdm_file, write_rdm_file

N = 18
IDS = [f"img{i:02d}" for i in range(N)]


def _study(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(1)
    layers = {f"layer{k}": rng.normal(size=(N, 3, 4)).astype(np.float32) for k in range(3)}
    write_store(tmp_path / "acts.h5", layers, IDS, model="tiny")
    with h5py.File(tmp_path / "patterns.h5", "w") as f:
        f.attrs["kind"] = "patterns"
        f.create_dataset("stimulus_ids", data=np.asarray(IDS, dtype=object),
                         dtype=h5py.string_dtype())  # fmt: skip
        for s in range(3):
            f.create_dataset(f"sub-{s}/AMY", data=rng.normal(size=(N, 30)))
            f.create_dataset(f"sub-{s}/V1", data=rng.normal(size=(N, 25)))
    rows = [(f"r{s}", sid, float(rng.normal())) for s in range(3) for sid in IDS]
    ratings = pd.DataFrame(rows, columns=["subject", "stimulus_id", "valence"])
    ratings.to_csv(tmp_path / "ratings.csv", index=False)
    pd.DataFrame(
        {"stimulus_id": IDS, "path": "x.jpg", "condition": ["a", "b", "c"] * (N // 3)}
    ).to_csv(tmp_path / "stimuli.csv", index=False)
    return {
        "store": tmp_path / "acts.h5",
        "brain": tmp_path / "patterns.h5",
        "ratings": tmp_path / "ratings.csv",
        "stimuli": tmp_path / "stimuli.csv",
    }


def _run(tmp_path: Path, **kwargs: object) -> Path:
    files = _study(tmp_path)
    out = tmp_path / "rsa"
    rsa(files["store"], brain=files["brain"], ratings=files["ratings"], stimuli=files["stimuli"],
        out=out, n_perm=10, n_boot=5, progress=False, **kwargs)  # type: ignore[arg-type]  # fmt: skip
    return out


def test_round_trip_keeps_order_names_and_attributes(tmp_path: Path) -> None:
    ids = ["a", "b", "c", "d"]
    rng = np.random.default_rng(0)
    rdms = RdmSet(
        ids,
        [
            Rdm("model", "m", "conv/1", rng.random(6), {"layer_index": 3, "metric": "cosine"}),
            Rdm("brain", "AMY", "sub-01", rng.random(6), {"n_voxels": 40}),
            Rdm("behaviour", "behavior", "group", rng.random(6)),
            Rdm("model", "m", "a_layer", rng.random(6)),
        ],
        ["x", "x", "y", ""],
        np.array([0.5, np.nan, -1.0, 2.0]),
        {"rdm_metric": "cosine"},
    )
    back = read_rdm_file(write_rdm_file(tmp_path / RDM_FILE, rdms))
    assert back.stimulus_ids == ids and back.conditions == ["x", "x", "y", ""]
    np.testing.assert_array_equal(back.valence, rdms.valence)
    assert [(r.kind, r.name, r.label) for r in back.rdms] == [
        (r.kind, r.name, r.label) for r in rdms.rdms
    ]
    for a, b in zip(back.rdms, rdms.rdms, strict=True):
        np.testing.assert_array_equal(a.vector, b.vector)
        assert dict(a.attrs) == dict(b.attrs)
    assert back.attrs["rdm_metric"] == "cosine"
    with h5py.File(tmp_path / RDM_FILE) as f:
        assert "model/m/conv%2F1" in f  # a '/' in a name does not nest groups


def test_wrong_length_is_refused(tmp_path: Path) -> None:
    bad = RdmSet(["a", "b", "c"], [Rdm("model", "m", "l", np.zeros(4))])
    with pytest.raises(ValueError, match="need 3"):
        write_rdm_file(tmp_path / "x.h5", bad)


def test_rsa_writes_every_rdm_it_used(tmp_path: Path) -> None:
    out = _run(tmp_path)
    rdms = read_rdm_file(out / RDM_FILE)
    assert rdms.stimulus_ids == IDS
    assert rdms.conditions == ["a", "b", "c"] * (N // 3)
    keys = {(r.kind, r.name, r.label) for r in rdms.rdms}
    assert {("model", "tiny", f"layer{k}") for k in range(3)} <= keys
    for roi in ("AMY", "V1"):
        assert {("brain", roi, f"sub-{s}") for s in range(3)} | {("brain", roi, "group")} <= keys
    assert {("behaviour", "behavior", f"r{s}") for s in range(3)} <= keys
    assert ("behaviour", "behavior", "group") in keys
    amy = rdms.get("brain", "AMY", "sub-1")
    assert amy.attrs["n_voxels"] == 30 and amy.attrs["roi"] == "AMY"
    assert rdms.get("model", "tiny", "layer2").attrs["layer_index"] == 2
    assert rdms.get("brain", "V1", "group").attrs["pooled_on"] == "spearman"
    manifest = (out / "manifest.json").read_text()
    assert RDM_FILE in manifest
    assert (out / "figures" / "rdms_AMY.png").is_file()
    assert (out / "figures" / "mds_behavior.png").is_file()


def test_save_rdms_false_writes_none(tmp_path: Path) -> None:
    out = _run(tmp_path, save_rdms=False)  # type: ignore[arg-type]
    assert (out / "alignment.csv").is_file() and not (out / RDM_FILE).exists()
    with pytest.raises(DataError, match=r"no rdms\.h5"):
        load_rdms(out)


def test_export_equals_rsatoolbox_calc_rdm(tmp_path: Path) -> None:
    """The exported set, loaded by rsatoolbox, equals the RDMs rsatoolbox computes itself from
    the same activations and patterns (1e-9), with the stimulus ids and descriptors."""
    rsatoolbox = pytest.importorskip("rsatoolbox")
    out = _run(tmp_path)
    target = tmp_path / "exported.hdf5"
    main(["export-rsatoolbox", str(out), str(target)])
    loaded = rsatoolbox.rdm.load_rdm(str(target))
    assert list(loaded.pattern_descriptors["stimulus_id"]) == IDS
    desc = {key: np.asarray(values) for key, values in loaded.rdm_descriptors.items()}
    with h5py.File(tmp_path / "acts.h5") as f:
        for k in range(3):
            data = rsatoolbox.data.Dataset(f[f"layers/layer{k}"][()].reshape(N, -1).astype(float))
            expected = rsatoolbox.rdm.calc_rdm(data, method="correlation").get_vectors()[0]
            (row,) = np.flatnonzero((desc["model"] == "tiny") & (desc["layer"] == f"layer{k}"))
            assert desc["layer_index"][row] == k and desc["kind"][row] == "model"
            np.testing.assert_allclose(loaded.get_vectors()[row], expected, rtol=0, atol=1e-9)
    with h5py.File(tmp_path / "patterns.h5") as f:
        for s in range(3):
            for roi in ("AMY", "V1"):
                data = rsatoolbox.data.Dataset(f[f"sub-{s}/{roi}"][()])
                expected = rsatoolbox.rdm.calc_rdm(data, method="correlation").get_vectors()[0]
                match = (desc["roi"] == roi) & (desc["subject"] == f"sub-{s}")
                (row,) = np.flatnonzero(match)
                np.testing.assert_allclose(loaded.get_vectors()[row], expected, rtol=0, atol=1e-9)
                assert desc["n_voxels"][row] == f[f"sub-{s}/{roi}"].shape[1]
    assert loaded.dissimilarity_measure == "correlation"
    assert loaded.n_rdm == len(read_rdm_file(out / RDM_FILE).rdms)
    only_models = to_rsatoolbox(out, kind="model")
    assert only_models.n_rdm == 3


def test_export_without_rsatoolbox_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _run(tmp_path)
    monkeypatch.setitem(sys.modules, "rsatoolbox.rdm", None)
    with pytest.raises(DataError, match="pip install rsatoolbox"):
        export_rsatoolbox(out, tmp_path / "x.hdf5")
    assert not (tmp_path / "x.hdf5").exists()


def test_report_shows_rdm_panels_when_rdms_are_written(tmp_path: Path) -> None:
    from object2brain.report.build import build_report

    out = _run(tmp_path)
    page = build_report(out).read_text()
    assert "RDMs and MDS" in page
    assert page.count("<figure>") >= page.count('alt="RDMs: ') > 0
    for target in ("AMY", "V1", "behavior"):
        assert f"RDMs: {target} and its best layer" in page
        assert f"MDS: {target} and its best layer" in page


def test_stimulus_order_and_classical_mds() -> None:
    from object2brain.report.figures.rdms import classical_mds, stimulus_order

    rdms = RdmSet(["a", "b", "c", "d"], [], ["y", "x", "y", "x"], np.array([2.0, 1.0, -1.0, 0.0]))
    assert stimulus_order(rdms).tolist() == [2, 0, 3, 1]  # condition y first, then valence
    points = np.random.default_rng(0).normal(size=(6, 2))
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    coords = classical_mds(distances)
    recovered = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    np.testing.assert_allclose(recovered, distances, atol=1e-9)  # Euclidean: exact
