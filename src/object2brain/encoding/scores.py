r"""Scores of out-of-fold predictions: per-voxel r and R^2, noise ceiling, permutation test.

For responses :math:`Y` ``(n, v)`` and out-of-fold predictions :math:`\hat{Y}` ``(n, v)``:

- :func:`pearson_r`: :math:`r_v = \mathrm{corr}(Y_{\cdot v}, \hat{Y}_{\cdot v})` over stimuli;
- :func:`r2_score`: :math:`R^2_v = 1 - \sum_i (Y_{iv} - \hat{Y}_{iv})^2 /
  \sum_i (Y_{iv} - \bar{Y}_v)^2` (negative when the predictions are worse than the mean);
- :func:`noise_ceiling`: from run-wise responses ``(runs, n, v)``, the split-half reliability
  :math:`\rho_v` (Pearson r between the mean of the odd and the mean of the even runs), Spearman-
  Brown corrected to the mean of all runs, :math:`\rho^{SB}_v = 2\rho_v / (1 + \rho_v)`; the
  ceiling on :math:`r_v` is :math:`\sqrt{\max(\rho^{SB}_v, 0)}` (a perfect model correlates with
  the noisy mean response at most by the square root of its reliability);
- :func:`permutation_test`: the ROI's mean r against its null distribution when the rows of
  :math:`\hat{Y}` are permuted together against :math:`Y` (within each outer fold: see the
  function); :math:`p = (1 + \#\{null \ge obs\}) / (1 + N)`. Fast, valid, conservative;
- :func:`refit_permutation_tests`: the exact test: the responses' rows are relabelled and the
  whole cross-validation rerun per permutation (many relabelled copies per call), the null of
  every stimulus mask (condition) from the same refits; optionally sequential
  (:func:`sequential_p`, Besag & Clifford 1991): a test stops once ``h`` null values have
  reached the observed one, so most null tests need a few dozen refits instead of ``n_perm``.

Permutation statistic in one product: with columns z-scored and divided by :math:`\sqrt{n}`
(:math:`\tilde{Y}`, :math:`\tilde{P}`), the mean r for permutation :math:`\pi` is
:math:`\frac{1}{v}\sum_i M_{i\pi(i)}` with :math:`M = \tilde{Y}\tilde{P}^\top` ``(n, n)``,
computed once. Permutations are drawn in fixed blocks of :data:`PERM_BLOCK`, block :math:`b`
from a generator seeded by ``(seed, b)``; a chunk of the computation holds whole blocks, so the
result does not depend on the chunk size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from scipy import stats

from object2brain.errors import DataError
from object2brain.rsa.inference import fdr_bh

#: Permutations per seeded block (fixed: changing it changes the permutations drawn).
PERM_BLOCK = 256

__all__ = [
    "PERM_BLOCK",
    "REFIT_COLUMNS",
    "NullRefit",
    "PermutationResult",
    "fdr_bh",
    "noise_ceiling",
    "normal_tail_p",
    "pearson_r",
    "permutation_test",
    "r2_score",
    "refit_permutation_test",
    "refit_permutation_tests",
    "roi_summary",
    "sequential_p",
]


def _standardise(values: np.ndarray) -> np.ndarray:
    """Columns centred and scaled to unit norm ``(n, v)`` (a constant column becomes NaN)."""
    centred = values - values.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(centred / np.linalg.norm(centred, axis=0))


def pearson_r(responses: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """Pearson r per column ``(v,)`` of ``responses`` and ``predictions`` ``(n, v)`` (NaN where a
    column is constant)."""
    return np.asarray((_standardise(responses) * _standardise(predictions)).sum(axis=0))


def r2_score(responses: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """Coefficient of determination per column ``(v,)``: ``1 - SSE / SST``."""
    sse = ((responses - predictions) ** 2).sum(axis=0)
    sst = ((responses - responses.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(1.0 - sse / sst)


def noise_ceiling(runs: np.ndarray) -> np.ndarray:
    """Ceiling on each voxel's r ``(v,)`` from run-wise responses ``(n_runs, n, v)``.

    Split-half reliability (odd runs' mean vs even runs' mean), Spearman-Brown corrected,
    clipped at 0, square root (see the module docstring).

    Raises:
        DataError: fewer than 2 runs, or non-finite values.
    """
    if runs.ndim != 3 or runs.shape[0] < 2:
        raise DataError(
            f"noise ceiling: need run-wise responses (runs >= 2, stimuli, voxels), got shape "
            f"{runs.shape}"
        )
    if not np.isfinite(runs).all():
        raise DataError("noise ceiling: run-wise responses contain NaN or infinite values")
    half = pearson_r(runs[0::2].mean(axis=0), runs[1::2].mean(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        corrected = 2.0 * half / (1.0 + half)
    return np.asarray(np.sqrt(np.clip(np.nan_to_num(corrected, nan=0.0), 0.0, None)))


@dataclass(frozen=True)
class RoiSummary:
    """Mean and median over voxels of r and R^2 (NaN voxels ignored)."""

    r_mean: float
    r_median: float
    r2_mean: float


def roi_summary(r: np.ndarray, r2: np.ndarray) -> RoiSummary:
    """Summaries of per-voxel ``r`` and ``r2`` ``(v,)``."""
    return RoiSummary(
        r_mean=float(np.nanmean(r)), r_median=float(np.nanmedian(r)), r2_mean=float(np.nanmean(r2))
    )


@dataclass(frozen=True)
class PermutationResult:
    """Observed ROI mean r, its null distribution ``(n_used,)`` (the draws behind ``p``: all
    ``n_perm``, or fewer where a sequential test stopped) and ``p``."""

    observed: float
    null: np.ndarray
    p: float

    @property
    def n_used(self) -> int:
        """Permutations behind ``p``."""
        return int(self.null.shape[0])


def _block_permutations(
    n: int, seed: int, block: int, count: int, groups: np.ndarray | None
) -> np.ndarray:
    """The first ``count`` permutations ``(count, n)`` of seeded block ``block`` (each within the
    ``groups`` ``(n,)`` when given: stimuli only exchange places with their own group)."""
    rng = np.random.default_rng([seed, block])
    if groups is None:
        full = rng.permuted(np.tile(np.arange(n), (PERM_BLOCK, 1)), axis=1)
        return full[:count]
    full = np.tile(np.arange(n), (PERM_BLOCK, 1))
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        full[:, members] = rng.permuted(np.tile(members, (PERM_BLOCK, 1)), axis=1)
    return full[:count]


def permutation_test(
    responses: np.ndarray,
    predictions: np.ndarray,
    *,
    n_perm: int,
    seed: int,
    groups: np.ndarray | None = None,
    blocks_per_chunk: int = 4,
) -> PermutationResult:
    """Permutation test of the ROI's mean Pearson r (rows of ``predictions`` permuted together).

    ``responses``, ``predictions`` ``(n, v)``. ``groups`` ``(n,)``: permute only within groups;
    pass the outer folds. Why: out-of-fold ridge predictions of pure noise correlate
    *negatively* with the responses (each fold's intercept, the training mean, moves against the
    held-out values; mean r about -0.17 with 60 stimuli, 5 folds), and a permutation across folds
    destroys that shared structure, so its null sits too high and the test almost never rejects
    (0 of 40 null datasets at 0.05). Permuting within folds keeps it; the test is then valid
    but still conservative (1.75% of 400 null datasets at 0.05 with 10 voxels, 0.25% with 50;
    ``validation/encoding_null.md``): each fold's predictions also depend on the other folds'
    responses, which no permutation of fixed predictions reproduces. The exact test is
    :func:`refit_permutation_tests`. ``blocks_per_chunk`` blocks of
    :data:`PERM_BLOCK` permutations are evaluated at once (memory ``8 n`` bytes per permutation);
    it does not change the result. ``n_perm == 0``: ``p`` is NaN.
    """
    y = _standardise(responses)
    pz = _standardise(predictions)
    n, v = y.shape
    products = y @ pz.T  # (n, n): M[i, j] = sum_v y[i, v] p[j, v]
    observed = float(np.trace(products) / v)
    null = np.empty(n_perm)
    rows = np.arange(n)
    n_blocks = -(-n_perm // PERM_BLOCK)
    step = max(1, blocks_per_chunk)
    for first in range(0, n_blocks, step):
        blocks = range(first, min(first + step, n_blocks))
        perms = np.concatenate(
            [
                _block_permutations(n, seed, b, min(PERM_BLOCK, n_perm - b * PERM_BLOCK), groups)
                for b in blocks
            ]
        )
        start = first * PERM_BLOCK
        null[start : start + perms.shape[0]] = products[rows, perms].sum(axis=1) / v
    if n_perm == 0:
        return PermutationResult(observed, null, float("nan"))
    # Tolerance: the same value computed in another order must count as reaching the observed.
    exceed = int(np.count_nonzero(null >= observed - 1e-12))
    return PermutationResult(observed, null, (1.0 + exceed) / (1.0 + n_perm))


#: Columns (relabelled copies x voxels) of one call to the refit in the exact test (memory of a
#: call about ``8 A n x REFIT_COLUMNS`` bytes; the result does not depend on it).
REFIT_COLUMNS = 8192

#: Tolerance of ``null >= observed``: the same value computed in another order must count as
#: reaching the observed one.
_TIES = 1e-12


def sequential_p(null: np.ndarray, observed: float, *, stop: int, n_perm: int) -> tuple[float, int]:
    r"""Besag & Clifford's (1991) sequential Monte Carlo p-value and the permutations it used.

    ``null`` ``(m,)``: the first ``m <= n_perm`` null statistics in the order they were drawn
    (every value up to the ``stop``-th one reaching ``observed``, or all ``n_perm``). With ``stop
    = h > 0``: if the ``h``-th null value :math:`\ge` ``observed`` is draw number ``L``, then
    :math:`p = h / L` after ``L`` permutations; if fewer than ``h`` of the ``n_perm`` draws reach
    it (``g`` of them), :math:`p = (g + 1) / (n_perm + 1)`, the fixed test's p. Valid:
    :math:`P(p \le u) \le u` under the null for every ``u`` (exact at the attainable values
    :math:`h / L` and :math:`(g + 1) / (n_perm + 1)`), because the sequence stops the same way
    whatever the later draws would have been. ``stop = 0``: the fixed test over all ``n_perm``.
    A p below ``h / n_perm`` is only reached without stopping, so a test that rejects at level
    :math:`\alpha \ge h / n_perm` gives up power only where ``p`` lies near :math:`\alpha`.

    Returns:
        ``(p, used)``: the p-value and the number of permutations behind it (NaN and 0 when
        ``n_perm == 0``).
    """
    if n_perm == 0:
        return float("nan"), 0
    hits = np.flatnonzero(np.asarray(null)[:n_perm] >= observed - _TIES)
    if 0 < stop <= hits.size:
        used = int(hits[stop - 1]) + 1
        return stop / used, used
    if null.shape[0] < n_perm:
        raise ValueError(f"sequential p: {null.shape[0]} of {n_perm} draws and no stop reached")
    return (1.0 + hits.size) / (1.0 + n_perm), n_perm


def normal_tail_p(observed: float, null: np.ndarray) -> float:
    r"""One-sided p of ``observed`` against ``R`` exchangeable null draws ``null`` ``(R,)`` if
    the null distribution is normal: Student's t prediction interval,

    .. math:: t = \frac{obs - \bar{d}}{s_d \sqrt{1 + 1/R}}, \qquad p = P(T_{R-1} \ge t),

    with :math:`\bar{d}`, :math:`s_d` the draws' mean and standard deviation (ddof 1). Exact
    (``P(p <= u) = u``) when the observed value and the draws are independent normal with a
    common mean and variance; NaN with fewer than 2 draws or no spread."""
    r = int(null.shape[0])
    spread = float(np.std(null, ddof=1)) if r >= 2 else 0.0
    if not spread > 0:
        return float("nan")
    t = (observed - float(np.mean(null))) / (spread * np.sqrt(1.0 + 1.0 / r))
    return float(stats.t.sf(t, r - 1))


def tail_p(p: float, used: int, null: np.ndarray, observed: float, n_perm: int) -> float:
    """The ``refit_tail`` p: the permutation p ``p`` (after ``used`` of ``n_perm`` draws), except
    where it sits at its floor ``1 / (n_perm + 1)`` (all draws run, none reached the observed
    value): there the smaller :func:`normal_tail_p` of the draws. At every level
    ``>= 1 / (n_perm + 1)`` the test rejects exactly when the permutation test does (so it keeps
    its calibration); below, the normal approximation only orders the tests for BH-FDR instead
    of tying them at the floor."""
    floor = 1.0 / (n_perm + 1)
    if used < n_perm or p > floor:
        return p
    tail = normal_tail_p(observed, null)
    return min(p, tail) if np.isfinite(tail) else p


@runtime_checkable
class NullRefit(Protocol):
    """A refit that computes the null statistics itself (e.g. on a GPU, where only the
    relabellings go in and the statistics come out):
    :meth:`object2brain.encoding.smoother.TorchCvSmoother.null_mean_r`."""

    def null_mean_r(
        self, responses: np.ndarray, orders: np.ndarray, masks: Sequence[np.ndarray]
    ) -> np.ndarray:
        """``(len(masks), b)``: mean r over voxels of each relabelling ``orders`` ``(b, n)`` of
        ``responses`` ``(n, v)`` against its refitted predictions, within each mask."""
        ...


def _batches(n_perm: int, per_call: int, stop: int) -> Iterator[tuple[int, int]]:
    """``(first, count)`` of the permutations of each refit call: ``per_call`` at a time, or with
    ``stop > 0`` first ``stop``, then doubling the total (``stop, stop, 2 stop, 4 stop, ...``,
    capped by ``per_call``) so a test that stops early computes at most about twice the draws it
    uses. The schedule only sets the cost: every p uses the prefix of the same seeded draws."""
    first = 0
    while first < n_perm:
        count = min(per_call, n_perm - first, max(stop, first) if stop > 0 else per_call)
        yield first, count
        first += count


def refit_permutation_tests(
    responses: np.ndarray,
    predictions: np.ndarray,
    refit: Callable[[np.ndarray], np.ndarray] | NullRefit,
    masks: Sequence[np.ndarray],
    *,
    n_perm: int,
    seed: int,
    stop: int = 0,
    max_columns: int = REFIT_COLUMNS,
    tail: bool = False,
) -> list[PermutationResult]:
    """Exact permutation tests of the ROI's mean r, one per stimulus mask, from one set of refits:
    the responses' rows are relabelled and the whole cross-validation is rerun (``refit``:
    responses ``(n, c)`` -> out-of-fold predictions ``(n, c)``, column by column, e.g.
    :meth:`object2brain.encoding.smoother.TorchCvSmoother.predict`; or a :class:`NullRefit`,
    which relabels, refits and scores on its device and returns the statistics, the same
    numbers to rounding), so the null carries the
    dependence of every fold's predictions on the other folds' responses that a permutation of fixed
    predictions (:func:`permutation_test`) misses.

    ``responses``, ``predictions`` ``(n, v)``; ``masks``: boolean ``(n,)`` each, the stimuli a
    test scores (all stimuli are relabelled and refitted once per permutation, whatever the
    masks). Permutations: the seeded blocks of :func:`permutation_test` (across all stimuli).
    ``stop = h > 0``: sequential p-values (:func:`sequential_p`): a mask's test stops at its
    ``h``-th null value reaching the observed one, and the refits stop once every mask's test
    has stopped (or after ``n_perm``); each result's ``null`` holds the draws its p used (its
    ``n_used``). Relabelled copies are stacked as columns, at most ``max(1, max_columns // v)``
    permutations per call of ``refit`` (:func:`_batches`); the results do not depend on
    ``max_columns``. ``tail``: a p at its floor ``1 / (n_perm + 1)`` is extended by the normal
    approximation of the same draws (:func:`tail_p`; ``perm_null = refit_tail``). Cost: one
    refit of ``v`` columns per permutation drawn
    (:class:`~object2brain.encoding.smoother.TorchCvSmoother`: about ``2 A n_T r v`` flops
    each, ``r`` the inner training sets' rank).
    """
    n, v = responses.shape
    observed = [float(np.nanmean(pearson_r(responses[m], predictions[m]))) for m in masks]
    nulls = [np.full(n_perm, np.nan) for _ in masks]
    reached = [0] * len(masks)  # null values >= observed so far, per mask
    drawn = [0] * len(masks)  # null values computed, per mask (stopped masks fall behind)
    orders = (
        order
        for block in range(-(-n_perm // PERM_BLOCK))
        for order in _block_permutations(
            n, seed, block, min(PERM_BLOCK, n_perm - block * PERM_BLOCK), None
        )
    )
    for first, count in _batches(n_perm, max(1, max_columns // max(v, 1)), stop):
        open_masks = [i for i in range(len(masks)) if stop == 0 or reached[i] < stop]
        if not open_masks:
            break
        batch = np.stack([next(orders) for _ in range(count)])  # (count, n)
        if isinstance(refit, NullRefit):
            means = refit.null_mean_r(responses, batch, [masks[i] for i in open_masks])
        else:
            relabelled = responses[batch].transpose(1, 0, 2).reshape(n, count * v)
            refitted = refit(relabelled)
            means = np.stack(
                [
                    np.nanmean(
                        pearson_r(relabelled[masks[i]], refitted[masks[i]]).reshape(count, v),
                        axis=1,
                    )
                    for i in open_masks
                ]
            )
        for i, values in zip(open_masks, means, strict=True):
            nulls[i][first : first + count] = values
            reached[i] += int(np.count_nonzero(values >= observed[i] - _TIES))
            drawn[i] = first + count
    results = []
    for obs, null, m in zip(observed, nulls, drawn, strict=True):
        p, used = sequential_p(null[:m], obs, stop=stop, n_perm=n_perm)
        if tail:
            p = tail_p(p, used, null[:used], obs, n_perm)
        results.append(PermutationResult(obs, null[:used], p))
    return results


def refit_permutation_test(
    responses: np.ndarray,
    predictions: np.ndarray,
    refit: Callable[[np.ndarray], np.ndarray] | NullRefit,
    *,
    n_perm: int,
    seed: int,
    mask: np.ndarray | None = None,
    stop: int = 0,
    max_columns: int = REFIT_COLUMNS,
) -> PermutationResult:
    """:func:`refit_permutation_tests` for one mask (``None``: all stimuli)."""
    keep = np.ones(responses.shape[0], dtype=bool) if mask is None else mask
    return refit_permutation_tests(
        responses,
        predictions,
        refit,
        [keep],
        n_perm=n_perm,
        seed=seed,
        stop=stop,
        max_columns=max_columns,
    )[0]
