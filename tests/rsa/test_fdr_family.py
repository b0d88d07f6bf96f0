"""FDR families of the alignment tables (``fdr_family``): Benjamini-Hochberg over the rows of
each family, checked against scipy's ``false_discovery_control``."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.stats
from rsa_helpers import write_store

from object2brain.api.rsa import rsa
from object2brain.options import OptionsError
from object2brain.rsa.align import FDR_FAMILIES, AlignmentResult

N = 16
IDS = [f"img{i:02d}" for i in range(N)]


def _run(tmp_path: Path, family: str | None) -> AlignmentResult:
    rng = np.random.default_rng(0)
    stores = []
    for name in ("alpha", "beta"):
        layers = {f"l{k}": rng.normal(size=(N, 6)) for k in range(3)}
        stores.append(write_store(tmp_path / f"{name}.h5", layers, IDS, model=name))
    if not (tmp_path / "brain.h5").exists():
        with h5py.File(tmp_path / "brain.h5", "w") as f:
            f.attrs["kind"] = "patterns"
            f.create_dataset("stimulus_ids", data=np.asarray(IDS, dtype="S"))
            for s in range(3):
                for roi in ("A", "B"):
                    f.create_dataset(f"sub-{s}/{roi}", data=rng.normal(size=(N, 9)))
        pd.DataFrame({"stimulus_id": IDS, "condition": ["x", "y"] * (N // 2)}).to_csv(
            tmp_path / "stimuli.csv", index=False
        )
    return rsa(
        stores, brain=tmp_path / "brain.h5", stimuli=tmp_path / "stimuli.csv", n_perm=99,
        n_boot=20, progress=False, figures=False, fdr_family=family,
    )  # fmt: skip


def _expected(frame: pd.DataFrame, family: list[str], p: str) -> np.ndarray:
    out = np.full(len(frame), np.nan)
    groups = frame.groupby(family, sort=False).groups.values() if family else [frame.index]
    for index in groups:
        values = frame.loc[index, p].to_numpy(np.float64)
        finite = np.isfinite(values)
        adjusted = np.full(values.shape, np.nan)
        adjusted[finite] = scipy.stats.false_discovery_control(values[finite], method="bh")
        out[frame.index.get_indexer(index)] = adjusted
    return out


@pytest.mark.parametrize("family", ["model", "models", "study"])
def test_families_are_bh_over_their_rows(tmp_path: Path, family: str) -> None:
    result = _run(tmp_path, family)
    default = _run(tmp_path, None)
    tables = {
        "alignment": (result.alignment, [("p_perm", "p_fdr")]),
        "condition_contrast": (
            result.condition_contrast, [("p_perm", "p_fdr"), ("p_boot", "p_boot_fdr")]
        ),
        "alignment_group": (result.alignment_group, [("p_t", "p_t_fdr")]),
    }  # fmt: skip
    for name, (frame, pairs) in tables.items():
        assert len(frame) > 0
        for p, adjusted in pairs:
            expected = _expected(frame, FDR_FAMILIES[family][name], p)
            np.testing.assert_allclose(frame[adjusted].to_numpy(), expected, rtol=1e-12)
    # the family changes only the adjusted p-values
    pd.testing.assert_series_equal(result.alignment["p_perm"], default.alignment["p_perm"])
    if family == "model":  # the default
        pd.testing.assert_frame_equal(result.alignment, default.alignment)


def test_unknown_family_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OptionsError, match="fdr_family"):
        _run(tmp_path, "everything")
