r"""Fast RDMs of filter subsets from per-filter sufficient statistics (the Object2Brain engine).

Lesioning (zeroing) or keeping only a subset of the :math:`K` filters of a layer changes that
layer's RDM. Recomputing it from masked activations for every group and for thousands of random
null subsets is slow; but every RDM metric is a function of quantities that *add up over filters*.
For stimuli :math:`i, j`, activations :math:`A_{ikp}` (filter :math:`k`, position :math:`p` of
:math:`P`) and a filter mask :math:`m \in \{0,1\}^K` (the masked feature vector is
:math:`m_k A_{ikp}`, of fixed length :math:`D = KP`; zeroed filters stay in as zeros):

.. math::

    C_{k,ij} = \sum_p A_{ikp} A_{jkp}, \quad s_{k,i} = \sum_p A_{ikp}, \quad
    q_{k,i} = \sum_p A_{ikp}^2,

    \text{cross}_{ij} = \sum_k m_k C_{k,ij}, \quad S_i = \sum_k m_k s_{k,i}, \quad
    Q_i = \sum_k m_k q_{k,i}.

Then, with :math:`V_i = Q_i - S_i^2/D` and :math:`c_{ij} = \text{cross}_{ij} - S_i S_j / D`,

- correlation distance: :math:`1 - c_{ij} / \sqrt{V_i V_j}`;
- Euclidean distance: :math:`\sqrt{Q_i + Q_j - 2\,\text{cross}_{ij}}`;
- cosine distance: :math:`1 - \text{cross}_{ij} / \sqrt{Q_i Q_j}`.

So the RDMs of many subsets at once are one matrix product of a ``(subsets, K)`` mask with the
``(K, n_pairs)`` stack :math:`C` (pairs :math:`i < j`, the condensed order of
``numpy.triu_indices``). The stack stays on the device when it fits there (at most half of the
free memory), else on the host, and is streamed in chunks of pairs. Chunk sizes (filters while
accumulating, pairs in :meth:`FilterStats.rdms`, subsets in :meth:`FilterStats.subsets_per_chunk`)
are picked from the free memory of the device (:func:`object2brain.devices.pick_chunk`) unless
given, and a chunk that runs out of memory is halved and retried. Everything is float64 (the
correlation form subtracts large, nearly equal numbers).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from object2brain.devices import chunked, free_memory_bytes, pick_chunk
from object2brain.errors import DataError, StoreError
from object2brain.io import STORE_REMEDY, hdf5_reading
from object2brain.options import NULL_KINDS as NULL_KINDS  # re-exported: the null vocabulary
from object2brain.options import RDM_METRICS
from object2brain.rsa.rdm import snap_ties

_RESIDENT_FRACTION = 0.5  # the cross stack stays on a CUDA device if it takes at most this


def _filter_step(chunk_bytes: int | None, n: int, positions: int, device: torch.device) -> int:
    """Filters per accumulation chunk: each holds its float64 activations ``(n, P)``, its Gram
    ``(n, n)`` and the gathered pairs ``(n_pairs,)``."""
    per_filter = 8 * (n * positions + n * n + n * (n - 1) // 2)
    if chunk_bytes is not None:
        return max(1, chunk_bytes // max(per_filter, 1))
    return pick_chunk(per_filter, device, cap_bytes=None if device.type == "cuda" else 1 << 30)


def pair_indices(n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every pair ``i < j`` in condensed order, each ``(n (n - 1) / 2,)``."""
    rows, cols = torch.triu_indices(n, n, offset=1, device=device)
    return rows, cols


