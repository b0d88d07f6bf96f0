"""RSA over within-condition pairs only (``--pairs within``).

Over all stimuli an RDM mixes two kinds of structure: pairs of stimuli of the same condition
(within) and pairs across conditions (between). Where conditions differ in content, model and
brain both separate the conditions, and the between pairs alone give a high r, even when nothing
within a condition is shared. With ``pairs = within`` the ``all`` rows compare only the pairs
``(i, j)``, ``i < j``, whose stimuli have the same (non-empty) condition label:

- **statistic**: the comparison (spearman, pearson, rho_a or cosine) of the ``P`` within pairs,
  i.e. of the concatenated upper triangles of the conditions' RDMs (ranks and means over all
  ``P`` values, as one vector);
- **null**: stimulus labels permuted *within* each condition (stratified Mantel test): a within
  pair maps to a within pair, so each permuted vector is a rearrangement of the same values and
  a permuted coefficient is one dot product of prepared vectors, as in
  :func:`~object2brain.rsa.inference.mantel_test`; one-sided ``p = (1 + #{r_perm >= r}) /
  (1 + N)``. The permutations depend only on ``(seed, n_perm, labels)``: block ``k`` of
  ``PERM_BLOCK`` from ``default_rng(chunk_seed(seed, _WITHIN_STREAM, k))``;
- **interval**: a stratified stimulus bootstrap (each condition resampled with replacement on its
  own); a resample holds within pair ``(a, b)`` ``c_a c_b`` times (pairs of a stimulus with its
  own copy dropped), computed as weighted coefficients
  (:class:`~object2brain.rsa.compare.WeightedComparison`); the pair-corrected t interval of the
  all-pairs rows (:func:`~object2brain.rsa.inference.corrected_spread`). The resamples come
  in chunks of ``BOOT_CHUNK``, chunk ``k`` from
  ``default_rng(chunk_seed(seed, _WITHIN_BOOT_STREAM, k))``.

Permutation blocks and resample chunks run as chunks of an executor
(:func:`~object2brain.rsa.inference.map_chunk_ranges`): the results do not depend on where, in
which order or on how many workers they run.

The whitened comparators (``corr_cov``, ``cosine_cov``) need whole RDMs and Kendall's tau-a has
no dot-product null: they are refused with ``pairs = within``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from object2brain.errors import DataError
from object2brain.executors.base import Executor, chunk_seed, chunks_of
from object2brain.rsa.compare import WeightedComparison, prepare
from object2brain.rsa.inference import (
    BOOT_CHUNK,
    PERM_BLOCK,
    TestResult,
    combine_finite,
    corrected_spread,
    map_chunk_ranges,
    n_blocks,
    percentile_interval,
)

#: Comparison methods usable over within-condition pairs.
WITHIN_METHODS: tuple[str, ...] = ("spearman", "pearson", "rho_a", "cosine")
_WITHIN_STREAM = 52_711  # stream of the stratified permutations (block k: [seed, stream, k])
_WITHIN_BOOT_STREAM = 52_721  # stream of the stratified resamples (chunk k: [seed, stream, k])
_TILE_ELEMENTS = 1 << 22  # gathered values per block of permutations
_TOL = 1e-12


@dataclass(frozen=True)
class WithinPairs:
    """The within-condition pairs of ``n`` stimuli.

    Attributes:
        groups: the stimulus indices of each condition (conditions with >= 2 stimuli).
        rows, cols: ``(P,)`` int64, the pairs ``(i, j)``, ``i < j``, condition by condition.
        position: ``(n, n)`` int64, the pair number of ``(i, j)`` (symmetric; -1 off the pairs).
    """

    groups: list[np.ndarray]
    rows: torch.Tensor
    cols: torch.Tensor
    position: torch.Tensor

    @property
    def n_stimuli(self) -> int:
        """Stimuli that have a within pair."""
        return int(sum(g.size for g in self.groups))


def within_pairs(labels: Sequence[str], device: torch.device | None = None) -> WithinPairs:
    """:class:`WithinPairs` of condition ``labels`` ``(n,)`` (``""``: in no condition).

    Raises:
        DataError: no condition with at least 2 stimuli.
    """
    lab = np.asarray([str(x) for x in labels])
    groups = [np.flatnonzero(lab == c) for c in dict.fromkeys(lab.tolist()) if c != ""]
    groups = [g for g in groups if g.size >= 2]
    if not groups:
        raise DataError("--pairs within needs conditions of at least 2 stimuli")
    rows, cols = [], []
    for g in groups:
        i, j = np.triu_indices(g.size, 1)
        rows.append(g[i])
        cols.append(g[j])
    r = torch.as_tensor(np.concatenate(rows), device=device)
    c = torch.as_tensor(np.concatenate(cols), device=device)
    n = lab.size
    position = torch.full((n, n), -1, dtype=torch.int64, device=device)
    number = torch.arange(r.numel(), device=device)
    position[r, c] = number
    position[c, r] = number
    return WithinPairs(groups, r, c, position)


def check_within_method(method: str) -> None:
    """Raise :class:`DataError` for a comparison that cannot run over within pairs."""
    if method not in WITHIN_METHODS:
        raise DataError(
            f"--pairs within supports --compare {' | '.join(WITHIN_METHODS)}, not {method} "
            "(the whitened comparators need whole RDMs; tau-a has no dot-product null)"
        )


def stratified_permutations(
    pairs: WithinPairs, n: int, n_perm: int, seed: int
) -> Iterator[np.ndarray]:
    """Blocks ``(b, n)`` of permutations of ``range(n)`` that permute within each condition
    (stimuli in no condition stay), ``n_perm`` rows in total (:func:`stratified_block`)."""
    for k in range(n_blocks(n_perm)):
        yield stratified_block(tuple(pairs.groups), n, n_perm, seed, k)


def stratified_block(
    groups: tuple[np.ndarray, ...], n: int, n_perm: int, seed: int, k: int
) -> np.ndarray:
    """Block ``k`` ``(b, n)`` of :func:`stratified_permutations`, drawn on its own from
    ``default_rng(chunk_seed(seed, _WITHIN_STREAM, k)) = default_rng([seed, _WITHIN_STREAM,
    k])``: any worker can draw any block, and the blocks are those of a plain loop."""
    size = min(PERM_BLOCK, n_perm - k * PERM_BLOCK)
    rng = np.random.default_rng(chunk_seed(seed, _WITHIN_STREAM, k))
    block = np.tile(np.arange(n), (size, 1))
    for g in groups:
        block[:, g] = g[rng.permuted(np.tile(np.arange(g.size), (size, 1)), axis=1)]
    return block


def _with_combine(r: torch.Tensor, combine: torch.Tensor | None) -> torch.Tensor:
    return r if combine is None else torch.cat([r, combine_finite(r, combine)], dim=-1)


@dataclass(frozen=True)
class _WithinNullJob:
    """What a chunk of stratified permutation blocks needs (an executor's shared object)."""

    xp: torch.Tensor  # (K, P) the models' prepared within-pair values
    yp: torch.Tensor  # (T, P) the targets'
    bound: torch.Tensor  # (K, T + G): r - tol
    combine: torch.Tensor | None
    position: torch.Tensor  # (n, n) pair numbers (WithinPairs.position)
    rows: torch.Tensor  # (P,) the pairs (i, j)
    cols: torch.Tensor
    groups: tuple[np.ndarray, ...]
    n: int
    n_perm: int
    seed: int

    def on_cpu(self) -> _WithinNullJob:
        """A copy whose tensors are on the CPU (for workers without the driver's GPU)."""
        combine = None if self.combine is None else self.combine.cpu()
        return dataclasses.replace(
            self, xp=self.xp.cpu(), yp=self.yp.cpu(), bound=self.bound.cpu(), combine=combine,
            position=self.position.cpu(), rows=self.rows.cpu(), cols=self.cols.cpu(),
        )  # fmt: skip


def _within_count_blocks(job: _WithinNullJob, blocks: range) -> torch.Tensor:
    """``#{r_perm >= r}`` ``(K, T + G)`` over the permutation blocks ``blocks``
    (:func:`stratified_block`)."""
    device = job.xp.device
    counts = torch.zeros_like(job.bound, dtype=torch.int64)
    K, P = job.xp.shape
    step = max(1, _TILE_ELEMENTS // max(1, K * P))
    for k in blocks:
        block = stratified_block(job.groups, job.n, job.n_perm, job.seed, k)
        perms = torch.as_tensor(block, device=device)
        for start in range(0, len(perms), step):
            p = perms[start : start + step]
            index = job.position[p[:, job.rows], p[:, job.cols]]  # (b, P)
            null = torch.einsum("kbp,tp->bkt", job.xp[:, index], job.yp)
            counts += (_with_combine(null, job.combine) >= job.bound).sum(dim=0)
    return counts


def within_mantel_test(
    models: torch.Tensor,
    targets: torch.Tensor,
    labels: Sequence[str],
    method: str,
    n_perm: int,
    seed: int,
    combine: torch.Tensor | None = None,
    *,
    executor: Executor | None = None,
) -> TestResult:
    """Stratified Mantel test over within-condition pairs (module docstring).

    Args:
        models: square RDMs ``(K, n, n)``; targets: ``(T, n, n)``; labels: ``(n,)``.
        executor: where the permutation blocks run (default: here); counts are integers added
            over the blocks, so ``p`` does not depend on the executor or its workers.
    Returns:
        ``r`` and one-sided ``p`` ``(K, T + G)`` (``G`` columns of ``combine``); ``p`` NaN where
        ``r`` is NaN and when ``n_perm = 0``.
    """
    check_within_method(method)
    device = models.device
    pairs = within_pairs(labels, device)
    xp = prepare(models[:, pairs.rows, pairs.cols], method)  # (K, P)
    yp = prepare(targets[:, pairs.rows, pairs.cols].to(device), method)  # (T, P)
    stat = _with_combine(xp @ yp.T, combine)
    job = _WithinNullJob(
        xp, yp, stat - _TOL, combine, pairs.position, pairs.rows, pairs.cols,
        tuple(pairs.groups), models.shape[-1], n_perm, seed,
    )  # fmt: skip
    found = map_chunk_ranges(
        _within_count_blocks, job, n_blocks(n_perm), executor, "rsa within permutations"
    )
    counts = torch.stack([c.to(device) for c in found]).sum(dim=0)
    r = stat.cpu().numpy()
    p_values: np.ndarray = (1.0 + counts.cpu().numpy()) / (1.0 + n_perm)
    p_values[np.isnan(r)] = np.nan
    if n_perm == 0:
        p_values[:] = np.nan
    return TestResult(r=r, p=p_values, n_perm=n_perm)


@dataclass(frozen=True)
class _WithinBootJob:
    """What a chunk of stratified resamples needs (an executor's shared object): the
    within-pair values and the conditions."""

    a: torch.Tensor  # (K, P) the models' within-pair values
    b: torch.Tensor  # (T, P) the targets'
    rows: torch.Tensor  # (P,) the pairs (i, j)
    cols: torch.Tensor
    groups: tuple[np.ndarray, ...]
    n: int
    method: str
    combine: torch.Tensor | None
    n_boot: int
    seed: int

    def on_cpu(self) -> _WithinBootJob:
        """A copy whose tensors are on the CPU (for workers without the driver's GPU)."""
        combine = None if self.combine is None else self.combine.cpu()
        return dataclasses.replace(
            self, a=self.a.cpu(), b=self.b.cpu(), rows=self.rows.cpu(), cols=self.cols.cpu(),
            combine=combine,
        )  # fmt: skip

    def counts(self, k: int) -> np.ndarray:
        """How often each stimulus is drawn ``(C, n)`` in chunk ``k``: each condition ``g``
        in turn, ``g[rng.integers(0, g.size, (C, g.size))]`` with
        ``rng = default_rng(chunk_seed(seed, _WITHIN_BOOT_STREAM, k))``."""
        size = len(chunks_of(self.n_boot, BOOT_CHUNK)[k])
        rng = np.random.default_rng(chunk_seed(self.seed, _WITHIN_BOOT_STREAM, k))
        counts = np.zeros((size, self.n))
        for g in self.groups:
            draws = g[rng.integers(0, g.size, size=(size, g.size))]
            np.add.at(counts, (np.arange(size)[:, None], draws), 1.0)
        return counts


def _within_boot_chunks(job: _WithinBootJob, chunks: range) -> torch.Tensor:
    """Coefficients ``(C, K, T + G)`` of the resamples of the chunks ``chunks`` (on the CPU)."""
    comparison = WeightedComparison(job.a, job.b, job.method)
    step = max(1, _TILE_ELEMENTS // max(1, (job.a.shape[0] + job.b.shape[0]) * job.a.shape[1]))
    values = []
    for k in chunks:
        c = torch.as_tensor(job.counts(k), device=job.a.device)
        for s in range(0, len(c), step):
            part = c[s : s + step]
            w = part[:, job.rows] * part[:, job.cols]
            values.append(_with_combine(comparison(w), job.combine).cpu())
    G = 0 if job.combine is None else job.combine.shape[1]
    shape = (0, job.a.shape[0], job.b.shape[0] + G)
    return torch.cat(values) if values else torch.zeros(shape, dtype=torch.float64)


def within_bootstrap_ci(
    models: torch.Tensor,
    targets: torch.Tensor,
    labels: Sequence[str],
    method: str,
    n_boot: int,
    seed: int,
    combine: torch.Tensor | None = None,
    level: float = 0.95,
    *,
    corrected: bool = True,
    executor: Executor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified stimulus-bootstrap interval ``(low, high)`` ``(K, T + G)`` of the
    within-pairs coefficients (module docstring); NaN when ``n_boot = 0``.

    ``corrected``: the pair-corrected t interval
    (:func:`~object2brain.rsa.inference.corrected_spread`; delete-one values over the stimuli
    that have within pairs, ``dof`` their number minus one); otherwise the percentile interval.
    The resamples come in chunks of :data:`~object2brain.rsa.inference.BOOT_CHUNK`, chunk ``k``
    drawn from ``default_rng(chunk_seed(seed, _WITHIN_BOOT_STREAM, k))``
    (:meth:`_WithinBootJob.counts`), so the interval does not depend on ``executor`` (where the
    chunks run; default: here) or the number of its workers.
    """
    check_within_method(method)
    device = models.device
    pairs = within_pairs(labels, device)
    G = 0 if combine is None else combine.shape[1]
    if n_boot == 0:
        nan = np.full((models.shape[0], targets.shape[0] + G), np.nan)
        return nan, nan.copy()
    a = models[:, pairs.rows, pairs.cols]
    b = targets[:, pairs.rows, pairs.cols].to(device)
    n = models.shape[-1]
    job = _WithinBootJob(
        a, b, pairs.rows, pairs.cols, tuple(pairs.groups), n, method, combine, n_boot, seed
    )
    total = len(chunks_of(n_boot, BOOT_CHUNK))
    parts = map_chunk_ranges(_within_boot_chunks, job, total, executor, "rsa within bootstrap")
    boot = torch.cat(parts).numpy()
    if not corrected:
        return percentile_interval(boot, level)
    comparison = WeightedComparison(a, b, method)
    stimuli = torch.as_tensor(np.concatenate(pairs.groups), device=device)
    keep = torch.ones((len(stimuli), n), dtype=torch.float64, device=device)
    keep[torch.arange(len(stimuli), device=device), stimuli] = 0.0
    jack = [
        _with_combine(comparison(k[:, pairs.rows] * k[:, pairs.cols]), combine).cpu()
        for k in (keep[s : s + 64] for s in range(0, len(keep), 64))
    ]
    ones = torch.ones((1, a.shape[1]), dtype=torch.float64, device=device)
    observed = _with_combine(comparison(ones), combine)[0].cpu().numpy()
    spread = corrected_spread(boot, torch.cat(jack).numpy(), observed, exact=False)  # strata
    return spread.interval(level)
