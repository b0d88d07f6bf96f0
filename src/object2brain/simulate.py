r"""Synthetic behaviour and fMRI data with a planted ground truth.

From an activation store, :func:`simulate` (:func:`compute_simulation` in memory, then
:func:`write_simulation`) writes everything an alignment study needs, generated
so that the right answer is known:

- **ratings** (``ratings.csv``, long: ``subject, stimulus_id, valence``): every subject rates every
  stimulus as the true valence plus subject noise, :math:`v_{si} = v_i + \epsilon_{si}`,
  :math:`\epsilon_{si} \sim N(0, \sigma^2)`, rounded to the integer scale -3..3 unless
  ``continuous_ratings``;
- **brain patterns** (``patterns.h5``: ``/stimulus_ids``, ``/<subject>/<roi>`` of shape
  ``(n_stimuli, n_voxels)``, root attribute ``kind = patterns``) and a brain manifest
  (``brain.yaml``): each ROI is a random linear map of a chosen *source* plus noise,

  .. math:: Y_s = g \odot (F W_s) + E_s, \qquad W_s \sim N(0, 1/p), \quad
            E_s \sim N(0, \operatorname{var}(F W_s) / \mathrm{SNR}),

  with a fresh map :math:`W_s` and noise :math:`E_s` per subject, :math:`F` the source features
  ``(n_stimuli, p)`` z-scored per feature, and :math:`g` an optional per-condition gain on the
  signal (e.g. a valence ROI that responds less in incongruent scenes);
- ``truth.json``: the true valence, every ROI's source, SNR and gains, and the seed.

Sources (:class:`RoiSpec.source`):

- ``layer:<name>``: the layer's activations, flattened;
- ``filters:<layer>:<k1,k2,...>``: only those filters (channel axis 1) of the layer;
- ``valence``: the true valence; ``condition:<name>``: the indicator of one condition.
  A scalar source is expanded into a population code of ``n_basis`` Gaussian tuning curves
  evenly spaced over its range (width = spacing) before the random map, so that pattern
  dissimilarity grows with :math:`|v_i - v_j|` as in a real tuned population.

The true valence comes from the stimulus table's ``valence`` column when present (a finite number
for every stimulus, else a :class:`DataError` naming the ids; an entirely empty column counts as
absent, with a warning), else from a
random projection of a layer (``valence_source = "layer:<name>"``) or from the store's predicted
``valence`` layer (``valence_source = "valence"``), scaled to mean 0 and standard deviation 1.5 and
clipped to [-3, 3].
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import yaml

from object2brain.activations.store import ActivationStore
from object2brain.data.stimuli import StimulusSet, load_stimuli
from object2brain.errors import DataError, listing
from object2brain.io import atomic_path, check_output_folder, staged_output, write_json
from object2brain.manifest import build_manifest, cached_file_sha256
from object2brain.options import SimulateOptions

RATING_RANGE = (-3.0, 3.0)

log = logging.getLogger(__name__)


class RoiSpecError(DataError):
    """An invalid ROI spec: ``<where>: <problem>; <problem>``, the problems kept in ``problems``."""

    def __init__(self, where: str, problems: list[str]) -> None:
        super().__init__(f"{where}: " + "; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class RoiSpec:
    """One simulated ROI.

    Attributes:
        name: ROI name (the HDF5 dataset name).
        source: ``layer:<name>`` | ``filters:<layer>:<k1,k2,...>`` | ``valence`` |
            ``condition:<name>`` (see module docstring).
        snr: signal variance / noise variance per voxel.
        n_voxels: voxels per subject.
        condition_gain: multiplies the signal of the stimuli of a condition (default 1).
    """

    name: str
    source: str
    snr: float = 1.0
    n_voxels: int = 200
    condition_gain: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise RoiSpecError(f"ROI {self.name!r}", problems)

    def problems(self) -> list[str]:
        """What is wrong with this spec's name and numeric options (empty if valid).

        The name must be non-empty, without ``/`` and not ``.`` (it becomes an HDF5 dataset name
        under ``/<subject>/``); ``snr`` must be finite and > 0, ``voxels`` an integer >= 1, each
        gain finite and >= 0 with a condition name. The source is checked against the store by
        :func:`simulate`.
        """
        problems = []
        if not self.name.strip():
            problems.append("the ROI name is empty")
        elif "/" in self.name or self.name == ".":
            problems.append(
                "ROI names cannot contain '/' or be '.' (the patterns file is /<subject>/<roi>)"
            )
        if not self.source.strip():
            problems.append("the source is empty")
        if isinstance(self.snr, bool) or not isinstance(self.snr, int | float):
            problems.append(f"snr must be a number, got {self.snr!r}")
        elif not (math.isfinite(self.snr) and self.snr > 0):
            problems.append(f"snr must be a finite number > 0, got {self.snr}")
        if isinstance(self.n_voxels, bool) or not isinstance(self.n_voxels, int | np.integer):
            problems.append(f"voxels must be an integer, got {self.n_voxels!r}")
        elif self.n_voxels < 1:
            problems.append(f"voxels must be at least 1, got {self.n_voxels}")
        for condition, gain in self.condition_gain.items():
            if not str(condition).strip():
                problems.append("a gain needs a condition name: gain.COND=G")
            if isinstance(gain, bool) or not isinstance(gain, int | float):
                problems.append(f"gain.{condition} must be a number, got {gain!r}")
            elif not (math.isfinite(gain) and gain >= 0):
                problems.append(f"gain.{condition} must be a finite number >= 0, got {gain}")
        return problems

    @classmethod
    def parse(cls, text: str) -> RoiSpec:
        """Parse ``NAME=SOURCE[;snr=X][;voxels=N][;gain.COND=G]``.

        Example: ``FFA=filters:layer4:3,17;snr=2``. Raises :class:`DataError` naming the spec for
        a bad syntax, option or value (see :meth:`problems`).
        """
        if "=" not in text:
            raise DataError(f"ROI spec {text!r}: expected NAME=SOURCE[;snr=X;voxels=N;gain.COND=G]")
        name, rest = text.split("=", 1)
        parts = rest.split(";")
        options: dict[str, Any] = {"condition_gain": {}}
        for part in parts[1:]:
            key, _, value = part.partition("=")
            key = key.strip()
            try:
                if key == "snr":
                    options["snr"] = float(value)
                elif key == "voxels":
                    options["n_voxels"] = int(value)
                elif key.startswith("gain."):
                    options["condition_gain"][key[5:].strip()] = float(value)
                else:
                    raise DataError(f"ROI spec {text!r}: unknown option {key!r}")
            except ValueError:
                raise DataError(f"ROI spec {text!r}: bad value for {key!r}: {value!r}") from None
        try:
            return cls(name=name.strip(), source=parts[0].strip(), **options)
        except RoiSpecError as exc:
            raise RoiSpecError(f"ROI spec {text!r}", exc.problems) from None


@dataclass
class SimulationResult:
    """Paths of the simulated data and the planted truth."""

    patterns: Path
    brain_manifest: Path
    ratings: Path
    truth: Path
    true_valence: np.ndarray
    stimulus_ids: list[str]


@dataclass(frozen=True)
class Simulation:
    """Simulated data in memory (what :func:`write_simulation` writes).

    Attributes:
        stimulus_ids: the store's stimulus ids, ``(n,)``.
        specs: the ROIs simulated.
        true_valence: the planted valence ``(n,)``, in [-3, 3].
        valence_origin: where it came from (``stimulus table``, ``layer:<name>``, ``valence``).
        patterns: ``{subject: {roi: (n, voxels) float array}}``, subjects ``sub-01``, ...
        ratings: long table ``subject, stimulus_id, valence``.
        options: the options simulated with (``rois``: the ROI names; their specs in
            ``specs``); ``seed``, ``n_basis``: as given.
        activations: the source store.
    """

    stimulus_ids: list[str]
    specs: list[RoiSpec]
    true_valence: np.ndarray
    valence_origin: str
    patterns: dict[str, dict[str, np.ndarray]]
    ratings: pd.DataFrame
    options: SimulateOptions
    seed: int
    n_basis: int
    activations: Path


def simulate(
    activations: str | Path,
    rois: Sequence[RoiSpec | str],
    *,
    out: str | Path,
    stimuli: str | Path | StimulusSet | None = None,
    n_subjects: int = 8,
    rating_noise: float = 1.0,
    continuous_ratings: bool = False,
    valence_source: str | None = None,
    n_basis: int = 16,
    seed: int = 0,
    options: SimulateOptions | None = None,
) -> SimulationResult:
    """Write simulated ratings, ROI patterns, a brain manifest and ``truth.json`` into ``out``.

    Args:
        activations: activation store whose layers serve as sources.
        rois: ROI specs (objects or ``NAME=SOURCE;...`` strings).
        out: output folder.
        stimuli: stimulus table giving ``condition`` and (optionally) ``valence``; images are not
            opened. Default: the store's ids, no conditions.
        n_subjects: simulated subjects (raters and fMRI participants alike).
        rating_noise: standard deviation :math:`\\sigma` of each subject's rating noise.
        continuous_ratings: keep ratings continuous instead of rounding to -3..3.
        valence_source: where the true valence comes from when the table has none
            (``layer:<name>`` or ``valence``); default: the store's last layer.
        n_basis: tuning curves used to expand scalar sources.
        seed: seeds everything.
        options: the options as one :class:`~object2brain.options.SimulateOptions` (its ``rois``
            replace ``rois``, its fields the keywords above).

    Raises:
        DataError: a bad ROI spec (name, source or option), argument, stimulus table (ids,
            valence) or store content, naming what is at fault. Every check runs before ``out``
            is created, so a rejected call leaves no folder behind.
        StoreError: an unreadable activation store or an unusable ``out``.
    """
    if options is not None:
        rois, n_subjects, rating_noise = options.rois, options.n_subjects, options.rating_noise
        continuous_ratings, valence_source = options.continuous_ratings, options.valence_source
    specs = _check_arguments(rois, n_subjects, rating_noise, n_basis)
    options = SimulateOptions(
        rois=[spec.name for spec in specs],
        n_subjects=n_subjects,
        rating_noise=rating_noise,
        continuous_ratings=continuous_ratings,
        valence_source=valence_source,
    )
    out = Path(out)
    check_output_folder(out)
    # Everything that can fail on the user's input is checked before --out is created.
    with ActivationStore.open(activations) as store:
        table, where = _stimulus_table(stimuli, store.stimulus_ids)
        simulation = compute_simulation(
            store, specs, table, options, seed=seed, n_basis=n_basis, where=where
        )
    # Written into a temporary sibling folder swapped in whole, under the output lock: a kill or a
    # full disk leaves the previous set or the new one, never a mix.
    with staged_output(out) as staging:
        written = write_simulation(simulation, staging.folder)
    patterns, manifest, ratings, truth = staging.final(
        [written.patterns, written.brain_manifest, written.ratings, written.truth]
    )
    return SimulationResult(
        patterns, manifest, ratings, truth, written.true_valence, written.stimulus_ids
    )


def compute_simulation(
    store: ActivationStore,
    specs: list[RoiSpec],
    table: pd.DataFrame,
    options: SimulateOptions,
    *,
    seed: int,
    n_basis: int = 16,
    where: str = "stimulus table",
) -> Simulation:
    """Simulate every subject's ROI patterns and ratings from an open store (no file written).

    ``table`` holds the store's stimuli in its order (``condition`` and ``valence`` optional);
    ``where`` names it in messages. One generator seeded with ``seed`` draws, in this order, the
    valence projection (if any), each subject's ROI maps and noise, then the rating noise.
    """
    rng = np.random.default_rng(seed)
    ids = store.stimulus_ids
    conditions = table["condition"].astype(str).to_numpy() if "condition" in table else None
    valence, origin = _true_valence(store, table, where, options.valence_source, rng)
    sources = {spec.name: _source(store, spec, valence, conditions, n_basis) for spec in specs}
    gains = {spec.name: _gains(spec, conditions, len(ids)) for spec in specs}
    subjects = [_subject(s) for s in range(options.n_subjects)]
    patterns = {
        subject: {
            spec.name: _roi_patterns(sources[spec.name], spec, gains[spec.name], rng)
            for spec in specs
        }
        for subject in subjects
    }
    noise = rng.normal(0.0, options.rating_noise, size=(len(subjects), len(ids)))
    noisy = valence[None, :] + noise
    if not options.continuous_ratings:
        noisy = np.clip(np.rint(noisy), *RATING_RANGE)
    ratings = pd.DataFrame(
        {
            "subject": np.repeat(subjects, len(ids)),
            "stimulus_id": np.tile(ids, len(subjects)),
            "valence": noisy.reshape(-1),
        }
    )
    return Simulation(
        ids, specs, valence, origin, patterns, ratings, options, seed, n_basis, store.path
    )


def write_simulation(simulation: Simulation, out: Path) -> SimulationResult:
    """Write ``patterns.h5``, ``brain.yaml``, ``ratings.csv``, ``truth.json`` and
    ``manifest.json`` of ``simulation`` into the existing folder ``out``."""
    ids, specs, options = simulation.stimulus_ids, simulation.specs, simulation.options
    patterns_path = out / "patterns.h5"
    # Built in memory, then written as plain bytes: a full disk is one OSError of that write,
    # never HDF5's failed flushes (which crash the interpreter when the handles are freed).
    image = io.BytesIO()
    with h5py.File(image, "w") as handle:
        handle.attrs["kind"] = "patterns"
        handle.attrs["simulated"] = True
        handle["stimulus_ids"] = np.asarray(ids, dtype=object).astype(h5py.string_dtype())
        for subject, rois in simulation.patterns.items():
            group = handle.create_group(subject)
            for name, patterns in rois.items():
                group.create_dataset(name, data=patterns, fletcher32=True)  # damage detected
    with atomic_path(patterns_path) as temp:
        temp.write_bytes(image.getbuffer())

    manifest_path = out / "brain.yaml"
    with atomic_path(manifest_path) as temp:
        temp.write_text(yaml.safe_dump({"sources": [{"kind": "patterns", "path": "patterns.h5"}]}))

    ratings_path = out / "ratings.csv"
    with atomic_path(ratings_path) as temp:
        simulation.ratings.to_csv(temp, index=False)

    truth = {
        "simulated": True,
        "seed": simulation.seed,
        "n_subjects": options.n_subjects,
        "rating_noise": options.rating_noise,
        "continuous_ratings": options.continuous_ratings,
        "valence_origin": simulation.valence_origin,
        "true_valence": dict(zip(ids, simulation.true_valence.round(6).tolist(), strict=True)),
        "rois": [asdict(spec) for spec in specs],
        "activations": str(simulation.activations.resolve()),
    }
    truth_path = write_json(out / "truth.json", truth)
    write_json(
        out / "manifest.json",
        build_manifest(
            "simulate",
            {
                "rois": [asdict(s) for s in specs],
                "n_subjects": options.n_subjects,
                "n_basis": simulation.n_basis,
                "rating_noise": options.rating_noise,
                "valence_source": simulation.valence_origin,
            },
            seeds={"seed": simulation.seed},
            inputs={"activations": cached_file_sha256(simulation.activations)},
            outputs=[str(p) for p in (patterns_path, manifest_path, ratings_path, truth_path)],
        ),
    )
    return SimulationResult(
        patterns_path, manifest_path, ratings_path, truth_path, simulation.true_valence, ids
    )


def _check_arguments(
    rois: Sequence[RoiSpec | str], n_subjects: int, rating_noise: float, n_basis: int
) -> list[RoiSpec]:
    """The parsed ROI specs, after checking the arguments that need no file."""
    if n_subjects < 1:
        raise DataError(f"--subjects must be at least 1, got {n_subjects}")
    if not (math.isfinite(rating_noise) and rating_noise >= 0):
        raise DataError(f"--rating-noise must be a finite number >= 0, got {rating_noise}")
    if n_basis < 1:
        raise DataError(f"n_basis must be at least 1, got {n_basis}")
    if isinstance(rois, str):
        rois = [rois]
    if not rois:
        raise DataError("simulate needs at least one ROI (--roi NAME=SOURCE)")
    specs = [RoiSpec.parse(r) if isinstance(r, str) else r for r in rois]
    names = [spec.name for spec in specs]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise DataError(f"ROI names must be unique: {', '.join(duplicated)} given more than once")
    return specs


def _subject(index: int) -> str:
    return f"sub-{index + 1:02d}"


def _stimulus_table(
    stimuli: str | Path | StimulusSet | None, ids: list[str]
) -> tuple[pd.DataFrame, str]:
    """The stimulus table's rows for the store's ``ids`` (in that order) and its name for
    messages; a table of the ids alone when no table is given."""
    if stimuli is None:
        return pd.DataFrame({"stimulus_id": ids}), "activation store"
    stimulus_set = (
        stimuli if isinstance(stimuli, StimulusSet) else load_stimuli(stimuli, check="table")
    )
    where = str(stimulus_set.source) if stimulus_set.source is not None else "stimulus table"
    table = stimulus_set.table.set_index("stimulus_id")
    missing = [sid for sid in ids if sid not in table.index]
    if missing:
        raise DataError(
            f"{where}: {len(missing)} stimulus id(s) of the activation store are not in the "
            f"table: {listing(missing)}"
        )
    return table.loc[ids].reset_index(), where


def _table_valence(table: pd.DataFrame, where: str) -> np.ndarray | None:
    """The table's ``valence`` column as float64 ``(n,)``; ``None`` if it is absent or entirely
    empty (logged).

    Raises:
        DataError: naming the table and the stimulus ids (with their values) whose valence is
            non-numeric, missing or infinite while others have one.
    """
    if "valence" not in table:
        return None
    raw = table["valence"]
    blank = raw.isna() | (raw.astype(str).str.strip() == "")
    if blank.all():
        log.warning("%s: the valence column is empty; the true valence is simulated", where)
        return None
    numeric = pd.to_numeric(raw.where(~blank), errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(numeric))
    if bad.size:
        shown = [
            f"{table['stimulus_id'].iloc[i]} ({'missing' if blank.iloc[i] else repr(raw.iloc[i])})"
            for i in bad
        ]
        raise DataError(
            f"{where}: column valence: {bad.size} stimulus id(s) with a missing, non-numeric or "
            f"infinite valence: {listing(shown)} (give every stimulus a number, or leave the "
            "whole column empty to simulate the valence)"
        )
    return numeric


def _true_valence(
    store: ActivationStore,
    table: pd.DataFrame,
    where: str,
    source: str | None,
    rng: np.random.Generator,
) -> tuple[np.ndarray, str]:
    """The true valence ``(n,)`` and where it came from (see the module docstring)."""
    if source is None:
        given = _table_valence(table, where)
        if given is not None:
            return given, "stimulus table"
        layers = [name for name in store.layers if name != "valence"]
        if not layers:
            raise DataError(
                f"{store.path}: the store has no layer to draw the true valence from; give a "
                "valence column in the stimulus table or --valence-source valence"
            )
        source = f"layer:{layers[-1]}"
    if source == "valence":
        raw = store.read("valence").astype(np.float64).reshape(-1)
    elif source.startswith("layer:"):
        features = _zscore(store.read(source[6:]).reshape(len(store.stimulus_ids), -1))
        raw = features @ rng.normal(size=features.shape[1])
    else:
        raise DataError(f"valence source {source!r}: use layer:<name> or valence")
    if not np.isfinite(raw).all():
        raise DataError(f"valence source {source!r} has NaN or infinite values")
    spread = raw.std()
    if spread == 0:
        raise DataError(f"valence source {source!r} is constant across stimuli")
    return np.clip((raw - raw.mean()) / spread * 1.5, *RATING_RANGE), source


def _zscore(x: np.ndarray) -> np.ndarray:
    scaled: np.ndarray = x.astype(np.float64)  # one float64 copy, centred and scaled in place
    sd = scaled.std(axis=0)
    scaled -= scaled.mean(axis=0)
    scaled /= np.where(sd > 0, sd, 1.0)
    return scaled


def _population_code(values: np.ndarray, n_basis: int) -> np.ndarray:
    """Gaussian tuning curves ``(n, n_basis)`` evenly spaced over the range of ``values``."""
    low, high = float(values.min()), float(values.max())
    if high == low:
        raise DataError("a scalar ROI source is constant across stimuli")
    centres = np.linspace(low, high, n_basis)
    width = (high - low) / max(n_basis - 1, 1)
    return np.exp(-0.5 * ((values[:, None] - centres[None, :]) / width) ** 2)


def _source(
    store: ActivationStore,
    spec: RoiSpec,
    valence: np.ndarray,
    conditions: np.ndarray | None,
    n_basis: int,
) -> np.ndarray:
    n = len(valence)
    kind, _, rest = spec.source.partition(":")
    where = f"ROI {spec.name!r} source {spec.source!r}"
    if kind == "layer":
        if rest not in store.layers:
            raise DataError(f"{where}: no layer {rest!r} in the store ({', '.join(store.layers)})")
        return _zscore(store.read(rest).reshape(n, -1))
    if kind == "filters":
        layer, _, listing = rest.rpartition(":")
        if layer not in store.layers:
            raise DataError(f"{where}: no layer {layer!r} in the store")
        try:
            filters = [int(k) for k in listing.split(",") if k.strip()]
        except ValueError:
            raise DataError(
                f"{where}: filters must be integers, e.g. filters:layer4:3,17"
            ) from None
        shape = store.shape(layer)
        if len(shape) < 2 or not filters or max(filters) >= shape[1] or min(filters) < 0:
            raise DataError(f"{where}: layer {layer!r} of shape {shape[1:]} has no such filters")
        return _zscore(store.read(layer)[:, filters].reshape(n, -1))
    if kind == "valence":
        return _population_code(valence, n_basis)
    if kind == "condition":
        if conditions is None:
            raise DataError(f"{where}: the stimulus table has no condition column")
        if rest not in set(conditions):
            raise DataError(
                f"{where}: no condition {rest!r} ({', '.join(sorted(set(conditions)))})"
            )
        indicator = (conditions == rest).astype(np.float64)
        return np.stack([indicator, 1.0 - indicator], axis=1)
    raise DataError(
        f"{where}: use layer:<name>, filters:<layer>:<k,...>, valence or condition:<name>"
    )


def _gains(spec: RoiSpec, conditions: np.ndarray | None, n: int) -> np.ndarray:
    gain = np.ones(n)
    if spec.condition_gain:
        if conditions is None:
            raise DataError(f"ROI {spec.name!r}: condition gains need a condition column")
        for condition, value in spec.condition_gain.items():
            if condition not in set(conditions):
                raise DataError(f"ROI {spec.name!r}: no condition {condition!r} for its gain")
            gain[conditions == condition] = value
    return gain


def _roi_patterns(
    features: np.ndarray, spec: RoiSpec, gain: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    weights = rng.normal(
        0.0, 1.0 / np.sqrt(features.shape[1]), size=(features.shape[1], spec.n_voxels)
    )
    signal = (features @ weights) * gain[:, None]
    noise_sd = np.sqrt(signal.var(axis=0).mean() / spec.snr)
    patterns: np.ndarray = signal + rng.normal(0.0, noise_sd, size=signal.shape)
    return patterns.astype(np.float32)


def read_truth(folder: str | Path) -> dict[str, Any]:
    """The planted truth written by :func:`simulate`."""
    return dict(json.loads((Path(folder) / "truth.json").read_text()))
