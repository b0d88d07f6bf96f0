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


class RunConfig(_Strict):
    """A whole study (see module docstring)."""

    out: Path = Path("results")
    seed: Int = 0
    device: str = "auto"
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


def load_config(path: str | Path) -> tuple[RunConfig, Path]:
    """Read, validate and resolve a run config; returns it and its folder.

    Raises:
        ConfigError: naming the key path (``models.0.arch``) and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = load_yaml(path)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {describe_yaml_error(exc)}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of options at the top level")
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            f"{path}: " + "; ".join(describe_error(e) for e in exc.errors())
        ) from None
    base = path.resolve().parent
    config = _resolve_paths(config, base, path)
    _check_against_models(config, path)
    return config, base


def _resolve_paths(config: RunConfig, base: Path, source: Path) -> RunConfig:
    def resolve(value: Path | None, key: str) -> Path | None:
        if value is None:
            return None
        full = value if value.is_absolute() else base / value
        if not full.exists():
            raise ConfigError(f"{source}: {key}: file not found: {full}")
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
        updates["dissect"] = config.dissect.model_copy(
            update={"groups": groups, "detector": detector}
        )
    return config.model_copy(update=updates)


def _check_against_models(config: RunConfig, source: Path) -> None:
    """What pydantic cannot see: layer names on their architectures, the dissect layer of every
    model, the detector, a valence head for dissection, the device; checked before any stage
    runs (architectures are built on the meta device: no memory, no weights)."""
    from object2brain.devices import resolve_device
    from object2brain.explain.detectors import (
        DETECTOR_KINDS,
        TORCHVISION_DETECTORS,
        given_boxes_file,
    )
    from object2brain.models.layers import resolve_layers
    from object2brain.models.zoo import build_architecture

    def fail(key: str, problem: object) -> ConfigError:
        return ConfigError(f"{source}: {key}: {problem}")

    networks = {m.label: build_architecture(m.arch, on_meta=True) for m in config.models}
    for index, model in enumerate(config.models):
        if model.layers != "all":
            try:
                resolve_layers(networks[model.label], model.layers, arch=model.arch)
            except Object2BrainError as exc:
                raise fail(f"models.{index}.layers", exc) from None
    dissect = config.dissect
    if dissect is not None:
        if isinstance(dissect.layer, dict):
            unknown = sorted(set(dissect.layer) - set(networks))
            if unknown:
                raise fail(
                    f"dissect.layer.{unknown[0]}",
                    f"no model named {unknown[0]!r} (models: {', '.join(networks)})",
                )
        for index, model in enumerate(config.models):
            try:
                layer = dissect.layer_for(model.label)
            except OptionsError as exc:  # names its key already
                raise ConfigError(f"{source}: {exc}") from None
            key = "dissect.layer" + (f".{model.label}" if isinstance(dissect.layer, dict) else "")
            try:
                resolve_layers(networks[model.label], [layer], arch=model.arch)
            except Object2BrainError as exc:
                raise fail(key, exc) from None
            if model.head is None and config.train_head is None:
                raise fail(
                    "dissect",
                    f"model {model.label!r} has no valence head to explain: give "
                    f"models.{index}.head or a train_head section",
                )
        _check_extracted(config, networks, fail)
        kind = dissect.detector.strip().lower()
        known = kind == "opencv" or kind in TORCHVISION_DETECTORS
        if given_boxes_file(kind) is None and not known:
            raise fail(
                "dissect.detector", f"unknown detector {kind!r}; use {', '.join(DETECTOR_KINDS)}"
            )
    try:
        resolve_device(config.device)
    except Object2BrainError as exc:
        raise fail("device", exc) from None


def _check_extracted(
    config: RunConfig, networks: dict[str, Any], fail: Callable[[str, object], ConfigError]
) -> None:
    """The lesions read the dissected layer from the activation store: with a ``lesion`` section,
    each model's dissect layer (and every ``lesion.layers`` entry, which must be that layer) has
    to be among the layers the study extracts (``models.N.layers``), or the study would fail at
    its last stage, after every other one has run."""
    from object2brain.models.layers import resolve_layers

    dissect, lesion = config.dissect, config.lesion
    if dissect is None or lesion is None:
        return
    for index, model in enumerate(config.models):
        layer = dissect.layer_for(model.label)
        key = "dissect.layer" + (f".{model.label}" if isinstance(dissect.layer, dict) else "")
        extracted = resolve_layers(networks[model.label], model.layers, arch=model.arch)
        if layer not in extracted:
            raise fail(
                key,
                f"layer {layer!r} of model {model.label!r} is dissected and lesioned but not "
                f"extracted: add it to models.{index}.layers (now: {listing(extracted)})",
            )
        others = [name for name in lesion.layers or [] if name != layer]
        if others:
            raise fail(
                "lesion.layers",
                f"{', '.join(others)}: only the dissected layer of model {model.label!r} "
                f"({layer!r}) has a filter assignment to lesion",
            )
