r"""The cross-validated ridge of one feature matrix as precomputed spectral maps of the responses,
in torch (CPU or CUDA): the engine of the exact ``refit`` permutation null.

For fixed features, folds and alpha grid, :func:`~object2brain.encoding.ridge.fit_ridge_cv` is a
function of the responses alone: per outer fold, each alpha's inner-CV score of a voxel is a
quadratic function of its training responses and each alpha's test prediction a linear one. With
the thin SVD of a centred training set :math:`X_T - \bar{x} = U S V^\top` (rank :math:`r`) the
ridge prediction (with intercept) of any rows :math:`X_*` is

.. math:: \hat{y}_*(\alpha) = \bar{y}_T + B\, \mathrm{diag}\big(s / (s^2 + \alpha)\big)
          \, U^\top y_T, \qquad B = (X_* - \bar{x}) V \quad (m \times r),

so one product :math:`z = U^\top y_T` serves every alpha. For each outer fold :math:`k`:

1. inner fold :math:`j` (training rows :math:`T_j`, validation rows :math:`V_j` of the outer
   training set): :math:`z_j = U_j^\top y_{T_j}` ``(r_j, c)``; the validation predictions of all
   ``A`` alphas are one product of the stacked maps :math:`[B_j \mathrm{diag}(sh_a)]_a`
   ``(A n_{V_j}, r_j)`` with :math:`z_j`; their residuals against :math:`y_{V_j}`, squared and
   summed, give the score :math:`-\sum_j \|res_j(\alpha)\|^2 / (n_{V_j} K_{inner})` (the mean over
   inner folds of the negative mean squared error: himalaya's and
   :class:`~object2brain.encoding.ridge.CvSmoother`'s score; ties to the larger alpha);
2. the outer test prediction is formed for each column's chosen alpha only:
   :math:`\bar{y}_T + B_{test}\,(sh_{a^*} \odot U^\top y_T)`.

Cost per column (a relabelled voxel): :math:`\sum_k [\sum_j (r_j n_{T_j} + A\, n_{V_j} r_j) +
r_k (n_{T_k} + n_{S_k})]` multiply-adds, against :math:`\sum_k A\, n_{T_k} (n_{T_k} + n_{S_k})` for
the dense maps of :class:`~object2brain.encoding.ridge.CvSmoother` (the reference it equals to
rounding, tested to 1e-10): less by the test fold's share (its predictions are formed for one
alpha, not ``A``) and by :math:`r_j / n_{T_k}` (the inner rank against the outer training size;
large savings when the features are few). The dominant term stays :math:`A\, n_T r` per column:
the alpha search (every alpha's inner residuals), which this scheme does not reduce.

Device and dtype: float64 on every device (CPU and CUDA), so that the CPU and GPU nulls agree to
rounding (held to 1e-10 by the CUDA test and ``benchmarks/gpu_cases.py``; a chosen alpha can
differ only where two alphas' scores are within rounding of each other after the tie-break of
1e-10 per unit of ``log(alpha)`` toward the larger alpha). The SVDs are computed once in numpy
(LAPACK, float64) on the host and shared, so both devices start from the same factors. Columns
are processed in chunks of at most ``max_elements / (A max n_V)`` so that memory stays bounded;
columns are independent, so the result does not depend on the chunking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from object2brain.encoding.folds import inner_splits
from object2brain.encoding.ridge import FoldReduction, given_or_reduced

#: Default bound on the elements of one chunk's largest intermediate (the stacked validation
#: residuals ``(A, n_V, columns)``): 2^20 float64 values (8 MiB, cache-sized) on the CPU, 2^27
#: (1 GiB) on CUDA.
CPU_ELEMENTS = 2**20
CUDA_ELEMENTS = 2**27

#: Tie-break added to the inner-CV score per unit of ``log(alpha)``: exact ties go to the larger
#: alpha (as himalaya and the dense reference do).
TIE_BREAK = 1e-10


@dataclass(frozen=True)
class _Spectral:
    """Thin SVD maps of one centred training set for some prediction rows.

    ``project`` ``(r, n_train)``: :math:`U^\\top`; ``rows`` ``(m, r)``: :math:`(X_* - \\bar{x}) V`;
    ``shrink`` ``(A, r)``: :math:`s / (s^2 + \\alpha)` per alpha.
    """

    project: np.ndarray
    rows: np.ndarray
    shrink: np.ndarray


def _spectral(x_train: np.ndarray, x_rows: np.ndarray, alphas: np.ndarray) -> _Spectral:
    """The :class:`_Spectral` maps of training features ``(n_train, d)`` for the rows
    ``(m, d)`` (the same SVD and formula as :func:`object2brain.encoding.ridge._smoother`)."""
    mean = x_train.mean(axis=0)
    u, s, vt = np.linalg.svd(x_train - mean, full_matrices=False)
    shrink = s[None, :] / (s[None, :] ** 2 + alphas[:, None])
    return _Spectral(np.ascontiguousarray(u.T), (x_rows - mean) @ vt.T, shrink)


@dataclass(frozen=True)
class _Inner:
    """One inner fold, on the device: positions ``train`` ``(n_Tj,)`` and ``validation``
    ``(n_V,)`` inside the outer training set; ``project`` ``(r, n_Tj)``; ``maps``
    ``(A * n_V, r)``: row block ``a`` is :math:`B_j \\mathrm{diag}(sh_a)`; ``weight``:
    :math:`1 / (n_V K_{inner})`."""

    train: torch.Tensor
    validation: torch.Tensor
    project: torch.Tensor
    maps: torch.Tensor
    weight: float


@dataclass(frozen=True)
class _Outer:
    """One outer fold, on the device: stimulus indices ``train_index`` ``(n_T,)`` and
    ``test_index`` ``(n_S,)``; ``project`` ``(r, n_T)``; ``rows`` ``(n_S, r)``; ``shrink``
    ``(A, r)``; its inner folds."""

    train_index: torch.Tensor
    test_index: torch.Tensor
    project: torch.Tensor
    rows: torch.Tensor
    shrink: torch.Tensor
    inner: tuple[_Inner, ...]


@dataclass(frozen=True)
class TorchCvSmoother:
    """Cross-validated ridge (alpha per voxel by inner CV) as spectral maps on ``device``:
    :meth:`predict` equals :func:`~object2brain.encoding.ridge.fit_ridge_cv`'s out-of-fold
    predictions for any responses, without refitting (see the module docstring).

    ``alphas`` ``(A,)`` sorted; ``max_elements``: bound on a chunk's largest intermediate.
    Memory of the maps: about ``8 (A n_V r + n r)`` bytes per outer fold.
    """

    alphas: np.ndarray
    device: torch.device
    folds: tuple[_Outer, ...]
    max_elements: int

    def predict(self, responses: np.ndarray) -> np.ndarray:
        """Out-of-fold predictions ``(n, c)`` (float64, numpy) of ``responses`` ``(n, c)`` (each
        column a voxel or a relabelled copy of one)."""
        y = torch.as_tensor(np.ascontiguousarray(responses, dtype=np.float64), device=self.device)
        return np.asarray(self.predict_tensor(y).cpu().numpy())

    def predict_tensor(self, y: torch.Tensor) -> torch.Tensor:
        """:meth:`predict` of float64 responses ``(n, c)`` already on the device."""
        n, c = y.shape
        out = torch.empty((n, c), dtype=torch.float64, device=self.device)
        widest = max(
            (self.alphas.size * inner.validation.numel() for f in self.folds for inner in f.inner),
            default=1,
        )
        step = max(1, self.max_elements // max(widest, 1))
        tie_break = torch.as_tensor(
            np.log(self.alphas) * TIE_BREAK, dtype=torch.float64, device=self.device
        )[:, None]
        # one buffer for every inner fold's stacked residuals (fresh large tensors per product
        # would cost page faults and extra passes over memory)
        buffer = torch.empty(widest * min(step, c), dtype=torch.float64, device=self.device)
        for first in range(0, c, step):
            chunk = y[:, first : first + step]
            for fold in self.folds:
                out[fold.test_index, first : first + step] = self._fold(
                    fold, chunk, tie_break, buffer
                )
        return out

    def null_mean_r(
        self, responses: np.ndarray, orders: np.ndarray, masks: Sequence[np.ndarray]
    ) -> np.ndarray:
        """The refit null's statistics, computed on the device: ``(len(masks), b)`` mean over
        voxels of the Pearson r, within each mask's stimuli, between each relabelled copy of
        ``responses`` ``(n, v)`` (copy ``i``'s row ``s`` is ``responses[orders[i, s]]``;
        ``orders`` ``(b, n)``) and its out-of-fold predictions. Only the orders go to the device
        besides the responses, and only the statistics come back (the host's work of
        :func:`~object2brain.encoding.scores.refit_permutation_tests` with :meth:`predict`, the
        same numbers to rounding). Voxels with an undefined r (constant within a mask) are
        left out of the mean, as by ``numpy.nanmean``.
        """
        y = torch.as_tensor(np.ascontiguousarray(responses, dtype=np.float64), device=self.device)
        index = torch.as_tensor(np.asarray(orders, dtype=np.int64), device=self.device)
        n, v = y.shape
        count = index.shape[0]
        relabelled = y[index].permute(1, 0, 2).reshape(n, count * v)  # column i v + j
        predicted = self.predict_tensor(relabelled)
        out = torch.empty((len(masks), count), dtype=torch.float64, device=self.device)
        for m, mask in enumerate(masks):
            rows = torch.as_tensor(np.flatnonzero(mask), device=self.device)
            r = _unit(relabelled.index_select(0, rows)) * _unit(predicted.index_select(0, rows))
            out[m] = r.sum(dim=0).view(count, v).nanmean(dim=1)
        return np.asarray(out.cpu().numpy())

    def _fold(
        self, fold: _Outer, y: torch.Tensor, tie_break: torch.Tensor, buffer: torch.Tensor
    ) -> torch.Tensor:
        """Test predictions ``(n_S, c)`` of one outer fold for responses ``y`` ``(n, c)``
        (``buffer``: at least ``A max(n_V) c`` float64 values of scratch)."""
        n_alphas, c = self.alphas.size, y.shape[1]
        y_train = y.index_select(0, fold.train_index)
        score = torch.zeros((n_alphas, c), dtype=torch.float64, device=self.device)
        for inner in fold.inner:
            y_fit = y_train.index_select(0, inner.train)
            offset = y_fit.mean(dim=0) - y_train.index_select(0, inner.validation)  # (n_V, c)
            residual = buffer[: inner.maps.shape[0] * c].view(inner.maps.shape[0], c)
            torch.mm(inner.maps, inner.project @ y_fit, out=residual)
            stacked = residual.view(n_alphas, -1, c)
            stacked.add_(offset).square_()
            score.sub_(stacked.sum(dim=1), alpha=inner.weight)
        best = (score + tie_break).argmax(dim=0)  # (c,)
        z = (fold.project @ y_train).mul_(fold.shrink[best].T)  # (r, c): the chosen alpha's
        return torch.addmm(y_train.mean(dim=0)[None, :], fold.rows, z)


def _unit(values: torch.Tensor) -> torch.Tensor:
    """Columns centred and scaled to unit norm (a constant column becomes NaN), as
    :func:`object2brain.encoding.scores.pearson_r` does."""
    centred = values - values.mean(dim=0)
    norm: torch.Tensor = torch.linalg.vector_norm(centred, dim=0)
    return centred / norm


def fit_torch_smoother(
    features: np.ndarray,
    folds: np.ndarray,
    *,
    alphas: Sequence[float],
    inner_folds: int,
    seed: int,
    pca_dim: int | None = None,
    standardize: bool = False,
    reductions: Sequence[FoldReduction] | None = None,
    device: torch.device | str = "cpu",
    max_elements: int | None = None,
) -> TorchCvSmoother:
    """The :class:`TorchCvSmoother` of ``features`` ``(n, p)`` with the folds ``(n,)``, inner
    folds (``inner_folds``, ``seed``), alphas, standardisation and PCA of
    :func:`~object2brain.encoding.ridge.fit_ridge_cv` (``reductions``: the folds' fitted
    standardisation and PCA, shared with the ridge fits), on ``device`` (float64).
    ``max_elements``: default :data:`CPU_ELEMENTS` on the CPU, :data:`CUDA_ELEMENTS` on CUDA.

    Raises:
        ValueError: ``reductions`` of other folds.
    """
    target = torch.device(device)
    grid = np.asarray(sorted(alphas), dtype=np.float64)
    reductions = given_or_reduced(features, folds, pca_dim, standardize, reductions)
    put = partial(_put, device=target)

    outer = []
    for k, fold in enumerate(reductions):
        x, x_test = fold.train_inputs(features), fold.test_inputs(features)
        splits = inner_splits(fold.train.size, inner_folds, seed=seed, outer_fold=k)
        inner = []
        for train, validation in splits:
            maps = _spectral(x[train], x[validation], grid)
            stacked = maps.rows[None, :, :] * maps.shrink[:, None, :]  # (A, n_V, r)
            inner.append(
                _Inner(
                    put(train.astype(np.int64)),
                    put(validation.astype(np.int64)),
                    put(maps.project),
                    put(stacked.reshape(-1, stacked.shape[2])),
                    1.0 / (validation.size * len(splits)),
                )
            )
        maps = _spectral(x, x_test, grid)
        outer.append(
            _Outer(
                put(fold.train.astype(np.int64)),
                put(fold.test.astype(np.int64)),
                put(maps.project),
                put(maps.rows),
                put(maps.shrink),
                tuple(inner),
            )
        )
    default = CUDA_ELEMENTS if target.type == "cuda" else CPU_ELEMENTS
    return TorchCvSmoother(grid, target, tuple(outer), max_elements or default)


@dataclass(frozen=True)
class _FixedFold:
    """One outer fold of :class:`FixedAlphaSmoother`, on the device: stimulus indices
    ``train_index`` ``(n_T,)`` and ``test_index`` ``(n_S,)``; the thin SVD maps ``project``
    ``(r, n_T)`` (:math:`U^\\top`), ``rows`` ``(n_S, r)`` (:math:`(X_S - \\bar{x}) V`) and
    ``shrink`` ``(A, r)`` of the training set."""

    train_index: torch.Tensor
    test_index: torch.Tensor
    project: torch.Tensor
    rows: torch.Tensor
    shrink: torch.Tensor

    def hat(self, alpha: int) -> torch.Tensor:
        r"""The ridge map ``(n_S, n_T)`` of grid alpha number ``alpha``, intercept included:
        :math:`H = \frac{1}{n_T}\mathbf{1}\mathbf{1}^\top + B\,\mathrm{diag}(sh_\alpha)\,U^\top`
        (test predictions :math:`H y_T`)."""
        hat = (self.rows * self.shrink[alpha]) @ self.project
        return hat.add_(1.0 / self.project.shape[1])


@dataclass(frozen=True)
class FixedAlphaSmoother:
    r"""The ridge of one feature matrix with a *given* alpha per voxel and outer fold, as linear
    maps of the responses on ``device`` (float64): the engine of the ``fixed_alpha``
    permutation null.

    For outer fold :math:`k` and a voxel whose alpha there is :math:`\alpha`, the test
    predictions of any responses are :math:`H_k(\alpha)\, y_{T_k}` (:meth:`_FixedFold.hat`), so
    a relabelled copy of the voxel is refitted by one product, without the inner alpha search
    (which :class:`TorchCvSmoother` reruns). :meth:`bind` fixes the alphas (those the real data
    chose, :attr:`object2brain.encoding.ridge.RidgeFit.alphas`) and returns the
    :class:`~object2brain.encoding.scores.NullRefit` of one ROI.

    Cost per relabelled voxel: :math:`\sum_k n_{S_k} n_{T_k}` multiply-adds
    (:math:`n^2 (K - 1) / K` for ``K`` balanced folds), against about :math:`\sum_k A\, n_{T_k}
    r_k` for the alpha search of :class:`TorchCvSmoother`. Its false-positive rate is measured,
    not assumed (it ignores the selection of alpha): ``validation/encoding_fixed_alpha_null.md``.
    """

    alphas: np.ndarray
    device: torch.device
    folds: tuple[_FixedFold, ...]

    def bind(self, chosen: np.ndarray, max_elements: int | None = None) -> FixedAlphaNull:
        """The null of one ROI whose alphas ``(K, v)`` (grid values, one row per outer fold)
        were chosen on the real responses. ``max_elements``: bound on the elements of a chunk's
        relabelled copies ``(n, v, b)`` (default :data:`CPU_ELEMENTS` on the CPU,
        :data:`CUDA_ELEMENTS` on CUDA).

        Raises:
            ValueError: ``chosen`` of another number of folds, or values off the grid.
        """
        chosen = np.asarray(chosen, dtype=np.float64)
        if chosen.ndim != 2 or chosen.shape[0] != len(self.folds):
            raise ValueError(f"alphas {chosen.shape} for {len(self.folds)} outer folds")
        index = np.abs(np.log(chosen)[..., None] - np.log(self.alphas)).argmin(axis=-1)
        if not np.allclose(self.alphas[index], chosen, rtol=1e-6, atol=0.0):
            raise ValueError("alphas off the grid of the smoother")
        orders, spans = [], []
        for fold, row in zip(self.folds, index, strict=True):
            order = np.argsort(row, kind="stable")  # the voxels of each alpha side by side
            values, starts, counts = np.unique(row[order], return_index=True, return_counts=True)
            orders.append(torch.as_tensor(order, device=self.device))
            spans.append(
                tuple(
                    (fold.hat(int(a)), int(first), int(first + count))
                    for a, first, count in zip(values, starts, counts, strict=True)
                )
            )
        default = CUDA_ELEMENTS if self.device.type == "cuda" else CPU_ELEMENTS
        return FixedAlphaNull(
            self.device, self.folds, tuple(orders), tuple(spans), max_elements or default
        )


@dataclass(frozen=True)
class FixedAlphaNull:
    """The ``fixed_alpha`` null of one ROI (:meth:`FixedAlphaSmoother.bind`): per outer fold
    ``k``, ``orders[k]`` ``(v,)`` sorts the voxels by their alpha there and ``spans[k]`` holds,
    per alpha used, its map ``(n_S, n_T)`` and the range of sorted voxels that use it."""

    device: torch.device
    folds: tuple[_FixedFold, ...]
    orders: tuple[torch.Tensor, ...]
    spans: tuple[tuple[tuple[torch.Tensor, int, int], ...], ...]
    max_elements: int

    def predict(self, responses: np.ndarray) -> np.ndarray:
        """Out-of-fold predictions ``(n, v)`` (float64 numpy) of ``responses`` ``(n, v)``
        (column ``j`` with voxel ``j``'s alphas)."""
        y = torch.as_tensor(np.ascontiguousarray(responses, dtype=np.float64), device=self.device)
        n = y.shape[0]
        identity = torch.arange(n, device=self.device)[None, :]
        return np.asarray(self._predict(y, identity)[:, :, 0].cpu().numpy())

    def _predict(self, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Out-of-fold predictions ``(n, v, b)`` of the ``b`` relabelled copies of ``y``
        ``(n, v)`` given by ``index`` ``(b, n)`` (copy ``i``'s row ``s`` is
        ``y[index[i, s]]``)."""
        n, v = y.shape
        b = index.shape[0]
        out = torch.empty((n, v, b), dtype=torch.float64, device=self.device)
        for fold, order, spans in zip(self.folds, self.orders, self.spans, strict=True):
            rows = index.index_select(1, fold.train_index).T  # (n_T, b) stimuli
            # (n_T, v b): column j b + i is copy i of sorted voxel j, so each alpha's voxels
            # are one block of columns and all copies go through one product per alpha
            train = y.index_select(1, order)[rows].transpose(1, 2).reshape(rows.shape[0], -1)
            predicted = torch.cat([hat @ train[:, a * b : z * b] for hat, a, z in spans], dim=1)
            n_s = fold.test_index.numel()
            out[fold.test_index[:, None], order[None, :]] = predicted.view(n_s, v, b)
        return out

    def null_mean_r(
        self, responses: np.ndarray, orders: np.ndarray, masks: Sequence[np.ndarray]
    ) -> np.ndarray:
        r"""``(len(masks), b)``: mean over voxels of the Pearson r, within each mask's stimuli,
        between each relabelled copy of ``responses`` ``(n, v)`` (copy ``i``'s row ``s`` is
        ``responses[orders[i, s]]``) and its out-of-fold predictions with the bound alphas
        (:class:`~object2brain.encoding.scores.NullRefit`). Voxels with an undefined r (no
        spread within a mask: variance below :math:`10^{-12}` of the sum of squares) are left
        out of the mean, as by ``numpy.nanmean``.

        The r of every mask comes from five sums per mask, formed by products with the masks'
        indicator matrix: :math:`r = (S_{yp} - S_y S_p / c) / \sqrt{(S_{yy} - S_y^2/c)
        (S_{pp} - S_p^2/c)}`; the responses are centred on their mean first (ridge with an
        intercept moves its predictions with them), so these differences lose no precision
        unless a mask's mean is far from the others' in units of its spread. Copies are
        processed in chunks of at most ``max_elements / (n v)``; the result does not depend on
        the chunking.
        """
        y = torch.as_tensor(np.ascontiguousarray(responses, dtype=np.float64), device=self.device)
        y = y - y.mean(dim=0)
        index = torch.as_tensor(np.asarray(orders, dtype=np.int64), device=self.device)
        n, v = y.shape
        count = index.shape[0]
        indicator = torch.as_tensor(
            np.stack([np.asarray(m, dtype=np.float64) for m in masks]), device=self.device
        )  # (m, n)
        sizes = indicator.sum(dim=1)[:, None]
        out = torch.empty((len(masks), count), dtype=torch.float64, device=self.device)
        step = max(1, self.max_elements // max(n * v, 1))
        for first in range(0, count, step):
            chunk = index[first : first + step]
            predicted = self._predict(y, chunk).view(n, -1)  # (n, v b)
            relabelled = y[chunk.T].transpose(1, 2).reshape(n, -1)  # (n, v b), same columns
            s_y, s_p = indicator @ relabelled, indicator @ predicted
            s_yy = indicator @ relabelled.square()
            s_pp = indicator @ predicted.square()
            s_yp = indicator @ relabelled.mul_(predicted)
            var_y = s_yy - s_y.square() / sizes
            var_p = s_pp - s_p.square() / sizes
            spread = (var_y > 1e-12 * s_yy) & (var_p > 1e-12 * s_pp)
            r = (s_yp - s_y * s_p / sizes) / torch.sqrt(var_y * var_p)
            r = torch.where(spread, r, torch.nan).view(len(masks), v, -1)
            out[:, first : first + chunk.shape[0]] = r.nanmean(dim=1)
        return np.asarray(out.cpu().numpy())


def fit_fixed_alpha_smoother(
    features: np.ndarray,
    folds: np.ndarray,
    *,
    alphas: Sequence[float],
    pca_dim: int | None = None,
    standardize: bool = False,
    reductions: Sequence[FoldReduction] | None = None,
    device: torch.device | str = "cpu",
) -> FixedAlphaSmoother:
    """The :class:`FixedAlphaSmoother` of ``features`` ``(n, p)`` with the outer folds ``(n,)``,
    alpha grid, standardisation and PCA of :func:`~object2brain.encoding.ridge.fit_ridge_cv`
    (``reductions``: the folds' fitted standardisation and PCA, shared with the ridge fits), on
    ``device`` (float64). One thin SVD per outer training set (numpy, shared by every device).

    Raises:
        ValueError: ``reductions`` of other folds.
    """
    target = torch.device(device)
    grid = np.asarray(sorted(alphas), dtype=np.float64)
    reductions = given_or_reduced(features, folds, pca_dim, standardize, reductions)
    put = partial(_put, device=target)

    out = []
    for fold in reductions:
        maps = _spectral(fold.train_inputs(features), fold.test_inputs(features), grid)
        out.append(
            _FixedFold(
                put(fold.train.astype(np.int64)),
                put(fold.test.astype(np.int64)),
                put(maps.project),
                put(maps.rows),
                put(maps.shrink),
            )
        )
    return FixedAlphaSmoother(grid, target, tuple(out))


def _put(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A contiguous ``array`` as a tensor on ``device`` (its dtype kept)."""
    return torch.as_tensor(np.ascontiguousarray(array), device=device)
