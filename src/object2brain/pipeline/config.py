"""Run configuration (YAML) for ``object2brain run``, validated with pydantic.

A study is one YAML file; paths are relative to the file's folder (``boxes:FILE`` detectors
too). Unknown keys, wrong types, missing files, unknown models, layers and detectors, a dissect
section without valence heads and an unavailable device are rejected before any stage runs, with
the path of the key at fault (``models.1.arch: unknown model 'resnet19' ...``). Example
(``examples/study.yaml``)::

    out: results
    seed: 0
    device: auto
    stimuli: stimuli.csv
    models:
      - arch: efficientnet_lite0
        weights: default
        head: heads/efficientnet_lite0/head.safetensors   # or train_head below
    brain: brain.yaml
    ratings: ratings.csv
    rsa: {rdm: correlation, compare: spearman, n_perm: 10000, n_boot: 1000}
    dissect: {layer: _blocks.15, detector: opencv}
    lesion: {variants: [lesion, keep], n_null: 1000, n_perm: 1000}
    encode: {folds: 5, n_perm: 1000, reduce: "srp:4096"}
    executor: {kind: ray, address: auto}   # optional; default local (results are the same)

Each stage section is that stage's options model (:mod:`object2brain.options`: the same names,
types, defaults and help as the command line); a missing optional section skips the stage. In a
study ``train_head.cross_fit`` defaults to 5 folds, and the lesions use the ``rsa`` section's RDM
metric and comparison unless the ``lesion`` section names its own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from object2brain.errors import Object2BrainError, listing
from object2brain.options import (
    DissectOptions,
    DuplicateRatings,
    EncodeOptions,
    ExecutorKind,
    ExtractOptions,
    Int,
    LesionOptions,
    OptionsError,
    RsaOptions,
    SimulateOptions,
    TrainHeadOptions,
    describe_error,
)
from object2brain.yaml_io import describe_yaml_error, load_yaml


class ConfigError(Object2BrainError):
    """A run configuration that cannot be used."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """One network: architecture, weights, optional valence head, layers to extract."""

    arch: str
    weights: str = "default"
    name: str | None = None
    head: Path | None = None
    layers: str | list[str] = "all"

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        from object2brain.models.zoo import SUPPORTED_MODELS

        if value.strip().lower() not in SUPPORTED_MODELS:
            raise ValueError(f"unknown model {value!r} (supported: {', '.join(SUPPORTED_MODELS)})")
        return value.strip().lower()

    @property
    def label(self) -> str:
        return self.name or self.arch


#: The keys (field name and alias) of the RDM metric and comparison in an ``rsa``/``lesion``
#: section: a study's lesions use the ``rsa`` section's unless their own section names one.
_SHARED_WITH_RSA = {
    "rdm_metric": ("rdm_metric", "rdm"),
    "compare_method": ("compare_method", "compare"),
}


class ExecutorConfig(_Strict):
    """Where the independent chunks of every stage run (``executor:`` section):
    ``kind`` local | ray, ``address`` of the Ray cluster (``auto``: the cluster of this
    machine; none: a local one started for the run)."""

    kind: ExecutorKind = "local"
    address: str | None = None


class RunConfig(_Strict):
    """A whole study (see module docstring)."""

    out: Path = Path("results")
    seed: Int = 0
    device: str = "auto"
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    stimuli: Path
    models: list[ModelConfig] = Field(min_length=1)
    brain: Path | None = None
    ratings: Path | None = None
    simulate: SimulateOptions | None = None
    extract: ExtractOptions = Field(default_factory=ExtractOptions)
    train_head: TrainHeadOptions | None = None
    rsa: RsaOptions | None = Field(default_factory=RsaOptions)
    dissect: DissectOptions | None = None
    lesion: LesionOptions | None = None
    encode: EncodeOptions | None = None
    report: bool = True

    @model_validator(mode="before")
    @classmethod
    def _lesion_metrics_from_rsa(cls, data: Any) -> Any:
        """A lesion section without its own RDM metric or comparison uses the rsa section's."""
        if not isinstance(data, dict):
            return data
        rsa, lesion = data.get("rsa"), data.get("lesion")
        if not isinstance(rsa, dict) or not isinstance(lesion, dict):
            return data
        lesion = dict(lesion)
        for field, keys in _SHARED_WITH_RSA.items():
            given = [rsa[key] for key in keys if key in rsa]
            if given and not any(key in lesion for key in keys):
                lesion[field] = given[0]
        return {**data, "lesion": lesion}

    @model_validator(mode="before")
    @classmethod
    def _duplicate_ratings_from_rsa(cls, data: Any) -> Any:
        """The lesion and encode sections read the ratings as rsa does unless they say."""
        if not isinstance(data, dict) or not isinstance(data.get("rsa"), dict):
            return data
        if "duplicate_ratings" not in data["rsa"]:
            return data
        updated = dict(data)
        for name in ("lesion", "encode"):
            section = data.get(name)
            if isinstance(section, dict) and "duplicate_ratings" not in section:
                updated[name] = {**section, "duplicate_ratings": data["rsa"]["duplicate_ratings"]}
        return updated

    def duplicate_ratings(self) -> DuplicateRatings:
        """How the study treats repeated ratings: the rsa section's choice (else encode's, else
        lesion's; default ``error``); a study's train-head reads the ratings with it."""
        for section in (self.rsa, self.encode, self.lesion):
            if section is not None:
                return section.duplicate_ratings
        return "error"

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        labels = [m.label for m in self.models]
        if len(set(labels)) != len(labels):
            raise ValueError(f"model names must be unique (give `name`): {', '.join(labels)}")
        if self.simulate is not None and (self.brain is not None or self.ratings is not None):
            raise ValueError("give either simulate or brain/ratings, not both")
        if self.lesion is not None and self.dissect is None:
            raise ValueError("lesion needs the dissect section (its filter assignment)")
        return self


