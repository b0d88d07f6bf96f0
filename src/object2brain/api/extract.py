"""The edge of the extraction stage, ``o2b.extract``: load the inputs (model by name or object,
stimuli by table or object, supplied valence by table or mapping), validate the options, then
plan and stream the activations into the store (:mod:`object2brain.activations.extract`)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from object2brain.errors import StoreError
from object2brain.io import check_output_folder
from object2brain.options import ExtractOptions, OptionsError, Runtime, as_flags, resolve_options

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from object2brain.data.stimuli import StimulusSet
    from object2brain.models.zoo import LoadedModel

__all__ = ["extract"]

log = logging.getLogger("object2brain.api.extract")


def extract(
    model: LoadedModel | str,
    stimuli: StimulusSet | str | Path,
    *,
    out: str | Path,
    layers: str | Sequence[str] = "all",
    options: ExtractOptions | None = None,
    batch_size: int | None = None,
    dtype: str | None = None,
    srp: int | None = None,
    amp_dtype: str | None = None,
    channels_last: bool | None = None,
    fold_batchnorm: bool | None = None,
    quantize: str | None = None,
    decode: str | None = None,
    num_workers: int | None = None,
    image_cache: str | Path | None = None,
    weights: str = "default",
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    overwrite: bool = False,
    valence: str | Path | pd.Series | Mapping[str, float] | None = None,
    executor: str = "local",
    ray_address: str | None = None,
) -> Path:
    """Extract activations of ``layers`` for every stimulus into the activation store ``out``.

    Args:
        model: a :class:`~object2brain.models.zoo.LoadedModel`, or an architecture name loaded
            with ``weights`` (and ``seed``, for ``weights="none"``).
        stimuli: a :class:`~object2brain.data.stimuli.StimulusSet`, or a stimulus table / image
            folder to load.
        out: the ``.h5`` file to write (its folder is created): ``/stimulus_ids`` ``(n,)``,
            ``/layers/<name>`` ``(n, ...)`` in each layer's original shape (or ``(n, srp)``), file
            attributes
            (model, weights and their SHA-256, preprocessing, layer ``order``, ``complete``).
        layers: ``all`` (the canonical layers) or names / a comma-separated list.
        options: :class:`~object2brain.options.ExtractOptions`; the keywords below, when given,
            override its fields (``batch_size``, ``dtype``, ``srp``, ``amp_dtype`` = field
            ``amp``, ``channels_last``, ``fold_batchnorm``, ``quantize``, ``decode``,
            ``num_workers``, ``image_cache``; meanings and
            defaults there).
        weights: used only when ``model`` is a name.
        seed: seed of the projection matrices (and of ``weights=none`` when loading by name).
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        progress: show a progress bar.
        overwrite: replace an existing store at ``out`` written by another run (a complete store
            of this very run is always reused as it is).
        valence: predicted valence to store as layer ``valence`` instead of the head's outputs
            (with or without a head; with a head it takes precedence over the head's outputs,
            and a warning says so): a table with ``stimulus_id, predicted`` (e.g.
            ``train-head --cross-fit``'s ``out_of_fold.csv``) or a Series/mapping by stimulus id.
            The store's attribute ``valence_source`` says which (``head`` or ``supplied``).
        executor: ``local`` (this process) | ``ray``: shards of stimuli on an actor pool of a
            Ray cluster at ``ray_address``, stitched into the same store
            (:mod:`object2brain.executors.extraction`).

    Returns:
        The path of the complete store.

    Raises:
        StoreError: invalid options (named by their flag), or a store that cannot be written.
    """
    from object2brain.activations.extract import (
        int8_cache_beside,
        plan_extraction,
        run_extraction,
    )
    from object2brain.data.ratings import load_predicted_valence
    from object2brain.data.stimuli import StimulusSet, load_stimuli
    from object2brain.models.zoo import LoadedModel, load_model

    given = {
        "batch_size": batch_size, "dtype": dtype, "srp": srp, "amp": amp_dtype,
        "channels_last": channels_last, "decode": decode, "num_workers": num_workers,
        "image_cache": image_cache, "fold_batchnorm": fold_batchnorm,
        "quantize": quantize,
    }  # fmt: skip
    resolved = _resolve(options, {k: v for k, v in given.items() if v is not None})
    runtime = Runtime(
        seed=seed, device=str(device), progress=progress, executor=executor,
        ray_address=ray_address,
    )  # fmt: skip
    if runtime.executor == "ray":
        from object2brain.executors import require_ray

        require_ray()  # before anything is loaded: one clear error without the extra
    out = Path(out).expanduser()
    stimulus_set = stimuli if isinstance(stimuli, StimulusSet) else load_stimuli(stimuli)
    supplied = None if valence is None else load_predicted_valence(valence, stimulus_set.ids)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, weights, seed=seed)
    if supplied is not None and loaded.has_head:  # a study does this on purpose: INFO
        log.info(
            "extract: model %r has a valence head and predicted valence was supplied: layer "
            "'valence' of %s holds the supplied values, not the head's outputs (the supplied "
            "valence takes precedence; store attribute valence_source = supplied)",
            loaded.name,
            out,
        )
    check_output_folder(out.parent)  # created (under the lock) by run_extraction
    if out.is_dir():
        raise StoreError(f"{out}: is a folder, expected a file name")
    plan = plan_extraction(loaded, stimulus_set, layers, resolved, runtime, valence=supplied)
    if plan.calibration is not None:  # int8: shards (and reruns) share the final store's cache
        plan = dataclasses.replace(plan, calibration_cache=int8_cache_beside(out))
    if runtime.executor == "ray":
        from object2brain.executors.extraction import extract_on_ray
        from object2brain.executors.pool import PoolSettings

        settings = PoolSettings(address=runtime.ray_address)
        return extract_on_ray(plan, out, overwrite=overwrite, settings=settings)
    return run_extraction(plan, out, overwrite=overwrite)


def _resolve(options: ExtractOptions | None, values: dict[str, Any]) -> ExtractOptions:
    """The options, as a :class:`StoreError` naming each option by its flag when invalid."""
    try:
        return resolve_options(ExtractOptions, options, **values)
    except OptionsError as exc:
        raise StoreError(f"extract: {as_flags(ExtractOptions, str(exc))}") from None
