"""The null draws of the lesion analysis, in seeded chunks run by an executor.

Every null of a group and variant (:class:`NullRequest`) is cut into chunks of
:data:`NULL_CHUNK` draws. Chunk ``k`` of a null with root seed ``root`` draws its subsets (or
stimulus permutations) from ``numpy.random.default_rng(chunk_seed(root, stream, k))``
(:func:`~object2brain.executors.chunk_seed`; one stream per kind of null), never from a
generator shared with another chunk. A chunk is a pure function of the scorer of the part (the
filter statistics and prepared targets, the executor's shared object: one copy in a Ray object
store) and its own description: its draws and hence every p-value are the same for any executor
and number of workers.

Kinds (streams):

- ``random`` (:data:`RANDOM_STREAM`): the subsets behind ``p_null``, of the group's size, uniform
  over the layer's filters or stratum by stratum of their norms (``null_subsets = matched``);
- ``group`` (:data:`GROUP_STREAM`): the subsets behind ``p_group``, matched to the group filter by
  filter on norm and single-filter alignment with one target (its columns only);
- ``perm`` (:data:`PERM_STREAM`): the stimulus-label permutations behind a cross-fitted
  ``p_perm`` (``delta_r`` of the group against permuted targets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch

from object2brain.executors.base import Executor, LocalExecutor, chunk_seed, chunks_of
from object2brain.lesion.engine import (
    FilterStats,
    matched_subset_masks,
    random_subset_masks,
    swap_subset_masks,
)
from object2brain.rsa.targets import TargetColumns

#: Draws per chunk (subsets or permutations): the unit of work of an executor, and of the seeds.
NULL_CHUNK = 250
#: Random streams of the chunk seeds (``[root, stream, k]``) of each kind of null.
RANDOM_STREAM = 1
GROUP_STREAM = 2
PERM_STREAM = 3

NullKind = Literal["random", "group", "perm"]
_STREAMS = {"random": RANDOM_STREAM, "group": GROUP_STREAM, "perm": PERM_STREAM}


class Scorer(Protocol):
    """What a chunk needs of the part's scorer (:class:`object2brain.lesion.analysis` scorer)."""

    @property
    def stats(self) -> FilterStats: ...

    @property
    def target(self) -> torch.Tensor: ...

    @property
    def columns(self) -> TargetColumns: ...

    def correlations(self, masks: np.ndarray) -> np.ndarray: ...

    def prepared(self, mask: np.ndarray) -> torch.Tensor: ...

    def on_cpu(self) -> Any: ...


@dataclass(frozen=True)
class NullRequest:
    """One null distribution of one group and variant: ``total`` draws from seed ``root``.

    ``members`` ``(k,)``: the group's filters of the ``n_filters`` of the layer; ``lesion``:
    the drawn subsets are zeroed (else kept). ``strata`` ``(K,)`` (kind ``random``, matched
    null): the filters' norm strata; ``norms`` and ``bins`` ``(K,)`` (kind ``group``): the
    filters' norms and alignment bins with the target whose columns are ``own`` ``(Q + G,)``
    bool; ``mask`` ``(K,)`` (kind ``perm``): the subset whose change is permuted.
    """

    kind: NullKind
    root: int
    total: int
    n_filters: int
    members: np.ndarray
    lesion: bool
    strata: np.ndarray | None = None
    norms: np.ndarray | None = None
    bins: np.ndarray | None = None
    own: np.ndarray | None = None
    mask: np.ndarray | None = None


@dataclass(frozen=True)
class NullChunk:
    """Chunk ``index`` of ``request``: ``size`` draws (:data:`NULL_CHUNK`, the last shorter)."""

    request: NullRequest
    index: int
    size: int


@dataclass(frozen=True)
class NullJob:
    """The shared object of a part's chunks: its scorer and the intact layer's r ``(Q + G,)``."""

    scorer: Scorer
    r_full: np.ndarray


def chunks_of_request(request: NullRequest, size: int = NULL_CHUNK) -> list[NullChunk]:
    """The chunks of ``request``, in draw order."""
    return [
        NullChunk(request, k, len(rows)) for k, rows in enumerate(chunks_of(request.total, size))
    ]