_PATH_KEYS = ("stimuli", "brain", "ratings")
#: Rounds of leaving out the keys at fault to check the rest of a config (see check_config).
_PRUNE_ROUNDS = 6


def load_config(path: str | Path) -> tuple[RunConfig, Path]:
    """Read, validate and resolve a run config; returns it and its folder.

    Raises:
        ConfigError: naming every key path at fault (``models.0.arch: ...; rsa.n_perm: ...``).
    """
    config, base, problems = check_config(path)
    if problems or config is None:
        raise ConfigError(f"{path}: " + "; ".join(problems or ["not a valid config"]))
    return config, base


def check_config(path: str | Path) -> tuple[RunConfig | None, Path, list[str]]:
    """Every problem of a run config at once: the config (None when too broken to resolve),
    its folder, and the problems, each ``key.path: problem``.

    Keys (types, unknown keys, values), files, layers, detectors and the device are checked in
    one pass: a key at fault is left out (a whole model entry for a problem inside it, a whole
    section when a required key is missing) and the rest is checked as if it were absent.
    """
    path = Path(path)
    base = path.resolve().parent
    if not path.is_file():
        return None, base, ["config file not found"]
    try:
        raw = load_yaml(path)
    except yaml.YAMLError as exc:
        return None, base, [f"not valid YAML: {describe_yaml_error(exc)}"]
    except UnicodeDecodeError as exc:
        return None, base, [f"not a UTF-8 text file ({exc.reason} at byte {exc.start})"]
    if not isinstance(raw, dict):
        return None, base, ["expected a mapping of options at the top level"]
    config, problems = _validate_leniently(raw)
    if config is None:
        return None, base, problems
    config = _resolve_paths(config, base, problems)
    _check_against_models(config, problems)
    return config, base, list(dict.fromkeys(problems))


