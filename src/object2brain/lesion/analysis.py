"""Object2Brain: how much each object group's filters carry the model-to-human correlation.

For every model, layer ``L`` and object group ``g`` of the EmoCAM++ filter assignment
(``filter_objects`` table; plus the group ``unassigned`` of filters assigned to no group):

- **lesion**: zero the filters of ``g``; **keep**: zero every other filter of ``L``;
- recompute the layer's RDM and its correlation ``r_variant`` with every target (behaviour, each
  ROI; each subject, and ``group`` = the mean over the subjects whose r is defined) in every
  condition; ``delta_r = r_variant - r_full``;
- null: ``n_null`` random subsets of the same number of filters of ``L`` (seeded; lesion zeroes
  them, keep keeps them); ``z = (delta_r - mean(null)) / sd(null)`` and the two-sided
  ``p = (1 + #{|null - mean(null)| >= |delta_r - mean(null)|}) / (1 + n_null)``. Groups of the same
  size share the same null draws. With ``null_subsets="matched"`` the subsets are drawn stratum by
  stratum of the filters' activation norms, as many from each as the group has there
  (:func:`~object2brain.lesion.engine.norm_strata`): the null then asks whether the group
  matters more than filters *as strong as its own*, where a uniform draw also counts their
  strength (a group of unusually strong filters changes the RDM more whatever it encodes).
- ``p_fdr``: Benjamini-Hochberg over groups x targets within model, layer, variant, condition and
  subject level (an extra column after those of DESIGN.md section 3).

RDMs of all subsets come from per-filter sufficient statistics (:mod:`object2brain.lesion.engine`),
so the null costs one matrix product per chunk of subsets.

Option ``propagate`` (needs the model and the stimulus images): the filters are zeroed *inside*
the forward pass (a hook on ``L``), so later layers and the valence output change too. Reported:
the change of the direct behaviour correlation (predicted vs rated valence, table
``propagate_behavior``) and of later layers' alignment (table ``propagate_alignment``). No null
is computed there (each subset would need its own forward pass).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from object2brain.activations.store import ActivationStore
from object2brain.data import ALL_CONDITION, GROUP_SUBJECT
from object2brain.data.brain import BrainData, brain_files, load_brain
from object2brain.data.ratings import Ratings, load_ratings
from object2brain.data.stimuli import StimulusSet, load_stimuli, read_table
from object2brain.devices import Chunking, resolve_device
from object2brain.errors import DataError, ModelError, require_columns
from object2brain.io import check_output_folder, write_json, write_table
from object2brain.lesion.engine import (
    NULL_KINDS,
    FilterStats,
    NullKind,
    condensed_subset,
    filter_norms,
    matched_subset_masks,
    norm_strata,
    random_subset_masks,
)
from object2brain.manifest import build_manifest, cached_file_sha256, output_list
from object2brain.rsa.align import Target, build_targets, warn_constant_subjects, with_fdr
from object2brain.rsa.compare import check_method, correlate_prepared, prepare
from object2brain.rsa.inference import (
    combine_finite,
    combine_matrix,
    linear_permutation_test,
)
from object2brain.rsa.rdm import check_metric, upper_triangle

log = logging.getLogger("object2brain.lesion.analysis")

Variant = Literal["lesion", "keep"]
UNASSIGNED = "unassigned"
OBJECT2BRAIN_COLUMNS = [
    "model",
    "layer",
    "group",
    "variant",
    "target",
    "subject",
    "condition",
    "n_filters",
    "r_full",
    "r_variant",
    "delta_r",
    "p_null",
    "z_null",
    "n_null",
    "p_fdr",
    "p_perm",
    "p_perm_fdr",
    "n_perm",
]
FILTER_COLUMNS = ("model", "layer", "filter", "group", "assigned")
#: Values of the variant-minus-full difference vectors tested at once for ``p_perm`` (256 MB).
DIFFERENCE_BLOCK_VALUES = 1 << 25


@dataclass
class LesionResult:
    """Tables of a lesion run and the files written."""

    object2brain: pd.DataFrame
    propagate_behavior: pd.DataFrame = field(default_factory=pd.DataFrame)
    propagate_alignment: pd.DataFrame = field(default_factory=pd.DataFrame)
    files: list[Path] = field(default_factory=list)


def group_filters(
    filters: pd.DataFrame, model: str, layer: str, n_filters: int, *, where: str = "filter table"
) -> dict[str, np.ndarray]:
    """Filter indices of every assigned group of ``model``/``layer``, plus ``unassigned``.

    Raises:
        DataError: no rows for this model/layer, or filter indices outside ``0..n_filters-1``.
    """
    rows = filters[
        (filters["model"].astype(str) == model) & (filters["layer"].astype(str) == layer)
    ]
    if rows.empty:
        known = sorted(
            {f"{m}/{lay}" for m, lay in zip(filters["model"], filters["layer"], strict=True)}
        )
        raise DataError(
            f"{where}: no rows for model {model!r}, layer {layer!r} "
            f"(the table has: {', '.join(known) or 'nothing'}); is it for another model or layer?"
        )
    indices = rows["filter"].astype(int)
    bad = sorted(set(indices[(indices < 0) | (indices >= n_filters)]))
    if bad:
        raise DataError(
            f"{where}: filter(s) {', '.join(map(str, bad[:10]))} of {model}/{layer} do not exist: "
            f"the layer has {n_filters} filters (0..{n_filters - 1})"
        )
    assigned = rows[rows["assigned"].astype(bool)]
    groups = {
        str(group): np.unique(block["filter"].astype(int).to_numpy())
        for group, block in assigned.groupby("group", sort=True)
    }
    taken = np.zeros(n_filters, dtype=bool)
    for members in groups.values():
        taken[members] = True
    if not groups:
        log.warning(
            "%s: no filter of %s/%s is assigned to an object group: nothing to lesion",
            where,
            model,
            layer,
        )
    elif (~taken).any():
        groups[UNASSIGNED] = np.flatnonzero(~taken)
    return groups


def load_filter_table(source: str | Path | pd.DataFrame) -> pd.DataFrame:
    """Read a ``filter_objects`` table and check its columns."""
    frame = source.copy() if isinstance(source, pd.DataFrame) else read_table(Path(source))
    where = "filter table" if isinstance(source, pd.DataFrame) else str(source)
    require_columns(frame.columns, FILTER_COLUMNS, where, detail=" of a filter_objects table")
    if frame.empty:
        raise DataError(f"{where}: the filter table has no rows")
    return frame


def run_lesion(
    activations: Sequence[str | Path] | str | Path,
    filters: str | Path | pd.DataFrame,
    *,
    brain: str | Path | BrainData | None = None,
    ratings: str | Path | pd.DataFrame | Ratings | None = None,
    stimuli: str | Path | pd.DataFrame | StimulusSet | None = None,
    out: str | Path | None = None,
    layers: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
    variants: Sequence[Variant] = ("lesion", "keep"),
    rdm_metric: str = "correlation",
    compare_method: str = "spearman",
    n_null: int = 1000,
    n_perm: int = 1000,
    seed: int = 0,
    device: str | torch.device = "auto",
    propagate: bool = False,
    null_subsets: NullKind = "random",
    model: Any = None,
    batch_size: int = 32,
    figures: bool = True,
    behavior_ids: Sequence[str] | None = None,
) -> LesionResult:
    """Lesion / keep-only analysis of every object group (see module docstring).

    Args:
        activations: activation stores (one model each).
        filters: the ``filter_objects`` table (file or DataFrame) of the dissection.
        brain, ratings, stimuli: as for :func:`object2brain.rsa.align.run_alignment`; stimuli
            give conditions (and, with ``propagate``, the images).
        out: output folder (nothing written if None).
        layers: layers to analyse (default: every layer of the store present in the table).
        groups: restrict to these groups (each must have filters).
        variants: ``lesion`` and/or ``keep``.
        rdm_metric, compare_method: as for the alignment.
        n_null: random subsets per group size (0 skips the null: NaN p and z).
        null_subsets: ``random`` (uniform subsets of the group's size, DESIGN.md) or ``matched``
            (subsets matched to the group's filter norms; module docstring).
        n_perm: permutations of the targets' stimulus labels for ``p_perm`` (0 skips it; NaN
            for ``kendall_tau_a``).
        seed: seed of the null subsets.
        device: where RDMs and comparisons run.
        propagate: also zero the filters inside the forward pass (needs ``model``).
        model: a :class:`~object2brain.models.zoo.LoadedModel` for ``propagate`` (its store is
            the one whose ``model`` attribute equals ``model.name``).
        batch_size: images per forward pass for ``propagate``.
        figures: write the heatmap figures (when ``out`` is given).
        behavior_ids: with ``propagate``, the stimuli of the direct behaviour correlation
            (default all): the held-out ones when the head was fitted on some of these stimuli.
    """
    check_metric(rdm_metric)
    check_method(compare_method)
    for variant in variants:
        if variant not in ("lesion", "keep"):
            raise DataError(f"unknown variant {variant!r}: use lesion or keep")
    if n_null < 0 or n_perm < 0:
        raise DataError("--n-null and --n-perm must be >= 0")
    if null_subsets not in NULL_KINDS:
        raise DataError(f"--null-subsets {null_subsets!r}: use {' or '.join(NULL_KINDS)}")
    if out is not None:
        check_output_folder(out)
    dev = resolve_device(device)
    table = load_filter_table(filters)
    where = str(filters) if isinstance(filters, str | Path) else "filter table"
    paths = (
        [Path(activations)]
        if isinstance(activations, str | Path)
        else [Path(p) for p in activations]
    )
    rows: list[dict[str, Any]] = []
    prop_behavior: list[pd.DataFrame] = []
    prop_alignment: list[pd.DataFrame] = []
    brain_data = load_brain(brain) if brain is not None else None
    covered: dict[tuple[str, ...], list[str]] = {}  # matched once per id set: one warning
    warned: set[tuple[tuple[str, ...], tuple[str, ...]]] = set()
    for path in paths:
        with ActivationStore.open(path) as store:
            model_name = str(store.attrs.get("model", path.stem))
            ids, conditions, stimulus_set = _stimuli(stimuli, store.stimulus_ids)
            if propagate:
                if model is None or stimulus_set is None:
                    raise DataError("--propagate needs --model and --stimuli (with images)")
                _check_same_weights(store, model)
            if brain_data is not None:
                key = tuple(ids)
                if key not in covered:
                    covered[key] = brain_data.common_ids(ids)
                ids = covered[key]
            rating_data = load_ratings(ratings, ids) if ratings is not None else None
            valence = _stimulus_valence(stimulus_set, ids)
            targets = build_targets(
                brain_data, rating_data, valence, ids, rdm_metric, dev, compare_method
            )
            if (seen := (tuple(ids), _condition_key(conditions))) not in warned:
                warned.add(seen)
                _warn_constant_targets(targets, ids, conditions, compare_method)
            chosen = _layers_of(store, table, model_name, layers, str(path))
            for layer in chosen:
                stats = FilterStats.from_store(store, layer, ids, device=dev)
                members = group_filters(table, model_name, layer, stats.n_filters, where=where)
                members = _select_groups(members, groups, model_name, layer)
                rows.extend(
                    _layer_rows(
                        model_name,
                        layer,
                        stats,
                        members,
                        targets,
                        ids,
                        conditions,
                        variants,
                        rdm_metric,
                        compare_method,
                        n_null,
                        n_perm,
                        seed,
                        dev,
                        null_subsets,
                    )
                )
                if propagate:
                    from object2brain.lesion.propagate import propagate_layer

                    assert model is not None and stimulus_set is not None  # checked above
                    behavior, later = propagate_layer(
                        model,
                        stimulus_set.subset(ids),
                        store,
                        layer,
                        members,
                        variants,
                        targets,
                        rating_data,
                        conditions,
                        rdm_metric,
                        compare_method,
                        batch_size,
                        dev,
                        behavior_ids,
                    )
                    prop_behavior.append(behavior)
                    prop_alignment.append(later)
    frame = pd.DataFrame(rows, columns=OBJECT2BRAIN_COLUMNS)
    frame = with_fdr(
        frame,
        ["model", "layer", "variant", "condition", "subject"],  # as the alignment's
        [("p_null", "p_fdr"), ("p_perm", "p_perm_fdr")],
    )
    result = LesionResult(
        frame,
        pd.concat(prop_behavior, ignore_index=True) if prop_behavior else pd.DataFrame(),
        pd.concat(prop_alignment, ignore_index=True) if prop_alignment else pd.DataFrame(),
    )
    if out is not None:
        result.files = _write(
            result,
            Path(out),
            paths,
            filters,
            brain,
            ratings,
            stimuli,
            figures,
            {
                "layers": list(layers) if layers else None,
                "groups": list(groups) if groups else None,
                "variants": list(variants),
                "rdm_metric": rdm_metric,
                "compare_method": compare_method,
                "n_null": n_null,
                "null_subsets": null_subsets,
                "n_perm": n_perm,
                "propagate": propagate,
                "device": str(dev),
            },
            seed,
        )
    return result


def _stimuli(
    source: str | Path | pd.DataFrame | StimulusSet | None, store_ids: list[str]
) -> tuple[list[str], np.ndarray | None, StimulusSet | None]:
    if source is None:
        return list(store_ids), None, None
    if isinstance(source, StimulusSet):
        stimulus_set = source
    else:
        stimulus_set = load_stimuli(source, check="table")
    in_store = set(store_ids)
    missing = [sid for sid in stimulus_set.ids if sid not in in_store]
    if missing:
        raise DataError(
            f"{len(missing)} stimulus id(s) of the stimulus table are not in the activation "
            f"store: {', '.join(missing[:20])}"
        )
    conditions = stimulus_set.conditions
    return stimulus_set.ids, None if conditions is None else np.asarray(conditions), stimulus_set


def _stimulus_valence(stimulus_set: StimulusSet | None, ids: list[str]) -> np.ndarray | None:
    if stimulus_set is None or "valence" not in stimulus_set.table:
        return None
    values = stimulus_set.table.set_index("stimulus_id").loc[ids, "valence"]
    return None if values.isna().any() else values.to_numpy(dtype=np.float64)


def _layers_of(
    store: ActivationStore,
    table: pd.DataFrame,
    model: str,
    layers: Sequence[str] | None,
    where: str,
) -> list[str]:
    in_table = set(table.loc[table["model"].astype(str) == model, "layer"].astype(str))
    if not in_table:
        models = sorted(set(table["model"].astype(str)))
        raise DataError(
            f"the filter table has no rows for model {model!r} of {where} "
            f"(it has: {', '.join(models)}); is it for another model?"
        )
    wanted = list(layers) if layers else [name for name in store.layers if name in in_table]
    for layer in wanted:
        if layer not in store.layers:
            raise DataError(f"{where}: no layer {layer!r} in the activation store")
        if layer not in in_table:
            raise DataError(f"the filter table has no rows for {model}/{layer}")
    if not wanted:
        raise DataError(
            f"none of the filter table's layers ({', '.join(sorted(in_table))}) is in {where}"
        )
    return wanted


def _select_groups(
    members: dict[str, np.ndarray], groups: Sequence[str] | None, model: str, layer: str
) -> dict[str, np.ndarray]:
    if not groups:
        return members
    empty = [g for g in groups if g not in members]
    if empty:
        raise DataError(
            f"group(s) {', '.join(empty)} have no filters assigned in {model}/{layer} "
            f"(groups with filters: {', '.join(sorted(members))})"
        )
    return {g: members[g] for g in groups}


def _check_same_weights(store: ActivationStore, model: Any) -> None:
    """``--propagate`` re-runs the network: it must be the one that wrote the activations."""
    stored = store.attrs.get("weights_sha256")
    if stored and stored != model.weights_sha256:
        raise ModelError(
            f"{store.path}: the activations come from {store.attrs.get('weights')!r} weights "
            f"(SHA-256 {str(stored)[:12]}...), but --model {model.name} has {model.weights!r} "
            f"(SHA-256 {model.weights_sha256[:12]}...): --propagate must run the same network "
            "(same --weights, and --seed for random weights)"
        )


def condition_sets(ids: list[str], conditions: np.ndarray | None) -> list[tuple[str, np.ndarray]]:
    """``("all", every row)`` and ``(name, rows)`` per condition; stimuli with an empty
    condition (``""``) enter ``all`` only, as in the alignment."""
    sets = [(ALL_CONDITION, np.arange(len(ids)))]
    if conditions is not None:
        for name in dict.fromkeys(conditions.tolist()):
            if name != "":
                sets.append((str(name), np.flatnonzero(conditions == name)))
    return sets


def _condition_key(conditions: np.ndarray | None) -> tuple[str, ...]:
    return () if conditions is None else tuple(str(c) for c in conditions)


def _warn_constant_targets(
    targets: list[Target], ids: list[str], conditions: np.ndarray | None, method: str
) -> None:
    """Warn once per target and condition about subjects whose RDM is constant there."""
    for condition, keep in condition_sets(ids, conditions):
        if len(keep) < 4:
            continue
        pairs = torch.as_tensor(condensed_subset(len(ids), keep))
        for target in targets:
            vectors = upper_triangle(target.rdms).reshape(len(target.subjects), -1)
            warn_constant_subjects(target, vectors[:, pairs.to(vectors.device)], condition, method)


def _layer_rows(
    model: str,
    layer: str,
    stats: FilterStats,
    members: dict[str, np.ndarray],
    targets: list[Target],
    ids: list[str],
    conditions: np.ndarray | None,
    variants: Sequence[str],
    metric: str,
    method: str,
    n_null: int,
    n_perm: int,
    seed: int,
    device: torch.device,
    null_subsets: NullKind = "random",
) -> list[dict[str, Any]]:
    K = stats.n_filters
    norms = filter_norms(stats) if null_subsets == "matched" else None
    columns = [(t.name, s) for t in targets for s in t.subjects]
    full_target = torch.cat([upper_triangle(t.rdms).reshape(len(t.subjects), -1) for t in targets])
    rows: list[dict[str, Any]] = []
    for condition, keep in condition_sets(ids, conditions):
        if len(keep) < 4:
            log.warning("condition %r has %d stimuli: skipped", condition, len(keep))
            continue
        sub_stats = stats if len(keep) == len(ids) else stats.subset(keep)
        pairs = torch.as_tensor(condensed_subset(len(ids), keep), device=full_target.device)
        # ranked / standardised once per condition, not once per chunk of subsets
        target = prepare(full_target[:, pairs], method).to(device)

        chunk = max(1, sub_stats.subsets_per_chunk(device))

        def correlations(
            masks: np.ndarray,
            sub: FilterStats = sub_stats,
            tgt: torch.Tensor = target,
            size: int = chunk,
        ) -> np.ndarray:
            def chunk_r(start: int, stop: int) -> np.ndarray:
                rdms = sub.rdms(masks[start:stop], metric, device=device, strict=False)
                valid = torch.isfinite(rdms).all(dim=1)
                r = torch.full((rdms.shape[0], tgt.shape[0]), float("nan"), dtype=torch.float64)
                if bool(valid.any()):
                    variant = prepare(rdms[valid], method)
                    r[valid.cpu()] = correlate_prepared(variant, tgt, method).cpu()
                return r.numpy()

            chunks = Chunking(size).run(len(masks), chunk_r, device=device)
            return with_group_means(np.concatenate([r for _, _, r in chunks]), targets)

        def prepared(mask: np.ndarray, sub: FilterStats = sub_stats) -> torch.Tensor:
            # a silent variant's RDM is NaN, and so is its prepared row: no r, no p
            return prepare(sub.rdms(mask[None], metric, device=device, strict=False), method)[0]

        full_mask = np.ones(K, dtype=bool)
        r_full = correlations(full_mask[None])[0]
        linear = n_perm > 0 and method != "kendall_tau_a"  # tau-a is not a dot product
        full_prepared = prepared(full_mask) if linear else None
        nulls: dict[tuple[str, int, tuple[int, ...]], np.ndarray] = {}
        estimates, variant_masks = [], []
        for group, filters in members.items():
            strata = None if norms is None else norm_strata(norms, filters)
            counts = _stratum_counts(strata, filters)
            for variant in variants:
                mask = np.ones(K, dtype=bool) if variant == "lesion" else np.zeros(K, dtype=bool)
                mask[filters] = variant == "keep"
                r_variant = correlations(mask[None])[0]
                delta = r_variant - r_full
                key = (variant, len(filters), counts)
                if n_null and key not in nulls:
                    draws = (
                        random_subset_masks(K, len(filters), n_null, seed=seed + len(filters))
                        if strata is None
                        else matched_subset_masks(strata, filters, n_null, seed=seed + len(filters))
                    )
                    null_masks = ~draws if variant == "lesion" else draws
                    nulls[key] = correlations(null_masks) - r_full[None]
                p, z = _null_stats(delta, nulls.get(key))
                estimates.append((group, filters, variant, r_variant, delta, p, z))
                variant_masks.append(mask)
        # delta_r = (prepare(variant) - prepare(full)) . target: permuting the targets' stimulus
        # labels gives its null when the target is unrelated to the model. Rows in blocks
        # (DIFFERENCE_BLOCK_VALUES), so many groups do not hold every difference vector at once.
        p_perm = np.full((len(estimates), len(r_full)), np.nan)
        if full_prepared is not None:
            block = max(1, DIFFERENCE_BLOCK_VALUES // full_prepared.numel())
            for first in range(0, len(variant_masks), block):
                differences = torch.stack(
                    [prepared(m) - full_prepared for m in variant_masks[first : first + block]]
                )
                p_perm[first : first + len(differences)] = linear_permutation_test(
                    differences, target, n_perm, seed, group_combine(targets)
                ).p
        for (group, filters, variant, r_variant, delta, p, z), p_labels in zip(
            estimates, p_perm, strict=True
        ):
            for c, (target_name, subject) in enumerate(with_group_labels(columns, targets)):
                rows.append(
                    {
                        "model": model,
                        "layer": layer,
                        "group": group,
                        "variant": variant,
                        "target": target_name,
                        "subject": subject,
                        "condition": condition,
                        "n_filters": len(filters),
                        "r_full": r_full[c],
                        "r_variant": r_variant[c],
                        "delta_r": delta[c],
                        "p_null": p[c],
                        "z_null": z[c],
                        "n_null": n_null,
                        "p_perm": p_labels[c],
                        "n_perm": n_perm if linear else 0,
                    }
                )
    return rows


def _stratum_counts(strata: np.ndarray | None, filters: np.ndarray) -> tuple[int, ...]:
    """What a matched null depends on: the number of strata and the group's count in each."""
    if strata is None:
        return ()
    n_strata = int(strata.max()) + 1
    return (n_strata, *np.bincount(strata[filters], minlength=n_strata).tolist())


def with_group_labels(
    columns: list[tuple[str, str]], targets: list[Target]
) -> list[tuple[str, str]]:
    labels = list(columns)
    for target in targets:
        if not target.group_only:
            labels.append((target.name, GROUP_SUBJECT))
    return labels


def group_combine(targets: list[Target]) -> torch.Tensor | None:
    """The ``(T, G)`` combine matrix of the mean over each target's subjects (None: no target
    has several subjects); its columns follow :func:`with_group_labels`."""
    groups, start = [], 0
    for target in targets:
        width = len(target.subjects)
        if not target.group_only:
            groups.append(range(start, start + width))
        start += width
    return combine_matrix(groups, start) if groups else None


def with_group_means(r: np.ndarray, targets: list[Target]) -> np.ndarray:
    """Append to ``r`` ``(N, T)``, per target with subjects, the mean over its subjects' columns
    (undefined r left out, as in the alignment: :func:`~object2brain.rsa.inference.combine_finite`).
    """
    combine = group_combine(targets)
    if combine is None:
        return r
    return np.concatenate([r, combine_finite(torch.from_numpy(r), combine).numpy()], axis=1)


def _null_stats(delta: np.ndarray, null: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided p and z of ``delta`` ``(T,)`` against ``null`` ``(N, T)``.

    Null subsets whose RDM is undefined (a silent pattern; NaN rows) are left out of the count.
    z is NaN where the null does not vary (spread <= 1e-12 of max(1, |centre|)).
    """
    if null is None or len(null) == 0:
        nan = np.full_like(delta, np.nan)
        return nan, nan
    finite = np.isfinite(null)
    count = finite.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN, as wanted
        centre = np.nanmean(np.where(finite, null, np.nan), axis=0)
        spread = np.nanstd(np.where(finite, null, np.nan), axis=0, ddof=1)
        extreme = (np.abs(null - centre) >= np.abs(delta - centre)[None] - 1e-12) & finite
        p = np.where(count > 0, (1 + extreme.sum(axis=0)) / (1 + count), np.nan)
    p = np.where(np.isfinite(delta), p, np.nan)
    # a constant null (e.g. keep-only of a group holding every filter) has a rounding-noise spread
    varies = spread > 1e-12 * np.maximum(1.0, np.abs(centre))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(varies, (delta - centre) / spread, np.nan)
    return p, z


def _write(
    result: LesionResult,
    out: Path,
    paths: list[Path],
    filters: str | Path | pd.DataFrame,
    brain: Any,
    ratings: Any,
    stimuli: Any,
    figures: bool,
    config: dict[str, Any],
    seed: int,
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = list(write_table(result.object2brain, out, "object2brain"))
    for name in ("propagate_behavior", "propagate_alignment"):
        frame = getattr(result, name)
        if not frame.empty:
            files.extend(write_table(frame, out, name))
    if figures and not result.object2brain.empty:
        from object2brain.report.figures.lesion import plot_lesion_heatmaps, plot_model_comparison

        files.extend(plot_lesion_heatmaps(result.object2brain, out / "figures"))
        files.extend(plot_model_comparison(result.object2brain, out / "figures"))
    inputs = {str(p): cached_file_sha256(p) for p in paths}
    for source in (filters, brain, ratings, stimuli):
        if isinstance(source, str | Path) and Path(source).is_file():
            inputs[str(source)] = cached_file_sha256(source)
    if isinstance(brain, str | Path) and Path(brain).is_file():
        # the data behind a YAML manifest
        inputs.update({str(f): cached_file_sha256(f) for f in brain_files(brain)})
    manifest = build_manifest(
        "lesion", config, seeds={"seed": seed}, inputs=inputs, outputs=output_list(files, out)
    )
    files.append(write_json(out / "manifest.json", manifest))
    return files
