"""Representational dissimilarity matrices (RDMs) from features, ratings and activation stores.

Definitions, for stimulus feature vectors ``x_i`` with ``p`` features:

- ``correlation`` (default): ``d_ij = 1 - r(x_i, x_j)`` with Pearson r across features,
  ``r = <x_i - mean(x_i), x_j - mean(x_j)> / (||x_i - mean(x_i)|| ||x_j - mean(x_j)||)``.
- ``euclidean``: ``d_ij = ||x_i - x_j||_2`` (the plain Euclidean distance). rsatoolbox's
  ``euclidean`` is the *squared* distance divided by ``p``: ``d_rsatoolbox = d**2 / p``. Ranks
  (Spearman, Kendall) are identical; Pearson-based comparisons differ.
- ``cosine``: ``d_ij = 1 - <x_i, x_j> / (||x_i|| ||x_j||)``.
- behavioural RDM of ratings ``v``: ``d_ij = |v_i - v_j|``. Layers with a single feature per
  stimulus (e.g. the predicted ``valence``) use this too, whatever the metric, because a
  correlation over one feature is undefined.

All three feature metrics are functions of the Gram matrix ``G = X X^T`` and the row sums, so they
are computed with matrix products, accumulated in float64 over *feature chunks* (column blocks of
the flattened layer): a layer never has to sit in memory whole. For correlation each row is
shifted by a per-row constant (its mean over the first chunk) before accumulation; for euclidean
each chunk's columns are centred across stimuli. Both shifts leave the result unchanged
mathematically and avoid catastrophic cancellation in ``G - s s^T / p``.

Condensed vectors are upper triangles ``i < j`` in row-major order (``numpy.triu_indices(n, 1)``),
the same order as rsatoolbox and ``scipy.spatial.distance.squareform``.

Cross-validated brain RDMs (:func:`crossvalidated_rdm`) from patterns measured in several runs
(each stimulus once per run; Walther et al. 2016, Diedrichsen et al. 2021), as rsatoolbox's
``calc_rdm(method='crossnobis', descriptor=..., cv_descriptor='runs', noise=...)``:

- ``crossvalidated_euclidean``: for each run ``f`` (leave-one-run-out fold), ``U`` the mean
  pattern of each stimulus over the other runs and ``V`` its pattern in run ``f``,
  ``d_f(i, j) = (u_i - u_j)^T P (v_i - v_j) / p`` with ``P = I``; the RDM is the mean over folds.
  Noise is independent across runs, so ``E[d] = ||mu_i - mu_j||^2 / p`` without the positive bias
  of a distance of noisy patterns (and it can be negative).
- ``crossnobis``: the same with ``P`` the noise precision (Mahalanobis), estimated from the
  residuals of each pattern around its stimulus' mean over runs with Schaefer & Strimmer's
  shrinkage towards the diagonal (rsatoolbox's ``prec_from_measurements(...,
  method='shrinkage_diag')``): ``S = sum_r e_r e_r^T / dof`` with rsatoolbox's ``dof = (n - 1)
  R`` (``n`` stimuli, ``R`` runs), off-diagonal entries shrunk by ``1 - lambda`` (``lambda`` the
  estimated sampling variance of the off-diagonal correlations over their sum of squares,
  clipped to [0, 1]), ``P = S^-1``.

Every RDM is rounded to a grid of ``2^-40`` of its largest value (:func:`snap_ties`): equal
dissimilarities that rounding made differ in their last bits (``|v_i - v_j|`` of group-mean
ratings, a layer kept to one filter) tie exactly, as Spearman and Kendall need; no value moves by
more than ``2^-40`` (9e-13) of the RDM's largest.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, get_args

import numpy as np
import torch

from object2brain.devices import resolve_device
from object2brain.errors import DataError, StoreError
from object2brain.io import STORE_REMEDY, hdf5_reading
from object2brain.options import RDM_METRICS as RDM_METRICS  # the vocabularies live there
from object2brain.options import BrainRdm
from object2brain.options import RdmMetric as RdmMetric

if TYPE_CHECKING:
    from object2brain.activations.store import ActivationStore

#: Cross-validated RDMs of run-wise brain patterns (:func:`crossvalidated_rdm`).
BRAIN_RDMS: tuple[str, ...] = get_args(BrainRdm)

ArrayLike = np.ndarray | torch.Tensor

_DEFAULT_CHUNK_ELEMENTS = 1 << 24  # 16 M values (128 MB in float64): the former fixed chunk


#: RDM values are multiples of 2^-SNAP_BITS of the RDM's largest value (rounded up to a power of 2).
SNAP_BITS = 40


def snap_ties(rdms: torch.Tensor, dims: int = 2, *, inplace: bool = False) -> torch.Tensor:
    """Round each RDM (the last ``dims`` axes of ``rdms``: 2 for square ``(..., n, n)``, 1 for
    condensed ``(..., n_pairs)``) to multiples of ``q = 2^(ceil(log2(max |d|)) - SNAP_BITS)``.

    ``q`` is a power of 2, so ``d / q`` and the product are exact: values that agree to about 12
    significant digits become bitwise equal (ties) and no value moves by more than
    ``q / 2 <= 2^-SNAP_BITS max |d|``.
    Zeros stay zero; an RDM with NaN stays NaN.
    """
    axes = tuple(range(-dims, 0))
    peak = rdms.abs().amax(dim=axes, keepdim=True)
    finfo = torch.finfo(rdms.dtype)
    smallest = finfo.tiny * finfo.eps  # smallest positive value: rounding to it changes nothing
    step = torch.exp2(torch.ceil(torch.log2(peak.clamp_min(smallest))) - SNAP_BITS)
    step = step.clamp_min(smallest)  # tiny RDMs (< ~1e-296 in float64) stay as they are
    if inplace:
        return rdms.div_(step).round_().mul_(step)
    return torch.round(rdms / step) * step


def feature_chunk_elements(
    chunk_elements: int | None, device: str | torch.device | None = "cpu"
) -> int:
    """Values per feature chunk: ``chunk_elements`` when given, else picked from the free memory
    of ``device`` so that three float64 copies of a chunk fit (the read block, its float64
    version on the device and its centred copy); see :func:`object2brain.devices.pick_chunk`.
    """
    if chunk_elements is not None:
        return int(chunk_elements)
    from object2brain.devices import pick_chunk

    return pick_chunk(3 * 8, resolve_device(device), minimum=1 << 16)


_DEGENERATE = 1e-12


def as_tensor(
    x: ArrayLike, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``x`` as a tensor of ``dtype`` on ``device`` (no copy when already there)."""
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    if isinstance(x, torch.Tensor):
        return x.to(device=dev, dtype=dtype)
    array = np.ascontiguousarray(x)
    if not array.flags.writeable:
        array = array.copy()
    return torch.as_tensor(array, dtype=dtype, device=dev)