def _validate_leniently(raw: dict[str, Any]) -> tuple[RunConfig | None, list[str]]:
    """Validate ``raw``; on errors, record them, leave out the keys at fault and validate the
    rest again (so later checks still see every valid key)."""
    import copy

    problems: list[str] = []
    data = copy.deepcopy(raw)
    for _ in range(_PRUNE_ROUNDS):
        try:
            return RunConfig.model_validate(data), problems
        except ValidationError as exc:
            errors = exc.errors()
            problems += [describe_error(e) for e in errors if describe_error(e) not in problems]
            pruned = False
            for error in sorted(errors, key=lambda e: [str(p) for p in e["loc"]], reverse=True):
                pruned |= _prune(data, tuple(error["loc"]), error["type"] == "missing")
            if not pruned:
                break
    return None, problems


def _prune(data: dict[str, Any], loc: tuple[Any, ...], missing: bool) -> bool:
    """Leave out what ``loc`` points at: a model entry as a whole, a section whose required
    key is missing as a whole, else the deepest key of ``loc`` present. False: nothing to
    leave out (a problem of the top level or of a required top-level key)."""
    if not loc or (len(loc) == 1 and loc[0] in ("stimuli", "models")):
        return False
    if loc[0] == "models" and len(loc) >= 2 and isinstance(data.get("models"), list):
        index = loc[1]
        if isinstance(index, int) and 0 <= index < len(data["models"]):
            del data["models"][index]
            return True
        return False
    node: Any = data
    trail: list[tuple[Any, Any]] = []
    for key in loc:
        present = (isinstance(node, dict) and key in node) or (
            isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node)
        )
        if not present:
            break
        trail.append((node, key))
        node = node[key]
    if missing and trail:  # a section without a required key: leave the section out
        trail = trail[:1]
    if not trail:
        return False
    parent, key = trail[-1]
    if isinstance(parent, dict) and len(trail) == 1 and key in ("stimuli", "models"):
        return False
    del parent[key]
    return True


def _resolve_paths(config: RunConfig, base: Path, problems: list[str]) -> RunConfig:
    def resolve(value: Path | None, key: str) -> Path | None:
        if value is None:
            return None
        full = value if value.is_absolute() else base / value
        if not full.exists():
            problems.append(f"{key}: file not found: {full}")
        return full

    updates: dict[str, Any] = {key: resolve(getattr(config, key), key) for key in _PATH_KEYS}
    updates["out"] = config.out if config.out.is_absolute() else base / config.out
    models = []
    for index, model in enumerate(config.models):
        head = resolve(model.head, f"models.{index}.head")
        weights = model.weights
        if weights.lower() not in ("default", "none") and (
            "/" in weights or weights.endswith((".pth", ".pt", ".tar"))
        ):
            weights = str(resolve(Path(weights), f"models.{index}.weights"))
        models.append(model.model_copy(update={"head": head, "weights": weights}))
    updates["models"] = models
    if config.dissect is not None:
        from object2brain.explain.detectors import given_boxes_file

        detector = config.dissect.detector.strip()
        boxes_file = given_boxes_file(detector)
        if boxes_file is not None:
            detector = f"boxes:{resolve(Path(boxes_file), 'dissect.detector')}"
        groups = resolve(config.dissect.groups, "dissect.groups")
        cache = config.dissect.detection_cache  # a folder made when needed: not checked
        if cache is not None and not cache.expanduser().is_absolute():
            cache = base / cache
        updates["dissect"] = config.dissect.model_copy(
            update={"groups": groups, "detector": detector, "detection_cache": cache}
        )
    return config.model_copy(update=updates)


