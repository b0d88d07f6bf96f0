"""``o2b.lesion`` (``object2brain lesion``): load the inputs -> compute the Object2Brain lesions ->
write the tables and ``manifest.json`` -> draw the figures.

The computation is :func:`object2brain.lesion.analysis.compute_lesion` on the shared analysis set
(:func:`object2brain.rsa.targets.build_analysis_set`), one per distinct set of stimuli; the
options are :class:`object2brain.options.LesionOptions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from object2brain.activations.store import ActivationStore
from object2brain.api.encode import load_targets
from object2brain.api.rsa import (
    ActivationsArg,
    BrainArg,
    RatingsArg,
    StimuliArg,
    check_counts,
    input_hashes,
    stimulus_table,
    store_paths,
)
from object2brain.data.brain import BrainData, brain_files, load_brain
from object2brain.data.ratings import load_ratings
from object2brain.data.stimuli import StimulusSet
from object2brain.devices import resolve_device
from object2brain.errors import DataError
from object2brain.executors import stage_runtime
from object2brain.io import (
    check_output_folder,
    optional_staging,
    write_json,
    write_tables,
)
from object2brain.lesion.analysis import (
    LesionResult,
    check_same_weights,
    compute_lesion,
    load_filter_table,
)
from object2brain.lesion.encoding import EncodingLesionData, compute_encoding_lesion
from object2brain.manifest import build_manifest, output_list
from object2brain.models.zoo import LoadedModel
from object2brain.options import (
    NULL_KINDS,
    SELECTIONS,
    EncodeOptions,
    LesionOptions,
    NullKind,
    Selection,
    Variant,
    resolve_options,
)
from object2brain.rsa.compare import check_method
from object2brain.rsa.rdm import check_metric
from object2brain.rsa.targets import AnalysisSet, build_analysis_set
from object2brain.tables import OBJECT2BRAIN


def lesion(
    activations: ActivationsArg,
    filters: str | Path | pd.DataFrame,
    *,
    brain: BrainArg = None,
    ratings: RatingsArg = None,
    stimuli: StimuliArg = None,
    out: str | Path | None = None,
    options: LesionOptions | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    model: LoadedModel | None = None,
    figures: bool = True,
    behavior_ids: Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
    variants: Sequence[Variant] | None = None,
    rdm_metric: str | None = None,
    compare_method: str | None = None,
    n_null: int | None = None,
    n_perm: int | None = None,
    null_subsets: NullKind | None = None,
    n_group_null: int | None = None,
    selection: Selection | None = None,
    selection_folds: int | None = None,
    propagate: bool | None = None,
    batch_size: int | None = None,
    image_cache: str | Path | None = None,
    analysis: str | None = None,
    encode_options: EncodeOptions | None = None,
    duplicate_ratings: str | None = None,
    folds: str | Path | None = None,
    executor: str = "local",
    ray_address: str | None = None,
) -> LesionResult:
    """Lesion / keep-only analysis of every object group (Object2Brain).

    Args:
        activations: activation stores (one model each).
        filters: the ``filter_objects`` table (file or DataFrame) of the dissection.
        brain, ratings, stimuli: as for :func:`object2brain.api.rsa.rsa`; stimuli give
            conditions (and, with ``propagate``, the images).
        out: output folder (nothing written if None).
        options: :class:`LesionOptions`; the option keywords below (when given) override it.
        seed: seed of the null subsets and the label permutations.
        device: where RDMs and comparisons run.
        progress: accepted for symmetry with the other stages (no bar is drawn).
        executor: ``local`` (this process) | ``ray``: the chunks of
            null subsets and permutations on a Ray cluster at
            ``ray_address`` (``auto``: the cluster of this machine; ``None``: a local one); the
            results are those of a local run (:mod:`object2brain.executors`).
        model: a :class:`~object2brain.models.zoo.LoadedModel` for ``propagate`` (the network
            that wrote the store).
        figures: write the heatmap figures (when ``out`` is given).
        behavior_ids: with ``propagate``, the stimuli of the direct behaviour correlation
            (default all): the held-out ones when the head was fitted on some of these stimuli.
        layers, groups, variants, rdm_metric, compare_method, n_null, n_perm, null_subsets,
            n_group_null, selection, selection_folds, propagate, batch_size, image_cache,
            duplicate_ratings: the fields of :class:`LesionOptions` (None: not given).
        folds: the dissection's selection folds (its ``folds.csv``: ``stimulus_id, fold``;
            default: the ``folds.csv`` next to a ``filters`` file). With
            ``selection="cross_fit"`` every analysed stimulus must be in it (else an error
            naming the file and the first missing stimulus) and fold ``k``'s groups are
            measured on the stimuli it puts in fold ``k``.
    """
    given = {
        "layers": None if layers is None else list(layers),
        "groups": None if groups is None else list(groups),
        "variants": None if variants is None else list(variants),
        "rdm_metric": rdm_metric,
        "compare_method": compare_method,
        "n_null": n_null,
        "n_perm": n_perm,
        "null_subsets": null_subsets,
        "n_group_null": n_group_null,
        "selection": selection,
        "selection_folds": selection_folds,
        "propagate": propagate,
        "batch_size": batch_size,
        "image_cache": image_cache,
        "analysis": analysis,
        "duplicate_ratings": duplicate_ratings,
    }
    opts = resolve_lesion_options(options, given)
    runtime = stage_runtime(
        seed=seed, device=str(device), progress=progress, executor=executor,
        ray_address=ray_address,
    )  # fmt: skip
    if out is not None:
        check_output_folder(out)
    table = load_filter_table(filters, folds)
    paths = store_paths(activations)
    brain_data = load_brain(brain) if brain is not None else None
    stimulus_set = stimulus_table(stimuli)
    dev = resolve_device(runtime.device)
    built: dict[tuple[str, ...], AnalysisSet] = {}
    with optional_staging(out) as staging, ExitStack() as stack:
        stores = [stack.enter_context(ActivationStore.open(p)) for p in paths]
        for store in stores:
            _check_store(store, stimulus_set, opts, model)
        analyses = []
        for store in stores if opts.analysis != "encoding" else ():
            key = tuple(stimulus_set.ids if stimulus_set is not None else store.stimulus_ids)
            if key not in built:  # one analysis set per distinct set of stimuli
                built[key] = build_analysis_set(
                    stimulus_set,
                    store.stimulus_ids,
                    brain=brain_data,
                    ratings=load_ratings(ratings, key, duplicates=opts.duplicate_ratings)
                    if ratings is not None
                    else None,
                    rdm_metric=opts.rdm_metric,
                    compare_method=opts.compare_method,
                    device=dev,
                    on_missing="error",
                    behavior_ids=behavior_ids,
                )
            analyses.append(built[key])
        result = LesionResult(pd.DataFrame(columns=OBJECT2BRAIN.column_names))
        if opts.analysis != "encoding":
            result = compute_lesion(stores, table, analyses, opts, runtime, model=model)
        if opts.analysis != "rsa":
            data = encoding_lesion_data(brain_data, ratings, stimulus_set, stores[0])
            encoded = compute_encoding_lesion(
                stores,
                table,
                data,
                opts,
                encode_options or EncodeOptions(),
                runtime,
                notes=result.notes,
            )
            parts = [result.object2brain, encoded] if opts.analysis == "both" else [encoded]
            result.object2brain = pd.concat(parts, ignore_index=True)
        if staging is not None:  # tables, figures, manifest: swapped in as a whole
            config = _config(opts, str(dev))
            sources = (filters, brain, ratings, stimuli)
            inputs = input_hashes(paths, sources, _manifest_files(brain))
            files = write_lesion(result, staging.folder, config, inputs, seed, figures=figures)
            result.files = staging.final(files)
    return result


def write_lesion(
    result: LesionResult,
    out: Path,
    config: dict[str, Any],
    inputs: dict[str, str],
    seed: int,
    *,
    figures: bool,
) -> list[Path]:
    """Write ``object2brain``, the ``propagate_*`` tables (when not empty), the figures (via
    :mod:`object2brain.report.figures.lesion`) and ``manifest.json``; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    optional = ("propagate_behavior", "propagate_alignment")
    files = write_tables(
        out,
        {name: getattr(result, name) for name in ("object2brain", *optional)},
        unless_empty=optional,
    )
    if figures:
        from object2brain.report.figures.lesion import lesion_figures

        table = result.object2brain  # one analysis per figure: RSA rows when there are some
        rsa_rows = table[table["analysis"] == "rsa"]
        files.extend(lesion_figures(rsa_rows if len(rsa_rows) else table, out / "figures"))
    manifest = build_manifest(
        "lesion",
        config,
        seeds={"seed": seed},
        inputs=inputs,
        outputs=output_list(files, out),
        extra={"selection_notes": result.notes} if result.notes else None,
    )
    files.append(write_json(out / "manifest.json", manifest))
    return files


