"""``perm_null = refit_tail``: the exact refit test whose p at its floor ``1 / (n_perm + 1)`` is
extended by a normal approximation of the same refits."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from object2brain.encoding import compute_encoding
from object2brain.encoding.scores import normal_tail_p, tail_p
from object2brain.options import EncodeOptions, Runtime


def test_normal_tail_p_is_exact_for_a_normal_null() -> None:
    """20,000 sets of 6 independent normals (an observed value and R = 5 draws): P(p <= u) = u
    at u = 0.01, 0.05, 0.2 within the binomial 99.9% interval. At 0.05 a normal z-score
    rejects 8.5% (10% without the prediction factor sqrt(1 + 1/R)) and the t without that
    factor 6.3%: each fails."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((20_000, 6)) * 3.0 + 1.0
    p = np.array([normal_tail_p(float(row[0]), row[1:]) for row in values])
    for level in (0.01, 0.05, 0.2):
        low, high = stats.binom.interval(0.999, p.size, level)
        assert low <= np.count_nonzero(p <= level) <= high, level
    assert np.isnan(normal_tail_p(1.0, np.ones(5)))
    assert np.isnan(normal_tail_p(1.0, np.ones(1)))


def test_tail_p_changes_only_a_p_at_its_floor() -> None:
    null = np.array([0.0, 0.1, -0.1, 0.05, -0.05])
    floor = 1 / 6
    # some draw reaches the observed value, or the sequential test stopped: p unchanged
    assert tail_p(2 / 6, 5, null, 0.07, 5) == 2 / 6
    assert tail_p(floor, 3, null[:3], 9.0, 5) == floor
    # at the floor: the normal tail, smaller
    extended = tail_p(floor, 5, null, 0.5, 5)
    assert extended == pytest.approx(normal_tail_p(0.5, null)) and extended < floor
    # never above the floor (a value barely above every draw keeps the permutation p)
    assert tail_p(floor, 5, null, 0.1000001, 5) <= floor


def test_stage_refit_tail_equals_refit_above_the_floor_and_orders_below_it() -> None:
    """59 refits: rows the exact test does not put at its floor have the same p and counts as
    ``refit``; the planted ROIs, tied at 1/60 by ``refit``, get distinct smaller p (the
    stronger effect the smaller p), so BH-FDR can tell them apart."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((45, 6))
    weights = rng.standard_normal((6, 8))
    responses = {
        ("strong", "s"): x @ weights + rng.standard_normal((45, 8)),
        ("weak", "s"): 0.3 * x @ weights + rng.standard_normal((45, 8)),
        ("noise", "s"): rng.standard_normal((45, 8)),
    }
    tables = {}
    for null in ("refit", "refit_tail"):
        options = EncodeOptions(
            n_perm=59, perm_null=null, folds=3, inner_folds=3,  # type: ignore[arg-type]
            alphas=[10.0**k for k in range(-1, 6)],
        )  # fmt: skip
        tables[null] = compute_encoding(
            {"l": x}, responses, options, Runtime(seed=0, device="cpu", progress=False),
            stimulus_ids=[f"s{i}" for i in range(45)],
        ).encoding.set_index("target")  # fmt: skip
    exact, tail = tables["refit"], tables["refit_tail"]
    assert exact.loc["strong", "p_perm"] == exact.loc["weak", "p_perm"] == 1 / 60
    assert tail.loc["strong", "p_perm"] < tail.loc["weak", "p_perm"] < 1 / 60
    assert exact.loc["noise", "p_perm"] > 0.05
    assert tail.loc["noise", "p_perm"] == exact.loc["noise", "p_perm"]
    assert (tail["n_perm"] == exact["n_perm"]).all()