def _check_against_models(config: RunConfig, problems: list[str]) -> None:
    """What pydantic cannot see: layer names on their architectures, the dissect layer of every
    model, the detector, a valence head for dissection, the device; checked before any stage
    runs (architectures are built on the meta device: no memory, no weights). Every problem is
    appended to ``problems``."""
    from object2brain.devices import resolve_device
    from object2brain.explain.detectors import (
        DETECTOR_KINDS,
        TORCHVISION_DETECTORS,
        given_boxes_file,
    )
    from object2brain.models.layers import resolve_layers
    from object2brain.models.zoo import build_architecture

    def fail(key: str, problem: object) -> None:
        problems.append(f"{key}: {problem}")

    networks = {m.label: build_architecture(m.arch, on_meta=True) for m in config.models}
    layered: set[str] = set()  # models whose layers resolve
    for index, model in enumerate(config.models):
        try:
            resolve_layers(networks[model.label], model.layers, arch=model.arch)
            layered.add(model.label)
        except Object2BrainError as exc:
            fail(f"models.{index}.layers", exc)
    dissect = config.dissect
    if dissect is not None:
        _check_dissect(config, networks, fail)
        _check_extracted(config, networks, layered, fail)
        kind = dissect.detector.strip().lower()
        known = kind == "opencv" or kind in TORCHVISION_DETECTORS
        if given_boxes_file(kind) is None and not known:
            fail("dissect.detector", f"unknown detector {kind!r}; use {', '.join(DETECTOR_KINDS)}")
    try:
        resolve_device(config.device)
    except Object2BrainError as exc:
        fail("device", exc)
    if config.executor.kind == "ray":
        from object2brain.executors import require_ray

        try:
            require_ray()
        except Object2BrainError as exc:
            fail("executor.kind", exc)


def _check_dissect(
    config: RunConfig, networks: dict[str, Any], fail: Callable[[str, object], None]
) -> None:
    """The dissect layer of every model exists, and every model has a head to explain."""
    from object2brain.models.layers import resolve_layers

    dissect = config.dissect
    assert dissect is not None
    if isinstance(dissect.layer, dict):
        for unknown in sorted(set(dissect.layer) - set(networks)):
            fail(f"dissect.layer.{unknown}",
                 f"no model named {unknown!r} (models: {', '.join(networks)})")  # fmt: skip
    for index, model in enumerate(config.models):
        key = "dissect.layer" + (f".{model.label}" if isinstance(dissect.layer, dict) else "")
        try:
            layer = dissect.layer_for(model.label)
            resolve_layers(networks[model.label], [layer], arch=model.arch)
        except OptionsError as exc:  # names its key already
            problems_key, _, problem = str(exc).partition(": ")
            fail(problems_key, problem or exc)
        except Object2BrainError as exc:
            fail(key, exc)
        if model.head is None and config.train_head is None:
            fail(
                "dissect",
                f"model {model.label!r} has no valence head to explain: give "
                f"models.{index}.head or a train_head section",
            )


def _check_extracted(
    config: RunConfig,
    networks: dict[str, Any],
    layered: set[str],
    fail: Callable[[str, object], None],
) -> None:
    """The lesions read the dissected layer from the activation store: with a ``lesion`` section,
    each model's dissect layer (and every ``lesion.layers`` entry, which must be that layer) has
    to be among the layers the study extracts (``models.N.layers``), or the study would fail at
    its last stage, after every other one has run. Models whose layers do not resolve
    (``layered``: those that do) are left out."""
    from object2brain.models.layers import resolve_layers

    dissect, lesion = config.dissect, config.lesion
    if dissect is None or lesion is None:
        return
    for index, model in enumerate(config.models):
        if model.label not in layered:
            continue
        try:
            layer = dissect.layer_for(model.label)
        except OptionsError:
            continue  # reported by _check_dissect
        key = "dissect.layer" + (f".{model.label}" if isinstance(dissect.layer, dict) else "")
        extracted = resolve_layers(networks[model.label], model.layers, arch=model.arch)
        if layer not in extracted:
            fail(
                key,
                f"layer {layer!r} of model {model.label!r} is dissected and lesioned but not "
                f"extracted: add it to models.{index}.layers (now: {listing(extracted)})",
            )
        others = [name for name in lesion.layers or [] if name != layer]
        if others:
            fail(
                "lesion.layers",
                f"{', '.join(others)}: only the dissected layer of model {model.label!r} "
                f"({layer!r}) has a filter assignment to lesion",
            )
