"""``o2b.rsa`` with ``executor="ray"`` writes the alignment tables of a local run: p-values
identical, r within 1e-12, with 1 and 2 workers (the Mantel permutation blocks run as Ray
tasks), and ``--executor ray`` on the command line."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import h5py
import numpy as np
import pandas as pd

from object2brain.api.rsa import rsa
from object2brain.cli import main

N = 16
IDS = [f"img{i:02d}" for i in range(N)]


def _study(tmp_path: Path) -> dict[str, Path]:
    """A store of 3 layers (layer1 planted in the ratings) and 3 raters, in two conditions."""
    rng = np.random.default_rng(1)
    layers = {f"layer{k}": rng.normal(size=(N, 6)).astype(np.float32) for k in range(3)}
    store = tmp_path / "acts.h5"
    with h5py.File(store, "w") as f:
        f.create_dataset("stimulus_ids", data=np.asarray(IDS, dtype=object),
                         dtype=h5py.string_dtype())  # fmt: skip
        group = f.create_group("layers")
        for name, values in layers.items():
            group.create_dataset(name, data=values)
        f.attrs.update({"model": "tiny", "arch": "tiny", "weights": "none",
                        "weights_sha256": "none", "preprocessing": "{}",
                        "object2brain_version": "0.1.0", "order": json.dumps(list(layers)),
                        "complete": True})  # fmt: skip
    signal = layers["layer1"][:, 0].astype(np.float64)
    ratings = pd.DataFrame(
        [
            {"subject": f"r{s}", "stimulus_id": sid, "valence": v + rng.normal()}
            for s in range(3)
            for sid, v in zip(IDS, signal, strict=True)
        ]
    )
    ratings.to_csv(tmp_path / "ratings.csv", index=False)
    conditions = ["congruent", "incongruent"] * (N // 2)
    pd.DataFrame({"stimulus_id": IDS, "path": "x.jpg", "condition": conditions}).to_csv(
        tmp_path / "stimuli.csv", index=False
    )
    return {
        "store": store,
        "ratings": tmp_path / "ratings.csv",
        "stimuli": tmp_path / "stimuli.csv",
    }


def _run(files: dict[str, Path], **extra: object) -> pd.DataFrame:
    options: dict[str, object] = {"n_perm": 2500, "n_boot": 20, **extra}
    result = rsa(files["store"], ratings=files["ratings"], stimuli=files["stimuli"],
                 device="cpu", progress=False, seed=3, **options)  # type: ignore[arg-type]  # fmt: skip
    return result.alignment


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0
    np.testing.assert_array_equal(a["p_perm"].to_numpy(), b["p_perm"].to_numpy())
    np.testing.assert_allclose(a["r"].to_numpy(), b["r"].to_numpy(), rtol=0, atol=1e-12)
    rest = [c for c in a.columns if c not in ("r", "p_perm")]
    pd.testing.assert_frame_equal(a[rest], b[rest], check_exact=False, rtol=0, atol=1e-12)


def test_alignment_on_ray_equals_local(ray_cluster: ModuleType, tmp_path: Path) -> None:
    files = _study(tmp_path)
    local = _run(files)
    assert (local["p_perm"] < 0.05).any()  # the planted layer is found: not a trivial table
    remote = _run(files, executor="ray")  # 2 workers (one task per CPU of the cluster)
    _same(remote, local)


def test_cli_executor_ray(ray_cluster: ModuleType, tmp_path: Path) -> None:
    files = _study(tmp_path)
    local = _run(files)
    out = tmp_path / "out"
    args = ["rsa", "--activations", str(files["store"]), "--ratings", str(files["ratings"]),
            "--stimuli", str(files["stimuli"]), "--out", str(out), "--n-perm", "2500",
            "--n-boot", "20", "--seed", "3", "--device", "cpu", "--quiet",
            "--executor", "ray"]  # fmt: skip
    main(args)
    _same(pd.read_csv(out / "alignment.csv"), local.reset_index(drop=True))


def test_within_pairs_on_ray_equals_local(ray_cluster: ModuleType, tmp_path: Path) -> None:
    """``--pairs within``: the stratified permutation blocks (3) and resample chunks (3) run as
    Ray tasks; the table equals the local one (``p_perm``, ``ci_low``, ``ci_high`` exactly)."""
    files = _study(tmp_path)
    local = _run(files, pairs="within", n_boot=601)
    remote = _run(files, pairs="within", n_boot=601, executor="ray")
    _same(remote, local)
    rows = local["condition"] == "all"
    assert rows.any() and np.isfinite(local.loc[rows, "ci_low"]).all()
    np.testing.assert_array_equal(remote["ci_low"].to_numpy(), local["ci_low"].to_numpy())
