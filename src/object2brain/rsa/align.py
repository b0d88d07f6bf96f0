"""The alignment run: every layer of every model against behaviour and every brain ROI.

:func:`run_alignment` (``object2brain rsa`` on the command line) computes, for every model
(activation store attribute ``model``), layer (store ``order``, including the predicted
``valence`` layer when present), target (each ROI, and ``behavior``), subject and condition
(``all`` and each value of the stimulus table's ``condition`` column), one row of the
``alignment`` table (DESIGN.md section 3):

``model, layer, layer_index, target, target_kind, subject, condition, rdm_metric,
compare_method, r, p_perm, p_fdr, ci_low, ci_high, nc_low, nc_high, n_stimuli, n_perm``

Subject levels of a target with per-subject data (brain subjects; raters who rated every analysed
stimulus):

- ``<subject id>``: r between the layer RDM and that subject's RDM;
- ``group``: the mean of the per-subject r (DESIGN.md section 4). Its permutation p and bootstrap
  CI come from the same permutations / resamples applied to every subject, so the mean has its
  own exact null; its standard error over subjects is in the extra table ``alignment_group``;
- ``group_rdm``: r against the group-mean RDM (for ROIs the subjects' RDMs averaged on the
  comparison's scale, ranks or z-scores: :func:`~object2brain.rsa.inference.pool_rdms`; for
  behaviour the RDM ``|v_i - v_j|`` of the group-mean ratings).

A target with group-level data only (an RDM file whose only subject is ``group``, or behaviour
from the stimulus table's ``valence`` column) has one row, ``group``.

Columns: ``layer_index`` is the layer's 0-based position in the store's network order;
``p_perm`` the one-sided Mantel p (``(1 + #{r_perm >= r}) / (1 + n_perm)``); ``p_fdr`` the
Benjamini-Hochberg adjustment over all (layer, target) tests of one model, condition and subject
level; ``ci_low``/``ci_high`` the 95% stimulus-bootstrap interval; ``nc_low``/``nc_high`` the
noise ceiling of the target in that condition (repeated on every row of the target; NaN with
fewer than two subjects).

Extra outputs (documented extensions):

- ``behavior_direct`` (when a store has a ``valence`` layer and ratings are available): predicted
  vs group-mean rated valence, Pearson and Spearman, two-sided permutation p, bootstrap CI.
- ``condition_contrast`` (when there are at least two conditions): for every pair of conditions
  ``(a, b)`` in order of appearance, ``delta_r = r_a - r_b`` per model, layer, target and subject
  level, tested by permuting condition labels (two-sided); columns ``model, layer, layer_index,
  target, target_kind, subject, condition_a, condition_b, rdm_metric, compare_method, r_a, r_b,
  delta_r, p_perm, p_fdr, n_a, n_b, n_perm`` (FDR as for ``alignment``, per pair).
- ``alignment_group``: ``model, layer, layer_index, target, target_kind, condition, mean_r, sem,
  n_subjects`` (SEM = sd / sqrt(S) of the per-subject r).
- ``figures/alignment_<model>.png|svg``: r per layer, one line per target (``group`` rows), the
  noise-ceiling band, FDR-significant points filled; one panel per condition.
- ``manifest.json``: configuration, seeds, package versions and input file SHA-256.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats
import torch

from object2brain.activations.store import ActivationStore
from object2brain.data import ALL_CONDITION, GROUP_RDM_SUBJECT, GROUP_SUBJECT
from object2brain.data.brain import BrainData, OnMissing, load_brain
from object2brain.data.ratings import Ratings, load_ratings
from object2brain.data.stimuli import StimulusSet, load_stimuli
from object2brain.devices import resolve_device
from object2brain.errors import DataError, listing
from object2brain.io import check_output_folder, write_json, write_table
from object2brain.manifest import build_manifest, cached_file_sha256, output_list
from object2brain.rsa.compare import check_method
from object2brain.rsa.inference import (
    ContrastInterval,
    ContrastResult,
    bootstrap_ci,
    combine_matrix,
    condition_difference_bootstrap,
    condition_difference_test,
    correlation_test,
    fdr_bh,
    mantel_test,
    noise_ceiling,
    pool_rdms,
)
from object2brain.rsa.rdm import (
    behavior_rdm,
    check_metric,
    rdm_from_store,
    upper_triangle,
)

log = logging.getLogger(__name__)

ALIGNMENT_COLUMNS = [
    "model",
    "layer",
    "layer_index",
    "target",
    "target_kind",
    "subject",
    "condition",
    "rdm_metric",
    "compare_method",
    "r",
    "p_perm",
    "p_fdr",
    "ci_low",
    "ci_high",
    "nc_low",
    "nc_high",
    "n_stimuli",
    "n_perm",
]
BEHAVIOR_DIRECT_COLUMNS = ["model", "condition", "method", "r", "p", "ci_low", "ci_high", "n"]
CONTRAST_COLUMNS = [
    "model",
    "layer",
    "layer_index",
    "target",
    "target_kind",
    "subject",
    "condition_a",
    "condition_b",
    "rdm_metric",
    "compare_method",
    "r_a",
    "r_b",
    "delta_r",
    "p_perm",
    "p_fdr",
    "ci_low",
    "ci_high",
    "p_boot",
    "p_boot_fdr",
    "n_a",
    "n_b",
    "n_perm",
    "n_boot",
]
GROUP_COLUMNS = [
    "model",
    "layer",
    "layer_index",
    "target",
    "target_kind",
    "condition",
    "mean_r",
    "sem",
    "n_subjects",
    "t",
    "p_t",
    "p_t_fdr",
]
BEHAVIOR_TARGET = "behavior"


@dataclass
class Target:
    """One target: subject RDMs ``(S, n, n)`` plus column labels.

    ``group_only``: the single RDM is itself group-level data (no per-subject rows).
    """

    name: str
    kind: str
    subjects: list[str]
    rdms: torch.Tensor
    group_rdm: torch.Tensor | None = None
    group_only: bool = False


@dataclass
class AlignmentResult:
    """Tables of one alignment run and the files written (empty when ``out`` is None)."""

    alignment: pd.DataFrame
    behavior_direct: pd.DataFrame
    condition_contrast: pd.DataFrame
    alignment_group: pd.DataFrame
    files: list[Path] = field(default_factory=list)


# --- inputs ---------------------------------------------------------------------------------


def warn_constant_subjects(target: Target, vectors: torch.Tensor, cond: str, method: str) -> None:
    """Name the subjects of ``target`` whose RDM ``vectors`` ``(S, n_pairs)`` is constant within
    ``cond`` (e.g. a rater who gave every stimulus of a condition the same rating): their
    Spearman/Pearson r is undefined, so their rows are NaN and the ``group`` mean leaves them out.
    """
    flags = (vectors == vectors[:, :1]).all(dim=1).tolist()
    constant = [subject for subject, flag in zip(target.subjects, flags, strict=True) if flag]
    if not constant:
        return
    if method == "kendall_tau_a":
        consequence = "their tau-a is 0 and enters the mean over subjects"
    else:
        consequence = (
            f"their {method} r is undefined (NaN rows); the mean over subjects (group row) and "
            "the noise ceiling leave them out"
        )
    log.warning(
        "%s, condition %r: the RDM of %s is constant (all dissimilarities equal): %s",
        target.name,
        cond,
        listing(constant),
        consequence,
    )


def build_targets(
    brain: BrainData | None,
    ratings: Ratings | None,
    stimulus_valence: np.ndarray | None,
    ids: list[str],
    metric: str,
    device: torch.device,
    method: str = "spearman",
) -> list[Target]:
    """Target RDMs for ``ids``: every ROI of ``brain`` and behaviour (per rater, or group-level).

    ``method``: the comparison, whose scale the ROIs' group RDMs are pooled on (:func:`pool_rdms`).

    Behaviour comes from ``ratings`` when given (raters who rated every stimulus get their own
    RDM), else from the stimulus table's ``valence`` (``stimulus_valence``). Shared by the
    alignment and the Object2Brain lesion analysis.
    """
    targets: list[Target] = []
    if brain is not None:
        aligned = brain.aligned(ids)
        for roi in aligned.rois:
            items = aligned.for_roi(roi)
            rdms = torch.stack([item.rdm(metric, device) for item in items])
            subjects = [item.subject for item in items]
            group_only = subjects == [GROUP_SUBJECT]
            targets.append(
                Target(
                    roi,
                    "roi",
                    subjects,
                    rdms,
                    None if group_only else pool_rdms(rdms, method),
                    group_only,
                )
            )
    if ratings is not None:
        group_values = ratings.group_mean(ids)
        group = behavior_rdm(group_values, device)
        subjects = ratings.complete_subjects(ids)
        if subjects:
            values = ratings.table.pivot(index="subject", columns="stimulus_id", values="valence")
            matrix = values.reindex(index=subjects, columns=ids).to_numpy(dtype=np.float64)
            rdms = torch.stack([behavior_rdm(row, device) for row in matrix])
            targets.append(Target(BEHAVIOR_TARGET, "behavior", subjects, rdms, group))
        else:
            log.warning("no rater rated every analysed stimulus: behaviour uses group ratings only")
            targets.append(
                Target(BEHAVIOR_TARGET, "behavior", [GROUP_SUBJECT], group[None], None, True)
            )
    elif stimulus_valence is not None:
        group = behavior_rdm(stimulus_valence, device)
        targets.append(
            Target(BEHAVIOR_TARGET, "behavior", [GROUP_SUBJECT], group[None], None, True)
        )
    if not targets:
        raise DataError(
            "nothing to align to: give brain data (--brain), ratings (--ratings) or a stimulus "
            "table with a valence column"
        )
    return targets


@dataclass
class _Columns:
    """The target columns (RDMs stacked) and the derived group-mean columns."""

    rdms: torch.Tensor  # (Q, n, n)
    labels: list[tuple[str, str, str]]  # (target, kind, subject) for Q + G columns
    combine: torch.Tensor | None
    target_of_column: list[int]


def _columns(targets: list[Target]) -> _Columns:
    stacks, labels, groups, owner = [], [], [], []
    q = 0
    for t_index, target in enumerate(targets):
        if target.group_only:
            stacks.append(target.rdms)
            labels.append((target.name, target.kind, GROUP_SUBJECT))
            owner.append(t_index)
            q += 1
            continue
        S = target.rdms.shape[0]
        assert target.group_rdm is not None
        stacks += [target.rdms, target.group_rdm[None]]
        labels += [(target.name, target.kind, s) for s in target.subjects]
        labels.append((target.name, target.kind, GROUP_RDM_SUBJECT))
        owner += [t_index] * (S + 1)
        groups.append((t_index, list(range(q, q + S))))
        q += S + 1
    combine = combine_matrix([cols for _, cols in groups], q) if groups else None
    for t_index, _ in groups:
        target = targets[t_index]
        labels.append((target.name, target.kind, GROUP_SUBJECT))
        owner.append(t_index)
    return _Columns(torch.cat(stacks), labels, combine, owner)


def _sub(rdms: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return rdms[:, idx][:, :, idx]


# --- the run --------------------------------------------------------------------------------


def run_alignment(
    activations: Sequence[str | Path] | str | Path,
    *,
    brain: str | Path | BrainData | None = None,
    ratings: str | Path | pd.DataFrame | Ratings | None = None,
    stimuli: str | Path | pd.DataFrame | StimulusSet | None = None,
    out: str | Path | None = None,
    rdm_metric: str = "correlation",
    compare_method: str = "spearman",
    n_perm: int = 10_000,
    n_boot: int = 1_000,
    seed: int = 0,
    device: str | torch.device = "auto",
    layers: Sequence[str] | None = None,
    on_missing: OnMissing = "error",
    progress: bool = True,
    figures: bool = True,
    behavior_ids: Sequence[str] | None = None,
) -> AlignmentResult:
    """Align every layer of every model with behaviour and brain ROIs by RSA.

    Args:
        activations: one or more activation stores (.h5), one model each.
        brain: brain manifest (YAML), patterns/RDMs HDF5, or loaded :class:`BrainData`.
        ratings: long ratings table (``subject, stimulus_id, valence``).
        stimuli: stimulus table (``stimulus_id``, optional ``condition``, ``valence``); images
            are not opened. Default: the first store's ids, no conditions.
        out: output folder for tables, figures and ``manifest.json`` (nothing written if None).
        rdm_metric: ``correlation`` | ``euclidean`` | ``cosine`` (features and patterns).
        compare_method: ``spearman`` | ``pearson`` | ``kendall_tau_a``.
        n_perm, n_boot: permutations (Mantel, condition contrast, direct p) and bootstrap
            resamples; 0 skips them (NaN p / CI).
        seed: seed of every permutation and resample.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        layers: layer names to analyse (default all, in network order).
        on_missing: ``error`` (default) or ``intersect`` when the brain data lack stimuli.
        progress: show a progress bar.
        figures: write the figures (when ``out`` is given).
        behavior_ids: the stimuli of the direct correlation of predicted with rated valence
            (``behavior_direct``; default: every analysed stimulus). When a valence head was
            fitted on some of the analysed stimuli, give the held-out ones (e.g. the ``test``
            split): on its own training stimuli a head's r is optimistic. Fewer than 3 in a
            condition give a NaN row.
    Returns:
        :class:`AlignmentResult` with the ``alignment``, ``behavior_direct``,
        ``condition_contrast`` and ``alignment_group`` tables.
    """
    check_metric(rdm_metric)
    check_method(compare_method)
    if n_perm < 0 or n_boot < 0:
        raise DataError("--n-perm and --n-boot must be >= 0")
    if out is not None:
        check_output_folder(out)
    dev = resolve_device(device)
    paths = (
        [Path(activations)]
        if isinstance(activations, str | Path)
        else [Path(p) for p in activations]
    )
    if not paths:
        raise DataError("no activation stores given (--activations)")
    stores = [ActivationStore.open(p) for p in paths]
    try:
        return _run(
            stores,
            paths,
            brain,
            ratings,
            stimuli,
            out,
            rdm_metric,
            compare_method,
            n_perm,
            n_boot,
            seed,
            dev,
            layers,
            on_missing,
            progress,
            figures,
            str(device),
            behavior_ids,
        )
    finally:
        for store in stores:
            store.close()


def _run(
    stores: list[ActivationStore],
    paths: list[Path],
    brain_source: str | Path | BrainData | None,
    ratings_source: str | Path | pd.DataFrame | Ratings | None,
    stimuli_source: str | Path | pd.DataFrame | StimulusSet | None,
    out: str | Path | None,
    metric: str,
    method: str,
    n_perm: int,
    n_boot: int,
    seed: int,
    dev: torch.device,
    layer_filter: Sequence[str] | None,
    on_missing: OnMissing,
    progress: bool,
    figures: bool,
    device_name: str,
    behavior_ids: Sequence[str] | None,
) -> AlignmentResult:
    # models
    models: list[tuple[str, ActivationStore, list[str]]] = []
    for path, store in zip(paths, stores, strict=True):
        name = str(store.attrs.get("model") or path.stem)
        if any(name == m for m, _, _ in models):
            raise DataError(
                f"{path}: model name {name!r} is used by two activation stores "
                "(extract them with distinct --name labels)"
            )
        names = store.layers
        if layer_filter is not None:
            unknown = [layer for layer in layer_filter if layer not in names]
            if len(unknown) == len(layer_filter):
                raise DataError(
                    f"{path}: none of the layers {', '.join(layer_filter)} is in the store"
                )
            names = [layer for layer in names if layer in layer_filter]
        models.append((name, store, names))

    # stimuli, ratings, brain
    if stimuli_source is None:
        table, stim_where = pd.DataFrame({"stimulus_id": stores[0].stimulus_ids}), "store ids"
    else:
        stimulus_set = (
            stimuli_source
            if isinstance(stimuli_source, StimulusSet)
            else load_stimuli(stimuli_source, check="table")
        )
        table = stimulus_set.table
        stim_where = str(stimulus_set.source or "stimulus table")
    table_ids = list(table["stimulus_id"])
    ratings = load_ratings(ratings_source, table_ids) if ratings_source is not None else None
    brain = load_brain(brain_source) if brain_source is not None else None
    ids = brain.common_ids(table_ids, on_missing) if brain is not None else table_ids
    if len(ids) < 3:
        raise DataError(f"{stim_where}: RSA needs at least 3 stimuli, found {len(ids)}")
    row_of = {sid: i for i, sid in enumerate(table_ids)}
    rows = [row_of[sid] for sid in ids]
    in_direct = np.ones(len(ids), dtype=bool)
    if behavior_ids is not None:
        unknown = sorted(set(behavior_ids) - set(table_ids))
        if unknown:
            raise DataError(
                f"{stim_where}: held-out stimuli not in the stimulus set: {listing(unknown)}"
            )
        # a set, not np.isin: on an object array isin compares every id with every held-out
        # id (O(n * m), quadratic at corpus scale)
        held = set(behavior_ids)
        in_direct = np.fromiter((sid in held for sid in ids), dtype=bool, count=len(ids))
    stim_valence = None
    if ratings is None and "valence" in table.columns:
        values = pd.to_numeric(table["valence"].iloc[rows], errors="coerce").to_numpy(np.float64)
        if np.isnan(values).any():
            bad = [sid for sid, v in zip(ids, values, strict=True) if np.isnan(v)]
            raise DataError(
                f"{stim_where}: missing or non-numeric valence for {', '.join(bad[:20])}"
            )
        stim_valence = values
    conditions: list[str] = []
    labels: np.ndarray | None = None
    if "condition" in table.columns:
        every = StimulusSet(table).conditions or []  # "" where empty, as in the lesion analysis
        labels = np.asarray([every[r] for r in rows])
        conditions = [c for c in dict.fromkeys(labels.tolist()) if c != ""]

    targets = build_targets(brain, ratings, stim_valence, ids, metric, dev, method)
    cols = _columns(targets)
    n = len(ids)
    cond_index: list[tuple[str, np.ndarray]] = [(ALL_CONDITION, np.arange(n))]
    for c in conditions:
        assert labels is not None
        idx = np.flatnonzero(labels == c)
        if idx.size < 3:
            log.warning("condition %r has %d stimuli (< 3): no RSA within it", c, idx.size)
            continue
        cond_index.append((c, idx))
    if method == "kendall_tau_a" and n_perm * n * n > 10**8:
        log.warning("kendall_tau_a costs O(m^2) per permutation: this run will be slow")

    # noise ceilings per (target, condition)
    ceilings: dict[tuple[int, str], tuple[float, float]] = {}
    for cond, idx in cond_index:
        it = torch.as_tensor(idx, device=dev)
        for t_index, target in enumerate(targets):
            vectors = upper_triangle(_sub(target.rdms, it))
            warn_constant_subjects(target, vectors, cond, method)
            if target.group_only:
                ceilings[(t_index, cond)] = (float("nan"), float("nan"))
            else:
                ceilings[(t_index, cond)] = noise_ceiling(vectors.cpu(), method)

    alignment_rows: list[dict[str, Any]] = []
    contrast_rows: list[dict[str, Any]] = []
    direct_rows: list[dict[str, Any]] = []
    contrasts: list[tuple[str, str]] = []
    if labels is not None and len(conditions) >= 2:
        sizes = {c: int(np.sum(labels == c)) for c in conditions}
        contrasts = [
            (a, b)
            for i, a in enumerate(conditions)
            for b in conditions[i + 1 :]
            if sizes[a] >= 3 and sizes[b] >= 3
        ]
    bar = _progress(len(models) * (len(cond_index) + len(contrasts)), progress)
    for model_name, store, layer_names in models:
        order = store.layers
        model_rdms = torch.stack(
            [rdm_from_store(store, layer, ids, metric, dev) for layer in layer_names]
        )
        layer_index = [order.index(layer) for layer in layer_names]
        for cond, idx in cond_index:
            it = torch.as_tensor(idx, device=dev)
            M, Tq = _sub(model_rdms, it), _sub(cols.rdms, it)
            test = mantel_test(
                upper_triangle(M), upper_triangle(Tq), method, n_perm, seed, dev, cols.combine
            )
            low, high = bootstrap_ci(M, Tq, method, n_boot, seed, dev, cols.combine)
            block = _rows(
                model_name,
                layer_names,
                layer_index,
                cols,
                cond,
                metric,
                method,
                test.r,
                {"p_perm": test.p, "ci_low": low, "ci_high": high},
                ceilings,
                len(idx),
                n_perm,
            )
            alignment_rows += block
            bar.update(1)
        boot_cache: dict[tuple[str, int], np.ndarray] = {}  # per model: its RDMs
        for cond_a, cond_b in contrasts:
            assert labels is not None
            res = condition_difference_test(
                model_rdms,
                cols.rdms,
                labels.tolist(),
                cond_a,
                cond_b,
                method,
                n_perm,
                seed,
                dev,
                cols.combine,
            )
            interval = condition_difference_bootstrap(
                model_rdms,
                cols.rdms,
                labels.tolist(),
                cond_a,
                cond_b,
                method,
                n_boot,
                seed,
                dev,
                cols.combine,
                cache=boot_cache,
            )
            contrast_rows += _contrast_rows(
                model_name, layer_names, layer_index, cols, cond_a, cond_b, metric, method,
                res, interval,
            )  # fmt: skip
            bar.update(1)
        if "valence" in order:
            rated = ratings.group_mean(ids) if ratings is not None else stim_valence
            if rated is not None:
                predicted = next(iter(_valence(store, ids)))
                for cond, all_idx in cond_index:
                    idx = all_idx[in_direct[all_idx]]
                    for how in ("pearson", "spearman"):
                        r, p, lo, hi = (
                            correlation_test(predicted[idx], rated[idx], how, n_perm, n_boot, seed)
                            if idx.size >= 3
                            else (np.nan, np.nan, np.nan, np.nan)
                        )
                        direct_rows.append(
                            {
                                "model": model_name,
                                "condition": cond,
                                "method": how,
                                "r": r,
                                "p": p,
                                "ci_low": lo,
                                "ci_high": hi,
                                "n": int(idx.size),
                            }
                        )
    bar.close()

    alignment = with_fdr(
        pd.DataFrame(alignment_rows, columns=ALIGNMENT_COLUMNS), ["model", "condition", "subject"]
    )
    contrast = with_fdr(
        pd.DataFrame(contrast_rows, columns=CONTRAST_COLUMNS),
        ["model", "condition_a", "condition_b", "subject"],
        [("p_perm", "p_fdr"), ("p_boot", "p_boot_fdr")],
    )
    direct = pd.DataFrame(direct_rows, columns=BEHAVIOR_DIRECT_COLUMNS)
    group = _group_summary(alignment)
    result = AlignmentResult(alignment, direct, contrast, group)
    if out is not None:
        config = {
            "activations": [str(p) for p in paths],
            "brain": _describe(brain_source),
            "ratings": _describe(ratings_source),
            "stimuli": stim_where,
            "rdm_metric": metric,
            "compare_method": method,
            "n_perm": n_perm,
            "n_boot": n_boot,
            "device": device_name,
            "layers": list(layer_filter) if layer_filter is not None else "all",
            "on_missing": on_missing,
            "behavior_ids": None if behavior_ids is None else sorted(behavior_ids),
        }
        inputs = list(paths)
        for source in (brain_source, ratings_source, stimuli_source):
            if isinstance(source, str | Path) and Path(source).is_file():
                inputs.append(Path(source))
        if brain is not None:
            inputs += [Path(s) for s in dict.fromkeys(item.source for item in brain.items)]
        result.files = _write(
            result, Path(out), config, seed, inputs, ids, conditions, targets, figures
        )
    return result


def _describe(source: object) -> str | None:
    if source is None:
        return None
    if isinstance(source, str | Path):
        return str(source)
    origin = getattr(source, "source", None)
    return str(origin) if origin is not None else type(source).__name__


def _valence(store: ActivationStore, ids: list[str]) -> list[np.ndarray]:
    values = np.asarray(store.read("valence", ids), dtype=np.float64).reshape(len(ids), -1)
    if values.shape[1] != 1:
        raise DataError(f"{store.path}: layer 'valence' should hold one value per stimulus")
    return [values[:, 0]]


class _NoBar:
    def update(self, k: int) -> None:
        return None

    def close(self) -> None:
        return None


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="rsa", unit="analysis")


def _rows(
    model: str,
    layer_names: list[str],
    layer_index: list[int],
    cols: _Columns,
    cond: str,
    metric: str,
    method: str,
    r: np.ndarray,
    extra: dict[str, np.ndarray],
    ceilings: dict[tuple[int, str], tuple[float, float]],
    n_stimuli: int,
    n_perm: int,
) -> list[dict[str, Any]]:
    rows = []
    for k, (layer, li) in enumerate(zip(layer_names, layer_index, strict=True)):
        for q, (target, kind, subject) in enumerate(cols.labels):
            nc_low, nc_high = ceilings[(cols.target_of_column[q], cond)]
            row: dict[str, Any] = {
                "model": model,
                "layer": layer,
                "layer_index": li,
                "target": target,
                "target_kind": kind,
                "subject": subject,
                "condition": cond,
                "rdm_metric": metric,
                "compare_method": method,
                "r": float(r[k, q]),
                "p_fdr": np.nan,
                "nc_low": nc_low,
                "nc_high": nc_high,
                "n_stimuli": n_stimuli,
                "n_perm": n_perm,
            }
            row.update({key: float(values[k, q]) for key, values in extra.items()})
            rows.append(row)
    return rows


def _contrast_rows(
    model: str,
    layer_names: list[str],
    layer_index: list[int],
    cols: _Columns,
    cond_a: str,
    cond_b: str,
    metric: str,
    method: str,
    res: ContrastResult,
    interval: ContrastInterval,
) -> list[dict[str, Any]]:
    rows = []
    for k, (layer, li) in enumerate(zip(layer_names, layer_index, strict=True)):
        for q, (target, kind, subject) in enumerate(cols.labels):
            rows.append(
                {
                    "model": model,
                    "layer": layer,
                    "layer_index": li,
                    "target": target,
                    "target_kind": kind,
                    "subject": subject,
                    "condition_a": cond_a,
                    "condition_b": cond_b,
                    "rdm_metric": metric,
                    "compare_method": method,
                    "r_a": float(res.r_a[k, q]),
                    "r_b": float(res.r_b[k, q]),
                    "delta_r": float(res.delta[k, q]),
                    "p_perm": float(res.p[k, q]),
                    "p_fdr": np.nan,
                    "ci_low": float(interval.low[k, q]),
                    "ci_high": float(interval.high[k, q]),
                    "p_boot": float(interval.p[k, q]),
                    "p_boot_fdr": np.nan,
                    "n_a": res.n_a,
                    "n_b": res.n_b,
                    "n_perm": res.n_perm,
                    "n_boot": interval.n_boot,
                }
            )
    return rows


def with_fdr(
    frame: pd.DataFrame,
    family: list[str],
    columns: Sequence[tuple[str, str]] = (("p_perm", "p_fdr"),),
) -> pd.DataFrame:
    """Fill each ``(p, adjusted)`` column pair: Benjamini-Hochberg within each ``family`` (the
    rows sharing those columns' values, e.g. the layers x targets of one model and condition)."""
    if frame.empty:
        return frame
    frame = frame.copy()
    for _, index in frame.groupby(family, sort=False).groups.items():
        for p_column, adjusted in columns:
            frame.loc[index, adjusted] = fdr_bh(frame.loc[index, p_column].to_numpy(np.float64))
    return frame


def _group_summary(alignment: pd.DataFrame) -> pd.DataFrame:
    """Mean and SEM over subjects of per-subject r (``alignment_group`` table), and a one-sided
    one-sample t-test of the mean r > 0 across subjects, ``t = mean / sem`` with ``S - 1``
    degrees of freedom (``p_t``; BH-FDR ``p_t_fdr`` over layers x targets per model and
    condition).

    The ``group`` rows of the alignment test these subjects (their p and CI come from stimulus
    permutations and resamples, the same for every subject: fixed effects); ``p_t`` treats the
    subjects as a sample of a population (random effects), the usual claim of a study.
    """
    subjects = alignment[~alignment["subject"].isin([GROUP_SUBJECT, GROUP_RDM_SUBJECT])]
    if subjects.empty:
        return pd.DataFrame(columns=GROUP_COLUMNS)
    keys = ["model", "layer", "layer_index", "target", "target_kind", "condition"]
    grouped = subjects.groupby(keys, sort=False)["r"]
    summary = grouped.agg(mean_r="mean", sd="std", n_subjects="count").reset_index()
    summary["sem"] = summary["sd"] / np.sqrt(summary["n_subjects"])
    with np.errstate(divide="ignore", invalid="ignore"):
        t = summary["mean_r"] / summary["sem"]
    dof = summary["n_subjects"] - 1
    summary["t"] = t.where(dof >= 1)
    summary["p_t"] = scipy.stats.t.sf(summary["t"], dof.clip(lower=1)).astype(float)
    summary.loc[summary["t"].isna(), "p_t"] = np.nan
    summary["p_t_fdr"] = np.nan
    summary = with_fdr(summary, ["model", "condition"], [("p_t", "p_t_fdr")])
    return summary[GROUP_COLUMNS]


def _write(
    result: AlignmentResult,
    out: Path,
    config: dict[str, Any],
    seed: int,
    inputs: list[Path],
    ids: list[str],
    conditions: list[str],
    targets: list[Target],
    figures: bool,
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    files += write_table(result.alignment, out, "alignment")
    files += write_table(result.behavior_direct, out, "behavior_direct")
    files += write_table(result.alignment_group, out, "alignment_group")
    if not result.condition_contrast.empty:
        files += write_table(result.condition_contrast, out, "condition_contrast")
    if figures:
        from object2brain.report.figures.alignment import plot_alignment

        for model in dict.fromkeys(result.alignment["model"]):
            files += plot_alignment(result.alignment, str(model), out / "figures")
    manifest = build_manifest(
        "rsa",
        config,
        seeds={"permutation": seed, "bootstrap": seed},
        inputs={str(p): cached_file_sha256(p) for p in dict.fromkeys(inputs) if p.is_file()},
        outputs=output_list(files, out),
        extra={
            "n_stimuli": len(ids),
            "conditions": conditions,
            "targets": {t.name: {"kind": t.kind, "subjects": t.subjects} for t in targets},
        },
    )
    files.append(write_json(out / "manifest.json", manifest))
    return files
