"""The sequential (Besag & Clifford) refit permutation test: p-values, stopping, batching, and
its calibration against the conservative ``predictions`` null."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from object2brain.encoding import compute_encoding
from object2brain.encoding.ridge import fit_smoother
from object2brain.encoding.scores import refit_permutation_tests, sequential_p
from object2brain.options import EncodeOptions, OptionsError, Runtime, resolve_options


def test_sequential_p_stops_at_the_h_th_null_value_reaching_the_observed() -> None:
    null = np.array([0.1, 0.5, 0.2, 0.6, 0.7, 0.0, 0.9])
    # values >= 0.5 at draws 2, 4, 5, 7: the 3rd at draw 5
    assert sequential_p(null, 0.5, stop=3, n_perm=7) == (3 / 5, 5)
    # only the prefix up to the stop is needed
    assert sequential_p(null[:5], 0.5, stop=3, n_perm=100) == (3 / 5, 5)
    # never stopped: the fixed test's (g + 1) / (n_perm + 1)
    assert sequential_p(null, 0.5, stop=5, n_perm=7) == (5 / 8, 7)
    assert sequential_p(null, 0.5, stop=0, n_perm=7) == (5 / 8, 7)
    # a tie within 1e-12 counts as reaching the observed value
    assert sequential_p(np.array([0.5 - 1e-13]), 0.5, stop=1, n_perm=1) == (1.0, 1)
    p, used = sequential_p(np.empty(0), 0.5, stop=3, n_perm=0)
    assert np.isnan(p) and used == 0
    with pytest.raises(ValueError, match="2 of 7 draws"):
        sequential_p(null[:2], 0.5, stop=3, n_perm=7)


def test_sequential_p_is_valid_and_exact_at_its_levels() -> None:
    """4,000 exchangeable (observed, null) sets (the null hypothesis): the sequential p rejects at
    0.05, 0.1 and 0.2 inside the binomial 95% interval (the attainable levels 10/200, 10/100,
    10/50 are exact), and most tests stop early. A liberal stopped p off by one in ``h``
    (``(h - 1) / L``) rejects 5.8%, 11.5% and 22.6% here, outside every interval."""
    rng = np.random.default_rng(0)
    draws = rng.standard_normal((4000, 1 + 999))
    results = [sequential_p(d[1:], d[0], stop=10, n_perm=999) for d in draws]
    p = np.array([r[0] for r in results])
    used = np.array([r[1] for r in results])
    for level in (0.05, 0.1, 0.2):
        low, high = stats.binom.interval(0.95, p.size, level)
        assert low <= np.count_nonzero(p <= level) <= high, level
    # mean draws under the null: about h (1 + ln(n_perm / h)) = 56 instead of 999
    assert 40 < used.mean() < 80


@pytest.fixture(scope="module")
def case() -> tuple[np.ndarray, np.ndarray, object, list[np.ndarray]]:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((36, 6))
    y = rng.standard_normal((36, 4))
    y[:18] += x[:18] @ rng.standard_normal((6, 4))  # a signal in the first half only
    folds = np.arange(36) % 3
    smoother = fit_smoother(x, folds, alphas=[0.1, 10.0, 1000.0], inner_folds=3, seed=0)
    masks = [np.ones(36, dtype=bool), np.arange(36) < 18, np.arange(36) >= 18]
    return y, smoother.predict(y), smoother, masks


def test_sequential_refits_are_a_prefix_of_the_full_test_whatever_the_batching(
    case: tuple[np.ndarray, np.ndarray, object, list[np.ndarray]],
) -> None:
    y, predictions, smoother, masks = case
    predict = smoother.predict  # type: ignore[attr-defined]
    full = refit_permutation_tests(y, predictions, predict, masks, n_perm=400, seed=3)
    runs = {}
    for max_columns in (4, 28, 100, 8192):
        columns: list[int] = []

        def counted(responses: np.ndarray, columns: list[int] = columns) -> np.ndarray:
            columns.append(responses.shape[1])
            return predict(responses)

        runs[max_columns] = refit_permutation_tests(
            y, predictions, counted, masks, n_perm=400, seed=3, stop=5, max_columns=max_columns
        )
        drawn = sum(columns) // y.shape[1]
        used = max(r.n_used for r in runs[max_columns])
        # the refits stop once every mask's test has stopped (at most the doubling overshoot)
        assert used <= drawn <= max(2 * used, 5)
    reference = runs[4]
    # the first half's test runs all 400, the second half's stops early
    assert reference[1].n_used == 400 and reference[2].n_used < 100
    for results in runs.values():
        for seq, ref, whole in zip(results, reference, full, strict=True):
            assert (seq.p, seq.n_used) == (ref.p, ref.n_used)
            np.testing.assert_allclose(seq.null, ref.null, atol=1e-12)
            np.testing.assert_allclose(seq.null, whole.null[: seq.n_used], atol=1e-12)
            expected = sequential_p(whole.null, whole.observed, stop=5, n_perm=400)
            assert (seq.p, seq.n_used) == expected
    # stop 0: the full test
    fixed = refit_permutation_tests(y, predictions, predict, masks, n_perm=400, seed=3, stop=0)
    assert [(r.p, r.n_used) for r in fixed] == [(r.p, 400) for r in full]


def test_the_table_reports_the_permutations_behind_each_p() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((30, 5))
    responses = {
        ("roi", "s"): x @ rng.standard_normal((5, 4)) + 0.5 * rng.standard_normal((30, 4)),
        ("noise", "s"): rng.standard_normal((30, 4)),
    }
    kw = {"folds": 3, "inner_folds": 3, "alphas": [0.1, 10.0, 1000.0], "n_perm": 200}
    runtime = Runtime(seed=4, device="cpu", progress=False)
    ids = [f"s{i}" for i in range(30)]

    def table(**extra: object) -> object:
        options = EncodeOptions(perm_null="refit", **kw, **extra)  # type: ignore[arg-type]
        return compute_encoding({"l": x}, responses, options, runtime, stimulus_ids=ids).encoding

    seq = table().set_index("target")  # type: ignore[attr-defined]
    full = table(perm_stop=0).set_index("target")  # type: ignore[attr-defined]
    assert seq.loc["roi", "n_perm"] == 200 and seq.loc["roi", "p_perm"] == full.loc["roi", "p_perm"]
    assert 10 <= seq.loc["noise", "n_perm"] < 200 and full.loc["noise", "n_perm"] == 200
    assert seq.loc["noise", "p_perm"] == pytest.approx(10 / seq.loc["noise", "n_perm"])


def test_sequential_refit_is_calibrated_where_predictions_is_conservative(
    small_null_tables: Callable[..., list[pd.DataFrame]],
) -> None:
    """60 small null datasets (30 stimuli, 20 voxels, 3 folds, 99 permutations): the sequential
    refit test (``perm_null = refit`` with the default ``perm_stop``) rejects at 0.2 inside the
    binomial 95% interval, with most tests stopped early, while the ``predictions`` null rejects
    below it (conservative). A refit test as conservative as ``predictions``, or one whose stopped
    p forgot the Besag-Clifford form, fails. The full run (400 datasets, 1,000 permutations) is
    ``validation/encoding_null.py --sequential``."""
    ids = [f"s{i}" for i in range(30)]
    stop = EncodeOptions().perm_stop  # the default
    tables = {null: small_null_tables(null, stop, ids) for null in ("refit", "predictions")}
    p_values = {null: [float(t["p_perm"].iloc[0]) for t in found] for null, found in tables.items()}
    used = [int(t["n_perm"].iloc[0]) for t in tables["refit"]]
    low, high = stats.binom.interval(0.95, 60, 0.2)
    rejected = {k: int(np.count_nonzero(np.asarray(v) <= 0.2)) for k, v in p_values.items()}
    assert low <= rejected["refit"] <= high
    assert rejected["predictions"] < low
    assert np.mean(used) < 50  # most null tests stop long before 99 refits


def test_perm_stop_option() -> None:
    assert EncodeOptions().perm_stop == 10 and EncodeOptions().perm_null == "predictions"
    assert resolve_options(EncodeOptions, None, perm_stop=0).perm_stop == 0
    with pytest.raises(OptionsError, match="perm_stop"):
        resolve_options(EncodeOptions, None, perm_stop=-1)
