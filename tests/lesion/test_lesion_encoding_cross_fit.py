"""Cross-fitted selection of the encoding lesion (``lesion --analysis encoding --selection``):
``same`` unchanged, ``cross_fit`` equal to a brute force (groups of fold ``k`` zeroed in the
features, the per-ROI out-of-fold ridge fit, Pearson on fold ``k``'s stimuli, fold-size
weighted mean over folds, nulls combined draw by draw)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from object2brain.activations.store import ActivationStore
from object2brain.data.splits import condition_folds
from object2brain.encoding.folds import outer_folds
from object2brain.encoding.ridge import fit_ridge_cv
from object2brain.encoding.scores import pearson_r
from object2brain.lesion.analysis import (
    FilterTable,
    fold_seed_shift,
    load_filter_table,
    null_interval,
    null_p_z,
    null_subset_masks,
)
from object2brain.lesion.encoding import EncodingLesionData, compute_encoding_lesion
from object2brain.options import EncodeOptions, LesionOptions, Runtime

N, K = 36, 10
SEED = 3
ENCODE = EncodeOptions(folds=3, inner_folds=3, alphas=[1.0, 100.0, 1e4], n_perm=0)
ALL_IMAGES = {"G1": [0, 1, 2], "G2": [3, 4, 5]}
#: The groups assigned without each selection fold's stimuli (G3 only in fold 1).
PER_FOLD = [{"G1": [0, 1, 2], "G2": [3, 4, 5]}, {"G1": [0, 1, 7], "G2": [3, 4], "G3": [9]}]
IDS = [f"s{i:02d}" for i in range(N)]
CONDITIONS = ["a" if i % 2 else "b" for i in range(N)]
#: Recorded selection folds (each condition split evenly).
FOLD_OF = np.array([(i // 2) % 2 for i in range(N)])


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, EncodingLesionData]:
    rng = np.random.default_rng(5)
    path = tmp_path_factory.mktemp("xfit") / "acts.h5"
    x = rng.gamma(2.0, size=(N, K, 2, 1))
    with h5py.File(path, "w") as handle:
        handle["stimulus_ids"] = np.array(IDS, dtype=object)
        handle.create_group("layers")["conv"] = x.astype(np.float32)
        handle.attrs.update(complete=True, order=json.dumps(["conv"]), model="toy", arch="toy")
    features = x.astype(np.float32).astype(np.float64).reshape(N, K, -1)
    flat = features.reshape(N, -1)
    responses = {
        ("A", f"sub-0{s}"): flat[:, :6] @ rng.normal(size=(6, 5)) + rng.normal(size=(N, 5))
        for s in (1, 2)
    }
    return path, features, EncodingLesionData(IDS, responses, CONDITIONS)


def _table(folds: bool) -> pd.DataFrame:
    def rows(groups: dict[str, list[int]], fold: float) -> list[dict[str, object]]:
        owner = {f: g for g, members in groups.items() for f in members}
        return [
            {"model": "toy", "layer": "conv", "filter": f, "group": owner.get(f, "Objects"),
             "assigned": f in owner, "fold": fold}
            for f in range(K)
        ]  # fmt: skip

    out = rows(ALL_IMAGES, np.nan)
    if folds:
        out += [row for k, groups in enumerate(PER_FOLD) for row in rows(groups, k)]
    return pd.DataFrame(out)


def _run(case: tuple[Path, np.ndarray, EncodingLesionData], filters: FilterTable,
         **options: object) -> pd.DataFrame:  # fmt: skip
    path, _, data = case
    with ActivationStore.open(path) as store:
        return compute_encoding_lesion(
            [store], filters, data, LesionOptions(**options), ENCODE, Runtime(seed=SEED)
        )


def _recorded() -> FilterTable:
    folds = pd.DataFrame({"stimulus_id": IDS, "fold": FOLD_OF})
    return FilterTable(_table(True), "filter table", folds, "folds.csv")


COLUMNS = ["r_full", "r_variant", "delta_r", "p_null", "z_null", "null_low", "null_high"]


def test_same_is_the_previous_output(
    case: tuple[Path, np.ndarray, EncodingLesionData],
) -> None:
    """Numbers of the encoding lesion before cross-fitting existed (bit-identical on the
    machine that recorded them): ``same`` on a table with per-fold rows, and ``cross_fit`` on
    one without them (falls back to ``same``)."""
    expected = {
        "r_full": [0.60796318766] * 6,
        "r_variant": [-0.011506876818, 0.681449382517, 0.606830160798, 0.034746456057,
                      0.661268687231, -0.043920255307],
        "delta_r": [-0.619470064478, 0.073486194857, -0.001133026862, -0.573216731603,
                    0.053305499571, -0.651883442968],
        "p_null": [0.047619047619, 0.047619047619, 0.47619047619, 0.47619047619,
                   0.142857142857, 0.047619047619],
        "z_null": [-3.21910726373, 2.86856414108, 1.049638616797, -1.003412497586,
                   1.478809252278, -1.638244383557],
        "null_low": [-0.405946046066, -0.647502201354, -0.405946046066, -0.647502201354,
                     -0.530130515542, -0.621430449737],
        "null_high": [0.038572265801, -0.12845168252, 0.038572265801, -0.12845168252,
                      0.033870302649, -0.050954345853],
    }  # fmt: skip
    sums = {"r_full": 33.201107653369, "r_variant": 17.592754689281,
            "delta_r": -15.608352964088, "p_null": 10.47619047619, "z_null": -4.066551287704,
            "null_low": -29.767263240365, "null_high": -1.417435905174,
            "p_fdr": 12.619047619048}  # fmt: skip
    for table in (
        _run(case, _recorded(), n_null=20, selection="same"),
        _run(case, load_filter_table(_table(False)), n_null=20, selection="cross_fit"),
    ):
        assert len(table) == 54 and set(table["selection"]) == {"same"}
        rows = table[(table["subject"] == "group") & (table["condition"] == "all")]
        assert rows[["group", "variant"]].values.tolist() == [
            [g, v] for g in ("G1", "G2", "unassigned") for v in ("lesion", "keep")
        ]
        for column, values in expected.items():
            assert rows[column].to_numpy() == pytest.approx(values, abs=1e-11), column
        for column, total in sums.items():
            assert table[column].sum() == pytest.approx(total, abs=1e-10), column


def _brute_force(
    case: tuple[Path, np.ndarray, EncodingLesionData], n_null: int
) -> dict[tuple[str, str, str, str], tuple[float, ...]]:
    """(group, variant, subject, condition) -> r_full, r_variant, delta_r, p_null, z_null,
    null_low, null_high, computed the slow way."""
    _, features, data = case
    labels = np.asarray(CONDITIONS, dtype=object)
    outer = outer_folds(N, ENCODE.folds, seed=SEED, conditions=labels)
    fits = {
        roi: fit_ridge_cv(
            features.reshape(N, -1), y, outer, alphas=ENCODE.alphas,
            inner_folds=ENCODE.inner_folds, seed=SEED, standardize=ENCODE.standardize,
            keep_weights=True,
        )
        for roi, y in data.responses.items()
    }  # fmt: skip
    groups = []
    for fold in PER_FOLD:
        taken = {f for members in fold.values() for f in members}
        groups.append(fold | {"unassigned": [f for f in range(K) if f not in taken]})

    def mean_r(mask: np.ndarray, rows: np.ndarray) -> dict[str, float]:
        """Subject -> mean r over voxels on ``rows``, plus the mean over subjects."""
        out = {}
        for (_, subject), fit in fits.items():
            masked = (features * mask[None, :, None]).reshape(N, -1)
            predicted = fit.predict(masked)
            out[subject] = float(np.nanmean(pearson_r(data.responses[("A", subject)][rows],
                                                      predicted[rows])))  # fmt: skip
        out["group"] = float(np.mean(list(out.values())))
        return out

    expected = {}
    conditions = {"all": np.ones(N, dtype=bool), "a": labels == "a", "b": labels == "b"}
    for condition, in_condition in conditions.items():
        tests = [in_condition & (k == FOLD_OF) for k in range(2)]
        sizes = np.array([t.sum() for t in tests], dtype=float)
        full = [mean_r(np.ones(K, dtype=bool), t) for t in tests]
        for group in ("G1", "G2", "G3", "unassigned"):
            for variant in ("lesion", "keep"):
                folds = [k for k in range(2) if group in groups[k]]
                weights = sizes[folds] / sizes[folds].sum()
                parts = {}
                for k in folds:
                    members = np.array(groups[k][group])
                    mask = np.full(K, variant == "lesion")
                    mask[members] = variant == "keep"
                    draws = null_subset_masks(
                        K, members, None, n_null, SEED + fold_seed_shift(k), variant
                    )
                    parts[k] = (mean_r(mask, tests[k]), [mean_r(d, tests[k]) for d in draws])
                for subject in ("sub-01", "sub-02", "group"):
                    pairs = list(zip(weights, folds, strict=True))
                    r_full = sum(w * full[k][subject] for w, k in pairs)
                    r_variant = sum(w * parts[k][0][subject] for w, k in pairs)
                    null = np.array([
                        sum(w * (parts[k][1][d][subject] - full[k][subject])
                            for w, k in pairs)
                        for d in range(n_null)
                    ])[:, None]  # fmt: skip
                    delta = np.array([r_variant - r_full])
                    p, z = null_p_z(delta, null)
                    low, high = null_interval(null, 1)
                    expected[(group, variant, subject, condition)] = (
                        r_full,
                        r_variant,
                        r_variant - r_full,
                        p[0],
                        z[0],
                        low[0],
                        high[0],
                    )
    return expected


def test_cross_fit_equals_a_brute_force(
    case: tuple[Path, np.ndarray, EncodingLesionData],
) -> None:
    n_null = 4
    table = _run(case, _recorded(), n_null=n_null, selection="cross_fit")
    expected = _brute_force(case, n_null)
    assert set(table["selection"]) == {"cross_fit"}
    assert len(table) == len(expected) == 4 * 2 * 3 * 3
    got = table.set_index(["group", "variant", "subject", "condition"]).sort_index()
    for key, values in expected.items():
        assert got.loc[key, COLUMNS].to_numpy(dtype=float) == pytest.approx(
            np.array(values), abs=1e-10, nan_ok=True
        ), key
    # a group found in one fold only is measured on that fold's stimuli alone
    assert (got.loc["G3", "n_filters"] == 1).all()
    assert (got.loc["G2", "n_filters"] == 2).all()  # round(weighted mean of 3 and 2)


def test_cross_fit_redraws_unrecorded_folds_as_the_rsa_lesion(
    case: tuple[Path, np.ndarray, EncodingLesionData],
) -> None:
    """Without ``folds.csv`` the selection folds are drawn again (condition-stratified, the
    run's seed), as the RSA lesion does; with those folds recorded the rows are the same."""
    redrawn = _run(case, load_filter_table(_table(True)), n_null=3, selection="cross_fit")
    drawn = condition_folds(CONDITIONS, N, 2, seed=SEED)
    folds = pd.DataFrame({"stimulus_id": IDS, "fold": drawn})
    recorded = _run(
        case, FilterTable(_table(True), "t", folds, "folds.csv"), n_null=3, selection="cross_fit"
    )
    assert set(redrawn["selection"]) == {"cross_fit"}
    pd.testing.assert_frame_equal(redrawn, recorded)


def test_cross_fit_null_keeps_alpha_and_finds_a_planted_group(tmp_path: Path) -> None:
    """Reduced calibration (full run: validation/encoding_lesion_cross_fit.py, 1,000 datasets):
    random per-fold groups reject at most 6 of 40 times at 0.05 (P < 0.004 under a calibrated
    test), a planted group is found in 4 of 4."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "validation"))
    from encoding_lesion_cross_fit import dataset_p

    null = [dataset_p(i, 40, 12, 10, 4, 99, False, tmp_path) for i in range(40)]
    for variant in ("lesion", "keep"):
        assert sum(d[variant] <= 0.05 for d in null) <= 6, variant
    planted = [dataset_p(i, 40, 12, 10, 4, 99, True, tmp_path) for i in range(4)]
    assert all(d["lesion"] <= 0.05 for d in planted)


def test_fallback_to_same_leaves_a_manifest_note(
    case: tuple[Path, np.ndarray, EncodingLesionData],
) -> None:
    path, _, data = case
    notes: list[str] = []
    with ActivationStore.open(path) as store:
        table = compute_encoding_lesion(
            [store], load_filter_table(_table(False)), data, LesionOptions(n_null=2), ENCODE,
            Runtime(seed=SEED), notes=notes,
        )  # fmt: skip
    assert set(table["selection"]) == {"same"}
    assert len(notes) == 1 and "toy/conv" in notes[0] and "selection = same" in notes[0]
