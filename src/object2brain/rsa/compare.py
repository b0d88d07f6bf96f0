"""Comparisons of RDMs on their upper triangles (``i < j``), vectorised over many RDMs at once.

For condensed RDM vectors ``a`` ``(K, m)`` and ``b`` ``(T, m)`` every function returns the
``(K, T)`` matrix of coefficients (float64 tensors on the inputs' device):

- ``pearson``: ``r = <a - mean(a), b - mean(b)> / (||a - mean(a)|| ||b - mean(b)||)``.
- ``spearman``: Pearson r of average ranks (ties get the mean of their ranks, as
  ``scipy.stats.rankdata``), i.e. rsatoolbox's ``spearman``.
- ``kendall_tau_a``: ``tau_a = sum_{p<q} sign(a_p - a_q) sign(b_p - b_q) / (m (m - 1) / 2)``
  (ties count 0 and stay in the denominator), rsatoolbox's ``tau-a``. It is exact but costs
  ``O(m^2)`` per pair of RDMs (computed in row chunks of the sign matrices).

The ``masked_*`` variants take an extra weight ``w`` ``(B, m)`` of 0/1 and a batch dimension: they
compare ``a`` ``(B, K, m)`` with ``b`` ``(B, T, m)`` using only the entries with ``w = 1``
(the stimulus bootstrap of Kendall's tau-a uses them to drop pairs of a stimulus with its own
copy).
A coefficient is NaN where one of its vectors is constant.

rsatoolbox's further comparators (``rsatoolbox.rdm.compare`` names in brackets):

- ``rho_a`` (``rho-a``): ``12 <r_a - mean, r_b - mean> / (m^3 - m)`` with ``r`` average ranks:
  Spearman's rho with the denominator of untied ranks, so ties in a model RDM lower it instead of
  being renormalised away (0, not NaN, for a constant RDM, like tau-a).
- ``cosine`` (``cosine``): ``<a, b> / (||a|| ||b||)``, no centring.
- ``cosine_cov`` (``cosine_cov``) and ``corr_cov`` (``corr_cov``, the same after subtracting
  each vector's mean): the cosine after whitening with the covariance of RDM entries under
  i.i.d. pattern noise (rsatoolbox's default, no ``sigma_k``; Diedrichsen et al. 2021). rsatoolbox
  computes it as the cosine of the double-centred second-moment matrices
  ``G = -H D H / 2`` (off-diagonal entries counted twice, the diagonal once). That is the
  bilinear form ``a^T M b`` with ``M a = vec(H A H)``; ``M`` commutes with relabelling the
  stimuli and has three eigenspaces: constant vectors (eigenvalue ``1/n``), the "row effects"
  ``u_i + u_j`` with ``sum u = 0`` (``2/n``) and the rest (1). :func:`whiten` applies
  ``M^(1/2)`` in ``O(m)`` (row sums), so the prepared vectors stay of length ``m``, permute with
  the stimuli and the coefficient is one dot product, like Pearson's.

:class:`WeightedComparison` compares the same rows under many integer weightings of their
entries (``w`` ``(B, m)``; an entry of weight ``c`` counts as ``c`` copies, 0 drops it), as a
stimulus bootstrap needs: a resample holds pair ``(a, b)`` ``c_a c_b`` times. Each row is sorted
once; under weights its average ranks come from a cumulative sum in that fixed order,
``rank = W_before + (W_tie + 1) / 2`` (``W_before``: weight of smaller values, ``W_tie``: weight
of the row's tie group), so no resample is ever sorted or expanded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from object2brain.errors import DataError
from object2brain.options import COMPARE_METHODS as COMPARE_METHODS  # vocabularies live there
from object2brain.options import CompareMethod as CompareMethod

#: The whitened comparators (cosine of double-centred second-moment matrices).
COV_METHODS: tuple[str, ...] = ("corr_cov", "cosine_cov")
#: rsatoolbox's name of each comparison method (``rsatoolbox.rdm.compare(method=...)``).
RSATOOLBOX_NAMES: dict[str, str] = {
    "spearman": "spearman",
    "pearson": "corr",
    "kendall_tau_a": "tau-a",
    "rho_a": "rho-a",
    "cosine": "cosine",
    "corr_cov": "corr_cov",
    "cosine_cov": "cosine_cov",
}

_SIGN_CHUNK_ELEMENTS = 1 << 24
_WEIGHTED_STEP_ELEMENTS = 1 << 22  # values per step of weighted ranking (32 MB in float64)


def check_method(method: str) -> None:
    """Raise :class:`DataError` for an unknown comparison method."""
    if method not in COMPARE_METHODS:
        raise DataError(
            f"unknown comparison method {method!r}; choose one of {', '.join(COMPARE_METHODS)}"
        )


def _t(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x if x.dtype == torch.float64 else x.to(torch.float64)
    array = np.ascontiguousarray(x)
    if not array.flags.writeable:
        array = array.copy()
    return torch.as_tensor(array, dtype=torch.float64)


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (1-based) along the last axis of ``x`` ``(..., m)``, like scipy's rankdata.

    Fully vectorised: sort, then rank = position + 1, except in rows with ties, where each tie
    group gets (first + last position of the group) / 2 + 1. Any sort will do (not only a stable
    one): the members of a tie group all get the same rank. A row holding NaN has no ranks: it
    is all NaN (scipy's ``nan_policy="propagate"``), so a coefficient of it is NaN, not made up.
    """
    shape = x.shape
    m = shape[-1]
    flat = x.reshape(-1, m)
    values, order = torch.sort(flat, dim=1)
    ranks = torch.empty(flat.shape, dtype=torch.float64, device=x.device)
    position = torch.arange(1, m + 1, dtype=torch.float64, device=x.device)
    tied = (values[:, 1:] == values[:, :-1]).any(dim=1)
    if bool(tied.any()):
        average = position.expand_as(ranks).clone()
        average[tied] = _tie_average_positions(values[tied])
        ranks.scatter_(1, order, average)
    else:
        ranks.scatter_(1, order, position.expand_as(ranks))
    if flat.is_floating_point():
        undefined = torch.isnan(flat).any(dim=1, keepdim=True)
        ranks = torch.where(undefined, torch.full_like(ranks, float("nan")), ranks)
    return ranks.reshape(shape)


