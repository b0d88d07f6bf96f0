"""compute_encoding: tables, planted truth, lesion predictions, bad input, the null."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from object2brain.encoding import (
    ENCODING_BAND_COLUMNS,
    ENCODING_COLUMNS,
    ENCODING_VOXEL_COLUMNS,
    EncodingResult,
    compute_encoding,
    predict_with_filters,
)
from object2brain.encoding.scores import pearson_r
from object2brain.errors import DataError
from object2brain.options import EncodeOptions, OptionsError, Runtime, resolve_options

N = 60
GROUP = np.array([True, True, True, False, False, False, False, False])  # planted filters of l2
RUNTIME = Runtime(seed=1, device="cpu", progress=False)


def _ids(n: int = N) -> list[str]:
    return [f"s{i:02d}" for i in range(n)]


@pytest.fixture(scope="module")
def study() -> dict[str, object]:
    rng = np.random.default_rng(7)
    features = {name: rng.standard_normal((N, 8, 2, 2)) for name in ("l1", "l2", "l3")}
    planted = features["l2"][:, GROUP].reshape(N, -1)
    signal = planted @ rng.standard_normal((planted.shape[1], 12))
    roi = signal + 0.7 * signal.std() * rng.standard_normal(signal.shape)
    responses = {("roi", "sub-01"): roi, ("noise", "sub-01"): rng.standard_normal((N, 9))}
    runs = {("roi", "sub-01"): roi[None] + rng.standard_normal((4, N, 12))}
    coords = {("roi", "sub-01"): np.arange(36).reshape(12, 3)}
    conditions = np.array(["a", "b"] * (N // 2))
    result = compute_encoding(
        features,
        responses,
        EncodeOptions(n_perm=400, banded=["l1", "l2"], n_iter=10, keep_weights=True),
        RUNTIME,
        stimulus_ids=_ids(),
        model="net",
        conditions=conditions,
        runs=runs,
        voxel_coords=coords,
    )
    return {"features": features, "responses": responses, "result": result}


def test_tables_have_their_columns_and_rows(study: dict[str, object]) -> None:
    result = study["result"]
    assert isinstance(result, EncodingResult)
    assert tuple(result.encoding.columns) == ENCODING_COLUMNS
    assert tuple(result.encoding_voxels.columns) == ENCODING_VOXEL_COLUMNS
    assert tuple(result.encoding_bands.columns) == ENCODING_BAND_COLUMNS
    # 3 layers + banded, 2 ROIs, 3 conditions (all, a, b)
    assert len(result.encoding) == 4 * 2 * 3
    assert set(result.encoding["condition"]) == {"all", "a", "b"}
    assert result.folds.columns.tolist() == ["stimulus_id", "fold"]
    assert result.folds["fold"].value_counts().tolist() == [12] * 5
    voxels = result.encoding_voxels
    roi = voxels[(voxels["layer"] == "l2") & (voxels["target"] == "roi")]
    assert roi["i"].tolist() == list(range(0, 36, 3))
    noise = voxels[voxels["target"] == "noise"]
    assert noise[["i", "j", "k"]].isna().all().all()
    row = result.encoding.query("layer == 'l2' and target == 'roi' and condition == 'all'")
    assert row["n_stimuli"].item() == N and row["n_folds"].item() == 5
    assert row["feature_dim"].item() == 32 and row["n_voxels"].item() == 12
    assert 0 < row["nc_mean"].item() <= 1
    assert row["frac_nc"].item() == pytest.approx(row["r_mean"].item() / row["nc_mean"].item())
    assert row["r_mean"].item() == pytest.approx(float(np.nanmean(roi["r"])))


def test_planted_layer_wins_and_noise_roi_is_not_significant(study: dict[str, object]) -> None:
    table = study["result"].encoding  # type: ignore[attr-defined]
    all_rows = table[table["condition"] == "all"]
    roi = all_rows[(all_rows["target"] == "roi") & ~all_rows["layer"].str.startswith("banded")]
    assert roi.sort_values("r_mean")["layer"].iloc[-1] == "l2"
    assert roi.set_index("layer").loc["l2", "r_mean"] > 0.5
    assert roi.set_index("layer").loc["l2", "p_perm"] < 0.01
    noise = all_rows[all_rows["target"] == "noise"]
    assert (noise["p_perm"] > 0.05).all()
    assert (table["p_fdr"] >= table["p_perm"] - 1e-15).all()
    bands = study["result"].encoding_bands  # type: ignore[attr-defined]
    shares = bands[bands["target"] == "roi"].set_index("layer")["r2_share_mean"]
    assert shares["l2"] > 0.3 > abs(shares["l1"])


def test_lesioning_the_planted_filters_removes_the_prediction(study: dict[str, object]) -> None:
    result = study["result"]
    features = study["features"]["l2"]  # type: ignore[index]
    y = study["responses"][("roi", "sub-01")]  # type: ignore[index]
    fit = result.fits[("l2", "roi", "sub-01")]  # type: ignore[attr-defined]
    intact = predict_with_filters(fit, features, np.ones(8, dtype=bool))
    np.testing.assert_allclose(intact, fit.ridge.predictions, atol=1e-12)
    full = float(pearson_r(y, intact).mean())
    lesioned = float(np.nanmean(pearson_r(y, predict_with_filters(fit, features, ~GROUP))))
    other = np.roll(GROUP, 4)  # three filters that carry no signal
    control = float(pearson_r(y, predict_with_filters(fit, features, ~other)).mean())
    kept = float(pearson_r(y, predict_with_filters(fit, features, GROUP)).mean())
    assert lesioned < 0.2 < full - 0.3
    assert control == pytest.approx(full, abs=0.1)
    assert kept > full - 0.05
    with pytest.raises(DataError, match="7 filter flags"):
        predict_with_filters(fit, features, np.ones(7, dtype=bool))


def test_weights_are_dropped_unless_kept(study: dict[str, object]) -> None:
    """Default ``keep_weights=False``: the same predictions, alphas and intercepts, no ``(p, v)``
    weights held, and a lesion prediction says why it cannot run."""
    kept = study["result"]
    features, responses = study["features"], study["responses"]
    light = compute_encoding(
        {"l2": features["l2"]},  # type: ignore[index]
        {("roi", "sub-01"): responses[("roi", "sub-01")]},  # type: ignore[index]
        EncodeOptions(n_perm=0),
        RUNTIME,
        stimulus_ids=_ids(),
        model="net",
        conditions=np.array(["a", "b"] * (N // 2)),
    )
    heavy_fit = kept.fits[("l2", "roi", "sub-01")]  # type: ignore[attr-defined]
    light_fit = light.fits[("l2", "roi", "sub-01")]
    np.testing.assert_array_equal(light_fit.ridge.predictions, heavy_fit.ridge.predictions)
    assert light_fit.ridge.feature_dim == heavy_fit.ridge.feature_dim == 32
    assert all(fold.weights.size == 0 for fold in light_fit.ridge.folds)
    with pytest.raises(DataError, match="keep_weights"):
        predict_with_filters(light_fit, features["l2"], np.ones(8, dtype=bool))  # type: ignore[index]


def test_srp_reduction_and_seeded_reproducibility() -> None:
    rng = np.random.default_rng(3)
    features = {"big": rng.standard_normal((30, 4, 5, 5)), "small": rng.standard_normal((30, 6))}
    responses = {("roi", "s"): rng.standard_normal((30, 4))}
    options = EncodeOptions(reduce="srp:16", n_perm=50, folds=3, inner_folds=3, keep_weights=True)
    first = compute_encoding(features, responses, options, RUNTIME, stimulus_ids=_ids(30))
    dims = first.encoding.set_index("layer")["feature_dim"]
    assert dims["big"] == 16 and dims["small"] == 6  # a layer at most DIM wide stays as it is
    again = compute_encoding(features, responses, options, RUNTIME, stimulus_ids=_ids(30))
    assert first.encoding.equals(again.encoding)
    fit = first.fits[("big", "roi", "s")]
    np.testing.assert_allclose(
        predict_with_filters(fit, features["big"], np.ones(4, bool)), fit.ridge.predictions
    )
    pca = compute_encoding(
        features,
        responses,
        options.model_copy(update={"reduce": "pca:5"}),
        RUNTIME,
        stimulus_ids=_ids(30),
    )
    assert pca.encoding.set_index("layer")["feature_dim"]["big"] == 5


def test_fold_reductions_are_fitted_once_per_layer_and_fold(
    study: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``pca:DIM`` and standardisation, each outer fold's PCA is fitted once per layer
    (and once per band on the driver), shared by every ROI, the refit null and the banded
    model; the tables equal, bit for bit, those of a fit per ROI (the cache switched off)."""
    import object2brain.encoding.ridge as ridge

    calls: list[int] = []
    original = ridge.fit_pca

    def counting(features: np.ndarray, dim: int) -> ridge.Pca:
        calls.append(features.shape[0])
        return original(features, dim)

    monkeypatch.setattr(ridge, "fit_pca", counting)
    features = study["features"]
    rng = np.random.default_rng(5)
    responses = dict(study["responses"])  # type: ignore[call-overload]
    responses[("roi", "sub-02")] = rng.standard_normal((N, 7))
    options = EncodeOptions(
        reduce="pca:10",
        standardize=True,
        folds=3,
        inner_folds=3,
        n_perm=20,
        perm_null="refit",
        banded=["l1", "l2"],
        n_iter=5,
    )

    def run() -> EncodingResult:
        return compute_encoding(
            features,  # type: ignore[arg-type]
            responses,
            options,
            RUNTIME,
            stimulus_ids=_ids(),
            conditions=np.array(["a", "b"] * (N // 2)),
        )

    shared = run()
    assert len(calls) == (3 + 2) * 3  # (layers + bands) x folds, not x 3 ROIs
    calls.clear()
    monkeypatch.setattr(ridge.ReductionCache, "reductions", lambda *_args: None)
    per_roi = run()
    assert len(calls) == (3 * (3 + 1) + 2 * 3) * 3  # per ROI (+ the refit null); per band x ROI
    pd.testing.assert_frame_equal(shared.encoding, per_roi.encoding, check_exact=True)
    pd.testing.assert_frame_equal(shared.encoding_voxels, per_roi.encoding_voxels, check_exact=True)
    pd.testing.assert_frame_equal(shared.encoding_bands, per_roi.encoding_bands, check_exact=True)
    for key, fit in shared.fits.items():
        np.testing.assert_array_equal(fit.ridge.predictions, per_roi.fits[key].ridge.predictions)
        assert all(fold.pca is None and fold.weights.size == 0 for fold in fit.ridge.folds)


def test_bad_input_raises_one_clear_error() -> None:
    rng = np.random.default_rng(0)
    x = {"l": rng.standard_normal((20, 5))}
    y = {("roi", "s"): rng.standard_normal((20, 3))}
    opts = EncodeOptions(n_perm=10)

    def run(
        features: object = x, responses: object = y, options: EncodeOptions = opts, **kw: object
    ) -> None:
        n = next(iter(features.values())).shape[0]  # type: ignore[attr-defined]
        compute_encoding(features, responses, options, RUNTIME, stimulus_ids=_ids(n), **kw)  # type: ignore[arg-type]

    with pytest.raises(DataError, match="4 stimuli cannot be split into 5 folds"):
        run({"l": x["l"][:4]}, {("roi", "s"): y[("roi", "s")][:4]})
    with pytest.raises(DataError, match=r"layer one, ROI roi/s: .*1 feature"):
        run({"one": rng.standard_normal((20, 1, 1, 1))})
    nan = y[("roi", "s")].copy()
    nan[3, 1] = np.nan
    with pytest.raises(DataError, match="1 voxel\\(s\\) with NaN"):
        run(responses={("roi", "s"): nan})
    bad = x["l"].copy()
    bad[0, 0] = np.nan
    with pytest.raises(DataError, match="features contain NaN"):
        run({"l": bad}, options=EncodeOptions(n_perm=5, perm_null="refit"))
    with pytest.raises(DataError, match="condition\\(s\\) b have fewer stimuli than the 5 folds"):
        run(conditions=["a"] * 16 + ["b"] * 4)
    with pytest.raises(DataError, match="no voxel axis for ROI\\(s\\) rdm/s"):
        run(responses={("rdm", "s"): rng.standard_normal(20)})
    with pytest.raises(DataError, match="unknown layer\\(s\\) nope"):
        run(options=EncodeOptions(layers=["nope"]))
    with pytest.raises(DataError, match="first dimension differs"):
        run(responses={("roi", "s"): rng.standard_normal((19, 3))})


def test_options_are_validated() -> None:
    options = EncodeOptions()
    assert options.folds == 5 and options.n_perm == 1000 and len(options.alphas) == 19
    np.testing.assert_allclose(options.alphas, np.logspace(-2, 7, 19))
    assert EncodeOptions(reduce="PCA:20").reduction() == ("pca", 20)
    assert EncodeOptions().reduction() == ("none", None)
    assert EncodeOptions().perm_null == "predictions"
    for bad in (
        {"reduce": "svd:3"},
        {"reduce": "pca:0"},
        {"alphas": [0.0, 1.0]},
        {"banded": ["l1"]},
        {"folds": 1},
        {"perm_null": "x"},
    ):
        with pytest.raises(OptionsError):
            resolve_options(EncodeOptions, None, **bad)


def _null_rejection_rate(perm_null: str, datasets: int = 40, n_perm: int = 200) -> float:
    options = EncodeOptions(n_perm=n_perm, perm_null=perm_null)  # type: ignore[arg-type]
    rejected = 0
    for index in range(datasets):
        rng = np.random.default_rng([2024, index])
        result = compute_encoding(
            {"layer": rng.standard_normal((60, 20))},
            {("roi", "s"): rng.standard_normal((60, 10))},
            options,
            Runtime(seed=index, device="cpu", progress=False),
            stimulus_ids=_ids(),
        )
        rejected += int(result.encoding["p_perm"].iloc[0] <= 0.05)
    return rejected / datasets


@pytest.mark.slow
@pytest.mark.parametrize("perm_null", ["predictions", "refit", "fixed_alpha"])
def test_permutation_tests_are_not_liberal_under_the_null(perm_null: str) -> None:
    """40 null datasets: the rejection rate at 0.05 stays below 0.125 (P < 0.01 for a calibrated
    test: Binomial(40, 0.05) >= 5), which a test with a wrong null (e.g. in-sample fits, or a
    p-value without the +1) far exceeds. The full run (400 datasets) is
    ``validation/encoding_null.py``."""
    assert _null_rejection_rate(perm_null) < 0.125


def test_refit_null_is_exact_on_a_planted_and_a_null_roi() -> None:
    rng = np.random.default_rng(11)
    x = rng.standard_normal((40, 6))
    signal = x @ rng.standard_normal((6, 5))
    responses = {
        ("roi", "s"): signal + rng.standard_normal((40, 5)),
        ("noise", "s"): rng.standard_normal((40, 5)),
    }
    options = EncodeOptions(n_perm=200, perm_null="refit", folds=4, inner_folds=4)
    table = compute_encoding({"l": x}, responses, options, RUNTIME, stimulus_ids=_ids(40)).encoding
    p = table.set_index("target")["p_perm"]
    assert p["roi"] < 0.01 and p["noise"] > 0.05


def test_refit_null_p_values_are_uniform_where_fixed_predictions_are_not(
    small_null_tables: Callable[..., list[pd.DataFrame]],
) -> None:
    """60 small null datasets (30 stimuli, 20 voxels, 3 folds): the exact ``refit`` p-values are
    uniform (Kolmogorov-Smirnov) and reject at 0.2 inside the binomial 95% interval, while the fast
    ``predictions`` null piles its p-values up near 1 (conservative: a fixed-prediction
    permutation misses how each fold's predictions depend on the other folds' responses). The
    full run (400 datasets, 1,000 permutations) is ``validation/encoding_null.py``."""
    p_values = {  # all 99 refits: the sequential p is discrete (no KS test)
        null: [float(t["p_perm"].iloc[0]) for t in small_null_tables(null, 0, _ids(30))]
        for null in ("refit", "predictions")
    }
    refit = np.asarray(p_values["refit"])
    assert stats.kstest(refit, "uniform").pvalue > 0.01
    low, high = stats.binom.interval(0.95, 60, 0.2)
    assert low <= np.count_nonzero(refit <= 0.2) <= high
    assert stats.kstest(p_values["predictions"], "uniform").pvalue < 0.01
