"""Statistical inference for RSA: permutation tests, bootstrap CIs, noise ceilings and FDR.

Notation: ``K`` model RDMs (e.g. layers) and ``T`` target RDMs (e.g. subjects x ROIs), all over
the same ``n`` stimuli; condensed vectors have ``m = n (n - 1) / 2`` entries (``i < j``).
A ``combine`` matrix ``C`` ``(T, G)`` adds ``G`` derived statistics ``r @ C`` to the ``T``
per-target coefficients, e.g. the mean r over the subjects of one ROI (``C[t, g] = 1 / S_g`` for
the subjects ``t`` of group ``g``); undefined (NaN) coefficients are left out of that mean
(:func:`combine_finite`). Every test and interval is computed for the derived columns
from the *same* permutations / resamples, so the group mean gets its own exact null.

- **Mantel permutation test** (one-sided, positive alignment): permute the stimulus labels of the
  model RDM (rows and columns together), ``p = (1 + #{r_perm >= r}) / (1 + N)``.
  Permuting labels is a gather on the condensed index; ranks / standardised vectors are computed
  once, because a permutation does not change a vector's multiset of values, so a permuted
  Pearson / Spearman coefficient is one dot product. Since
  ``r(x o g_pi, y) = r(x, y o g_pi^-1)`` exactly, the smaller side (models or targets) is the one
  gathered; the null distribution is identical either way.
- **Permutations** are a function of ``(seed, n_perm, n)`` only (:func:`permutations`): blocks of
  ``PERM_BLOCK`` permutations from ``numpy.random.default_rng([seed, block])``, so results do not
  depend on batch sizes or devices, and a brute-force loop can reuse the same permutations.
- **Stimulus bootstrap**: resample the ``n`` stimuli with replacement, take all pairs ``a < b``
  of the resample and drop those where a stimulus meets its own copy; percentile interval
  (default 95%). Such a resample holds original pair ``(a, b)`` exactly ``c_a c_b`` times
  (``c``: how often each stimulus was drawn), so Spearman and Pearson are computed as weighted
  coefficients over the original pairs (:class:`~object2brain.rsa.compare.WeightedComparison`):
  no resample is gathered or sorted. Resamples come in chunks of ``BOOT_CHUNK`` with their own
  seeds (:func:`bootstrap_values`), so an executor's workers (Ray) give the numbers of a local
  run.
- **Noise ceiling** of ``S`` subject RDMs: upper = ``mean_s r(RDM_s, mean of all)``, lower =
  ``mean_s r(RDM_s, mean of the others)`` (raw dissimilarities averaged; NaN when ``S < 2``).
- **FDR**: Benjamini-Hochberg step-up adjusted p-values.
- **Condition difference**: ``d = r_a - r_b`` of the stimuli of conditions ``a`` and ``b``;
  null by permuting the condition labels among those stimuli (group sizes kept), two-sided
  ``p = (1 + #{|d_perm| >= |d|}) / (1 + N)``. Every permutation re-ranks each RDM within both
  conditions (Spearman); the RDMs are first replaced by int32 dense ranks of their values, which
  keep every order and tie, so those ranks are unchanged and sort faster.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats
import torch

from object2brain.devices import Chunking, pick_chunk, resolve_device
from object2brain.errors import DataError
from object2brain.executors.base import Executor, chunk_seed, chunks_of
from object2brain.rsa.compare import (
    WeightedComparison,
    check_method,
    comparison_scale,
    correlate_prepared,
    masked_compare,
    prepare,
)
from object2brain.rsa.compare import (
    compare as compare_rdms,
)
from object2brain.rsa.rdm import snap_ties, squareform, triu_indices, upper_triangle

PERM_BLOCK = 1000
_BOOT_STREAM = 7_919  # second word of the bootstrap seed sequence (independent of permutations)
_CONTRAST_STREAM = 104_729  # seed word of the within-condition bootstraps of a contrast
_TOL = 1e-12
_CPU_TILE_ELEMENTS = 1 << 16  # gathered values per Mantel tile on the CPU (512 KB: in cache)


def _batch_size(
    memory_elements: int | None, elements_per_item: int, bytes_per_item: int, dev: torch.device
) -> int:
    """Items per batch: ``memory_elements // elements_per_item`` when a budget is given, else
    picked from the free memory of ``dev`` with ``bytes_per_item`` the peak bytes of one item
    (:func:`object2brain.devices.pick_chunk`)."""
    if memory_elements is not None:
        return max(1, memory_elements // max(1, elements_per_item))
    return pick_chunk(bytes_per_item, dev)


def _inputs(
    method: str, device: str | torch.device | None, *arrays: np.ndarray | torch.Tensor
) -> tuple[torch.device, list[torch.Tensor]]:
    """Check ``method``, resolve ``device`` and put ``arrays`` there as float64 tensors."""
    check_method(method)
    dev = resolve_device(device)
    return dev, [torch.as_tensor(a, dtype=torch.float64).to(dev) for a in arrays]


def n_from_pairs(m: int) -> int:
    """Number of stimuli ``n`` with ``m = n (n - 1) / 2`` pairs."""
    n = round((1 + float(np.sqrt(1 + 8 * m))) / 2)
    if n * (n - 1) // 2 != m:
        raise DataError(f"{m} values are not the upper triangle of a square RDM")
    return n


def permutations(n: int, n_perm: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks ``(b, n)`` of random permutations of ``range(n)``, ``n_perm`` rows in total.

    Block ``k`` comes from ``numpy.random.default_rng([seed, k])``: the sequence depends only on
    ``(seed, n_perm, n)``.
    """
    for k in range(n_blocks(n_perm)):
        yield permutation_block(n, n_perm, seed, k)