def _tie_average_positions(values: torch.Tensor) -> torch.Tensor:
    """For sorted rows ``values`` ``(r, m)``: 1-based rank of each position, tie groups averaged."""
    m = values.shape[1]
    pos = torch.arange(m, device=values.device).expand_as(values)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    ends = torch.ones_like(values, dtype=torch.bool)
    ends[:, :-1] = starts[:, 1:]
    first = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=1).values
    last_rev = torch.where(ends, pos, torch.full_like(pos, m)).flip(1)
    last = torch.cummin(last_rev, dim=1).values.flip(1)
    return (first + last).to(torch.float64) / 2 + 1


#: A row counts as constant when its centred norm is at most this fraction of its uncentred norm:
#: the mean of a constant row is rounded, so its centred values are ~1e-17, not 0.
CONSTANT_ROW_TOLERANCE = 1e-12


def _nan_where_constant(
    centred: torch.Tensor, norm: torch.Tensor, raw_norm: torch.Tensor
) -> torch.Tensor:
    varies = norm > CONSTANT_ROW_TOLERANCE * raw_norm
    return centred / torch.where(varies, norm, torch.full_like(norm, float("nan")))


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Rows ``(..., m)`` centred and scaled to unit norm (NaN rows where the row is constant,
    within :data:`CONSTANT_ROW_TOLERANCE`)."""
    centred = x - x.mean(dim=-1, keepdim=True)
    norm = torch.linalg.vector_norm(centred, dim=-1, keepdim=True)
    return _nan_where_constant(centred, norm, torch.linalg.vector_norm(x, dim=-1, keepdim=True))


def prepare(x: np.ndarray | torch.Tensor, method: str) -> torch.Tensor:
    """What a method correlates, ``(..., m)``: unit vectors whose dot products are the
    coefficients (every method but ``kendall_tau_a``, whose values are returned unchanged).

    pearson: centred values / norm; spearman: the same of average ranks; rho_a: centred ranks /
    ``sqrt((m^3 - m) / 12)``; cosine: values / norm; cosine_cov, corr_cov: :func:`whiten`
    (``corr_cov`` after centring) / norm. Each of these commutes with relabelling the stimuli
    (a permuted RDM's prepared vector is the permuted prepared vector), which the Mantel test
    relies on.
    """
    check_method(method)
    if method == "spearman" and isinstance(x, torch.Tensor) and not x.is_floating_point():
        return standardize(rankdata(x))  # integer keys (e.g. dense ranks) rank as they are
    t = _t(x)
    if method == "pearson":
        return standardize(t)
    if method == "spearman":
        return standardize(rankdata(t))
    if method == "rho_a":
        return rho_a_scale(rankdata(t))
    if method == "cosine":
        return unit_rows(t)
    if method in COV_METHODS:
        if method == "corr_cov":
            t = t - t.mean(dim=-1, keepdim=True)
        return unit_rows(whiten(t), reference=t)
    return t


def comparison_scale(x: torch.Tensor, method: str) -> torch.Tensor:
    """Condensed RDMs ``(S, m)`` on the scale a comparison sees, for pooling subjects (as
    rsatoolbox's ``pool_rdm``, up to a factor common to all rows): z-scores (pearson), ranks
    (spearman, rho_a, kendall_tau_a), unit vectors (cosine), vectors of unit whitened norm
    (cosine_cov; corr_cov after centring)."""
    check_method(method)
    if method == "pearson":
        return standardize(x)
    if method == "cosine":
        return unit_rows(x)
    if method in COV_METHODS:
        if method == "corr_cov":
            x = x - x.mean(dim=-1, keepdim=True)
        norm = torch.linalg.vector_norm(whiten(x), dim=-1, keepdim=True)
        return x / torch.where(norm > 0, norm, torch.full_like(norm, float("nan")))
    return rankdata(x)


def rho_a_scale(ranks: torch.Tensor) -> torch.Tensor:
    """Centred ranks ``(..., m)`` divided by ``sqrt((m^3 - m) / 12)`` (the norm of untied
    centred ranks): their dot product is rsatoolbox's ``rho-a``."""
    m = ranks.shape[-1]
    centred = ranks - ranks.mean(dim=-1, keepdim=True)
    return centred / float(np.sqrt(max(m**3 - m, 1) / 12.0))


def unit_rows(x: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``(..., m)`` divided by their norm; NaN rows where the norm is 0 (or, with a
    ``reference``, at most :data:`CONSTANT_ROW_TOLERANCE` times the reference's norm)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    raw = norm if reference is None else torch.linalg.vector_norm(reference, dim=-1, keepdim=True)
    varies = norm > CONSTANT_ROW_TOLERANCE * raw if reference is not None else norm > 0
    return x / torch.where(varies, norm, torch.full_like(norm, float("nan")))


def n_stimuli(m: int) -> int:
    """Number of stimuli ``n`` of a condensed RDM with ``m = n (n - 1) / 2`` entries."""
    n = round((1 + float(np.sqrt(1 + 8 * m))) / 2)
    if n * (n - 1) // 2 != m:
        raise DataError(f"{m} values are not the upper triangle of a square RDM")
    return n


def _pairs(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    iu, ju = torch.triu_indices(n, n, offset=1, device=device)
    return iu, ju


def row_sums(x: torch.Tensor, n: int) -> torch.Tensor:
    """Row sums ``(..., n)`` of the square hollow matrices whose upper triangles are ``x``
    ``(..., m)``: ``s_i = sum_{j != i} x_ij``."""
    iu, ju = _pairs(n, x.device)
    s = torch.zeros((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    return s.index_add_(-1, iu, x).index_add_(-1, ju, x)


def whiten(x: torch.Tensor) -> torch.Tensor:
    """``M^(1/2) x`` for condensed RDMs ``x`` ``(..., m)`` (see the module docstring):
    ``P_rest x + sqrt(2/n) P_rows x + sqrt(1/n) mean(x)``, where ``P_rows x = u_i + u_j`` with
    ``u = s / (n - 2)`` (``s``: row sums of the centred RDM) and ``P_rest`` the remainder.
    Then ``<whiten(a), whiten(b)> = <G_a, G_b>_F / 2`` with ``G = -H D H / 2``. ``n >= 3``."""
    n = n_stimuli(x.shape[-1])
    if n < 3:
        raise DataError("a whitened RDM comparison needs at least 3 stimuli")
    mean = x.mean(dim=-1, keepdim=True)
    centred = x - mean
    u = row_sums(centred, n) / (n - 2)
    iu, ju = _pairs(n, x.device)
    rows = u[..., iu] + u[..., ju]
    return centred - rows + float(np.sqrt(2.0 / n)) * rows + float(np.sqrt(1.0 / n)) * mean


def pearson(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Pearson r ``(K, T)`` between rows of ``a`` ``(K, m)`` and ``b`` ``(T, m)``."""
    return standardize(_t(a)) @ standardize(_t(b)).T


def spearman(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Spearman rho ``(K, T)`` (Pearson r of average ranks) between rows of ``a`` and ``b``."""
    return prepare(a, "spearman") @ prepare(b, "spearman").T


def kendall_tau_a(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Kendall tau-a ``(K, T)`` between rows of ``a`` ``(K, m)`` and ``b`` ``(T, m)``.

    ``tau_a = sum_{p != q} sign(a_p - a_q) sign(b_p - b_q) / (m (m - 1))``, accumulated over
    row chunks of the sign matrices so memory stays bounded.
    """
    A, B = _t(a), _t(b)
    m = A.shape[-1]
    if m < 2:
        return torch.full(
            (A.shape[0], B.shape[0]), float("nan"), dtype=torch.float64, device=A.device
        )
    total = torch.zeros((A.shape[0], B.shape[0]), dtype=torch.float64, device=A.device)
    step = max(1, _SIGN_CHUNK_ELEMENTS // max(1, (A.shape[0] + B.shape[0]) * m))
    for start in range(0, m, step):
        sa = torch.sign(A[:, start : start + step, None] - A[:, None, :])
        sb = torch.sign(B[:, start : start + step, None] - B[:, None, :])
        total += torch.einsum("kcm,tcm->kt", sa, sb)
    return total / (m * (m - 1))


def compare(
    a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, method: str = "spearman"
) -> torch.Tensor:
    """Coefficients ``(K, T)`` between condensed RDMs ``a`` ``(K, m)`` and ``b`` ``(T, m)``.

    1-D inputs ``(m,)`` are treated as one row.
    """
    check_method(method)
    A, B = _t(a), _t(b)
    A = A[None] if A.ndim == 1 else A
    B = B[None] if B.ndim == 1 else B
    if A.shape[-1] != B.shape[-1]:
        raise DataError(
            f"RDMs differ in size: {A.shape[-1]} vs {B.shape[-1]} upper-triangle entries"
        )
    if method == "kendall_tau_a":
        return kendall_tau_a(A, B.to(A.device))
    return prepare(A, method) @ prepare(B, method).to(A.device).T


def correlate_prepared(a: torch.Tensor, b: torch.Tensor, method: str) -> torch.Tensor:
    """Coefficients ``(..., K, T)`` of outputs of :func:`prepare` ``a`` ``(..., K, m)``, ``b``."""
    if method == "kendall_tau_a":
        if a.ndim == 2:
            return kendall_tau_a(a, b)
        return torch.stack([kendall_tau_a(x, y) for x, y in zip(a, b, strict=True)])
    return a @ b.transpose(-1, -2)


# --- weighted multisets (bootstrap) ------------------------------------------------------------


@dataclass(frozen=True)
class SortedRows:
    """Sort order of rows ``(R, m)`` and, where values tie, the tie group of each sorted position.

    Attributes:
        order: ``(R, m)`` int64, ``argsort`` of each row.
        group: ``(R, m)`` int64 tie-group number (0, 1, ... within a row) of each sorted position;
            ``None`` when no row has ties.
    """

    order: torch.Tensor
    group: torch.Tensor | None

    def take(self, start: int, stop: int) -> SortedRows:
        """The rows ``start:stop``."""
        group = None if self.group is None else self.group[start:stop]
        return SortedRows(self.order[start:stop], group)


def sort_rows(x: torch.Tensor) -> SortedRows:
    """:class:`SortedRows` of ``x`` ``(R, m)``."""
    values, order = torch.sort(x, dim=-1)
    new_group = values[:, 1:] != values[:, :-1]
    if bool(new_group.all()):
        return SortedRows(order, None)
    group = torch.zeros_like(order)
    group[:, 1:] = new_group.cumsum(dim=-1)
    return SortedRows(order, group)


def split_by_ties(x: torch.Tensor) -> list[tuple[torch.Tensor, SortedRows]]:
    """:class:`SortedRows` of ``x`` ``(R, m)`` in (at most) two parts, ``(row indices, rows)``:
    the rows without ties (``group`` None: the closed-form ranks) and those with ties, so that
    one tied row (e.g. a rating RDM) does not send every row down the tie path."""
    rows = sort_rows(x)
    everything = torch.arange(x.shape[0], device=x.device)
    if rows.group is None:
        return [(everything, rows)]
    tied = rows.group[:, -1] < x.shape[-1] - 1  # fewer tie groups than values
    parts = []
    if not bool(tied.all()):
        index = everything[~tied]
        parts.append((index, SortedRows(rows.order[index], None)))
    index = everything[tied]
    parts.append((index, SortedRows(rows.order[index], rows.group[index])))
    return parts


def standardized_weighted_ranks(
    rows: SortedRows,
    w: torch.Tensor,
    *,
    times_weight: bool,
    out: torch.Tensor | None = None,
    rho_a: bool = False,
) -> torch.Tensor:
    """Average ranks of :class:`SortedRows` ``(R, m)`` under weights ``w`` ``(B, m)``, centred and
    scaled to unit weighted norm, times ``w`` if ``times_weight`` ``(B, R, m)``; written to
    ``out`` when given (see :func:`weighted_standardize`).

    Entry ``c`` of weight ``w_c`` stands for ``w_c`` copies with rank
    ``W_before + (W_tie + 1) / 2`` (weights of the smaller values and of its tie group); with
    ``w = 1`` these are :func:`rankdata`'s ranks. Over ``N = sum(w)`` copies the mean rank is
    ``(N + 1) / 2`` and, in a row without tied values (its tie groups are the copies of one
    entry), the sum of squared deviations is ``(N^3 - N - sum_c (w_c^3 - w_c)) / 12``; rows with
    tied values sum them explicitly. NaN rows where all copies tie. With ``rho_a`` the centred
    ranks are divided by ``sqrt((N^3 - N) / 12)`` instead (rsatoolbox's rho-a of the ``N``
    copies; 0, not NaN, where all copies tie).
    """
    B, (R, m) = w.shape[0], rows.order.shape
    order = rows.order.expand(B, R, m)
    w_sorted = torch.gather(w[:, None, :].expand(B, R, m), 2, order)
    total = w.sum(dim=-1)[:, None, None]  # N
    upto = w_sorted.cumsum(dim=-1)  # weight of the values <= this one, in sorted order
    if rows.group is None:
        centred = upto.sub_(w_sorted, alpha=0.5).sub_(total / 2)  # rank - (N + 1) / 2
        squares = (total**3 - total - (w**3 - w).sum(dim=-1)[:, None, None]) / 12
    else:
        group = rows.group.expand(B, R, m)
        before = upto - w_sorted
        # cumulative weights never decrease: a tie group's extremes are its first and last entry
        start = torch.zeros_like(upto).scatter_reduce(2, group, before, "amin", include_self=False)
        end = torch.zeros_like(upto).scatter_reduce(2, group, upto, "amax", include_self=False)
        start, end = torch.gather(start, 2, group), torch.gather(end, 2, group)
        centred = (start + end) / 2 - total / 2  # start + (end - start + 1) / 2 - (N + 1) / 2
        squares = (centred**2 * w_sorted).sum(dim=-1, keepdim=True)
    if times_weight:
        centred.mul_(w_sorted)
    if rho_a:
        squares = (total**3 - total).clamp_min(1) / 12
    norm = squares.clamp_min(0).sqrt()
    centred.div_(torch.where(norm > 1e-12 * total**1.5, norm, torch.full_like(norm, float("nan"))))
    target = torch.empty_like(centred) if out is None else out
    return target.scatter_(2, order, centred)


def weighted_standardize(x: torch.Tensor, w: torch.Tensor, *, times_weight: bool) -> torch.Tensor:
    """Rows of ``x`` ``(B, R, m)`` centred at their ``w``-weighted mean and divided by their
    weighted norm ``sqrt(sum_c w_c (x_c - mean)^2)``, times ``w`` if ``times_weight`` (NaN rows
    where the weighted row is constant, within :data:`CONSTANT_ROW_TOLERANCE`).

    ``z_a . z_b`` with one side times ``w`` is the weighted Pearson r, i.e. the Pearson r of the
    multisets where entry ``c`` counts ``w_c`` times.
    """
    ww = w[:, None, :]
    mean = (x * ww).sum(dim=-1, keepdim=True) / ww.sum(dim=-1, keepdim=True)
    centred = x - mean
    norm = (centred**2 * ww).sum(dim=-1, keepdim=True).sqrt()
    raw_norm = (x**2 * ww).sum(dim=-1, keepdim=True).sqrt()
    if times_weight:
        centred = centred * ww
    return _nan_where_constant(centred, norm, raw_norm)


def weighted_unit(x: torch.Tensor, w: torch.Tensor, *, times_weight: bool) -> torch.Tensor:
    """Rows of ``x`` ``(B, R, m)`` divided by their weighted norm ``sqrt(sum_c w_c x_c^2)``,
    times ``w`` if ``times_weight`` (the weighted cosine is ``z_a . z_b``; NaN rows of norm 0)."""
    ww = w[:, None, :]
    norm = (x**2 * ww).sum(dim=-1, keepdim=True).sqrt()
    scaled = x / torch.where(norm > 0, norm, torch.full_like(norm, float("nan")))
    return scaled * ww if times_weight else scaled


def counts_from_pair_weights(w: torch.Tensor, n: int) -> torch.Tensor:
    """Draws ``c`` ``(B, n)`` of each stimulus in a bootstrap resample of ``n`` draws, from its
    pair weights ``w = c_a c_b`` ``(B, m)``.

    Row sums give ``s_a = c_a (n - c_a)``, so ``c_a`` is a root of ``c^2 - n c + s_a``: the
    smaller one, except for at most one stimulus drawn more than ``n / 2`` times (the one
    whose larger root makes the draws sum to ``n``). Rows where no choice reproduces ``w``
    (fewer than three distinct stimuli drawn: the pair weights do not determine the draws) are
    NaN.
    """
    s = row_sums(w, n)
    disc = (n * n - 4 * s).clamp_min(0).sqrt()
    low, gap = ((n - disc) / 2).round(), disc.round()
    counts = low.clone()
    deficit = n - low.sum(dim=-1)
    flip = (gap == deficit[:, None]) & (deficit[:, None] > 0)
    first = flip & (flip.cumsum(dim=-1) == 1)
    counts = torch.where(first, low + gap, counts)
    iu, ju = _pairs(n, w.device)
    exact = (counts[:, iu] * counts[:, ju] == w).all(dim=-1) & (counts.sum(dim=-1) == n)
    return torch.where(exact[:, None], counts, torch.full_like(counts, float("nan")))


def weighted_whitened(x: torch.Tensor, counts: torch.Tensor, *, centre: bool) -> torch.Tensor:
    """Whitened rows ``(B, R, m + n)`` of condensed RDMs ``x`` ``(R, m)`` in the bootstrap
    resamples with draws ``counts`` ``(B, n)``, as rsatoolbox whitens a resampled RDM whose
    pairs of a stimulus with its own copy are missing (``_cov_weighting`` with NaNs).

    rsatoolbox centres ``v = -x / 2`` (pairs and a zero diagonal) by weighted least squares on
    row effects: ``r = v - W X beta``, ``beta = (X^T W X)^-1 X^T v``, ``X`` the incidence of
    each entry on its stimuli (a pair: ``e_p + e_q``, a diagonal entry: ``e_p``), ``W`` 1/2 on
    pairs and 1 on the diagonal. Copies of a stimulus share ``beta``, so with ``N`` draws
    ``(diag(N/2 - c + 1) + 1 c^T / 2) beta = V c`` (Sherman-Morrison; a direct solve where a
    diagonal entry vanishes); the residuals are ``v_ab - (beta_a + beta_b) / 2`` on the pairs
    (``c_a c_b`` copies, weighted ``sqrt(2)``) and ``-beta_a`` on the diagonal (``c_a``
    copies). Rows are returned with unit norm (the square roots of the multiplicities folded in),
    so the cosine of two resampled RDMs is one dot product. ``centre``: subtract the weighted
    mean first (``corr_cov``).
    """
    B, (R, m), n = counts.shape[0], x.shape, counts.shape[1]
    iu, ju = _pairs(n, x.device)
    c = torch.nan_to_num(counts)
    w = c[:, iu] * c[:, ju]
    v = x.expand(B, R, m)
    if centre:
        v = v - (v * w[:, None]).sum(-1, keepdim=True) / w.sum(-1)[:, None, None]
    v = -0.5 * v
    y = torch.zeros((B, R, n), dtype=x.dtype, device=x.device)
    y.index_add_(-1, iu, v * c[:, None, ju]).index_add_(-1, ju, v * c[:, None, iu])
    d = c.sum(-1, keepdim=True) / 2 - c + 1  # (B, n)
    singular = ((d.abs() < 0.25) & (c > 0)).any(dim=-1)
    d_safe = torch.where(d.abs() < 0.25, torch.ones_like(d), d)
    dy = y / d_safe[:, None, :]
    shift = 0.5 * (dy * c[:, None, :]).sum(-1, keepdim=True)
    beta = dy - (1 / d_safe)[:, None, :] * shift / (1 + 0.5 * (c / d_safe).sum(-1))[:, None, None]
    if bool(singular.any()):
        idx = torch.nonzero(singular).flatten()
        system = torch.diag_embed(d[idx]) + 0.5 * c[idx][:, None, :]
        beta[idx] = torch.linalg.solve(system, y[idx].transpose(1, 2)).transpose(1, 2)
    off = (v - 0.5 * (beta[..., iu] + beta[..., ju])) * (2 * w).sqrt()[:, None, :]
    diag = -beta * c.sqrt()[:, None, :]
    z = torch.cat([off, diag], dim=-1)
    norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
    raw = torch.linalg.vector_norm(v * w.sqrt()[:, None, :], dim=-1, keepdim=True)
    z = z / torch.where(
        norm > CONSTANT_ROW_TOLERANCE * raw, norm, torch.full_like(norm, float("nan"))
    )
    return torch.where(torch.isnan(counts).any(dim=-1)[:, None, None], float("nan"), z)


class WeightedComparison:
    """Coefficients ``(B, K, T)`` of rows ``a`` ``(K, m)`` vs ``b`` ``(T, m)`` under many
    integer weightings ``w`` ``(B, m)`` of their entries (sorted once, here): spearman, pearson,
    rho_a, cosine, and (for bootstrap resamples, whose draws the weights determine:
    :func:`counts_from_pair_weights`) corr_cov and cosine_cov.

    Memory of one call: the prepared rows ``(B, K + T, m)`` (``m + n`` for the whitened
    methods) plus the temporaries of a few rows at a time (at most
    :data:`_WEIGHTED_STEP_ELEMENTS` values each).
    """

    def __init__(
        self, a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, method: str
    ) -> None:
        check_method(method)
        if method == "kendall_tau_a":
            raise DataError("weighted comparison does not support kendall_tau_a")
        self.a, self.b, self.method = _t(a), _t(b), method
        ranked = method in ("spearman", "rho_a")
        self.sorted_a = split_by_ties(self.a) if ranked else None
        self.sorted_b = split_by_ties(self.b) if ranked else None

    def __call__(self, w: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
        """Coefficients under pair weights ``w`` ``(B, m)``; ``counts`` ``(B, n)``: the draws
        behind them (whitened methods only; default: recovered from ``w`` for ``n`` draws)."""
        if self.method in COV_METHODS:
            if counts is None:
                counts = counts_from_pair_weights(w, n_stimuli(w.shape[-1]))
            centre = self.method == "corr_cov"
            za = self._whitened(self.a, counts, centre)
            zb = self._whitened(self.b, counts, centre)
            return za @ zb.transpose(-1, -2)
        za = self._split_standardized(self.a, self.sorted_a, w, times_weight=True)
        zb = self._split_standardized(self.b, self.sorted_b, w, times_weight=False)
        return za @ zb.transpose(-1, -2)

    @staticmethod
    def _whitened(x: torch.Tensor, counts: torch.Tensor, centre: bool) -> torch.Tensor:
        B, (R, m), n = counts.shape[0], x.shape, counts.shape[1]
        z = torch.empty((B, R, m + n), dtype=torch.float64, device=x.device)
        step = max(1, _WEIGHTED_STEP_ELEMENTS // (B * (m + n)))
        for start in range(0, R, step):
            stop = min(R, start + step)
            z[:, start:stop] = weighted_whitened(x[start:stop], counts, centre=centre)
        return z

    def _split_standardized(
        self,
        x: torch.Tensor,
        parts: list[tuple[torch.Tensor, SortedRows]] | None,
        w: torch.Tensor,
        *,
        times_weight: bool,
    ) -> torch.Tensor:
        if parts is None:
            return self._standardized(x, None, w, times_weight=times_weight)
        if len(parts) == 1:
            return self._standardized(x, parts[0][1], w, times_weight=times_weight)
        z = torch.empty((w.shape[0], *x.shape), dtype=torch.float64, device=x.device)
        for index, rows in parts:  # rows without ties take the closed-form path
            z[:, index] = self._standardized(x[index], rows, w, times_weight=times_weight)
        return z

    def _standardized(
        self, x: torch.Tensor, rows: SortedRows | None, w: torch.Tensor, *, times_weight: bool
    ) -> torch.Tensor:
        B, (R, m) = w.shape[0], x.shape
        z = torch.empty((B, R, m), dtype=torch.float64, device=x.device)
        step = max(1, _WEIGHTED_STEP_ELEMENTS // (B * m))
        for start in range(0, R, step):
            stop = min(R, start + step)
            if rows is not None:
                standardized_weighted_ranks(
                    rows.take(start, stop),
                    w,
                    times_weight=times_weight,
                    out=z[:, start:stop],
                    rho_a=self.method == "rho_a",
                )
            elif self.method == "cosine":
                part = x[start:stop].expand(B, -1, -1)
                z[:, start:stop] = weighted_unit(part, w, times_weight=times_weight)
            else:
                part = x[start:stop].expand(B, -1, -1)
                z[:, start:stop] = weighted_standardize(part, w, times_weight=times_weight)
        return z


# --- masked (bootstrap) variants -------------------------------------------------------------


def masked_rankdata(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Average ranks of ``x`` ``(B, K, m)`` among the entries with ``w`` ``(B, m)`` = 1.

    Invalid entries are set to +inf before ranking, so they rank after every valid entry and do
    not change the valid entries' ranks.
    """
    filled = torch.where(w[:, None, :] > 0, x, torch.full_like(x, float("inf")))
    return rankdata(filled)


def masked_compare(
    a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, method: str = "spearman"
) -> torch.Tensor:
    """Coefficients ``(B, K, T)`` of ``a`` ``(B, K, m)`` vs ``b`` ``(B, T, m)`` where ``w = 1``."""
    check_method(method)
    if method == "kendall_tau_a":
        return masked_kendall_tau_a(a, b, w)
    if method not in ("spearman", "pearson"):
        raise DataError(
            f"masked comparison supports spearman, pearson and kendall_tau_a, not {method}"
        )
    if method == "spearman":
        a, b = masked_rankdata(a, w), masked_rankdata(b, w)
    # with 0/1 weights, weighting both sides keeps exactly the valid entries
    za = weighted_standardize(a, w, times_weight=True)
    zb = weighted_standardize(b, w, times_weight=True)
    return za @ zb.transpose(-1, -2)


def masked_kendall_tau_a(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Kendall tau-a ``(B, K, T)`` over the valid entries (``w = 1``) of each batch row."""
    Bn, K, m = a.shape
    T = b.shape[1]
    total = torch.zeros((Bn, K, T), dtype=torch.float64, device=a.device)
    step = max(1, _SIGN_CHUNK_ELEMENTS // max(1, Bn * (K + T) * m))
    for start in range(0, m, step):
        stop = min(m, start + step)
        pair_w = w[:, start:stop, None] * w[:, None, :]  # (B, c, m)
        sa = torch.sign(a[:, :, start:stop, None] - a[:, :, None, :]) * pair_w[:, None]
        sb = torch.sign(b[:, :, start:stop, None] - b[:, :, None, :])
        total += torch.einsum("bkcm,btcm->bkt", sa, sb)
    valid = w.sum(dim=-1)
    denom = (valid * (valid - 1))[:, None, None]
    return total / torch.where(denom > 0, denom, torch.full_like(denom, float("nan")))
