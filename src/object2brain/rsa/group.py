"""Group-level inference over subjects and stimuli at once, and paired model comparisons.

Notation: ``K`` model RDMs, ``S`` subject RDMs of one target, ``n`` stimuli, ``m = n (n - 1) / 2``
pairs, ``B`` resamples. The statistic is the mean over subjects of the per-subject coefficient,
``rbar = mean_s r(model, subject_s)`` (any comparator of :data:`GROUP_METHODS`), or of a
difference of two models' coefficients, ``delta = mean_s (r_a,s - r_b,s)``.

**Two-factor ("dual") bootstrap** (Schuett et al. 2023, eLife 12:e82566; rsatoolbox's
``eval_dual_bootstrap``). Each resample ``b`` draws ``n`` stimuli with replacement (counts
``c_b``; a pair of stimuli then enters ``c_a c_b`` times and a stimulus never meets its own copy)
and ``S`` subjects with replacement (in chunks of :data:`RESAMPLE_CHUNK` with their own seeds,
:func:`resample_plan`), and evaluates the statistic three ways from the same draws:
stimuli and subjects resampled (variance ``V_both``), subjects only (``V_subj``), stimuli only
(``V_stim``).

**The corrected two-factor variance.** rsatoolbox's estimator for cells of a crossed design,
``S/(S-1) V_subj + n/(n-1) V_stim - S n/((S-1)(n-1)) (V_both - V_subj - V_stim)``, is
conservative for RDM comparisons (its stimulus terms carry the pair excess below, and its
``min(S, n) - 1`` degrees of freedom). Writing ``rbar = mu + mean_s a_s + c(P) + mean_s u_s(P)``
(subject effects ``a_s``; the stimulus-sample deviation ``c`` shared by the subjects and ``u_s``
each subject's own), ``Var(rbar) = s_a^2 / S + Var(c) + Var(u) / S``, estimated as

    V = W + max(0, S/(S-1) V_subj - I),   I = (mean_s W_s - W) / (S - 1),

with ``W`` the pair-corrected stimulus variance of ``rbar`` (unbiased for
``Var(c) + Var(u) / S``), ``W_s`` that of subject ``s``'s own ``r_s`` (``Var(c) + Var(u)``) and
``S/(S-1) V_subj`` the subject bootstrap (``s_a^2 / S + Var(u) / S``); Welch-Satterthwaite
degrees of freedom. ``V_both`` is kept for rsatoolbox's estimator (``pair_correction=False``).

**Pair correction of the stimulus bootstrap** (the reason stimulus-bootstrap intervals are too
wide). An RDM coefficient is, to first order, a mean over pairs of stimuli of influence values
``h_ab = g_a + g_b + e_ab`` (Hoeffding decomposition; ``e``: the part of a pair not explained
by its two stimuli). Sampling ``n`` stimuli from a population gives
``Var = 4 s_g^2 / n + 2 s_e^2 / (n (n - 1))``, but the bootstrap's stimulus effects are the
sample's row means ``g_a + mean_b e_ab``, which carry ``s_e^2 / (n - 1)`` of pair noise each, so
the bootstrap variance exceeds the sampling variance by about

    E = 4 s_e^2 / (n (n - 1)).

With noisy brain RDMs ``s_e`` dominates and the bootstrap variance is 2-3 times too large
(intervals 1.4-1.7 times too wide). The delete-one-stimulus jackknife (pairs of the left-out
stimulus dropped; exact recomputation, ranks included) has expectation
``4 s_g^2 / n + 4 s_e^2 / (n (n - 2))`` and the weighted pair bootstrap
``4 (n-2)^2 s_g^2 / (n^2 (n-1)) + (6n - 8) s_e^2 / (n^2 (n-1))``, so

    W = (2n - 3)/(n - 1) V_jack - n/(n - 2) V_stim

(:func:`pair_corrected`) is unbiased for the sampling variance ``4 s_g^2 / n + 2 s_e^2 /
(n (n - 1))``; floored at ``n / (3n - 4) V_stim``, its value when ``s_g = 0``.

Reported per cell: ``se = sqrt(V)`` of the chosen bootstrap (``stimuli``: ``W``;
``subjects``: ``S/(S-1) V_subj``; ``both``: the corrected ``V``), a Student-t interval
``rbar +- t_{dof, 0.975} se`` and t-tests with ``dof = n - 1`` (stimuli), ``S - 1`` (subjects)
or Welch-Satterthwaite (both): one-sided ``p_greater`` of ``rbar > 0`` (the table's ``p`` is
the test of :func:`group_p` instead: the relabelling test for ``stimuli``, the score test of
:func:`association_test` for ``both``), one-sided
``p_below_nc`` of ``rbar`` below the lower noise ceiling (the per-subject differences
``r_s - l_s`` to the leave-one-subject-out ceiling ``l_s`` resampled with the same draws) and,
for comparisons, two-sided ``p`` of ``delta != 0``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.stats
import torch

from object2brain.data.splits import make_folds
from object2brain.devices import Chunking, pick_chunk
from object2brain.errors import DataError
from object2brain.executors.base import Executor, chunk_seed, chunks_of
from object2brain.rsa.compare import (
    WeightedComparison,
    compare,
    comparison_scale,
    masked_compare,
    prepare,
    row_sums,
)
from object2brain.rsa.inference import (
    mantel_test,
    pair_corrected,
    pair_corrected_variance,
    relabelled_mean_test,
    relabelling_moments,
)
from object2brain.rsa.rdm import squareform, triu_indices, upper_triangle

Bootstrap = Literal["stimuli", "subjects", "both"]
BOOTSTRAPS: tuple[str, ...] = ("stimuli", "subjects", "both")
_GROUP_STREAM = 15_485_863  # seed word of the two-factor resamples
_BLOCK = 64  # resamples per weighted comparison call on the CPU (at most)
#: Resamples per chunk: chunk ``k`` is drawn from its own seed (:func:`resample_plan`) and is one
#: unit of work of an executor; a constant, never dependent on the number of workers.
RESAMPLE_CHUNK = 250
KENDALL = "kendall_tau_a"
#: Comparators of the group tables (Kendall tau-a's resamples are gathered, the others weighted).
GROUP_METHODS: tuple[str, ...] = (
    "spearman", "pearson", "rho_a", "cosine", "corr_cov", "cosine_cov", KENDALL,
)  # fmt: skip
#: Fewest subjects of a target whose default bootstrap is ``both``.
MIN_SUBJECTS_BOTH = 3


def default_bootstrap(requested: str | None, n_subjects: int) -> str:
    """``requested``, or ``both`` with at least :data:`MIN_SUBJECTS_BOTH` subjects, else
    ``stimuli``. A subject bootstrap of one subject is refused (``stimuli`` is used)."""
    if requested is None:
        return "both" if n_subjects >= MIN_SUBJECTS_BOTH else "stimuli"
    if requested not in BOOTSTRAPS:
        raise DataError(f"unknown bootstrap {requested!r}; choose one of {', '.join(BOOTSTRAPS)}")
    return requested if n_subjects >= 2 else "stimuli"


@dataclass(frozen=True)
class ResamplePlan:
    """The draws shared by every statistic of one condition and target.

    ``counts`` ``(B, n)``: how often each stimulus was drawn; ``subjects`` ``(B, S)``: the
    subjects drawn (indices).
    """

    counts: np.ndarray
    subjects: np.ndarray

    @property
    def n_boot(self) -> int:
        """Number of resamples ``B``."""
        return int(self.counts.shape[0])


def resample_plan(n: int, n_subjects: int, n_boot: int, seed: int | Sequence[int]) -> ResamplePlan:
    """Draws of ``n_boot`` two-factor resamples: a function of ``(seed, n, n_subjects, n_boot)``
    only, so every model of a study is resampled alike (paired comparisons).

    ``seed``: ``root`` or ``(root, *words)`` (e.g. the target and condition). Resamples come in
    chunks of :data:`RESAMPLE_CHUNK`; chunk ``k`` draws its stimulus indices ``(C, n)`` and then
    its subject indices ``(C, S)`` from
    ``numpy.random.default_rng([*chunk_seed(root, stream, k), *words])``, so any worker can draw
    any chunk and the first resamples do not change with ``n_boot``.
    """
    root, *words = [int(seed)] if isinstance(seed, int | np.integer) else [int(w) for w in seed]
    counts = np.zeros((n_boot, n))
    subjects = np.zeros((n_boot, n_subjects), dtype=np.int64)
    for k, rows in enumerate(chunks_of(n_boot, RESAMPLE_CHUNK)):
        rng = np.random.default_rng([*chunk_seed(root, _GROUP_STREAM, k), *words])
        idx = rng.integers(0, n, size=(len(rows), n))
        np.add.at(counts, (np.asarray(rows)[:, None], idx), 1.0)
        subjects[rows.start : rows.stop] = rng.integers(0, n_subjects, size=(len(rows), n_subjects))
    return ResamplePlan(counts, subjects)


@dataclass(frozen=True)
class SubjectCoefficients:
    """Per-subject coefficients of ``K`` rows (models or differences) and their resamples.

    ``r`` ``(K, S)``; ``boot`` ``(B, K, S)`` under each resample's stimulus counts (all
    subjects); ``influence`` ``(K, m)``: the subject-mean pair influence values of ``r``.
    """

    r: np.ndarray
    boot: np.ndarray
    jack: np.ndarray

    def __sub__(self, other: SubjectCoefficients) -> SubjectCoefficients:
        return SubjectCoefficients(self.r - other.r, self.boot - other.boot, self.jack - other.jack)

    def rows(self, index: Sequence[int] | np.ndarray) -> SubjectCoefficients:
        """The rows ``index`` of every array."""
        i = np.asarray(index, dtype=np.int64)
        return SubjectCoefficients(self.r[i], self.boot[:, i], self.jack[:, i])


def resample_block(rows: int, n: int, device: torch.device) -> int:
    """Resamples per weighted comparison call of ``rows = K + T`` condensed RDMs of ``n``
    stimuli on ``device``: what fits in a share of its free memory
    (:func:`object2brain.devices.pick_chunk`), the prepared rows of every resample plus the
    ranking and pair-weight temporaries (about 12 more rows; ``m + n`` values each, the whitened
    methods' size),
    and at most :data:`_BLOCK` on the CPU (larger blocks are not faster there). A block only
    groups resamples: every resample's coefficients are computed on their own, so the results
    do not depend on it (tests)."""
    per_resample = 8 * (n * (n - 1) // 2 + n) * (rows + 12)
    cap = _BLOCK if device.type == "cpu" else None
    return pick_chunk(per_resample, device, maximum=cap)


def _weighted(
    comparison: WeightedComparison, counts: torch.Tensor, n: int, block: int | None = None
) -> np.ndarray:
    """Coefficients ``(C, K, T)`` under stimulus counts ``(C, n)`` (pair weights ``c_a c_b``),
    on the device of the comparison's rows, ``block`` resamples per call (default:
    :func:`resample_block`; halved when a block runs out of memory)."""
    device = comparison.a.device
    rows = comparison.a.shape[0] + comparison.b.shape[0]
    iu, ju = triu_indices(n, device)
    counts = counts.to(device=device, dtype=torch.float64)

    def work(start: int, stop: int) -> np.ndarray:
        c = counts[start:stop]
        return comparison(c[:, iu] * c[:, ju], c).cpu().numpy()

    chunking = Chunking(block or resample_block(rows, n, device))
    parts = [value for _, _, value in chunking.run(len(counts), work, device=device)]
    return (
        np.concatenate(parts)
        if parts
        else np.zeros((0, comparison.a.shape[0], comparison.b.shape[0]))
    )


def _kendall(a: torch.Tensor, y: torch.Tensor, counts: np.ndarray) -> np.ndarray:
    """Kendall tau-a ``(C, K, T)`` of condensed RDMs ``a`` ``(K, m)`` and ``y`` ``(T, m)`` under
    stimulus counts ``(C, n)``: each resample lists stimulus ``a`` ``c_a`` times, takes the pairs
    ``p < q`` of that list and drops those of a stimulus with its own copy (tau-a has no weighted
    form: the pairs are gathered; ``O(m^2)`` per resample)."""
    A, Y = squareform(a), squareform(y)
    n = counts.shape[1]
    out = []
    for c in np.asarray(counts).astype(np.int64):
        idx = torch.as_tensor(np.repeat(np.arange(n), c))
        i, j = triu_indices(len(idx), torch.device("cpu"))
        ra, rb = idx[i], idx[j]
        w = (ra != rb).to(torch.float64)[None]
        out.append(masked_compare(A[:, ra, rb][None], Y[:, ra, rb][None], w, KENDALL).numpy())
    return np.concatenate(out) if out else np.zeros((0, a.shape[0], y.shape[0]))


def _coefficients(
    a: torch.Tensor, y: torch.Tensor, method: str, counts: np.ndarray, block: int | None = None
) -> Any:
    """Coefficients ``(C, K, T)`` of condensed RDMs under stimulus counts ``(C, n)`` (pair
    weights ``c_a c_b``; on the device of ``a`` and ``y``, ``block`` resamples per call,
    :func:`_weighted`; Kendall tau-a: :func:`_kendall`, on the CPU)."""
    if method == KENDALL:
        return _kendall(a.cpu(), y.cpu(), counts)
    n = counts.shape[1]
    return _weighted(WeightedComparison(a, y, method), torch.as_tensor(counts), n, block)


def _weighted_chunk(shared: tuple[torch.Tensor, torch.Tensor, str], counts: np.ndarray) -> Any:
    """One chunk of resamples (an executor's unit): ``(C, K, T)`` coefficients of the condensed
    RDMs ``shared = (A, Y, method)`` under the stimulus counts ``(C, n)``."""
    a, y, method = shared
    return _coefficients(a, y, method, counts)


def resampled(
    a: torch.Tensor, y: torch.Tensor, method: str, counts: np.ndarray,
    executor: Executor | None = None, block: int | None = None,
) -> np.ndarray:  # fmt: skip
    """Coefficients ``(B, K, T)`` of condensed RDMs ``a`` ``(K, m)`` and ``y`` ``(T, m)`` under
    every resample's stimulus counts: here on the device of ``a`` and ``y`` (``block``
    resamples per call, :func:`_weighted`), or with a non-local ``executor`` its chunks of
    :data:`RESAMPLE_CHUNK` resamples on the workers (CPU); the same numbers for every
    executor, number of workers, device (to rounding) and block size."""
    if executor is None or executor.name == "local" or len(counts) <= RESAMPLE_CHUNK:
        return np.asarray(_coefficients(a, y, method, counts, block))
    chunks = [counts[r.start : r.stop] for r in chunks_of(len(counts), RESAMPLE_CHUNK)]
    parts = executor.map_chunks(
        _weighted_chunk, chunks, stage="rsa group bootstrap", shared=(a.cpu(), y.cpu(), method)
    )
    return np.concatenate(parts)


def leave_one_out_counts(n: int) -> torch.Tensor:
    """``(n, n)`` stimulus counts of the delete-one jackknife: row ``a`` drops stimulus ``a``."""
    return 1.0 - torch.eye(n, dtype=torch.float64)


def subject_coefficients(
    model_rdms: torch.Tensor, subject_rdms: torch.Tensor, method: str, plan: ResamplePlan,
    executor: Executor | None = None, device: torch.device | str = "cpu",
    block: int | None = None,
) -> SubjectCoefficients:  # fmt: skip
    """Coefficients of square model RDMs ``(K, n, n)`` with subject RDMs ``(S, n, n)``, observed
    and under each resample's stimulus counts (pairs weighted ``c_a c_b``; computed on
    ``device``, ``block`` resamples per call, or the resamples' chunks run by ``executor``,
    :func:`resampled`)."""
    if method not in GROUP_METHODS:
        raise DataError(f"group inference supports {', '.join(GROUP_METHODS)}, not {method!r}")
    dev = torch.device(device)
    A = upper_triangle(model_rdms.to(dev)).to(torch.float64)
    Y = upper_triangle(subject_rdms.to(dev)).to(torch.float64)
    n = model_rdms.shape[-1]
    r = compare(A, Y, method).cpu().numpy()
    boot = resampled(A, Y, method, plan.counts, executor, block)
    jack = _coefficients(A, Y, method, leave_one_out_counts(n).numpy(), block)
    return SubjectCoefficients(r, boot, jack)


def lower_ceiling_coefficients(
    subject_rdms: torch.Tensor, method: str, plan: ResamplePlan, executor: Executor | None = None,
    device: torch.device | str = "cpu", block: int | None = None,
) -> SubjectCoefficients:  # fmt: skip
    """The lower noise ceiling's per-subject terms ``l_s = r(subject_s, mean of the others)``
    (pooled on the comparison's scale) as a ``(1, S)`` row, observed and resampled (on
    ``device``, as :func:`subject_coefficients`)."""
    Y = upper_triangle(subject_rdms.to(torch.device(device))).to(torch.float64)
    S, n = Y.shape[0], subject_rdms.shape[-1]
    scaled = comparison_scale(Y, method)
    others = (scaled.sum(dim=0, keepdim=True) - scaled) / max(1, S - 1)
    r = torch.diagonal(compare(Y, others, method)).cpu().numpy()
    boot = np.diagonal(resampled(Y, others, method, plan.counts, executor, block), axis1=1, axis2=2)
    jack = np.diagonal(
        _coefficients(Y, others, method, leave_one_out_counts(n).numpy(), block), axis1=1, axis2=2
    )
    return SubjectCoefficients(r[None], boot[:, None, :], jack[:, None, :])


@dataclass(frozen=True)
class Variances:
    """Bootstrap variances ``(K,)`` of the subject-mean statistic from one plan.

    ``subject_stimuli``, ``subject_jackknife``: the means over subjects of each subject's own
    ``V_stim,s`` and ``V_jack,s`` (the stimulus variances of ``r_s`` alone), the ingredients of
    the two-factor interaction (module docstring).
    """

    both: np.ndarray
    stimuli: np.ndarray
    subjects: np.ndarray
    jackknife: np.ndarray
    subject_stimuli: np.ndarray
    subject_jackknife: np.ndarray


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        defined = np.isfinite(values)
        total = np.where(defined, values, 0.0).sum(axis=-1)
        count = defined.sum(axis=-1)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _var(values: np.ndarray) -> np.ndarray:
    """Variance over axis 0 (ddof 1) of the defined resamples."""
    with np.errstate(invalid="ignore", divide="ignore"):
        out: np.ndarray = (
            np.nanvar(values, axis=0, ddof=1)
            if len(values) > 1
            else np.full(values.shape[1:], np.nan)
        )
    return out


def _jackknife_var(jack: np.ndarray) -> np.ndarray:
    """Delete-one jackknife variance ``(n-1)/n sum_a (x_(a) - mean)^2`` over axis 0."""
    n = jack.shape[0]
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "Mean of empty slice": NaN stays
        centred = jack - np.nanmean(jack, axis=0)
        return np.asarray((n - 1) / n * np.nansum(centred**2, axis=0))


def bootstrap_variances(coef: SubjectCoefficients, plan: ResamplePlan) -> Variances:
    """``V_both``, ``V_stim``, ``V_subj``, ``V_jack`` of the subject mean and the subjects'
    mean own corrected stimulus variance (module docstring)."""
    picked = plan.subjects[:, None, :]  # (B, 1, S)
    both = _nanmean_rows(np.take_along_axis(coef.boot, np.broadcast_to(picked, coef.boot.shape), 2))
    stimuli = _nanmean_rows(coef.boot)
    subjects = _nanmean_rows(coef.r[:, plan.subjects]).T  # (K, B, S) -> (B, K)
    jackknife = _jackknife_var(_nanmean_rows(coef.jack))
    own_boot, own_jack = _var(coef.boot), _jackknife_var(coef.jack)  # (K, S)
    return Variances(_var(both), _var(stimuli), _var(subjects), jackknife,
                     _nanmean_rows(own_boot), _nanmean_rows(own_jack))  # fmt: skip


@dataclass(frozen=True)
class Components:
    """The corrected variance ``(K,)`` as a subject part and a stimulus part (``both`` = their
    sum), and its Welch-Satterthwaite degrees of freedom."""

    subjects: np.ndarray
    stimuli: np.ndarray
    dof: np.ndarray

    @property
    def total(self) -> np.ndarray:
        """``subjects + stimuli``."""
        return np.asarray(self.subjects + self.stimuli)


def variance_components(
    v: Variances, mode: str, n: int, n_subjects: int, *, pair_correction: bool = True
) -> Components:
    """The variance of the chosen bootstrap, corrected (module docstring), in parts.

    ``stimuli``: :func:`~object2brain.rsa.inference.pair_corrected_variance` with ``n - 1``
    degrees of freedom;
    ``subjects``: ``S / (S - 1) V_subj`` with ``S - 1``; ``both``: the stimulus part plus
    ``max(0, S / (S - 1) V_subj - I)`` with the interaction
    ``I = (mean_s W_s - W) / (S - 1)`` (``W``: the corrected stimulus variance of the subject
    mean, ``W_s``: of subject ``s``'s own coefficient) and Welch-Satterthwaite degrees of
    freedom. Without ``pair_correction`` this is rsatoolbox's dual-bootstrap variance (stimulus
    factor ``n / (n - 1)``) with its ``min(S, n) - 1`` degrees of freedom.
    """
    shape = np.shape(v.stimuli)
    zero = np.zeros(shape)
    fs = n_subjects / (n_subjects - 1) if n_subjects > 1 else np.nan
    if not pair_correction:
        return Components(zero, _rsatoolbox_variance(v, mode, n, n_subjects, fs),
                          np.full(shape, float(dof(mode, n, n_subjects))))  # fmt: skip
    raw = pair_corrected(v.jackknife, v.stimuli, n)
    stim = pair_corrected_variance(v.jackknife, v.stimuli, n)
    if mode == "stimuli":
        return Components(zero, np.asarray(stim), np.full(shape, n - 1.0))
    if mode == "subjects":
        return Components(np.asarray(fs * v.subjects), zero, np.full(shape, n_subjects - 1.0))
    own = pair_corrected(v.subject_jackknife, v.subject_stimuli, n)
    interaction = (own - raw) / (n_subjects - 1)
    subj = np.maximum(fs * v.subjects - interaction, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        k = (subj + stim) ** 2 / (subj**2 / (n_subjects - 1) + stim**2 / (n - 1))
    k = np.clip(np.nan_to_num(k, nan=n - 1.0), min(n, n_subjects) - 1, n + n_subjects - 2)
    return Components(np.asarray(subj), np.asarray(stim), np.asarray(k))


def _rsatoolbox_variance(v: Variances, mode: str, n: int, n_subjects: int, fs: float) -> Any:
    """rsatoolbox's ``_dual_bootstrap`` (``n_rdm = S``, ``n_pattern = n``) and its one-factor
    ``n / (n - 1)`` corrections."""
    fn = n / (n - 1)
    if mode == "stimuli":
        return fn * v.stimuli
    if mode == "subjects":
        return fs * v.subjects
    dual = fs * v.subjects + fn * v.stimuli - fs * fn * (v.both - v.subjects - v.stimuli)
    return np.minimum(np.maximum(np.maximum(dual, fs * v.subjects), fn * v.stimuli), v.both)


def corrected_variance(
    v: Variances, mode: str, n: int, n_subjects: int, *, pair_correction: bool = True
) -> np.ndarray:
    """The variance of the chosen bootstrap, corrected (:func:`variance_components`)."""
    return variance_components(v, mode, n, n_subjects, pair_correction=pair_correction).total


def dof(mode: str, n: int, n_subjects: int) -> int:
    """rsatoolbox's degrees of freedom of the uncorrected estimators: ``n - 1``, ``S - 1`` or
    ``min(S, n) - 1`` (the corrected ``both`` uses Welch-Satterthwaite,
    :func:`variance_components`)."""
    if mode == "stimuli":
        return n - 1
    if mode == "subjects":
        return n_subjects - 1
    return min(n, n_subjects) - 1


@dataclass(frozen=True)
class GroupEstimate:
    """Per row: the subject-mean statistic, its corrected SE, t interval, p-values and the
    t distribution's degrees of freedom ``(K,)``."""

    mean: np.ndarray
    se: np.ndarray
    low: np.ndarray
    high: np.ndarray
    p_greater: np.ndarray
    p_two_sided: np.ndarray
    dof: np.ndarray