def condensed_subset(n: int, keep: Sequence[int] | np.ndarray) -> np.ndarray:
    """Positions in the condensed vector of ``n`` stimuli of the pairs among ``keep`` (sorted).

    The result indexes a condensed RDM of ``n`` stimuli and gives the condensed RDM of the
    stimuli ``keep`` (in ascending order).
    """
    rows = np.sort(np.asarray(keep, dtype=np.int64))
    i, j = np.triu_indices(len(rows), k=1)
    a, b = rows[i], rows[j]
    positions: np.ndarray = (a * n - a * (a + 1) // 2 + (b - a - 1)).astype(np.int64)
    return positions


@dataclass
class FilterStats:
    """Per-filter sufficient statistics of one layer for ``n`` stimuli.

    Attributes:
        cross: ``(K, n_pairs)`` float64, :math:`C_{k,ij}` for pairs ``i < j`` (host or device).
        sums: ``(K, n)`` float64, :math:`s_{k,i}`.
        sumsq: ``(K, n)`` float64, :math:`q_{k,i}`.
        n_positions: :math:`P`, spatial positions per filter (1 for fc layers).
        stimulus_ids: the ``n`` stimulus ids, in row order.
    """

    cross: torch.Tensor
    sums: torch.Tensor
    sumsq: torch.Tensor
    n_positions: int
    stimulus_ids: list[str]

    @property
    def n_filters(self) -> int:
        return int(self.sums.shape[0])

    @property
    def n_stimuli(self) -> int:
        return int(self.sums.shape[1])

    @classmethod
    def from_activations(
        cls,
        activations: np.ndarray | torch.Tensor,
        stimulus_ids: Sequence[str] | None = None,
        *,
        device: torch.device | str = "cpu",
        chunk_bytes: int | None = None,
    ) -> FilterStats:
        """Statistics of activations ``(n, K, ...)`` (positions flattened), in filter chunks.

        ``chunk_bytes`` bounds the memory of one chunk (activations, Gram matrices and pairs of
        its filters); default: picked from the free memory of ``device``.
        """
        n = int(activations.shape[0])
        ids = list(stimulus_ids) if stimulus_ids is not None else [str(i) for i in range(n)]
        dev = torch.device(device)
        shape = tuple(activations.shape)
        if len(shape) < 2:
            raise DataError(f"activations of shape {shape} have no filter axis")
        positions = int(np.prod(shape[2:], dtype=np.int64))
        step = _filter_step(chunk_bytes, n, positions, dev)
        blocks = (activations[:, start : start + step] for start in range(0, shape[1], step))
        return cls._accumulate(blocks, n, ids, dev, n_filters=int(shape[1]))

    @classmethod
    def from_store(
        cls,
        store: Any,
        layer: str,
        ids: Sequence[str] | None = None,
        *,
        device: torch.device | str = "cpu",
        chunk_bytes: int | None = None,
    ) -> FilterStats:
        """Statistics of ``layer`` of an :class:`~object2brain.activations.store.ActivationStore`.

        Reads filter slabs ``(n, k_chunk, ...)`` with h5py, so the layer never sits in memory
        whole; rows in ``ids`` order (all stimuli in store order by default).
        """
        shape = store.shape(layer)
        if len(shape) < 2:
            raise DataError(f"{store.path}: layer {layer!r} has no filters (shape {shape})")
        if layer in store.projected_layers:
            raise DataError(
                f"{store.path}: layer {layer!r} was stored as a random projection (--srp), whose "
                "columns are not filters: extract it again without --srp to lesion its filters"
            )
        dataset = store._dataset(layer)
        all_ids = store.stimulus_ids
        rows = np.arange(len(all_ids)) if ids is None else np.asarray(store.rows(ids))
        order = np.argsort(rows)
        inverse = np.argsort(order)
        dev = torch.device(device)
        positions = int(np.prod(shape[2:], dtype=np.int64))
        step = _filter_step(chunk_bytes, max(int(shape[0]), len(rows)), positions, dev)

        def blocks() -> Iterator[np.ndarray]:
            for start in range(0, shape[1], step):
                with hdf5_reading(store.path, STORE_REMEDY, StoreError):  # damaged: one line
                    slab = np.asarray(dataset[:, start : start + step])
                yield slab[rows[order]][inverse] if ids is not None else slab

        chosen = all_ids if ids is None else list(ids)
        return cls._accumulate(blocks(), len(rows), chosen, dev, n_filters=int(shape[1]))

    @classmethod
    def _accumulate(
        cls,
        blocks: Iterator[Any],
        n: int,
        ids: list[str],
        device: torch.device,
        *,
        n_filters: int,
    ) -> FilterStats:
        rows, cols = pair_indices(n, device)
        n_pairs = n * (n - 1) // 2
        resident = (
            device.type == "cpu"
            or 8 * n_filters * n_pairs <= _RESIDENT_FRACTION * free_memory_bytes(device)
        )
        # filled block by block (a concatenation at the end would hold the stack twice)
        cross = torch.empty(
            (n_filters, n_pairs), dtype=torch.float64, device=device if resident else "cpu"
        )
        sums = torch.empty((n_filters, n), dtype=torch.float64, device=device)
        sumsq = torch.empty_like(sums)
        positions, done = None, 0
        for block in blocks:
            x = torch.as_tensor(np.asarray(block) if not isinstance(block, torch.Tensor) else block)
            x = x.to(device=device, dtype=torch.float64).reshape(n, x.shape[1], -1)
            if not bool(torch.isfinite(x).all()):
                raise DataError("activations contain NaN or infinite values")
            positions, k = int(x.shape[2]), int(x.shape[1])
            per_filter = x.permute(1, 0, 2)  # (k, n, P)
            gram = per_filter @ per_filter.transpose(1, 2)  # (k, n, n)
            cross[done : done + k] = gram[:, rows, cols]
            del gram
            sums[done : done + k] = per_filter.sum(dim=2)
            sumsq[done : done + k] = (per_filter**2).sum(dim=2)
            done += k
        if positions is None:
            raise DataError("no activations given")
        return cls(cross=cross, sums=sums, sumsq=sumsq, n_positions=positions, stimulus_ids=ids)

    def to(self, device: torch.device | str) -> FilterStats:
        """The same statistics with every tensor on ``device``."""
        dev = torch.device(device)
        return FilterStats(
            cross=self.cross.to(dev),
            sums=self.sums.to(dev),
            sumsq=self.sumsq.to(dev),
            n_positions=self.n_positions,
            stimulus_ids=list(self.stimulus_ids),
        )

    def subsets_per_chunk(
        self, device: torch.device | str | None = None, *, temporaries: int = 12
    ) -> int:
        """How many subsets one :meth:`rdms` call (plus their comparison) should take.

        Each subset's condensed RDM ``(n_pairs,)`` float64 and about ``temporaries`` arrays of
        the same size (ranking for Spearman: sort values and indices, tie bookkeeping, ranks,
        standardised ranks) must fit in the free memory of ``device`` (see
        :func:`~object2brain.devices.pick_chunk`).
        """
        target = torch.device(device) if device is not None else self.sums.device
        n_pairs = int(self.cross.shape[1])
        return pick_chunk(8 * n_pairs * (1 + temporaries), target)

    def subset(self, keep: Sequence[int] | np.ndarray) -> FilterStats:
        """Statistics of the stimuli ``keep`` (row indices, taken in ascending order)."""
        rows = np.sort(np.asarray(keep, dtype=np.int64))
        positions = torch.as_tensor(
            condensed_subset(self.n_stimuli, rows), device=self.cross.device
        )
        index = torch.as_tensor(rows, device=self.sums.device)
        return FilterStats(
            cross=self.cross[:, positions],
            sums=self.sums[:, index],
            sumsq=self.sumsq[:, index],
            n_positions=self.n_positions,
            stimulus_ids=[self.stimulus_ids[i] for i in rows],
        )

    def rdms(
        self,
        masks: np.ndarray | torch.Tensor,
        metric: str = "correlation",
        *,
        device: torch.device | str | None = None,
        chunk_bytes: int | None = None,
        strict: bool = True,
    ) -> torch.Tensor:
        """Condensed RDMs ``(n_subsets, n_pairs)`` (float64) of the masked layer, rounded by
        :func:`~object2brain.rsa.rdm.snap_ties` as every RDM is.

        Args:
            masks: ``(n_subsets, K)`` 0/1 (or bool): 1 keeps a filter, 0 zeroes it; a 1-D mask
                ``(K,)`` is one subset.
            metric: ``correlation`` | ``euclidean`` | ``cosine``.
            device: where to compute (default: where the sums live).
            chunk_bytes: at most this many bytes of the ``cross`` stack per chunk of pairs
                (default: picked from the free memory of ``device``; a chunk that runs out of
                memory is halved and retried).
            strict: raise on a degenerate subset; if ``False``, its whole row is NaN instead.

        Raises:
            DataError: (``strict``) a masked pattern with zero variance (correlation) or all zeros
                (cosine), e.g. an empty subset or a subset whose filters are silent.
        """
        if metric not in RDM_METRICS:
            raise DataError(
                f"unknown RDM metric {metric!r}; choose one of {', '.join(RDM_METRICS)}"
            )
        target = torch.device(device) if device is not None else self.sums.device
        m = torch.as_tensor(masks, dtype=torch.float64, device=target)
        m = m[None] if m.ndim == 1 else m
        if m.shape[1] != self.n_filters:
            raise DataError(f"masks have {m.shape[1]} filters, the layer has {self.n_filters}")
        total = float(self.n_filters * self.n_positions)
        S = m @ self.sums.to(target)  # (subsets, n)
        Q = m @ self.sumsq.to(target)
        V = Q - S**2 / total if metric == "correlation" else Q
        degenerate = torch.zeros_like(V, dtype=torch.bool)
        if metric != "euclidean":
            degenerate = 1e-12 * Q.amax(dim=1, keepdim=True).clamp_min(1e-300) >= V
            if strict and bool(degenerate.any()):
                subset, stim = (int(v) for v in torch.nonzero(degenerate)[0])
                raise DataError(
                    f"subset {subset}: the masked pattern of stimulus "
                    f"{self.stimulus_ids[stim]!r} is constant, so its {metric} distance is "
                    "undefined (e.g. all of its kept filters are silent)"
                )
        rows, cols = pair_indices(self.n_stimuli, target)
        out = torch.empty((m.shape[0], rows.numel()), dtype=torch.float64, device=target)
        if chunk_bytes is not None:
            step = max(1, chunk_bytes // max(1, self.n_filters * 8))
        else:  # per pair: its cross column (K,) and ~8 temporaries (subsets,), float64
            step = pick_chunk(8 * (self.n_filters + 8 * m.shape[0]), target)

        def fill(start: int, stop: int) -> None:
            # Writes only its own columns of ``out``: a retried chunk overwrites them.
            cross = m @ self.cross[:, start:stop].to(target, non_blocking=True)
            i, j = rows[start:stop], cols[start:stop]
            if metric == "euclidean":
                out[:, start:stop] = (Q[:, i] + Q[:, j] - 2 * cross).clamp_min(0).sqrt()
            elif metric == "correlation":
                centred = cross - S[:, i] * S[:, j] / total
                out[:, start:stop] = 1 - centred / torch.sqrt(V[:, i] * V[:, j])
            else:
                out[:, start:stop] = 1 - cross / torch.sqrt(V[:, i] * V[:, j])

        for _ in chunked(rows.numel(), step, fill, device=target):
            pass
        out[degenerate.any(dim=1)] = float("nan")
        return snap_ties(out, dims=1, inplace=True)


def random_subset_masks(
    n_filters: int,
    size: int,
    n_subsets: int,
    *,
    seed: int | Sequence[int],
    pool: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """``(n_subsets, n_filters)`` bool masks, each with ``size`` ones drawn uniformly (seeded).

    ``pool`` restricts the draw to those filter indices (default: all filters).
    """
    candidates = np.arange(n_filters) if pool is None else np.asarray(pool, dtype=np.int64)
    if not 0 <= size <= len(candidates):
        raise DataError(f"cannot draw {size} filters from {len(candidates)}")
    rng = np.random.default_rng(seed)
    keys = rng.random((n_subsets, len(candidates)))
    chosen = candidates[np.argsort(keys, axis=1)[:, :size]]
    masks = np.zeros((n_subsets, n_filters), dtype=bool)
    np.put_along_axis(masks, chosen, True, axis=1)
    return masks


#: Most strata of the norm-matched null (deciles of the filter norms).
MAX_STRATA = 10


def filter_norms(stats: FilterStats) -> np.ndarray:
    """Activation norm of every filter ``(K,)``: ``sqrt(sum_i q_{k,i})``, over stimuli and
    positions."""
    norms: np.ndarray = torch.sqrt(stats.sumsq.sum(dim=1)).cpu().numpy()
    return norms


def norm_strata(
    norms: np.ndarray, members: Sequence[int] | np.ndarray, max_strata: int = MAX_STRATA
) -> np.ndarray:
    """Stratum of every filter ``(K,)`` in ``0 .. B - 1`` for a null matched to ``members``.

    The filters are cut into ``B`` quantile bins of their norms (equal sizes to one filter), with
    ``B`` the largest number up to ``max_strata`` for which every bin holds at least twice as
    many filters as the group has in it, so that the matched draws still vary; ``B = 1`` (the
    plain random null) when no ``B > 1`` does.
    """
    n_filters = len(norms)
    order = np.argsort(norms, kind="stable")
    chosen = np.asarray(members, dtype=np.int64)
    for n_strata in range(min(max_strata, n_filters), 1, -1):
        strata = np.empty(n_filters, dtype=np.int64)
        strata[order] = np.arange(n_filters) * n_strata // n_filters
        in_group = np.bincount(strata[chosen], minlength=n_strata)
        if (np.bincount(strata, minlength=n_strata) >= 2 * in_group).all():
            return strata
    return np.zeros(n_filters, dtype=np.int64)


def matched_subset_masks(
    strata: np.ndarray,
    members: Sequence[int] | np.ndarray,
    n_subsets: int,
    *,
    seed: int | Sequence[int],
) -> np.ndarray:
    """``(n_subsets, K)`` bool masks drawn like ``members`` stratum by stratum: as many filters
    from each stratum as ``members`` has there, uniformly within it (stratum ``b`` from the
    seed words ``[*seed, b]``)."""
    words = [seed] if isinstance(seed, int | np.integer) else list(seed)
    n_filters = len(strata)
    masks = np.zeros((n_subsets, n_filters), dtype=bool)
    counts = np.bincount(
        strata[np.asarray(members, dtype=np.int64)], minlength=int(strata.max()) + 1
    )
    for stratum, count in enumerate(counts):
        if count:
            pool = np.flatnonzero(strata == stratum)
            masks |= random_subset_masks(
                n_filters, int(count), n_subsets, seed=[*words, stratum], pool=pool
            )
    return masks


#: Most quantile bins of single-filter alignment in the group null.
MAX_ALIGNMENT_BINS = 4
#: Norm caliper of the group null: a group filter is swapped only with filters whose activation
#: norm is within this distance in natural-log units (exp(0.2): within about 22%).
NORM_CALIPER = 0.2


def alignment_bins(
    alignment: np.ndarray, members: Sequence[int] | np.ndarray, max_bins: int = MAX_ALIGNMENT_BINS
) -> np.ndarray:
    """Quantile bin ``(K,)`` of every filter's single-filter alignment, for a null matched to
    ``members``: the most bins (up to ``max_bins``; equal sizes to one filter, NaN lowest) in
    which every bin holds at least twice as many filters as the group has there, so that a
    group of unusually aligned filters is compared with filters from its upper bin, half of them
    at least from outside the group; one bin when no finer cut does."""
    values = np.where(np.isfinite(alignment), alignment, -np.inf)
    order = np.argsort(values, kind="stable")
    chosen = np.asarray(members, dtype=np.int64)
    n_filters = len(values)
    for n_bins in range(min(max_bins, n_filters), 1, -1):
        bins = np.empty(n_filters, dtype=np.int64)
        bins[order] = np.arange(n_filters) * n_bins // n_filters
        if (
            np.bincount(bins, minlength=n_bins) >= 2 * np.bincount(bins[chosen], minlength=n_bins)
        ).all():
            return bins
    return np.zeros(n_filters, dtype=np.int64)


def swap_subset_masks(
    norms: np.ndarray,
    bins: np.ndarray,
    members: Sequence[int] | np.ndarray,
    n_subsets: int,
    *,
    seed: int | Sequence[int],
    caliper: float = NORM_CALIPER,
) -> np.ndarray:
    """``(n_subsets, K)`` bool masks of subsets matched to ``members`` filter by filter.

    Each group filter ``i`` is replaced by a filter drawn uniformly from its pool: the filters
    of its alignment bin (``bins``) whose log norm is within ``caliper`` of its own, itself
    included, none drawn twice (a pool used up: the unused filter of nearest norm in the bin,
    else overall). Filters with the fewest candidates are replaced first. A group whose norms no
    other filter shares is thus compared with itself (p = 1: no claim), where quantile strata
    would mix in weaker filters and reject for norm alone.
    """
    chosen = np.asarray(members, dtype=np.int64)
    n_filters = len(norms)
    log_norm = np.log(np.maximum(np.asarray(norms, dtype=np.float64), 1e-300))
    pools = [(np.abs(log_norm - log_norm[i]) <= caliper) & (bins == bins[i]) for i in chosen]
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_subsets, n_filters), dtype=bool)
    for step in np.argsort([pool.sum() for pool in pools], kind="stable"):
        i = chosen[step]
        keys = rng.random((n_subsets, n_filters))
        free = ~masks
        candidates = pools[step][None] & free
        score = np.where(candidates, keys, -1.0)
        pick = score.argmax(axis=1)
        empty = ~candidates.any(axis=1)
        if empty.any():  # nearest unused norm, within the bin first
            distance = np.abs(log_norm - log_norm[i])[None] + 1e6 * (bins != bins[i])[None]
            fallback = np.where(free[empty], distance, np.inf).argmin(axis=1)
            pick[empty] = fallback
        masks[np.arange(n_subsets), pick] = True
    return masks