def n_blocks(n_perm: int) -> int:
    """Number of blocks of :func:`permutations` (``ceil(n_perm / PERM_BLOCK)``)."""
    return -(-n_perm // PERM_BLOCK)


def permutation_block(n: int, n_perm: int, seed: int, k: int) -> np.ndarray:
    """Block ``k`` ``(b, n)`` of :func:`permutations`, drawn on its own from
    ``default_rng(chunk_seed(seed, None, k)) = default_rng([seed, k])``: any worker can draw any
    block, and the blocks are those of a plain loop."""
    size = min(PERM_BLOCK, n_perm - k * PERM_BLOCK)
    rng = np.random.default_rng(chunk_seed(seed, None, k))
    return rng.permuted(np.tile(np.arange(n), (size, 1)), axis=1)


def pair_index(perms: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Condensed positions ``(P, C)`` of the pairs ``(pi_i, pi_j)`` for the pairs ``(i, j)`` given
    by ``rows``, ``cols`` ``(C,)`` (``i < j``), one row per permutation of ``perms`` ``(P, n)``.

    ``c(a, b) = lo n - lo (lo + 1) / 2 + (hi - lo - 1)`` with ``lo = min(a, b)``,
    ``hi = max(a, b)``: the permuted RDM ``D'[i, j] = D[pi_i, pi_j]`` has condensed entries
    ``x'[c(i, j)] = x[c(pi_i, pi_j)]``.
    """
    n = perms.shape[-1]
    a, b = perms[:, rows], perms[:, cols]
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    return lo * n - lo * (lo + 1) // 2 + (hi - lo - 1)


def pair_permutation(
    perms: np.ndarray | torch.Tensor, device: torch.device | None = None
) -> torch.Tensor:
    """Condensed gather index ``(P, m)`` of stimulus permutations ``perms`` ``(P, n)``: the
    permuted condensed RDM is ``x[index[p]]`` (:func:`pair_index` over all pairs)."""
    p = torch.as_tensor(np.asarray(perms) if not isinstance(perms, torch.Tensor) else perms)
    p = p.to(device=device, dtype=torch.long)
    rows, cols = triu_indices(p.shape[1], p.device)
    return pair_index(p, rows, cols)


def combine_matrix(groups: Sequence[Sequence[int]], n_targets: int) -> torch.Tensor:
    """``(T, G)`` matrix averaging the target columns listed in each group."""
    C = torch.zeros((n_targets, len(groups)), dtype=torch.float64)
    for g, cols in enumerate(groups):
        if len(cols) == 0:
            raise DataError("empty group of targets to average")
        C[list(cols), g] = 1.0 / len(cols)
    return C


def combine_finite(r: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
    """Derived columns ``(..., G)`` of coefficients ``r`` ``(..., T)``: per column ``g`` the
    ``combine``-weighted mean of the *defined* coefficients,
    ``sum_t C[t, g] r_t [r_t finite] / sum_t C[t, g] [r_t finite]``.

    A subject whose RDM is constant (e.g. a rater who gave every stimulus the same rating) has no
    Spearman/Pearson r; it is left out of the mean rather than making it NaN. The derived value
    is NaN only when no coefficient of the group is defined. With every coefficient defined this
    is ``r @ C``.
    """
    C = combine.to(device=r.device, dtype=r.dtype)
    defined = torch.isfinite(r)
    total = torch.where(defined, r, torch.zeros((), dtype=r.dtype, device=r.device)) @ C
    weight = defined.to(r.dtype) @ C
    return total / torch.where(weight > 0, weight, torch.full_like(weight, float("nan")))


def _with_combine(r: torch.Tensor, combine: torch.Tensor | None) -> torch.Tensor:
    if combine is None:
        return r
    return torch.cat([r, combine_finite(r, combine)], dim=-1)


def _corr2d(a: torch.Tensor, b: torch.Tensor, method: str) -> torch.Tensor:
    return correlate_prepared(a, b, method)


@dataclass(frozen=True)
class TestResult:
    """Observed statistic ``r`` ``(K, T + G)`` and its permutation p-values (same shape)."""

    r: np.ndarray
    p: np.ndarray
    n_perm: int


def mantel_test(
    model: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    method: str = "spearman",
    n_perm: int = 10_000,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    combine: torch.Tensor | None = None,
    memory_elements: int | None = None,
    *,
    executor: Executor | None = None,
) -> TestResult:
    """Mantel permutation test of condensed model RDMs ``(K, m)`` against targets ``(T, m)``.

    Returns ``r`` and one-sided ``p = (1 + #{r_perm >= r}) / (1 + n_perm)`` of shape
    ``(K, T + G)`` (``G`` columns of ``combine``); ``p`` is NaN where ``r`` is NaN and when
    ``n_perm = 0``. Permutations are processed in tiles of at most ``memory_elements`` gathered
    values (default: cache-sized on the CPU, sized from free memory on a GPU; a tile that runs
    out of memory is halved and retried). p-values do not depend on the tile sizes; ``r_perm``
    only in the last bits (summation order), far inside the ``1e-12`` tie tolerance.
    ``executor`` (:mod:`object2brain.executors`): where the blocks of permutations run; the
    p-values are the same for every executor and number of workers.
    """
    _, (X, Y) = _inputs(method, device, model, target)
    X = X[None] if X.ndim == 1 else X
    Y = Y[None] if Y.ndim == 1 else Y
    n = n_from_pairs(X.shape[-1])
    xp, yp = prepare(X, method), prepare(Y, method)
    stat = _with_combine(_corr2d(xp, yp, method), combine)
    # r(x o g_pi, y) = r(x, y o g_pi^-1): gather the smaller side, permuted by the inverse when
    # it is the targets, so both choices give the same null distribution.
    gather_model = xp.shape[0] <= yp.shape[0]
    null: _DotNull | _KendallNull
    if method == "kendall_tau_a":
        null = _KendallNull(xp, yp, gather_model, n, memory_elements)
    else:
        null = _DotNull(xp, yp, gather_model, n, memory_elements)
    del X, Y, xp, yp  # the null holds what it needs (the dot null: pair-major copies)
    counts = _count_extremes(
        null, stat, combine, n, n_perm, seed, gather_model, two_sided=False, executor=executor
    )
    r = stat.cpu().numpy()
    return TestResult(r=r, p=_permutation_p(counts, r, n_perm), n_perm=n_perm)


def _permutation_p(counts: torch.Tensor, observed: np.ndarray, n_perm: int) -> np.ndarray:
    """``p = (1 + count) / (1 + n_perm)`` per entry; NaN where ``observed`` is NaN or without
    permutations."""
    p: np.ndarray = (1.0 + counts.cpu().numpy()) / (1.0 + n_perm)
    p[np.isnan(observed)] = np.nan
    if n_perm == 0:
        p[:] = np.nan
    return p


@dataclass(frozen=True)
class _NullJob:
    """What a chunk of permutation blocks needs (an executor's shared object: the RDM vectors,
    inside ``null``, go to a Ray object store once)."""

    null: _DotNull | _KendallNull | _SquareNull
    bound: torch.Tensor  # (K, T + G): r - tol, or |r| - tol
    combine: torch.Tensor | None
    n: int
    n_perm: int
    seed: int
    gather_model: bool
    two_sided: bool

    def on_cpu(self) -> _NullJob:
        """A copy whose tensors are on the CPU (for workers without the driver's GPU)."""
        if self.bound.device.type == "cpu":
            return self
        combine = None if self.combine is None else self.combine.cpu()
        return dataclasses.replace(
            self, null=_null_on_cpu(self.null), bound=self.bound.cpu(), combine=combine
        )


def _null_on_cpu(
    null: _DotNull | _KendallNull | _SquareNull,
) -> _DotNull | _KendallNull | _SquareNull:
    """A copy of ``null`` whose tensors are on the CPU, its tiles sized for the CPU."""
    null = copy.copy(null)
    for key, value in vars(null).items():
        if isinstance(value, torch.Tensor):
            setattr(null, key, value.cpu())
    if isinstance(null, _DotNull):  # tiles sized for the CPU's cache, not the GPU's memory
        m, S = null.gathered.shape
        null.tile = _CPU_TILE_ELEMENTS
        null.perms_per_tile = max(1, _CPU_TILE_ELEMENTS // (m * S))
    if isinstance(null, _SquareNull):
        null.perms_per_tile = _SquareNull.tile_for(null.target.shape[0], torch.device("cpu"))
    return null


def _count_blocks(job: _NullJob, blocks: range) -> torch.Tensor:
    """``#{s_perm >= s}`` (or ``#{|s_perm| >= |s|}``) over the permutation blocks ``blocks``
    (:func:`permutation_block`), per entry ``(K, T + G)``, in tiles of ``job.null``."""
    null, dev = job.null, job.bound.device
    counts = torch.zeros_like(job.bound, dtype=torch.int64)

    def count_block(perms: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        values = _with_combine(null.coefficients(perms[start:stop]), job.combine)
        return ((values.abs() if job.two_sided else values) >= job.bound).sum(dim=0)

    chunking = Chunking(null.perms_per_tile)
    for k in blocks:
        block = permutation_block(job.n, job.n_perm, job.seed, k)
        perms = torch.as_tensor(block if job.gather_model else np.argsort(block, axis=1)).to(dev)
        for _start, _stop, found in chunking.run(
            len(perms), partial(count_block, perms), device=dev
        ):
            counts += found
    return counts


def _count_extremes(
    null: _DotNull | _KendallNull | _SquareNull,
    stat: torch.Tensor,
    combine: torch.Tensor | None,
    n: int,
    n_perm: int,
    seed: int,
    gather_model: bool,
    *,
    two_sided: bool,
    executor: Executor | None = None,
) -> torch.Tensor:
    """``#{s_perm >= s}`` (or ``#{|s_perm| >= |s|}``) over the permutations of
    :func:`permutations`, per entry of ``stat`` ``(K, T + G)``.

    The blocks run as chunks of ``executor`` (default: in this process, all blocks in one
    chunk); counts are integers summed over the chunks, so p-values do not depend on the
    executor or the number of its workers. A Ray executor's workers compute on the CPU.
    """
    bound = stat.abs() - _TOL if two_sided else stat - _TOL
    job = _NullJob(null, bound, combine, n, n_perm, seed, gather_model, two_sided)
    total = n_blocks(n_perm)
    if executor is None or executor.name == "local" or total == 0:
        return _count_blocks(job, range(total))
    per_chunk = max(1, -(-total // (2 * executor.workers)))
    found = executor.map_chunks(
        _count_blocks, chunks_of(total, per_chunk), stage="rsa permutations", shared=job.on_cpu()
    )
    return torch.stack(found).sum(dim=0).to(stat.device)


def linear_permutation_test(
    model_side: torch.Tensor,
    target_prepared: torch.Tensor,
    n_perm: int,
    seed: int = 0,
    combine: torch.Tensor | None = None,
    memory_elements: int | None = None,
    *,
    executor: Executor | None = None,
    two_sided: bool = True,
) -> TestResult:
    """Permutation test (two-sided; one-sided ``s > s_perm`` without ``two_sided``) of
    statistics linear in a prepared target:
    ``s = x . (y o pi)`` for rows ``x`` of ``model_side`` ``(K, m)`` (any vectors, e.g. the
    difference of two standardised model RDMs) and prepared target rows ``y`` ``(T, m)``
    (standardised values or ranks, :func:`~object2brain.rsa.compare.prepare`).

    Stimulus labels are permuted as in :func:`mantel_test` (same permutations for a seed);
    ``p = (1 + #{|s_perm| >= |s|}) / (1 + N)`` (one-sided: ``#{s_perm >= s}``), NaN where ``s``
    is NaN or ``N = 0``. With
    ``x = prepare(variant) - prepare(full)`` this tests a change of Pearson / Spearman r,
    ``delta = r(variant, y) - r(full, y)``, against targets whose stimulus labels carry no
    relation to the model. ``executor``: where the permutation blocks run (as in
    :func:`mantel_test`).
    """
    X = model_side.to(torch.float64)
    Y = target_prepared.to(device=X.device, dtype=torch.float64)
    n = n_from_pairs(X.shape[-1])
    stat = _with_combine(X @ Y.T, combine)
    gather_model = X.shape[0] <= Y.shape[0]
    null = _DotNull(X, Y, gather_model, n, memory_elements)  # NaN rows stay NaN (left out)
    counts = _count_extremes(
        null, stat, combine, n, n_perm, seed, gather_model, two_sided=two_sided,
        executor=executor,
    )  # fmt: skip
    s = stat.cpu().numpy()
    return TestResult(r=s, p=_permutation_p(counts, s, n_perm), n_perm=n_perm)


def relabelled_mean_test(
    model_side: torch.Tensor,
    target_row: torch.Tensor,
    n_perm: int,
    seed: int = 0,
    *,
    executor: Executor | None = None,
) -> TestResult:
    """One-sided permutation test of ``s = x . y`` for rows ``x`` of ``model_side`` ``(K, m)``
    and one prepared target row ``target_row`` ``(1, m)`` (e.g. the mean of several subjects'
    prepared RDMs): ``p = (1 + #{s_pi >= s}) / (1 + N)`` over the permutations of
    :func:`permutations` (those of :func:`mantel_test` for ``seed``), ``r`` and ``p``
    ``(K, 1)``, NaN where ``s`` is NaN or ``N = 0``.

    The statistic under ``pi`` is ``x . (y o pi^-1)``, computed from the square target
    (:class:`_SquareNull`: two row/column gathers of ``n x n`` values and one matrix product per
    permutation, no condensed index arithmetic), on the device of ``model_side``; the counts equal
    :func:`linear_permutation_test`'s up to ties within ``1e-12``.
    """
    X = model_side.to(torch.float64)
    Y = target_row.to(device=X.device, dtype=torch.float64).reshape(1, -1)
    n = n_from_pairs(X.shape[-1])
    stat = X @ Y.T
    null = _SquareNull(X, Y, n)
    counts = _count_extremes(
        null, stat, None, n, n_perm, seed, False, two_sided=False, executor=executor
    )
    r = stat.cpu().numpy()
    return TestResult(r=r, p=_permutation_p(counts, r, n_perm), n_perm=n_perm)


@dataclass(frozen=True)
class RelabellingMoments:
    """Monte Carlo moments of coefficients over ``n_perm`` random relabellings of the stimuli,
    per entry ``(K, T + G)``: ``mean = sum_pi s_pi / N`` and the raw second moment
    ``second = sum_pi s_pi^2 / N`` (about 0, not about ``mean``: the variance where the null mean
    is known to be 0, as for Kendall's tau-a)."""

    mean: np.ndarray
    second: np.ndarray
    n_perm: int


@dataclass(frozen=True)
class _MomentJob:
    """What a chunk of permutation blocks of :func:`relabelling_moments` needs (an executor's
    shared object)."""

    null: _DotNull | _KendallNull
    combine: torch.Tensor | None
    n: int
    n_perm: int
    seed: int
    gather_model: bool
    device: torch.device

    def on_cpu(self) -> _MomentJob:
        """A copy whose tensors are on the CPU (for workers without the driver's GPU)."""
        if self.device.type == "cpu":
            return self
        null = _null_on_cpu(self.null)
        assert isinstance(null, _DotNull | _KendallNull)
        combine = None if self.combine is None else self.combine.cpu()
        return dataclasses.replace(self, null=null, combine=combine, device=torch.device("cpu"))


def _moment_blocks(job: _MomentJob, blocks: range) -> torch.Tensor:
    """Per permutation block ``k`` of ``blocks`` (:func:`permutation_block`) the sums
    ``(sum_pi s_pi, sum_pi s_pi^2)`` over its relabellings: ``(len(blocks), 2, K, T + G)`` on the
    CPU. A block's coefficients are concatenated before they are combined and summed, so its
    sums do not depend on the tiles it was computed in (to the bit where the coefficients do
    not: tau-a)."""
    null, dev = job.null, job.device
    out = []
    chunking = Chunking(null.perms_per_tile)
    for k in blocks:
        block = permutation_block(job.n, job.n_perm, job.seed, k)
        perms = torch.as_tensor(block if job.gather_model else np.argsort(block, axis=1)).to(dev)

        def tile(start: int, stop: int, perms: torch.Tensor = perms) -> torch.Tensor:
            return null.coefficients(perms[start:stop])

        parts = [value for _, _, value in chunking.run(len(perms), tile, device=dev)]
        values = _with_combine(torch.cat(parts), job.combine).cpu()
        out.append(torch.stack([values.sum(dim=0), (values**2).sum(dim=0)]))
    return torch.stack(out)


def relabelling_moments(
    model: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    method: str,
    n_perm: int,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    combine: torch.Tensor | None = None,
    memory_elements: int | None = None,
    *,
    executor: Executor | None = None,
) -> RelabellingMoments:
    """Monte Carlo moments of the coefficients of condensed model RDMs ``(K, m)`` against
    targets ``(T, m)`` (and the ``G`` derived columns of ``combine``) over the ``n_perm``
    relabellings of :func:`permutations` for ``seed``, those of :func:`mantel_test`, whose null
    coefficients it sums instead of counting (same kernels, tiles and executor chunks).

    For comparators without closed-form relabelling moments (Kendall's tau-a): the variance of
    the relabelling distribution estimated from ``N`` draws has relative standard error about
    ``sqrt(2 / N)`` (1.4% at ``N = 10,000``). The per-block sums are added in block order, so
    the moments do not depend on the executor, its number of workers or the tile sizes (for
    tau-a, whose coefficients are integer counts over a fixed denominator, not in a single
    bit); on another device only in the last bits.
    """
    dev, (X, Y) = _inputs(method, device, model, target)
    X = X[None] if X.ndim == 1 else X
    Y = Y[None] if Y.ndim == 1 else Y
    n = n_from_pairs(X.shape[-1])
    G = 0 if combine is None else combine.shape[1]
    if n_perm <= 0:
        nan = np.full((X.shape[0], Y.shape[0] + G), np.nan)
        return RelabellingMoments(nan, nan.copy(), 0)
    xp, yp = prepare(X, method), prepare(Y, method)
    gather_model = xp.shape[0] <= yp.shape[0]
    null: _DotNull | _KendallNull
    if method == "kendall_tau_a":
        null = _KendallNull(xp, yp, gather_model, n, memory_elements)
    else:
        null = _DotNull(xp, yp, gather_model, n, memory_elements)
    cm = None if combine is None else combine.to(device=dev, dtype=torch.float64)
    job = _MomentJob(null, cm, n, n_perm, seed, gather_model, dev)
    parts = map_chunk_ranges(
        _moment_blocks, job, n_blocks(n_perm), executor, "rsa relabelling moments"
    )
    sums = torch.cat(parts)
    total = sums[0].clone()
    for row in sums[1:]:  # block order: the same sum for every split of the blocks
        total += row
    moments = (total / n_perm).numpy()
    return RelabellingMoments(moments[0], moments[1], n_perm)


class _SquareNull:
    """Null coefficients ``x . (y o pi)`` of ``K`` model rows against ONE gathered target row,
    from the square target ``Y`` ``(n, n)``: ``Y[pi][:, pi]`` is a row gather and a column
    gather (no condensed pair index per permutation, the cost of :class:`_DotNull`), and
    ``sum_{i<j} X_ij Y'_ij = sum_ij (X / 2)_ij Y'_ij`` one matrix product with the halved square
    model rows ``(n^2, K)`` for a tile of permutations."""

    def __init__(self, xp: torch.Tensor, target: torch.Tensor, n: int) -> None:
        self.target = squareform(target)[0].contiguous()  # (n, n), zero diagonal
        self.model = (0.5 * squareform(xp)).reshape(xp.shape[0], n * n).T.contiguous()
        self.perms_per_tile = self.tile_for(n, xp.device)

    @staticmethod
    def tile_for(n: int, device: torch.device) -> int:
        """Permutations per tile: the gathered rows and values (two ``n x n`` float64 arrays a
        permutation), from free memory on a GPU, 8 on the CPU (a few MB: no gain beyond)."""
        if device.type == "cpu":
            return 8
        return pick_chunk(8 * 3 * n * n, device)

    def coefficients(self, perms: torch.Tensor) -> torch.Tensor:
        """``(P, K, 1)`` coefficients under the permutations ``perms`` ``(P, n)``."""
        P, n = perms.shape
        perms = perms.to(device=self.target.device, dtype=torch.long)
        rows = self.target.index_select(0, perms.reshape(-1)).reshape(P, n, n)
        values = torch.gather(rows, 2, perms[:, None, :].expand(P, n, n))
        return (values.reshape(P, n * n) @ self.model)[:, :, None]


class _DotNull:
    """Null coefficients of Pearson / Spearman, whose prepared vectors are standardised: a
    permuted coefficient is a dot product ``sum_c x[index[c]] y[c]``.

    The gathered side is stored pair-major ``(m, S)`` so one index fetches the values of all
    ``S`` RDMs at once, and the pairs are processed in chunks so each gathered tile
    ``(P, C, S)`` stays in cache on the CPU (the gather, not the arithmetic, bounds the time
    there). On a GPU a tile holds all ``m`` pairs of as many permutations as free memory allows.
    """

    def __init__(
        self,
        xp: torch.Tensor,
        yp: torch.Tensor,
        gather_model: bool,
        n: int,
        memory_elements: int | None,
    ) -> None:
        gathered, other = (xp, yp) if gather_model else (yp, xp)
        self.gathered = gathered.T.contiguous()  # (m, S)
        self.other = other.T.contiguous()  # (m, O)
        self.gather_model = gather_model
        self.n = n
        self.rows, self.cols = triu_indices(n, xp.device)
        m, S = self.gathered.shape
        if memory_elements is None and xp.device.type == "cuda":
            # index arithmetic (about five int64 values per pair) + the gathered (m, S) float64
            memory_elements = pick_chunk(8 * m * (6 + S), xp.device) * m * S
        tile = max(1, memory_elements if memory_elements is not None else _CPU_TILE_ELEMENTS)
        self.perms_per_tile = max(1, tile // (m * S))
        self.tile = tile

    def coefficients(self, perms: torch.Tensor) -> torch.Tensor:
        """``(P, K, T)`` coefficients under the permutations ``perms`` ``(P, n)``."""
        P = perms.shape[0]
        m, S = self.gathered.shape
        step = max(1, min(m, self.tile // (P * S)))
        if self.n**2 < 2**31:  # int32 index arithmetic: half the memory traffic of int64
            perms = perms.to(torch.int32)
        acc = torch.zeros((P, S, self.other.shape[1]), dtype=torch.float64, device=perms.device)
        for start in range(0, m, step):
            stop = min(m, start + step)
            index = pair_index(perms, self.rows[start:stop], self.cols[start:stop])
            values = self.gathered.index_select(0, index.reshape(-1)).reshape(P, -1, S)
            acc.baddbmm_(values.transpose(1, 2), self.other[start:stop].expand(P, -1, -1))
        return acc if self.gather_model else acc.transpose(1, 2)


class _KendallNull:
    """Null coefficients of Kendall tau-a: gather whole permuted vectors and compare them
    (``O(m^2)`` per permutation, as the statistic itself)."""

    def __init__(
        self,
        xp: torch.Tensor,
        yp: torch.Tensor,
        gather_model: bool,
        n: int,
        memory_elements: int | None,
    ) -> None:
        self.xp, self.yp, self.gather_model = xp, yp, gather_model
        self.rows, self.cols = triu_indices(n, xp.device)
        m = xp.shape[-1]
        side = xp.shape[0] if gather_model else yp.shape[0]
        # Peak bytes of one permutation: its index, the gathered values and their comparison's
        # temporaries.
        per_perm = 8 * (m + 2 * side * m)
        self.perms_per_tile = _batch_size(memory_elements, side * m, per_perm, xp.device)

    def coefficients(self, perms: torch.Tensor) -> torch.Tensor:
        index = pair_index(perms, self.rows, self.cols)
        P, m = index.shape
        if self.gather_model:
            K = self.xp.shape[0]
            g = self.xp[:, index].reshape(K * P, m)
            return _corr2d(g, self.yp, "kendall_tau_a").reshape(K, P, -1).permute(1, 0, 2)
        T = self.yp.shape[0]
        g = self.yp[:, index].reshape(T * P, m)
        return _corr2d(self.xp, g, "kendall_tau_a").reshape(-1, T, P).permute(2, 0, 1)


def bootstrap_ci(
    model_rdms: np.ndarray | torch.Tensor,
    target_rdms: np.ndarray | torch.Tensor,
    method: str = "spearman",
    n_boot: int = 1_000,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    combine: torch.Tensor | None = None,
    level: float = 0.95,
    memory_elements: int | None = None,
    *,
    corrected: bool = True,
    executor: Executor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Stimulus-bootstrap interval of the coefficients of square RDMs.

    Args:
        model_rdms: ``(K, n, n)``; target_rdms: ``(T, n, n)``.
        combine: optional ``(T, G)`` derived columns (see module docstring).
        corrected: the pair-corrected Student-t interval (:func:`corrected_spread`); False: the
            plain percentile interval of the resamples (too wide: see the module docstring).
    Returns:
        ``(low, high)``, each ``(K, T + G)``; NaN when ``n_boot = 0``.
    Each resample draws ``n`` stimuli with replacement; pairs ``a < b`` of the resample whose two
    entries are the same stimulus are dropped (weight 0), the rest compared with ``method``.
    """
    K, T = len(model_rdms), len(target_rdms)
    G = 0 if combine is None else combine.shape[1]
    if n_boot == 0:
        nan = np.full((K, T + G), np.nan)
        return nan, nan.copy()
    values = bootstrap_values(
        model_rdms, target_rdms, method, n_boot, seed, device, combine, memory_elements,
        executor,
    )  # fmt: skip
    if not corrected:
        return percentile_interval(values, level)
    spread = corrected_spread(
        values, jackknife_values(model_rdms, target_rdms, method, device, combine),
        observed_values(model_rdms, target_rdms, method, device, combine),
    )  # fmt: skip
    return spread.interval(level)


@dataclass(frozen=True)
class Spread:
    """A statistic ``(K, T + G)``, its corrected sampling variance over stimuli and the degrees
    of freedom of its t interval and test."""

    observed: np.ndarray
    variance: np.ndarray
    dof: np.ndarray | float
    bound: float = 1.0  # the statistic's range is [-bound, bound]

    @property
    def se(self) -> np.ndarray:
        """Standard error ``sqrt(variance)``."""
        return np.asarray(np.sqrt(np.maximum(self.variance, 0.0)))

    def interval(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """``observed +- t_{dof, (1 + level) / 2} se``, clipped to ``[-bound, bound]``."""
        q = scipy.stats.t.ppf(0.5 + level / 2, self.dof)
        low = np.clip(self.observed - q * self.se, -self.bound, self.bound)
        high = np.clip(self.observed + q * self.se, -self.bound, self.bound)
        return low, high

    def p_two_sided(self) -> np.ndarray:
        """Two-sided t-test ``p`` of ``observed = 0`` (NaN where the SE is 0 or undefined)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            t = self.observed / np.where(self.se > 0, self.se, np.nan)
        return np.asarray(2 * scipy.stats.t.sf(np.abs(t), self.dof))

    def difference(self, other: Spread) -> Spread:
        """``self - other`` of two independent statistics: variances add, Welch-Satterthwaite
        degrees of freedom ``(V_a + V_b)^2 / (V_a^2 / dof_a + V_b^2 / dof_b)``."""
        va, vb = np.maximum(self.variance, 0.0), np.maximum(other.variance, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            dof = (va + vb) ** 2 / (va**2 / self.dof + vb**2 / other.dof)
        fallback = np.minimum(self.dof, other.dof)
        dof = np.where(np.isfinite(dof) & (dof > 0), dof, fallback)
        return Spread(
            self.observed - other.observed, va + vb, np.asarray(dof, dtype=np.float64),
            self.bound + other.bound,
        )  # fmt: skip


def pair_corrected(jackknife: Any, bootstrap: Any, n: int) -> Any:
    """The unbiased combination ``(2n - 3)/(n - 1) V_jack - n/(n - 2) V_boot`` of a delete-one
    jackknife and a pair-bootstrap variance of a pair statistic of ``n`` stimuli (unfloored,
    linear in both; derivation in :func:`corrected_spread`). The one copy of the formula:
    :mod:`object2brain.rsa.group` uses it too."""
    return (2 * n - 3) / (n - 1) * jackknife - n / (n - 2) * bootstrap


def pair_corrected_variance(jackknife: Any, bootstrap: Any, n: int) -> Any:
    """:func:`pair_corrected` floored at ``n / (3n - 4) V_boot`` (its expectation when the
    stimuli carry no effect of their own, ``s_g = 0``)."""
    return np.maximum(pair_corrected(jackknife, bootstrap, n), n / (3 * n - 4) * bootstrap)


def corrected_spread(
    boot: np.ndarray, jack: np.ndarray, observed: np.ndarray, *, exact: bool = True
) -> Spread:
    """Pair-corrected sampling variance of an RDM coefficient from its stimulus bootstrap.

    ``boot`` ``(B, ...)``: resample values; ``jack`` ``(n, ...)``: delete-one-stimulus values;
    ``observed`` ``(...)``. With ``V_boot`` the variance of the resamples (ddof 1, undefined ones
    left out) and ``V_jack = (n - 1) / n sum_a (jack_a - mean)^2``,

        V = max((2n - 3)/(n - 1) V_jack - n/(n - 2) V_boot, n/(3n - 4) V_boot),  dof = n - 1

    (:func:`pair_corrected_variance`). A coefficient is to first order a mean over pairs of
    influence values ``h_ab = g_a + g_b + e_ab``; its sampling variance over stimuli is
    ``4 s_g^2 / n + 2 s_e^2 / (n (n - 1))``, the jackknife's expectation
    ``4 s_g^2 / n + 4 s_e^2 / (n (n - 2))`` and the pair bootstrap's (pairs of a stimulus with
    its own copy dropped) ``4 (n-2)^2 s_g^2 / (n^2 (n-1)) + (6n - 8) s_e^2 / (n^2 (n-1))``; the
    combination above is unbiased for the sampling variance, the floor is its value at
    ``s_g = 0``. ``exact=False``: the large-``n`` limit ``max(2 V_jack - V_boot, V_boot / 3)``,
    kept for the stratified within-pairs bootstrap (:mod:`object2brain.rsa.within`), whose
    conditions of different sizes have no single ``n``.
    """
    n = jack.shape[0]
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells stay NaN
        v_boot = (
            np.nanvar(boot, axis=0, ddof=1) if len(boot) > 1 else np.full(observed.shape, np.nan)
        )
        centre = np.nanmean(jack, axis=0)
        v_jack = (n - 1) / n * np.nansum((jack - centre) ** 2, axis=0)
    v_jack = np.where(np.isfinite(jack).all(axis=0), v_jack, np.nan)
    if exact and n > 2:
        variance = pair_corrected_variance(v_jack, v_boot, n)
    else:
        variance = np.maximum(2 * v_jack - v_boot, v_boot / 3)
    variance = np.where(np.isnan(v_jack), v_boot, variance)  # no jackknife: the bootstrap's
    return Spread(np.asarray(observed, dtype=np.float64), variance, float(n - 1))


def observed_values(
    model_rdms: np.ndarray | torch.Tensor,
    target_rdms: np.ndarray | torch.Tensor,
    method: str = "spearman",
    device: str | torch.device | None = "auto",
    combine: torch.Tensor | None = None,
) -> np.ndarray:
    """Coefficients ``(K, T + G)`` of square RDMs ``(K, n, n)`` and ``(T, n, n)``."""
    _, (A, Bt) = _inputs(method, device, model_rdms, target_rdms)
    r = compare_rdms(upper_triangle(A), upper_triangle(Bt), method)
    return _with_combine(r, combine).cpu().numpy()


def jackknife_values(
    model_rdms: np.ndarray | torch.Tensor,
    target_rdms: np.ndarray | torch.Tensor,
    method: str = "spearman",
    device: str | torch.device | None = "auto",
    combine: torch.Tensor | None = None,
) -> np.ndarray:
    """Delete-one-stimulus values ``(n, K, T + G)``: row ``a`` compares the RDMs without
    stimulus ``a`` (all its pairs dropped; ranks recomputed)."""
    dev, (A, Bt) = _inputs(method, device, model_rdms, target_rdms)
    n = A.shape[-1]
    keep = torch.ones((n, n), dtype=torch.bool, device=dev)
    keep.fill_diagonal_(False)
    if method == "kendall_tau_a":
        idx = torch.arange(n, device=dev).expand(n, n)[keep].reshape(n, n - 1)
        iu, ju = triu_indices(n - 1, dev)
        parts = [_kendall_resamples(A, Bt, iu, ju, idx[s : s + 4]) for s in range(0, n, 4)]
        return _with_combine(torch.cat(parts), combine).cpu().numpy()
    comparison = WeightedComparison(upper_triangle(A), upper_triangle(Bt), method)
    iu, ju = triu_indices(n, dev)
    counts = keep.to(torch.float64)
    step = max(1, PERM_BLOCK // 16)
    parts = [
        comparison(c[:, iu] * c[:, ju], c)
        for c in (counts[s : s + step] for s in range(0, n, step))
    ]
    return _with_combine(torch.cat(parts), combine).cpu().numpy()


#: Resamples per chunk of a stimulus bootstrap: chunk ``k`` draws from its own seed
#: (:func:`bootstrap_values`) and is one unit of work of an executor; a constant, never
#: dependent on the number of workers.
BOOT_CHUNK = 250


@dataclass(frozen=True)
class _BootJob:
    """What a chunk of stimulus-bootstrap resamples needs (an executor's shared object)."""

    a: torch.Tensor  # (K, n, n) float64
    bt: torch.Tensor  # (T, n, n) float64
    method: str
    combine: torch.Tensor | None
    memory_elements: int | None
    n_boot: int
    root: int
    words: tuple[int, ...]

    def on_cpu(self) -> _BootJob:
        """A copy whose tensors are on the CPU (for workers without the driver's GPU)."""
        combine = None if self.combine is None else self.combine.cpu()
        return dataclasses.replace(self, a=self.a.cpu(), bt=self.bt.cpu(), combine=combine)

    def indices(self, k: int) -> np.ndarray:
        """Stimulus draws ``(C, n)`` of chunk ``k``:
        ``default_rng([*chunk_seed(root, stream, k), *words]).integers(0, n, (C, n))``."""
        rows = chunks_of(self.n_boot, BOOT_CHUNK)[k]
        rng = np.random.default_rng([*chunk_seed(self.root, _BOOT_STREAM, k), *self.words])
        n = self.a.shape[-1]
        return rng.integers(0, n, size=(len(rows), n))


def _boot_chunks(job: _BootJob, chunks: range) -> torch.Tensor:
    """Coefficients ``(C, K, T + G)`` of the resamples of the chunks ``chunks`` (on the CPU)."""
    A, Bt, dev = job.a, job.bt, job.a.device
    K, n, T = A.shape[0], A.shape[-1], Bt.shape[0]
    m = n * (n - 1) // 2
    iu, ju = triu_indices(n, dev)
    if job.method == "kendall_tau_a":
        draw = partial(_kendall_resamples, A, Bt, iu, ju)
        # Per resample: gathered (K + T, m) values, sign-matrix chunks, the pair index (m,) x 3.
        batch = _batch_size(
            job.memory_elements, (K + T) * m, 8 * (4 * (K + T) * m + 3 * m + n), dev
        )
        batch = max(1, min(batch, 4))
    else:
        # A resample holds pair (a, b) c_a c_b times (c: how often each stimulus was drawn), so
        # it is the original pairs under those weights: sort once, no gathers.
        comparison = WeightedComparison(upper_triangle(A), upper_triangle(Bt), job.method)
        draw = partial(_weighted_resamples, comparison, iu, ju)
        # Per resample: the weights (m,), the standardised rows (K + T, m) and the temporaries of
        # one row being ranked (about 7 arrays (m,): gathered weights, cumulative sums, ties).
        batch = _batch_size(job.memory_elements, (K + T) * m, 8 * ((K + T + 8) * m + n), dev)
    stats = []
    chunking = Chunking(batch)
    for k in chunks:
        idx = torch.as_tensor(job.indices(k)).to(dev)

        def resamples(start: int, stop: int, idx: torch.Tensor = idx) -> torch.Tensor:
            return _with_combine(draw(idx[start:stop]), job.combine).cpu()

        stats += [values for _start, _stop, values in chunking.run(len(idx), resamples, device=dev)]
    G = 0 if job.combine is None else job.combine.shape[1]
    return torch.cat(stats) if stats else torch.zeros((0, K, T + G), dtype=torch.float64)


def bootstrap_values(
    model_rdms: np.ndarray | torch.Tensor,
    target_rdms: np.ndarray | torch.Tensor,
    method: str = "spearman",
    n_boot: int = 1_000,
    seed: int | Sequence[int] = 0,
    device: str | torch.device | None = "auto",
    combine: torch.Tensor | None = None,
    memory_elements: int | None = None,
    executor: Executor | None = None,
) -> np.ndarray:
    """The coefficients of ``n_boot`` stimulus-bootstrap resamples, ``(n_boot, K, T + G)``
    (see :func:`bootstrap_ci`).

    ``seed``: ``root`` or ``(root, *words)`` (e.g. ``(seed, condition)``) for independent
    streams. The resamples come in chunks of :data:`BOOT_CHUNK`; chunk ``k`` draws its stimuli
    from ``numpy.random.default_rng([*chunk_seed(root, stream, k), *words])``, so the values do
    not depend on batch sizes, devices, ``executor`` (where the chunks run; default: here) or
    the number of its workers (a Ray executor's workers compute on the CPU).
    """
    _, (A, Bt) = _inputs(method, device, model_rdms, target_rdms)
    root, *words = [int(seed)] if isinstance(seed, int | np.integer) else [int(w) for w in seed]
    job = _BootJob(A, Bt, method, combine, memory_elements, n_boot, root, tuple(words))
    total = len(chunks_of(n_boot, BOOT_CHUNK)) if n_boot > 0 else 0
    return torch.cat(map_chunk_ranges(_boot_chunks, job, total, executor, "rsa bootstrap")).numpy()


def map_chunk_ranges(
    fn: Callable[[Any, range], torch.Tensor],
    job: Any,
    total: int,
    executor: Executor | None,
    stage: str,
) -> list[torch.Tensor]:
    """``fn(job, chunks)`` over the chunks ``range(total)`` (bootstrap chunks, permutation
    blocks), each seeded by its own index: here in one call (no executor, a local one, or at
    most one chunk), otherwise cut into ``2 x workers`` tasks of ``executor`` that share
    ``job.on_cpu()``; the parts in chunk order (concatenate or add them)."""
    if executor is None or executor.name == "local" or total <= 1:
        return [fn(job, range(total))]
    per_task = max(1, -(-total // (2 * executor.workers)))
    return executor.map_chunks(fn, chunks_of(total, per_task), stage=stage, shared=job.on_cpu())


def percentile_interval(values: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """The ``level`` percentile interval over axis 0 of bootstrap ``values`` ``(n_boot, ...)``.

    Undefined resamples (NaN) are left out; NaN where none is defined.
    """
    alpha = (1 - level) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "All-NaN slice": the bound is NaN
        low = np.nanquantile(values, alpha, axis=0)
        high = np.nanquantile(values, 1 - alpha, axis=0)
    return low, high


def _weighted_resamples(
    comparison: WeightedComparison, iu: torch.Tensor, ju: torch.Tensor, idx: torch.Tensor
) -> torch.Tensor:
    """Coefficients ``(B, K, T)`` of the resamples ``idx`` ``(B, n)`` as pair weights
    ``w[a, b] = c_a c_b`` (``c``: draws of each stimulus; pairs of a stimulus with itself drop)."""
    counts = torch.zeros(idx.shape, dtype=torch.float64, device=idx.device)
    counts.scatter_add_(1, idx, torch.ones_like(counts))
    return comparison(counts[:, iu] * counts[:, ju])


def _kendall_resamples(
    A: torch.Tensor, Bt: torch.Tensor, iu: torch.Tensor, ju: torch.Tensor, idx: torch.Tensor
) -> torch.Tensor:
    """Kendall tau-a ``(B, K, T)`` of the resamples ``idx`` ``(B, n)``, gathered explicitly."""
    ra, rb = idx[:, iu], idx[:, ju]
    w = (ra != rb).to(torch.float64)
    a = A[:, ra, rb].permute(1, 0, 2)
    b = Bt[:, ra, rb].permute(1, 0, 2)
    return masked_compare(a, b, w, "kendall_tau_a")


def _on_comparison_scale(x: torch.Tensor, method: str) -> torch.Tensor:
    """Condensed RDMs ``(S, m)`` on the scale a comparison sees: z-scores (Pearson; unit norm,
    a scale common to all rows) or ranks (Spearman, Kendall tau-a), as rsatoolbox's pool_rdm
    (:func:`~object2brain.rsa.compare.comparison_scale`, which also covers the other methods)."""
    return comparison_scale(x, method)


def pool_rdms(rdms: torch.Tensor, method: str = "spearman") -> torch.Tensor:
    """Group RDM ``(n, n)`` of subject RDMs ``(S, n, n)``: the mean of the subjects' RDMs on the
    comparison's scale (:func:`_on_comparison_scale`, as in :func:`noise_ceiling`).

    ``group_rdm = mean_s p(x_s)``, ``p`` = ranks (Spearman, tau-a) or z-scores (Pearson) over
    the upper triangle, so a subject whose dissimilarities span a larger range does not dominate.
    Subjects whose RDM is constant (within rounding) or holds NaN are left out (all of them: the
    plain mean). Pooled over all
    ``n`` stimuli once; analyses of a subset (a condition) use its rows and columns, so the group
    RDM stays one fixed RDM under permutations and resamples of the stimuli.
    """
    vectors = upper_triangle(rdms)
    varies = (vectors != vectors[:, :1]).any(dim=1)
    scaled = _on_comparison_scale(vectors[varies], method)
    usable = torch.isfinite(scaled).all(dim=1)  # NaN: constant within rounding, or NaN input
    if not bool(usable.any()):
        return rdms.mean(dim=0)
    return snap_ties(squareform(scaled[usable].mean(dim=0)))


def noise_ceiling(rdms: np.ndarray | torch.Tensor, method: str = "spearman") -> tuple[float, float]:
    """Noise ceiling ``(lower, upper)`` of ``S`` subject RDMs given condensed ``(S, m)``.

    ``upper = mean_s r(x_s, mean_t p_t)``, ``lower = mean_s r(x_s, mean_{t != s} p_t)``, where
    the subjects are pooled on the scale the comparison sees (as rsatoolbox's ``pool_rdm``):
    ``p_t`` = ranks of ``x_t`` for Spearman and Kendall tau-a, z-scores for Pearson. Averaging
    raw dissimilarities instead lets a subject whose RDM has a larger scale dominate the mean,
    and the "upper" bound then falls below a true model's r. ``(nan, nan)`` when ``S < 2``. For
    Spearman and Pearson, subjects whose RDM is constant have no r and are left out first, as in
    the group mean (:func:`combine_finite`).
    """
    X = torch.as_tensor(rdms, dtype=torch.float64)
    if method != "kendall_tau_a":
        X = X[torch.isfinite(prepare(X, method)).all(dim=-1)]
    S = X.shape[0]
    if S < 2:
        return float("nan"), float("nan")
    pooled = _on_comparison_scale(X, method)
    total = pooled.sum(dim=0)
    mean_all = total / S
    others = (total[None] - pooled) / (S - 1)
    upper = compare_rdms(X, mean_all[None], method)[:, 0]
    if method == "kendall_tau_a":
        lower = torch.diagonal(compare_rdms(X, others, method))
    else:
        lower = (prepare(X, method) * prepare(others, method)).sum(dim=-1)
    return float(lower.mean()), float(upper.mean())


def fdr_bh(p: np.ndarray | Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (same shape; NaNs kept and not counted).

    ``q_(i) = min_{j >= i} min(1, p_(j) M / j)`` over the ``M`` finite p-values sorted ascending.
    """
    values = np.asarray(p, dtype=np.float64)
    flat = values.ravel()
    out = np.full_like(flat, np.nan)
    finite = np.flatnonzero(~np.isnan(flat))
    M = finite.size
    if M:
        order = finite[np.argsort(flat[finite], kind="stable")]
        scaled = flat[order] * M / np.arange(1, M + 1)
        adjusted = np.minimum.accumulate(scaled[::-1])[::-1]
        out[order] = np.minimum(adjusted, 1.0)
    return out.reshape(values.shape)


def with_fdr(
    frame: pd.DataFrame,
    family: list[str],
    columns: Sequence[tuple[str, str]] = (("p_perm", "p_fdr"),),
) -> pd.DataFrame:
    """Fill each ``(p, adjusted)`` column pair of a result table: Benjamini-Hochberg
    (:func:`fdr_bh`) within each ``family`` (the rows sharing the values of those columns, e.g.
    the layers x targets of one model, condition and subject level)."""
    if frame.empty:
        return frame
    frame = frame.copy()
    for _, index in frame.groupby(family, sort=False).groups.items():
        for p_column, adjusted in columns:
            frame.loc[index, adjusted] = fdr_bh(frame.loc[index, p_column].to_numpy(np.float64))
    return frame


@dataclass(frozen=True)
class ContrastResult:
    """Condition contrast: ``r_a``, ``r_b``, ``delta = r_a - r_b`` and two-sided ``p``.

    All arrays ``(K, T + G)``; ``n_a``, ``n_b`` stimuli per condition.
    """

    r_a: np.ndarray
    r_b: np.ndarray
    delta: np.ndarray
    p: np.ndarray
    n_a: int
    n_b: int
    n_perm: int


def _subset_vectors(rdms: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Condensed vectors ``(P, R, m_s)`` of RDMs ``(R, n, n)`` restricted to rows ``(P, n_s)``."""
    iu, ju = triu_indices(rows.shape[-1], rows.device)
    return rdms[:, rows[:, iu], rows[:, ju]].permute(1, 0, 2)


def _dense_rank_squares(rdms: torch.Tensor) -> torch.Tensor:
    """Square RDMs ``(R, n, n)`` -> int32 dense ranks (0, 1, ...; ties share one) of each RDM's
    upper-triangle values, placed symmetrically (diagonal 0)."""
    R, n = rdms.shape[0], rdms.shape[-1]
    iu, ju = triu_indices(n, rdms.device)
    values, order = torch.sort(rdms[:, iu, ju], dim=-1)
    steps = torch.zeros_like(order, dtype=torch.int32)
    steps[:, 1:] = (values[:, 1:] != values[:, :-1]).to(torch.int32)
    dense = torch.empty_like(steps).scatter_(1, order, steps.cumsum(dim=-1, dtype=torch.int32))
    out = torch.zeros((R, n, n), dtype=torch.int32, device=rdms.device)
    out[:, iu, ju] = dense
    out[:, ju, iu] = dense
    return out


def condition_difference_test(
    model_rdms: np.ndarray | torch.Tensor,
    target_rdms: np.ndarray | torch.Tensor,
    labels: Sequence[str],
    condition_a: str,
    condition_b: str,
    method: str = "spearman",
    n_perm: int = 10_000,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    combine: torch.Tensor | None = None,
    memory_elements: int | None = None,
) -> ContrastResult:
    """Test ``r_a - r_b`` between two conditions by permuting condition labels.

    Args:
        model_rdms: square ``(K, n, n)``; target_rdms: square ``(T, n, n)``.
        labels: condition of each of the ``n`` stimuli.
    Returns:
        :class:`ContrastResult`; ``p = (1 + #{|d_perm| >= |d|}) / (1 + n_perm)``.
    """
    dev, (A, Bt) = _inputs(method, device, model_rdms, target_rdms)
    lab = np.asarray([str(x) for x in labels])
    in_a = np.flatnonzero(lab == condition_a)
    in_b = np.flatnonzero(lab == condition_b)
    n_a, n_b = in_a.size, in_b.size
    if n_a < 3 or n_b < 3:
        raise DataError(
            f"conditions {condition_a!r} ({n_a} stimuli) and {condition_b!r} ({n_b}) need at "
            "least 3 stimuli each for an RSA contrast"
        )
    pool = torch.as_tensor(np.concatenate([in_a, in_b]), device=dev)
    if method == "spearman":
        # Ranks within a subset depend only on the order (and ties) of its values: dense ranks
        # of the whole RDM keep both, and int32 keys gather and sort faster than float64.
        A, Bt = _dense_rank_squares(A), _dense_rank_squares(Bt)

    def stats(rows_a: torch.Tensor, rows_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for rows in (rows_a, rows_b):
            xa = prepare(_subset_vectors(A, rows), method)
            ya = prepare(_subset_vectors(Bt, rows), method)
            out.append(_with_combine(correlate_prepared(xa, ya, method), combine))
        return out[0], out[1]

    obs_a, obs_b = stats(pool[None, :n_a], pool[None, n_a:])
    obs_a, obs_b = obs_a[0], obs_b[0]
    delta = obs_a - obs_b
    counts = torch.zeros_like(delta, dtype=torch.int64)
    m_max = max(n_a * (n_a - 1), n_b * (n_b - 1)) // 2
    R = A.shape[0] + Bt.shape[0]
    batch = _batch_size(memory_elements, R * m_max, 8 * (4 * R * m_max + 2 * m_max), dev)

    def count_block(shuffled: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        pa, pb = stats(shuffled[start:stop, :n_a], shuffled[start:stop, n_a:])
        return ((pa - pb).abs() >= delta.abs() - _TOL).sum(dim=0)

    chunking = Chunking(batch)
    for block in permutations(n_a + n_b, n_perm, seed):
        shuffled = pool[torch.as_tensor(block, device=dev)]
        for _start, _stop, found in chunking.run(
            len(shuffled), partial(count_block, shuffled), device=dev
        ):
            counts += found
    d = delta.cpu().numpy()
    p = _permutation_p(counts, d, n_perm)
    return ContrastResult(
        r_a=obs_a.cpu().numpy(),
        r_b=obs_b.cpu().numpy(),
        delta=d,
        p=p,
        n_a=int(n_a),
        n_b=int(n_b),
        n_perm=n_perm,
    )


@dataclass(frozen=True)
class ContrastInterval:
    """Stratified bootstrap of ``delta = r_a - r_b``: interval and two-sided ``p``,
    all ``(K, T + G)``."""

    low: np.ndarray
    high: np.ndarray
    p: np.ndarray
    n_boot: int


@dataclass(frozen=True)
class ConditionResamples:
    """One condition's bootstrap values ``(B, K, T + G)``, delete-one values ``(n_c, K, T + G)``
    and observed coefficients ``(K, T + G)``."""

    boot: np.ndarray
    jack: np.ndarray
    observed: np.ndarray

    def spread(self) -> Spread:
        """The pair-corrected variance of the condition's coefficients
        (:func:`corrected_spread`)."""
        return corrected_spread(self.boot, self.jack, self.observed)

    def scaled(self, divisor: np.ndarray) -> ConditionResamples:
        """Every value divided by ``divisor`` (broadcast to ``(K, T + G)``)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return ConditionResamples(
                self.boot / divisor, self.jack / divisor, self.observed / divisor
            )


def condition_difference_bootstrap(
    model_rdms: np.ndarray | torch.Tensor,
    target_rdms: np.ndarray | torch.Tensor,
    labels: Sequence[str],
    condition_a: str,
    condition_b: str,
    method: str = "spearman",
    n_boot: int = 1_000,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    combine: torch.Tensor | None = None,
    level: float = 0.95,
    memory_elements: int | None = None,
    cache: dict[tuple[str, int], ConditionResamples] | None = None,
    *,
    corrected: bool = True,
    ceilings: tuple[np.ndarray, np.ndarray] | None = None,
    executor: Executor | None = None,
) -> ContrastInterval:
    """Stimulus bootstrap of ``r_a - r_b`` that resamples within each condition.

    Each condition's stimuli are resampled with replacement on their own (independent streams),
    so ``delta* = r_a* - r_b*`` varies as the difference of two independent estimates; nothing
    assumes that stimuli of the two conditions are exchangeable. The label permutation of
    :func:`condition_difference_test` does assume it: where the conditions differ in content
    (a mean pattern or spread shared by model and brain), mixed groups inflate r and its null is
    too narrow (type-I error 0.3-0.7 at alpha 0.05 in simulations).

    Returns:
        :class:`ContrastInterval`. ``corrected`` (default): each condition's variance is
        pair-corrected (:func:`corrected_spread`), ``V = V_a + V_b``, the interval
        ``delta +- t se`` and ``p`` the two-sided t-test with Welch-Satterthwaite degrees of
        freedom (:meth:`Spread.difference`). Otherwise the percentile interval of ``delta*`` and
        ``p = min(1, 2 min(1 + #{delta* <= 0}, 1 + #{delta* >= 0}) / (1 + B))`` over the ``B``
        defined resamples (conservative: the resampled spread is too wide). NaN when
        ``n_boot = 0``.

    ``cache``: a dict shared by calls with the same RDMs, method, ``n_boot``, seed and
    ``combine`` (e.g. every contrast of one model): a condition's resamples depend only on it
    and its side of the pair (``a`` or ``b``), so pairs (a, b) and (a, c) share a's.

    ``ceilings``: divisors ``(c_a, c_b)``, each broadcastable to ``(K, T + G)`` (e.g. each
    condition's noise ceiling per target column): the statistic becomes
    ``r_a / c_a - r_b / c_b`` (divisors held fixed; variances scale by ``1 / c^2``).
    """
    lab = np.asarray([str(x) for x in labels])
    A = torch.as_tensor(model_rdms)
    Bt = torch.as_tensor(target_rdms)
    sides: list[ConditionResamples] = []
    for word, condition in enumerate((condition_a, condition_b)):
        rows = torch.as_tensor(np.flatnonzero(lab == condition), device=A.device)
        if rows.numel() < 3:
            raise DataError(f"condition {condition!r} has {rows.numel()} stimuli (< 3)")
        if n_boot == 0:
            continue
        if cache is not None and (condition, word) in cache:
            sides.append(cache[(condition, word)])
            continue
        sub_a = A[:, rows][:, :, rows]
        sub_b = Bt[:, rows.to(Bt.device)][:, :, rows.to(Bt.device)]
        boot = bootstrap_values(
            sub_a, sub_b, method, n_boot, (seed, _CONTRAST_STREAM, word), device, combine,
            memory_elements, executor,
        )  # fmt: skip
        sides.append(
            ConditionResamples(
                boot,
                jackknife_values(sub_a, sub_b, method, device, combine),
                observed_values(sub_a, sub_b, method, device, combine),
            )
        )
        if cache is not None:
            cache[(condition, word)] = sides[-1]
    G = 0 if combine is None else combine.shape[1]
    if n_boot == 0:
        nan = np.full((len(A), len(Bt) + G), np.nan)
        return ContrastInterval(nan, nan.copy(), nan.copy(), 0)
    if ceilings is not None:
        sides = [side.scaled(c) for side, c in zip(sides, ceilings, strict=True)]
    if corrected:
        spread = sides[0].spread().difference(sides[1].spread())
        low, high = spread.interval(level)
        return ContrastInterval(low, high, spread.p_two_sided(), n_boot)
    delta = sides[0].boot - sides[1].boot
    low, high = percentile_interval(delta, level)
    defined = np.isfinite(delta)
    count = defined.sum(axis=0)
    below = ((delta <= 0) & defined).sum(axis=0)
    above = ((delta >= 0) & defined).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.minimum(1.0, 2.0 * np.minimum(1 + below, 1 + above) / (1 + count))
    p = np.where(count > 0, p, np.nan)
    return ContrastInterval(low, high, p, n_boot)


def correlation_test(
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    method: str = "pearson",
    n_perm: int = 10_000,
    n_boot: int = 1_000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float, float]:
    """Direct correlation of two vectors ``(n,)`` (e.g. predicted vs rated valence).

    Returns ``(r, p, ci_low, ci_high)``: two-sided permutation
    ``p = (1 + #{|r_perm| >= |r|}) / (1 + n_perm)`` (permuting ``x``) and a bootstrap
    percentile interval over stimuli resampled with replacement. ``method`` is ``pearson`` or
    ``spearman`` (``kendall_tau_a`` also works).
    """
    check_method(method)
    xv = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    yv = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
    n = xv.shape[0]
    r = float(compare_rdms(xv[None], yv[None], method)[0, 0])
    p = float("nan")
    if n_perm > 0 and not np.isnan(r):
        count = 0
        for block in permutations(n, n_perm, seed):
            idx = torch.as_tensor(block)
            rp = compare_rdms(xv[idx], yv[None], method)[:, 0]
            count += int((rp.abs() >= abs(r) - _TOL).sum())
        p = (1 + count) / (1 + n_perm)
    low = high = float("nan")
    if n_boot > 0:
        rng = np.random.default_rng([seed, _BOOT_STREAM])
        idx = torch.as_tensor(rng.integers(0, n, size=(n_boot, n)))
        xs, ys = xv[idx], yv[idx]
        if method == "kendall_tau_a":
            rb = torch.stack(
                [compare_rdms(a[None], b[None], method)[0, 0] for a, b in zip(xs, ys, strict=True)]
            )
        else:
            rb = (prepare(xs, method) * prepare(ys, method)).sum(dim=-1)
        low, high = (float(bound) for bound in percentile_interval(rb.numpy(), level))
    return r, p, low, high