def chunk_masks(chunk: NullChunk) -> np.ndarray:
    """The filter subsets ``(size, K)`` (True: kept) of a ``random`` or ``group`` chunk."""
    request = chunk.request
    words = chunk_seed(request.root, _STREAMS[request.kind], chunk.index)
    K, members = request.n_filters, request.members
    if request.kind == "random" and request.strata is None:
        draws = random_subset_masks(K, len(members), chunk.size, seed=words)
    elif request.kind == "random":
        assert request.strata is not None
        draws = matched_subset_masks(request.strata, members, chunk.size, seed=words)
    elif request.kind == "group":
        assert request.norms is not None and request.bins is not None
        draws = swap_subset_masks(request.norms, request.bins, members, chunk.size, seed=words)
    else:
        raise ValueError(f"a {request.kind!r} chunk draws no filter subsets")
    return ~draws if request.lesion else draws


def request_masks(request: NullRequest) -> np.ndarray:
    """Every subset ``(total, K)`` of a ``random`` or ``group`` request, chunk after chunk."""
    masks = [chunk_masks(chunk) for chunk in chunks_of_request(request)]
    return np.concatenate(masks) if masks else np.zeros((0, request.n_filters), dtype=bool)


def chunk_permutations(chunk: NullChunk, n: int) -> np.ndarray:
    """The stimulus permutations ``(size, n)`` of a ``perm`` chunk."""
    rng = np.random.default_rng(chunk_seed(chunk.request.root, PERM_STREAM, chunk.index))
    return rng.permuted(np.tile(np.arange(n), (chunk.size, 1)), axis=1)


def null_chunk(job: NullJob, chunk: NullChunk) -> np.ndarray:
    """``delta_r`` ``(size, Q + G)`` of the chunk's draws: ``r(draw) - r_full`` per target
    column (kind ``group``: only the columns ``own``, NaN elsewhere; kind ``perm``: the
    variant-minus-full change against permuted targets)."""
    request, scorer = chunk.request, job.scorer
    if request.kind == "perm":
        assert request.mask is not None
        return _permuted_deltas(scorer, request.mask, chunk_permutations(chunk, _n(scorer)))
    r = scorer.correlations(chunk_masks(chunk))
    delta: np.ndarray = r - job.r_full[None]
    if request.kind == "group":
        assert request.own is not None
        delta[:, ~request.own] = np.nan
    return delta


def _n(scorer: Scorer) -> int:
    return scorer.stats.n_stimuli


def _permuted_deltas(scorer: Scorer, mask: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """``delta_r`` ``(P, Q + G)`` of the subset ``mask`` against the targets with their stimulus
    labels permuted by ``perms`` ``(P, n)``: the dot product of the prepared variant-minus-full
    difference with each permuted target."""
    full = scorer.prepared(np.ones(scorer.stats.n_filters, dtype=bool))
    difference = (scorer.prepared(mask) - full).cpu().numpy()
    target = scorer.target.cpu().numpy()
    n = perms.shape[1]
    square = np.zeros((n, n), dtype=np.int64)
    i, j = np.triu_indices(n, k=1)
    square[i, j] = square[j, i] = np.arange(len(i))
    out = np.empty((len(perms), target.shape[0]))
    for p, order in enumerate(perms):
        out[p] = target[:, square[order[i], order[j]]] @ difference
    deltas: np.ndarray = scorer.columns.with_group(out)
    return deltas


def run_nulls(
    job: NullJob,
    requests: Sequence[NullRequest],
    executor: Executor | None = None,
    *,
    stage: str = "lesion nulls",
) -> list[np.ndarray]:
    """``delta_r`` ``(total, Q + G)`` of every request, its chunks run by ``executor`` (default:
    in this process) as one batch, the scorer shared once; chunks concatenated in draw order."""
    executor = executor or LocalExecutor()
    chunks = [chunk for request in requests for chunk in chunks_of_request(request)]
    if not chunks:
        return [np.zeros((0, len(job.r_full))) for _ in requests]
    shared = job if executor.name == "local" else NullJob(job.scorer.on_cpu(), job.r_full)
    found = executor.map_chunks(null_chunk, chunks, stage=stage, shared=shared)
    out: list[np.ndarray] = []
    start = 0
    for request in requests:
        count = len(chunks_of_request(request))
        parts = found[start : start + count]
        out.append(np.concatenate(parts) if parts else np.zeros((0, len(job.r_full))))
        start += count
    return out