def check_metric(metric: str) -> None:
    """Raise :class:`DataError` for an unknown RDM metric name."""
    if metric not in RDM_METRICS:
        raise DataError(f"unknown RDM metric {metric!r}; choose one of {', '.join(RDM_METRICS)}")


def triu_indices(n: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices ``(m,)`` of the upper triangle ``i < j``, ``m = n (n - 1) / 2``."""
    iu = torch.triu_indices(n, n, offset=1, device=device)
    return iu[0], iu[1]


def upper_triangle(rdms: ArrayLike) -> torch.Tensor:
    """Condensed vectors ``(..., m)`` of square RDMs ``(..., n, n)`` (row-major, ``i < j``)."""
    t = rdms if isinstance(rdms, torch.Tensor) else torch.as_tensor(np.asarray(rdms))
    n = t.shape[-1]
    i, j = triu_indices(n, t.device)
    return t[..., i, j]


def squareform(vectors: ArrayLike) -> torch.Tensor:
    """Square symmetric RDMs ``(..., n, n)`` with zero diagonal from condensed ``(..., m)``."""
    v = vectors if isinstance(vectors, torch.Tensor) else torch.as_tensor(np.asarray(vectors))
    m = v.shape[-1]
    n = round((1 + float(np.sqrt(1 + 8 * m))) / 2)
    if n * (n - 1) // 2 != m:
        raise DataError(f"{m} values are not the upper triangle of a square RDM")
    out = torch.zeros((*v.shape[:-1], n, n), dtype=v.dtype, device=v.device)
    i, j = triu_indices(n, v.device)
    out[..., i, j] = v
    out[..., j, i] = v
    return out


class GramAccumulator:
    """Accumulates what an RDM needs from feature chunks ``(n, p_c)``, in float64.

    After all chunks: ``G = sum_c Y_c Y_c^T`` of the shifted chunks ``Y_c``, row sums
    ``s = sum_c Y_c 1`` and the feature count ``p``; :meth:`rdm` turns them into the RDM.
    """

    def __init__(self, n: int, metric: str, device: torch.device) -> None:
        check_metric(metric)
        self.n = n
        self.metric = metric
        self.device = device
        self.gram = torch.zeros((n, n), dtype=torch.float64, device=device)
        self.sums = torch.zeros(n, dtype=torch.float64, device=device)
        self.count = 0
        self._shift: torch.Tensor | None = None

    def add(self, chunk: ArrayLike) -> None:
        """Add a feature chunk ``(n, p_c)`` (more dimensions are flattened)."""
        x = as_tensor(chunk, self.device).reshape(self.n, -1)
        if x.shape[1] == 0:
            return
        if not bool(torch.isfinite(x).all()):
            raise DataError("features contain NaN or infinite values")
        if self.metric == "correlation":
            if self._shift is None:
                self._shift = x.mean(dim=1, keepdim=True)
            x = x - self._shift
            self.sums += x.sum(dim=1)
        elif self.metric == "euclidean":
            x = x - x.mean(dim=0, keepdim=True)
        self.gram += x @ x.T
        self.count += x.shape[1]

    def rdm(self, ids: Sequence[str] | None = None, what: str = "features") -> torch.Tensor:
        """The RDM ``(n, n)`` (float64, symmetric, zero diagonal) of everything added."""
        if self.count == 0:
            raise DataError(f"{what}: no features to compute an RDM from")
        G = self.gram
        if self.metric == "euclidean":
            sq = torch.diagonal(G)
            d2 = (sq[:, None] + sq[None, :] - 2 * G).clamp_min(0)
            out = torch.sqrt(d2)
        else:
            if self.metric == "correlation":
                s = self.sums
                G = G - torch.outer(s, s) / self.count
            norms = torch.sqrt(torch.diagonal(G).clamp_min(0))
            scale = torch.sqrt(torch.diagonal(self.gram).clamp_min(0)).max()
            bad = norms <= _DEGENERATE * max(float(scale), 1.0)
            if bool(bad.any()):
                rows = torch.nonzero(bad).flatten().tolist()
                names = [ids[r] if ids is not None else str(r) for r in rows]
                kind = "zero-variance" if self.metric == "correlation" else "all-zero"
                shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
                raise DataError(
                    f"{what}: {len(names)} {kind} pattern(s) (stimulus id(s) {shown}): "
                    f"{self.metric} distance is undefined for them"
                )
            out = 1 - G / torch.outer(norms, norms)
        out = (out + out.T) / 2
        out.fill_diagonal_(0)
        return snap_ties(out, inplace=True)


def rdm_from_chunks(
    chunks: Iterable[ArrayLike],
    n: int,
    metric: str = "correlation",
    device: str | torch.device | None = "auto",
    ids: Sequence[str] | None = None,
    what: str = "features",
) -> torch.Tensor:
    """RDM ``(n, n)`` from an iterable of feature chunks ``(n, p_c)`` (columns of one layer).

    ``ids`` and ``what`` only name the stimuli and data in error messages.
    """
    acc = GramAccumulator(n, metric, resolve_device(device))
    for chunk in chunks:
        acc.add(chunk)
    return acc.rdm(ids, what)


def rdm_from_features(
    features: ArrayLike,
    metric: str = "correlation",
    device: str | torch.device | None = "auto",
    chunk_elements: int | None = None,
    ids: Sequence[str] | None = None,
    what: str = "features",
) -> torch.Tensor:
    """RDM ``(n, n)`` (float64) of features ``(n, ...)``, flattened per stimulus.

    Features of a single value per stimulus (``(n,)`` or ``(n, 1)``) give ``|x_i - x_j|``.
    Accumulated over column chunks of about ``chunk_elements`` values (default: from the free
    memory of ``device``, :func:`feature_chunk_elements`).
    """
    x = features if isinstance(features, torch.Tensor) else np.asarray(features)
    n = int(x.shape[0])
    flat = x.reshape(n, -1)
    if flat.shape[1] == 1:
        return behavior_rdm(flat[:, 0], device=device)
    step = max(1, feature_chunk_elements(chunk_elements, device) // max(n, 1))
    chunks = (flat[:, start : start + step] for start in range(0, flat.shape[1], step))
    return rdm_from_chunks(chunks, n, metric, device, ids, what)


def behavior_rdm(values: ArrayLike, device: str | torch.device | None = "auto") -> torch.Tensor:
    """Behavioural RDM ``(n, n)``: ``d_ij = |v_i - v_j|`` of ratings ``v`` ``(n,)``."""
    v = as_tensor(values, resolve_device(device)).reshape(-1)
    if not bool(torch.isfinite(v).all()):
        raise DataError("ratings contain NaN or infinite values")
    return snap_ties((v[:, None] - v[None, :]).abs(), inplace=True)


def iter_feature_chunks(
    store: ActivationStore,
    layer: str,
    ids: Sequence[str] | None = None,
    chunk_elements: int | None = None,
) -> Iterator[np.ndarray]:
    """Stream a layer of an activation store as column chunks ``(n_ids, p_c)``.

    Slices along the first feature axis of ``/layers/<layer>`` (``(n, C, ...)``) with h5py, so at
    most about ``chunk_elements`` values of the stored rows are read at once; rows are returned
    in ``ids`` order (all rows in store order if ``ids`` is None). Default ``chunk_elements``:
    from the free host memory (:func:`feature_chunk_elements`).
    """
    chunk_elements = feature_chunk_elements(chunk_elements, "cpu")
    damaged = partial(hdf5_reading, store.path, STORE_REMEDY, StoreError)
    with damaged():  # a damaged store: one line naming it, as from the store's own reads
        dataset: Any = store._dataset(layer)
        shape = tuple(dataset.shape)
    rows = None if ids is None else np.asarray(store.rows(ids))
    if len(shape) == 1:
        with damaged():
            block = np.asarray(dataset[()]).reshape(-1, 1)
        yield block if rows is None else block[rows]
        return
    n_rows = shape[0]
    per_index = int(np.prod(shape[2:], dtype=np.int64)) * n_rows
    step = max(1, chunk_elements // max(per_index, 1))
    for start in range(0, shape[1], step):
        with damaged():
            block = np.asarray(dataset[:, start : start + step]).reshape(n_rows, -1)
        yield block if rows is None else block[rows]


def rdm_from_store(
    store: ActivationStore,
    layer: str,
    ids: Sequence[str] | None = None,
    metric: str = "correlation",
    device: str | torch.device | None = "auto",
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """RDM ``(n_ids, n_ids)`` of one layer, streamed from the store in feature chunks.

    Single-feature layers (e.g. ``valence``, ``(n,)``) give ``|x_i - x_j|``.
    """
    ids = list(ids) if ids is not None else store.stimulus_ids
    shape = store.shape(layer)
    what = f"{store.path}: layer {layer!r}"
    if int(np.prod(shape[1:], dtype=np.int64)) == 1:
        values = next(iter_feature_chunks(store, layer, ids, chunk_elements))[:, 0]
        if not np.isfinite(values).all():
            raise DataError(f"{what}: contains NaN or infinite values")
        return behavior_rdm(values, device=device)
    chunks = iter_feature_chunks(store, layer, ids, chunk_elements)
    return rdm_from_chunks(chunks, len(ids), metric, device, ids, what)


def to_rsatoolbox(
    rdms: ArrayLike,
    stimulus_ids: Sequence[str],
    metric: str = "correlation",
    descriptors: dict[str, Sequence[Any]] | None = None,
) -> Any:
    """Export RDMs ``(k, n, n)`` or ``(n, n)`` to an ``rsatoolbox.rdm.RDMs`` object.

    ``stimulus_ids`` become the pattern descriptor ``stimulus_id``; ``descriptors`` (each a
    sequence of length k, e.g. ``{"layer": [...], "subject": [...]}``) the RDM descriptors.
    """
    import importlib

    rdms_class: Any = importlib.import_module("rsatoolbox.rdm").RDMs

    t = rdms if isinstance(rdms, torch.Tensor) else torch.as_tensor(np.asarray(rdms))
    if t.ndim == 2:
        t = t[None]
    vectors = upper_triangle(t).detach().cpu().numpy().astype(np.float64)
    rdm_desc = {key: list(values) for key, values in (descriptors or {}).items()}
    return rdms_class(
        dissimilarities=vectors,
        dissimilarity_measure=metric,
        rdm_descriptors=rdm_desc or None,
        pattern_descriptors={"stimulus_id": list(stimulus_ids)},
    )


# --- cross-validated RDMs of run-wise patterns ------------------------------------------------


def run_tensor(
    patterns: ArrayLike,
    stimulus_ids: Sequence[str],
    runs: np.ndarray,
    order: Sequence[str],
    what: str = "patterns",
) -> torch.Tensor:
    """Patterns ``(N, p)`` of single runs as a tensor ``(n, R, p)`` (float64): stimulus ``order[i]``
    in the ``r``-th run (runs sorted).

    Raises:
        DataError: a stimulus not measured exactly once in every run, or fewer than 2 runs.
    """
    x = as_tensor(patterns if isinstance(patterns, torch.Tensor) else np.asarray(patterns), None)
    x = x.reshape(x.shape[0], -1)
    labels = np.asarray(runs)
    run_values = np.unique(labels)
    if run_values.size < 2:
        raise DataError(
            f"{what}: cross-validated distances need at least 2 runs, found {run_values.size}"
        )
    position = {sid: i for i, sid in enumerate(order)}
    run_of = {value: r for r, value in enumerate(run_values.tolist())}
    slot = np.full((len(order), run_values.size), -1, dtype=np.int64)
    for row, (sid, run) in enumerate(zip(stimulus_ids, labels.tolist(), strict=True)):
        if sid not in position:
            continue
        i, r = position[sid], run_of[run]
        if slot[i, r] >= 0:
            raise DataError(f"{what}: stimulus {sid!r} appears twice in run {run!r}")
        slot[i, r] = row
    values = run_values.tolist()
    lacking = [(order[i], values[r]) for i, r in np.argwhere(slot < 0)]
    if lacking:
        shown = ", ".join(f"{sid!r} in run {run!r}" for sid, run in lacking[:5])
        raise DataError(
            f"{what}: cross-validated distances need every stimulus once in every run; missing "
            f"{len(lacking)} pattern(s): {shown}" + (" ..." if len(lacking) > 5 else "")
        )
    index = torch.as_tensor(slot, device=x.device)
    return x[index]  # (n, R, p)


def noise_precision(tensor: torch.Tensor) -> torch.Tensor:
    """Noise precision ``(p, p)`` of run-wise patterns ``(n, R, p)``: the inverse of the
    residual covariance shrunk towards its diagonal (rsatoolbox's ``prec_from_measurements(...,
    method='shrinkage_diag')``, module docstring)."""
    n, R, p = tensor.shape
    e = (tensor - tensor.mean(dim=1, keepdim=True)).reshape(n * R, p)
    dof = (n - 1) * R  # rsatoolbox's degrees of freedom for a (stimulus x channel x run) tensor
    rows = e.shape[0]
    s_sum = e.T @ e
    s2_sum = (e * e).T @ (e * e)
    s = s_sum / dof
    var = torch.diagonal(s)
    std = var.sqrt()
    s_mean = s_sum / std[None, :] / std[:, None] / (rows - 1)
    s2_mean = s2_sum / var[None, :] / var[:, None] / (rows - 1)
    var_hat = rows / dof**2 * (s2_mean - s_mean**2)
    off = ~torch.eye(p, dtype=torch.bool, device=tensor.device)
    lamb = float((var_hat[off].sum() / (s_mean[off] ** 2).sum()).clamp(0, 1)) if p > 1 else 0.0
    shrunk = torch.where(off, s * (1 - lamb), s)
    if not bool(torch.isfinite(shrunk).all()) or bool((var <= 0).any()):
        raise DataError("the noise covariance is undefined: a voxel has no residual variance")
    precision: torch.Tensor = torch.linalg.inv(shrunk)
    return precision


def crossvalidated_rdm(
    patterns: ArrayLike,
    stimulus_ids: Sequence[str],
    runs: np.ndarray,
    order: Sequence[str],
    method: str = "crossnobis",
    device: str | torch.device | None = "auto",
    what: str = "patterns",
) -> torch.Tensor:
    """Cross-validated RDM ``(n, n)`` (float64) over the stimuli ``order`` of run-wise patterns
    ``(N, p)`` (row ``k``: stimulus ``stimulus_ids[k]`` in run ``runs[k]``); ``method``
    ``crossnobis`` or ``crossvalidated_euclidean`` (module docstring). Not snapped."""
    if method not in BRAIN_RDMS:
        raise DataError(f"unknown brain RDM {method!r}; choose one of {', '.join(BRAIN_RDMS)}")
    dev = resolve_device(device)
    x = patterns.to(dev) if isinstance(patterns, torch.Tensor) else np.asarray(patterns)
    tensor = run_tensor(x, stimulus_ids, runs, order, what).to(dev)
    n, R, p = tensor.shape
    if method == "crossnobis":
        precision = noise_precision(tensor)
    else:
        precision = torch.eye(p, dtype=torch.float64, device=dev)
    total = tensor.sum(dim=1)
    rdm = torch.zeros((n, n), dtype=torch.float64, device=dev)
    for fold in range(R):
        test = tensor[:, fold]
        train = (total - test) / (R - 1)
        kernel = train @ precision @ test.T
        diag = torch.diagonal(kernel)
        rdm += diag[None, :] + diag[:, None] - kernel - kernel.T
    rdm = rdm / (R * p)
    return (rdm + rdm.T) / 2 * (1 - torch.eye(n, dtype=torch.float64, device=dev))