def estimate(
    coef: SubjectCoefficients,
    plan: ResamplePlan,
    mode: str,
    level: float = 0.95,
    *,
    pair_correction: bool = True,
) -> GroupEstimate:
    """Mean over subjects, corrected SE (``mode``: stimuli | subjects | both), Student-t
    interval at ``level`` and t-test p-values (one-sided ``> 0`` and two-sided) with the
    degrees of freedom of :func:`variance_components`."""
    n, S = plan.counts.shape[1], coef.r.shape[1]
    mean = _nanmean_rows(coef.r)
    parts = variance_components(
        bootstrap_variances(coef, plan), mode, n, S, pair_correction=pair_correction
    )
    se = np.sqrt(np.maximum(parts.total, 0))
    k = parts.dof
    quantile = scipy.stats.t.ppf(0.5 + level / 2, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = mean / se
    return GroupEstimate(
        mean,
        se,
        mean - quantile * se,
        mean + quantile * se,
        scipy.stats.t.sf(t, k),
        2 * scipy.stats.t.sf(np.abs(t), k),
        k,
    )


# --- the test of r > 0 (column ``p`` of ``group_inference``) -----------------------------------


def _mantel_parts(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean ``(R,)``, sum of squared stimulus effects ``(R,)`` and sum of squared residuals
    ``(R,)`` of condensed hollow symmetric matrices ``x`` ``(R, m)`` written
    ``x_ij = mu + g_i + g_j + e_ij`` with ``sum_i g_i = 0`` and every row of ``e`` summing to 0
    (``g = (s - (n - 1) mu) / (n - 2)``, ``s``: row sums)."""
    mu = x.mean(dim=-1, keepdim=True)
    g = (row_sums(x, n) - (n - 1) * mu) / (n - 2)
    iu, ju = triu_indices(n, x.device)
    e = x - mu - g[..., iu] - g[..., ju]
    return mu[..., 0], (g**2).sum(dim=-1), (e**2).sum(dim=-1)


def permutation_moments(a: torch.Tensor, y: torch.Tensor, n: int) -> tuple[Any, Any]:
    """Exact mean and variance ``(K, T)`` of ``<a o pi, y>`` over all ``n!`` relabellings ``pi``
    of the stimuli of condensed RDMs ``a`` ``(K, m)`` (``y`` ``(T, m)``; ``n >= 4``).

    With ``a = mu_a + g_i + g_j + e_ij`` (:func:`_mantel_parts`) and ``y`` alike, the statistic is
    ``m mu_a mu_y + (n - 2) sum_i g_i h_pi(i) + sum_{i<j} e_ij f_pi(i)pi(j)``; the two random
    terms are uncorrelated, the first is a linear permutation statistic (variance
    ``sum g^2 sum h^2 / (n - 1)``), the second is degenerate (variance
    ``2 sum e^2 sum f^2 / (n (n - 3))``), so (Mantel 1967; Hubert 1987)
    ``Var = (n - 2)^2 / (n - 1) G_a G_y + 2 E_a E_y / (n (n - 3))``."""
    m = a.shape[-1]
    mu_a, g_a, e_a = _mantel_parts(a, n)
    mu_y, g_y, e_y = _mantel_parts(y, n)
    mean = m * mu_a[:, None] * mu_y[None]
    linear = (n - 2) ** 2 / (n - 1) * g_a[:, None] * g_y[None]
    var = linear + 2 / (n * (n - 3)) * e_a[:, None] * e_y[None]
    return mean.cpu().numpy(), var.cpu().numpy()


@dataclass(frozen=True)
class AssociationTest:
    """The score test of the subject-mean coefficient against no association, per row ``(K,)``:
    ``z = (rbar - null_mean) / sqrt(W0 + B0)`` with ``W0`` the exact stimulus-relabelling
    variance of ``rbar`` and ``B0`` the subject variance net of it, one-sided ``p``."""

    z: np.ndarray
    p: np.ndarray
    dof: np.ndarray
    null_mean: np.ndarray
    null_variance: np.ndarray  # W0
    subject_variance: np.ndarray  # B0


def association_test(
    model_rdms: torch.Tensor, subject_rdms: torch.Tensor, method: str, mode: str,
    *, n_perm: int = 0, seed: int = 0, device: torch.device | str = "cpu",
    executor: Executor | None = None,
) -> AssociationTest | None:  # fmt: skip
    """One-sided test of ``rbar > 0`` (no association) for the ``p`` column of
    ``group_inference``; ``None`` where it does not apply (``subjects``: the stimuli are held
    fixed, the t-test of :func:`estimate` is used; ``kendall_tau_a`` without relabellings,
    ``n_perm = 0``; fewer than 4 stimuli).

    Every comparator but tau-a is ``r_s = <a o pi, y_s>`` of prepared vectors
    (:func:`object2brain.rsa.compare.prepare`), so under the null that the model's stimulus
    labels are exchangeable with respect to the subjects' RDMs, ``rbar = <a o pi, mean_s y_s>``
    has the exact mean and variance ``W0`` of :func:`permutation_moments` (a score test:
    the variance under H0, not the bootstrap variance, whose pair terms overstate it near 0).
    ``both`` adds the between-subject variance ``B0 = max(0, var_s(r_s - E0_s) / S - I0)``, net
    of its expectation under the null ``I0 = (mean_s W0_s - W0) / (S - 1)`` (``W0_s``, ``E0_s``
    of each subject's own r), so a population of subjects whose mean association is 0 is not
    rejected because each subject's own r differs from 0; reference: Student t with
    ``(W0 + B0)^2 / (B0^2 / (S - 1))`` degrees of freedom (``W0`` is exact; normal when
    ``B0 = 0``). ``stimuli``: ``B0 = 0`` (subjects fixed), the normal approximation of the
    Mantel test of the subject mean (slightly liberal at small ``n``: the degenerate pair part
    is right-skewed under the null; the table's ``stimuli`` rows use the exact
    :func:`relabelling_test` when the run has relabellings). Subjects with an undefined r are
    left out.

    ``kendall_tau_a`` is not a dot product of relabelled vectors and has no closed-form
    relabelling variance here; its moments are Monte Carlo ones over the ``n_perm``
    relabellings of ``seed`` (those of :func:`relabelling_test`;
    :func:`object2brain.rsa.inference.relabelling_moments`, on ``device`` or by ``executor``):
    ``E0 = 0`` exactly (a relabelling maps an ordered pair of stimulus pairs and its reverse
    with equal probability, so every sign product averages to 0), ``W0_s = mean_pi r_s,pi^2``
    and ``W0 = mean_pi rbar_pi^2``, then the same ``z``, ``B0`` and degrees of freedom.
    """
    n = model_rdms.shape[-1]
    if mode == "subjects" or n < 4 or (method == KENDALL and n_perm <= 0):
        return None
    K = model_rdms.shape[0]
    moments = (
        _kendall_null_moments(model_rdms, subject_rdms, n_perm, seed, device, executor)
        if method == KENDALL
        else _dot_null_moments(model_rdms, subject_rdms, method)
    )
    if moments is None:
        nan = np.full(K, np.nan)
        return AssociationTest(nan, nan, nan, nan, nan, nan)
    r, own_mean, own_var, null_mean, null_var = moments
    S = r.shape[1]
    subj = np.zeros(K)
    if mode == "both" and S >= 2:
        spread = np.var(r - own_mean, axis=1, ddof=1) / S
        subj = np.maximum(spread - (own_var.mean(axis=1) - null_var) / (S - 1), 0.0)
    total = null_var + subj
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (r.mean(axis=1) - null_mean) / np.sqrt(total)
        k = np.where(subj > 0, total**2 / (subj**2 / max(S - 1, 1)), np.inf)
    k = np.maximum(k, max(S - 1, 1))
    return AssociationTest(z, scipy.stats.t.sf(z, k), k, null_mean, null_var, subj)


_NullMoments = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _dot_null_moments(
    model_rdms: torch.Tensor, subject_rdms: torch.Tensor, method: str
) -> _NullMoments | None:
    """``(r (K, S), E0_s (K, S), W0_s (K, S), E0 (K,), W0 (K,))`` of a dot-product comparator:
    exact (:func:`permutation_moments`), subjects with an undefined r left out (``None``: no
    subject left)."""
    n = model_rdms.shape[-1]
    a = prepare(upper_triangle(model_rdms).to(torch.float64).cpu(), method)
    y = prepare(upper_triangle(subject_rdms).to(torch.float64).cpu(), method)
    y = y[torch.isfinite(y).all(dim=-1)]
    if y.shape[0] == 0:
        return None
    r = (a @ y.T).numpy()  # (K, S)
    own_mean, own_var = permutation_moments(a, y, n)
    null_mean, null_var = (v[:, 0] for v in permutation_moments(a, y.mean(dim=0, keepdim=True), n))
    return r, own_mean, own_var, null_mean, null_var


def _kendall_null_moments(
    model_rdms: torch.Tensor, subject_rdms: torch.Tensor, n_perm: int, seed: int,
    device: torch.device | str = "cpu", executor: Executor | None = None,
) -> _NullMoments:  # fmt: skip
    """The moments of :func:`_dot_null_moments` for Kendall's tau-a: ``E0 = 0`` exactly, second
    moments over the ``n_perm`` relabellings of ``seed`` (every subject's tau-a and their mean as
    a combined column, :func:`object2brain.rsa.inference.relabelling_moments`)."""
    dev = torch.device(device)
    a = upper_triangle(model_rdms.to(dev)).to(torch.float64)
    y = upper_triangle(subject_rdms.to(dev)).to(torch.float64)
    K, S = a.shape[0], y.shape[0]
    mean = torch.full((S, 1), 1.0 / S, dtype=torch.float64)
    moments = relabelling_moments(a, y, KENDALL, n_perm, seed, dev, mean, executor=executor)
    r = compare(a, y, KENDALL).cpu().numpy()
    zero = np.zeros((K, S))
    return r, zero, moments.second[:, :S], np.zeros(K), moments.second[:, S]


def relabelling_test(
    model_rdms: torch.Tensor, subject_rdms: torch.Tensor, method: str, n_perm: int, seed: int,
    device: torch.device | str = "cpu", executor: Executor | None = None,
) -> np.ndarray:  # fmt: skip
    """Monte Carlo relabelling p ``(K,)`` of the subject mean ``rbar`` of square model RDMs
    ``(K, n, n)`` against subject RDMs ``(S, n, n)``: one-sided
    ``p = (1 + #{rbar_pi >= rbar}) / (1 + n_perm)`` over ``n_perm`` random relabellings ``pi``
    of the stimuli (one relabelling shared by all subjects), valid at every ``n`` under the
    sharp null of :func:`association_test`'s ``stimuli`` mode (the permutation p is exact:
    ``P(p <= alpha) <= alpha``).

    The relabellings are :func:`object2brain.rsa.inference.permutations` of ``seed``: those of
    the ``group`` row of ``alignment`` for the run's seed (chunk-seeded blocks: the same p for
    every device, executor and tile size), so the two p agree (with ``--pairs all``; a test).
    Dot-product comparators relabel one square matrix per relabelling, the prepared subject
    mean ``ybar = mean_s y_s`` (``rbar = <a o pi, ybar>``;
    :func:`object2brain.rsa.inference.relabelled_mean_test`), on ``device``; ``kendall_tau_a`` runs
    :func:`object2brain.rsa.inference.mantel_test` with the subject mean as a combined column
    (``O(m^2)`` per relabelling). Subjects with an undefined r are left out; NaN where ``rbar``
    is undefined or ``n_perm = 0``.
    """
    dev = torch.device(device)
    a = upper_triangle(model_rdms.to(dev)).to(torch.float64)
    y = upper_triangle(subject_rdms.to(dev)).to(torch.float64)
    if method == KENDALL:
        mean = torch.full((y.shape[0], 1), 1.0 / y.shape[0], dtype=torch.float64)
        test = mantel_test(a, y, KENDALL, n_perm, seed, dev, mean, executor=executor)
        return np.asarray(test.p[:, -1])
    yp = prepare(y, method)
    yp = yp[torch.isfinite(yp).all(dim=-1)]
    if yp.shape[0] == 0:
        return np.full(a.shape[0], np.nan)
    test = relabelled_mean_test(
        prepare(a, method), yp.mean(dim=0, keepdim=True), n_perm, seed, executor=executor
    )
    return np.asarray(test.p[:, 0])


def group_p(
    model_rdms: torch.Tensor, rows: np.ndarray, subject_rdms: torch.Tensor, method: str,
    mode: str, est: GroupEstimate, n_perm: int = 0, seed: int = 0,
    device: torch.device | str = "cpu", executor: Executor | None = None,
) -> np.ndarray:  # fmt: skip
    """The ``p`` column (one-sided, r > 0) of ``group_inference`` of the model RDMs restricted
    to ``rows`` against ``subject_rdms``: ``stimuli`` with ``n_perm > 0`` and at least 4
    stimuli, the exact relabelling test of :func:`relabelling_test` (``n_perm`` relabellings
    of ``seed``); otherwise :func:`association_test` (``kendall_tau_a``: its moments over the
    same relabellings), or the t-test of ``est`` where that test does not apply (``subjects``;
    ``kendall_tau_a`` with ``n_perm = 0``; fewer than 4 stimuli)."""
    models = _restrict(model_rdms, rows)
    if mode == "stimuli" and n_perm > 0 and len(rows) >= 4:
        return relabelling_test(models, subject_rdms, method, n_perm, seed, device, executor)
    test = association_test(
        models, subject_rdms, method, mode, n_perm=n_perm, seed=seed, device=device,
        executor=executor,
    )  # fmt: skip
    return est.p_greater if test is None else test.p


# --- the tables ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRdms:
    """One model's analysed layers and their square RDMs ``(K, n, n)`` over the analysis set."""

    name: str
    layers: list[str]
    layer_index: list[int]
    rdms: torch.Tensor


@dataclass(frozen=True)
class GroupSettings:
    """What the group tables need of the rsa options and the run."""

    method: str
    n_boot: int
    bootstrap: str | None
    compare_models: str | list[str]
    seed: int
    executor: Executor | None = None  # where the chunks of resamples run (None: here)
    device: str | torch.device = "cpu"  # where they run here (the run's --device)
    block: int | None = None  # resamples per call (None: from the device's free memory)
    n_perm: int = 10_000  # relabellings of the `stimuli` mode's p (0: its score test)


def _cell_plan(
    target: Any, rows: np.ndarray, settings: GroupSettings, words: tuple[int, int]
) -> tuple[torch.Tensor, ResamplePlan, str]:
    """Subject RDMs of one target within a condition, its resamples and its bootstrap."""
    index = torch.as_tensor(rows, device=target.rdms.device)
    sub = target.rdms[:, index][:, :, index].cpu()
    S = sub.shape[0]
    plan = resample_plan(len(rows), S, settings.n_boot, (settings.seed, *words))
    return sub, plan, default_bootstrap(settings.bootstrap, S)


def _restrict(rdms: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    index = torch.as_tensor(rows, device=rdms.device)
    return rdms[:, index][:, :, index].cpu()


def group_inference_rows(
    models: Sequence[ModelRdms], analysis: Any, settings: GroupSettings, ceilings: dict[Any, Any]
) -> list[dict[str, Any]]:
    """Rows of the ``group_inference`` table (every model, layer, target and condition)."""
    out: list[dict[str, Any]] = []
    for ci, condition in enumerate(analysis.conditions):
        for ti, target in enumerate(analysis.targets):
            sub, plan, mode = _cell_plan(target, condition.rows, settings, (ti, ci))
            S, n = sub.shape[0], len(condition.rows)
            lower = (
                lower_ceiling_coefficients(
                    sub, settings.method, plan, settings.executor, settings.device, settings.block
                )
                if S >= 2
                else None
            )
            nc_low, nc_high = ceilings[(ti, condition.name)]
            for model in models:
                coef = subject_coefficients(
                    _restrict(model.rdms, condition.rows), sub, settings.method, plan,
                    settings.executor, settings.device, settings.block,
                )  # fmt: skip
                est = estimate(coef, plan, mode)
                p_greater = group_p(
                    model.rdms, condition.rows, sub, settings.method, mode, est,
                    settings.n_perm, settings.seed, settings.device, settings.executor,
                )  # fmt: skip
                below = np.full(len(model.layers), np.nan)
                if lower is not None:
                    below = 1.0 - estimate(coef - lower, plan, mode).p_greater
                for k, layer in enumerate(model.layers):
                    out.append(
                        {"model": model.name, "layer": layer,
                         "layer_index": model.layer_index[k], "target": target.name,
                         "condition": condition.name, "compare_method": settings.method,
                         "mean_r": float(est.mean[k]), "se": float(est.se[k]),
                         "ci_low": float(est.low[k]), "ci_high": float(est.high[k]),
                         "p": float(p_greater[k]), "p_fdr": np.nan,
                         "nc_low": nc_low, "nc_high": nc_high, "p_below_nc": float(below[k]),
                         "n_subjects": S, "n_stimuli": n, "n_boot": settings.n_boot,
                         "bootstrap": mode}
                    )  # fmt: skip
    return out


@dataclass(frozen=True)
class Pick:
    """One side of a comparison: a model and one of its layers (position ``k``)."""

    model: ModelRdms
    k: int

    @property
    def layer(self) -> str:
        """The layer's name."""
        return self.model.layers[self.k]


def explicit_picks(models: Sequence[ModelRdms], spec: str | list[str]) -> list[Pick]:
    """The ``model:layer`` pairs of ``spec`` (``valence``: every model's ``valence`` layer).

    Raises:
        DataError: an entry that is not ``model:layer`` or names an unknown model or layer.
    """
    by_name = {m.name: m for m in models}
    if spec == "valence":
        return [Pick(m, m.layers.index("valence")) for m in models if "valence" in m.layers]
    items = [spec] if isinstance(spec, str) else list(spec)
    picks = []
    for item in (part for entry in items for part in entry.split(",") if part):
        name, sep, layer = item.partition(":")
        if not sep or name not in by_name or layer not in by_name[name].layers:
            raise DataError(
                f"--compare-models: {item!r} is not model:layer of an analysed model and layer "
                f"(models: {', '.join(by_name)})"
            )
        picks.append(Pick(by_name[name], by_name[name].layers.index(layer)))
    return picks


#: Stimulus folds of the cross-validated ``best`` layer choice.
BEST_FOLDS = 5
#: Fewest stimuli of a held-out fold.
MIN_FOLD_STIMULI = 4


def stimulus_folds(
    n_rows: int, seed: int, within: Sequence[str] | np.ndarray | None = None
) -> list[np.ndarray]:
    """Positions of ``n_rows`` stimuli in ``k = min(BEST_FOLDS, n_rows // MIN_FOLD_STIMULI)``
    folds of near-equal size (each sorted; empty when ``k < 2``): the folds of
    :func:`object2brain.data.splits.make_folds` (one level; stratified by the ``within``
    labels, e.g. each stimulus' condition, when given)."""
    k = min(BEST_FOLDS, n_rows // MIN_FOLD_STIMULI)
    if k < 2:
        return []
    folds = make_folds(np.zeros(n_rows), k, seed=seed, within=within)
    return [np.flatnonzero(folds == f) for f in range(k)]


def best_picks(
    models: Sequence[ModelRdms], sub: torch.Tensor, rows: np.ndarray, method: str
) -> list[Pick]:
    """Each model's layer with the highest mean r over subjects on the stimuli ``rows``."""
    picks = []
    for model in models:
        y = upper_triangle(_restrict(sub, rows))
        r = compare(upper_triangle(_restrict(model.rdms, rows)), y, method).numpy()
        score = _nanmean_rows(r)
        picks.append(Pick(model, int(np.nanargmax(score)) if np.isfinite(score).any() else 0))
    return picks


def model_comparison_rows(
    models: Sequence[ModelRdms], analysis: Any, settings: GroupSettings
) -> list[dict[str, Any]]:
    """Rows of the ``model_comparison`` table: every pair of picks per target and condition,
    ``delta_r = mean_s (r_a,s - r_b,s)`` on the same resamples (``best``: cross-validated,
    :func:`cross_validated_rows`)."""
    out: list[dict[str, Any]] = []
    best = settings.compare_models == "best"
    fixed = None if best else explicit_picks(models, settings.compare_models)
    selection = "valence" if settings.compare_models == "valence" else "listed"
    for ci, condition in enumerate(analysis.conditions):
        for ti, target in enumerate(analysis.targets):
            if best:
                known = getattr(analysis, "labels", None)
                labels = None if known is None else np.asarray(known)[condition.rows]
                out += cross_validated_rows(models, target, condition, settings, (ti, ci), labels)
                continue
            assert fixed is not None
            rows = condition.rows
            if len(fixed) < 2 or len(rows) < 4:
                continue
            sub, plan, mode = _cell_plan(target, rows, settings, (ti, ci))
            out += _pair_rows(fixed, sub, rows, plan, mode, settings, target.name, condition.name,
                              selection)  # fmt: skip
    return out


def _fold_coefficients(
    pick_layers: list[int], model: ModelRdms, sub: torch.Tensor, folds: list[np.ndarray],
    plans: list[ResamplePlan], method: str, executor: Executor | None = None,
    device: torch.device | str = "cpu", block: int | None = None,
) -> SubjectCoefficients:  # fmt: skip
    """One model's held-out coefficients, fold ``f`` scored with layer ``pick_layers[f]`` on
    the fold's stimuli: ``r = mean_f r_f`` ``(1, S)``, resamples ``mean_f r_f*`` (each fold's
    stimuli resampled on their own, subjects drawn once), and delete-one rows (a stimulus of
    fold ``f`` changes only ``r_f``)."""
    parts = [
        subject_coefficients(
            _restrict(model.rdms[k : k + 1], fold),
            _restrict(sub, fold),
            method,
            plan,
            executor,
            device,
            block,
        )
        for k, fold, plan in zip(pick_layers, folds, plans, strict=True)
    ]
    k = len(parts)
    total = sum(part.r for part in parts)
    boot = sum(part.boot for part in parts) / k
    jack = np.concatenate([(total - part.r + part.jack) / k for part in parts])
    return SubjectCoefficients(np.asarray(total) / k, np.asarray(boot), jack)


def cross_validated_rows(
    models: Sequence[ModelRdms], target: Any, condition: Any, settings: GroupSettings,
    words: tuple[int, int], labels: Sequence[str] | np.ndarray | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """``--compare-models best``: k-fold cross-validation over stimulus folds
    (:func:`stimulus_folds`, stratified by the stimuli's condition ``labels`` when given). For
    each fold, each model's layer with the highest mean r over
    subjects on the *other* folds (:func:`best_picks`) is scored on the fold's own stimuli
    (pairs within the fold); the statistic is the mean over folds of the held-out
    ``delta_r``, never computed on the stimuli its layers were chosen on. Its resamples draw
    each fold's stimuli on their own and the subjects once (shared by the folds)."""
    rows = condition.rows
    folds = stimulus_folds(len(rows), settings.seed, labels)
    if len(models) < 2 or not folds:
        return []
    sub_all = _restrict(target.rdms, rows)
    chosen = []  # (fold, model) -> layer position
    for fold in folds:
        train = np.setdiff1d(np.arange(len(rows)), fold)
        chosen.append([p.k for p in best_picks(models, sub_all, train, settings.method)])
    S = sub_all.shape[0]
    plans = [resample_plan(len(f), S, settings.n_boot, (settings.seed, *words, i))
             for i, f in enumerate(folds)]  # fmt: skip
    plan = ResamplePlan(np.concatenate([p.counts for p in plans], axis=1), plans[0].subjects)
    mode = default_bootstrap(settings.bootstrap, S)
    coefs = [
        _fold_coefficients(
            [c[m] for c in chosen],
            model,
            sub_all,
            folds,
            plans,
            settings.method,
            settings.executor,
            settings.device,
            settings.block,
        )
        for m, model in enumerate(models)
    ]
    selection = f"best by {len(folds)}-fold cross-validation"
    out = []
    for i, j in combinations(range(len(models)), 2):
        est = estimate(coefs[i] - coefs[j], plan, mode)
        out.append(
            {"model_a": models[i].name, "layer_a": _fold_layers(models[i], [c[i] for c in chosen]),
             "model_b": models[j].name, "layer_b": _fold_layers(models[j], [c[j] for c in chosen]),
             "target": target.name, "condition": condition.name,
             "compare_method": settings.method, "delta_r": float(est.mean[0]),
             "se": float(est.se[0]), "ci_low": float(est.low[0]), "ci_high": float(est.high[0]),
             "p": float(est.p_two_sided[0]), "p_fdr": np.nan, "n_boot": settings.n_boot,
             "bootstrap": mode, "selection": selection}
        )  # fmt: skip
    return out


def _fold_layers(model: ModelRdms, picks: list[int]) -> str:
    """The layer chosen in every fold, or the folds' choices in fold order
    (``conv3|conv3|fc|conv3|conv3``) when they differ."""
    names = [model.layers[k] for k in picks]
    return names[0] if len(set(names)) == 1 else "|".join(names)


def _pair_rows(
    picks: Sequence[Pick], sub: torch.Tensor, rows: np.ndarray, plan: ResamplePlan, mode: str,
    settings: GroupSettings, target: str, condition: str, selection: str,
) -> list[dict[str, Any]]:  # fmt: skip
    coefs = [
        subject_coefficients(
            _restrict(p.model.rdms[p.k : p.k + 1], rows),
            sub,
            settings.method,
            plan,
            settings.executor,
            settings.device,
            settings.block,
        )
        for p in picks
    ]
    out = []
    for i, j in combinations(range(len(picks)), 2):
        est = estimate(coefs[i] - coefs[j], plan, mode)
        a, b = picks[i], picks[j]
        out.append(
            {"model_a": a.model.name, "layer_a": a.layer, "model_b": b.model.name,
             "layer_b": b.layer, "target": target, "condition": condition,
             "compare_method": settings.method, "delta_r": float(est.mean[0]),
             "se": float(est.se[0]), "ci_low": float(est.low[0]), "ci_high": float(est.high[0]),
             "p": float(est.p_two_sided[0]), "p_fdr": np.nan, "n_boot": settings.n_boot,
             "bootstrap": mode, "selection": selection}
        )  # fmt: skip
    return out


def group_tables(
    models: Sequence[ModelRdms],
    analysis: Any,
    options: Any,
    seed: int,
    ceilings: dict[Any, Any],
    executor: Executor | None = None,
    device: torch.device | str = "cpu",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``group_inference`` and ``model_comparison`` tables of one alignment run; the chunks
    of resamples run by ``executor`` (default: here, on ``device``, the run's ``--device``;
    the same numbers for every executor, and on every device to rounding)."""
    from object2brain.rsa.inference import with_fdr
    from object2brain.tables import GROUP_INFERENCE, MODEL_COMPARISON

    group = pd.DataFrame(columns=GROUP_INFERENCE.column_names)
    comparison = pd.DataFrame(columns=MODEL_COMPARISON.column_names)
    if options.compare_method not in GROUP_METHODS:
        return group, comparison
    settings = GroupSettings(
        options.compare_method, options.n_boot, options.bootstrap, options.compare_models, seed,
        executor, device, n_perm=options.n_perm,
    )  # fmt: skip
    rows = group_inference_rows(models, analysis, settings, ceilings)
    if rows:
        group = with_fdr(pd.DataFrame(rows, columns=GROUP_INFERENCE.column_names),
                         ["model", "condition"], [("p", "p_fdr")])  # fmt: skip
    pairs = model_comparison_rows(models, analysis, settings)
    if pairs:
        comparison = with_fdr(pd.DataFrame(pairs, columns=MODEL_COMPARISON.column_names),
                              ["condition"], [("p", "p_fdr")])  # fmt: skip
    return group, comparison