def resolve_lesion_options(options: LesionOptions | None, given: dict[str, Any]) -> LesionOptions:
    """``options`` with the keywords given (not None); the values a user mistypes most are
    checked first, with the messages of the command line."""
    values = {key: value for key, value in given.items() if value is not None}
    if "rdm_metric" in values:
        check_metric(values["rdm_metric"])
    if "compare_method" in values:
        check_method(values["compare_method"])
    for variant in values.get("variants", ()):
        if variant not in ("lesion", "keep"):
            raise DataError(f"unknown variant {variant!r}: use lesion or keep")
    check_counts(values, ("n_null", "n_perm"))
    check_counts(values, ("n_group_null",))
    chosen = values.get("selection")
    if chosen is not None and chosen not in SELECTIONS:
        raise DataError(f"--selection {chosen!r}: use {' or '.join(SELECTIONS)}")
    kind = values.get("null_subsets")
    if kind is not None and kind not in NULL_KINDS:
        raise DataError(f"--null-subsets {kind!r}: use {' or '.join(NULL_KINDS)}")
    return resolve_options(LesionOptions, options, **values)


def _check_store(
    store: ActivationStore,
    stimuli: StimulusSet | None,
    options: LesionOptions,
    model: LoadedModel | None,
) -> None:
    """The stimulus table's ids are in ``store``; ``propagate`` has a model (the store's
    network) and a stimulus table with images."""
    if stimuli is not None:
        in_store = set(store.stimulus_ids)
        missing = [sid for sid in stimuli.ids if sid not in in_store]
        if missing:
            raise DataError(
                f"{len(missing)} stimulus id(s) of the stimulus table are not in the activation "
                f"store: {', '.join(missing[:20])}"
            )
    if options.propagate:
        if model is None or stimuli is None:
            raise DataError("--propagate needs --model and --stimuli (with images)")
        check_same_weights(store, model)


