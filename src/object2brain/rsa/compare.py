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

:class:`WeightedComparison` compares the same rows under many integer weightings of their
entries (``w`` ``(B, m)``; an entry of weight ``c`` counts as ``c`` copies, 0 drops it), as a
stimulus bootstrap needs: a resample holds pair ``(a, b)`` ``c_a c_b`` times. Each row is sorted
once; under weights its average ranks come from a cumulative sum in that fixed order,
``rank = W_before + (W_tie + 1) / 2`` (``W_before``: weight of smaller values, ``W_tie``: weight
of the row's tie group), so no resample is ever sorted or expanded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from object2brain.errors import DataError

CompareMethod = Literal["spearman", "pearson", "kendall_tau_a"]
COMPARE_METHODS: tuple[str, ...] = ("spearman", "pearson", "kendall_tau_a")

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
    """What a method correlates: standardised values (pearson) or standardised ranks (spearman).

    For ``kendall_tau_a`` the values are returned unchanged. ``x`` is ``(..., m)``.
    """
    check_method(method)
    if method == "spearman" and isinstance(x, torch.Tensor) and not x.is_floating_point():
        return standardize(rankdata(x))  # integer keys (e.g. dense ranks) rank as they are
    t = _t(x)
    if method == "pearson":
        return standardize(t)
    if method == "spearman":
        return standardize(rankdata(t))
    return t


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
    rows: SortedRows, w: torch.Tensor, *, times_weight: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Average ranks of :class:`SortedRows` ``(R, m)`` under weights ``w`` ``(B, m)``, centred and
    scaled to unit weighted norm, times ``w`` if ``times_weight`` ``(B, R, m)``; written to
    ``out`` when given (see :func:`weighted_standardize`).

    Entry ``c`` of weight ``w_c`` stands for ``w_c`` copies with rank
    ``W_before + (W_tie + 1) / 2`` (weights of the smaller values and of its tie group); with
    ``w = 1`` these are :func:`rankdata`'s ranks. Over ``N = sum(w)`` copies the mean rank is
    ``(N + 1) / 2`` and, in a row without tied values (its tie groups are the copies of one
    entry), the sum of squared deviations is ``(N^3 - N - sum_c (w_c^3 - w_c)) / 12``; rows with
    tied values sum them explicitly. NaN rows where all copies tie.
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


class WeightedComparison:
    """Spearman / Pearson coefficients ``(B, K, T)`` of rows ``a`` ``(K, m)`` vs ``b`` ``(T, m)``
    under many integer weightings ``w`` ``(B, m)`` of their entries (sorted once, here).

    Memory of one call: the standardised rows ``(B, K + T, m)`` plus the temporaries of a few rows
    at a time (at most :data:`_WEIGHTED_STEP_ELEMENTS` values each).
    """

    def __init__(
        self, a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, method: str
    ) -> None:
        check_method(method)
        if method == "kendall_tau_a":
            raise DataError("weighted comparison supports spearman and pearson only")
        self.a, self.b, self.method = _t(a), _t(b), method
        self.sorted_a = split_by_ties(self.a) if method == "spearman" else None
        self.sorted_b = split_by_ties(self.b) if method == "spearman" else None

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        za = self._split_standardized(self.a, self.sorted_a, w, times_weight=True)
        zb = self._split_standardized(self.b, self.sorted_b, w, times_weight=False)
        return za @ zb.transpose(-1, -2)

    @classmethod
    def _split_standardized(
        cls,
        x: torch.Tensor,
        parts: list[tuple[torch.Tensor, SortedRows]] | None,
        w: torch.Tensor,
        *,
        times_weight: bool,
    ) -> torch.Tensor:
        if parts is None:
            return cls._standardized(x, None, w, times_weight=times_weight)
        if len(parts) == 1:
            return cls._standardized(x, parts[0][1], w, times_weight=times_weight)
        z = torch.empty((w.shape[0], *x.shape), dtype=torch.float64, device=x.device)
        for index, rows in parts:  # rows without ties take the closed-form path
            z[:, index] = cls._standardized(x[index], rows, w, times_weight=times_weight)
        return z

    @staticmethod
    def _standardized(
        x: torch.Tensor, rows: SortedRows | None, w: torch.Tensor, *, times_weight: bool
    ) -> torch.Tensor:
        B, (R, m) = w.shape[0], x.shape
        z = torch.empty((B, R, m), dtype=torch.float64, device=x.device)
        step = max(1, _WEIGHTED_STEP_ELEMENTS // (B * m))
        for start in range(0, R, step):
            stop = min(R, start + step)
            if rows is not None:
                standardized_weighted_ranks(
                    rows.take(start, stop), w, times_weight=times_weight, out=z[:, start:stop]
                )
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