def _manifest_files(brain: BrainArg) -> list[Path]:
    """The data files behind a brain manifest given as a path (hashed as inputs)."""
    if isinstance(brain, BrainData) or brain is None or not Path(brain).is_file():
        return []
    return [Path(f) for f in brain_files(brain)]


def _config(options: LesionOptions, device: str) -> dict[str, Any]:
    return {
        "layers": list(options.layers) if options.layers else None,
        "groups": list(options.groups) if options.groups else None,
        "variants": list(options.variants),
        "rdm_metric": options.rdm_metric,
        "compare_method": options.compare_method,
        "n_null": options.n_null,
        "null_subsets": options.null_subsets,
        "n_perm": options.n_perm,
        "n_group_null": options.n_group_null,
        "selection": options.selection,
        "selection_folds": options.selection_folds,
        "propagate": options.propagate,
        "analysis": options.analysis,
        "device": device,
    } | ({"duplicate_ratings": "mean"} if options.duplicate_ratings == "mean" else {})


def encoding_lesion_data(
    brain: BrainData | None,
    ratings: RatingsArg,
    stimuli: StimulusSet | None,
    store: ActivationStore,
) -> EncodingLesionData:
    """The responses of the encoding lesion: brain patterns (not RDMs) and raters, as the
    ``encode`` stage reads them, on the stimulus table's ids (else the first store's).

    Raises:
        DataError: neither brain data nor ratings, an RDMs source, missing stimuli.
    """
    if brain is None and ratings is None:
        raise DataError(
            "lesion --analysis encoding needs brain patterns (--brain) or ratings (--ratings)"
        )
    ids = list(stimuli.ids if stimuli is not None else store.stimulus_ids)
    conditions = None
    if stimuli is not None and "condition" in stimuli.table:
        conditions = [str(c) for c in stimuli.table["condition"]]
    targets = load_targets(brain, ratings, ids, conditions)
    return EncodingLesionData(ids, targets.responses, conditions)
