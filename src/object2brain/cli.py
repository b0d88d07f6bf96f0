"""Command-line interface: a thin typer shell over the Python API, one function per subcommand.

A stage command's options are generated from the stage's options model
(:mod:`object2brain.options`): one ``--flag`` per field (the field name with dashes, or the
``cli`` name of its ``json_schema_extra``; ``None``: no flag), with the field's type, allowed
values, bounds, default and description; list fields are repeatable flags, booleans a pair
``--x/--no-x`` (so that one whose default is true can be turned off).
Each command declares only its inputs (files, model, weights, head, ...) itself, and shares
``--seed``, ``--device`` and ``--quiet`` (:class:`~object2brain.options.Runtime`).

Errors caused by the user's input (:class:`~object2brain.errors.Object2BrainError`) are printed as
one line on stderr with exit status 2; ``--debug`` shows the traceback instead. Stage code is
imported inside the commands only, so ``object2brain --help`` starts without torch.
"""

from __future__ import annotations

import inspect
import logging
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import annotated_types
import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from object2brain.errors import DataError, Object2BrainError
from object2brain.io import disk_error_reason
from object2brain.options import (
    DissectOptions,
    EncodeOptions,
    ExtractOptions,
    FetchOptions,
    LesionOptions,
    OptionsError,
    RsaOptions,
    Runtime,
    SimulateOptions,
    StageOptions,
    TrainHeadOptions,
    cli_flag,
)

app = typer.Typer(
    name="object2brain",
    help="Alignment of valence-appraising CNNs with human behaviour and fMRI (Object2Brain).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False, "quiet": False}

DeviceOpt = Annotated[
    str, typer.Option("--device", help=Runtime.model_fields["device"].description)
]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="No progress bars or info messages.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Output folder.")]
BrainOpt = Annotated[
    Path | None, typer.Option("--brain", help="Brain manifest (YAML) or patterns/RDMs .h5.")
]
RatingsOpt = Annotated[
    Path | None, typer.Option("--ratings", help="Ratings table: subject, stimulus_id, valence.")
]
WeightsOpt = Annotated[
    str, typer.Option("--weights", help="default | enum name | checkpoint path | none")
]


@app.callback()
def _main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def _quiet(quiet: bool) -> None:
    _state["quiet"] = quiet
    if quiet:
        logging.getLogger("object2brain").setLevel(logging.WARNING)


# --- options generated from the options models -------------------------------------------


def _cli_type(annotation: Any) -> Any:
    """The type typer parses a field as: ``X | None`` and ``Annotated[X, ...]`` become ``X``, a
    union of several types its first (``str | dict``: a string on the command line), a list a
    repeatable string option."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _cli_type(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        return _cli_type(members[0])
    if origin is list:  # typer lists hold plain types: the model checks allowed values
        return list[str]
    if origin is Literal:  # a string: the model names the vocabulary in its message
        return str
    return annotation


def _bounds(info: FieldInfo) -> dict[str, Any]:
    """``min``/``max`` of a numeric option from the field's constraints (open bounds are checked
    by the model)."""
    bounds: dict[str, Any] = {}
    for item in info.metadata:
        if isinstance(item, annotated_types.Ge | annotated_types.Gt):
            bounds["min"] = item.ge if isinstance(item, annotated_types.Ge) else item.gt
        elif isinstance(item, annotated_types.Le | annotated_types.Lt):
            bounds["max"] = item.le if isinstance(item, annotated_types.Le) else item.lt
    return bounds


def _parameter(name: str, info: FieldInfo, flag: str) -> inspect.Parameter:
    """One typer option for the field ``name``."""
    kind = _cli_type(info.annotation)
    help_text = info.description or ""
    default: Any
    if info.is_required():
        default = inspect.Parameter.empty
    elif info.default_factory is not None:
        default = None  # the model's default applies
        shown = info.default_factory()  # type: ignore[call-arg]
        help_text += f" (default: {', '.join(map(str, shown))})"
    else:
        default = info.default
    if (get_origin(kind) is list and default is not inspect.Parameter.empty) or (
        default is None and kind is not bool
    ):
        kind = kind | None
    bounds = _bounds(info) if kind in (int, float, int | None, float | None) else {}
    option = typer.Option(_switch(flag) if kind is bool else flag, help=help_text,
                          show_default=default is not None, **bounds)  # fmt: skip
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[kind, option], default=default
    )


def _switch(flag: str) -> str:
    """A boolean's flag as typer's on/off pair: ``--x`` -> ``--x/--no-x`` (a flag that names its
    pair already is kept)."""
    return flag if "/" in flag else f"{flag}/--no-{flag.removeprefix('--')}"


def _model_parameters(
    model: type[BaseModel], only: Sequence[str] | None = None
) -> list[inspect.Parameter]:
    """The typer options of every field of ``model`` that has a flag (``only``: these fields)."""
    parameters = []
    for name, info in model.model_fields.items():
        flag = cli_flag(model, name)
        if flag is not None and (only is None or name in only):
            parameters.append(_parameter(name, info, flag))
    return parameters


CommandT = TypeVar("CommandT", bound=Callable[..., None])


def stage_command(
    name: str,
    model: type[StageOptions],
    *,
    runtime: Sequence[str] = ("seed", "device"),
    group: typer.Typer | None = None,
) -> Callable[[CommandT], CommandT]:
    """Register ``function`` as the command ``name``: its own parameters (the inputs) plus the
    options of ``model``, the ``runtime`` fields and ``--quiet``. The function receives
    ``options`` (a validated ``model``) and ``runtime`` (:class:`Runtime`) instead of them.
    ``group``: the command group it belongs to (default: the top level)."""

    def register(function: CommandT) -> CommandT:
        own = [
            p
            for p in inspect.signature(function, eval_str=True).parameters.values()
            if p.name not in ("options", "runtime")
        ]
        generated = _model_parameters(model)
        shared = [*_model_parameters(Runtime, runtime), _QUIET]
        fields = [p.name for p in generated]

        def command(**values: Any) -> None:
            quiet = values.pop("quiet")
            _quiet(quiet)
            given = {k: values.pop(k) for k in fields}
            options = _validated(model, {k: v for k, v in given.items() if v is not None})
            settings = {k: values.pop(k) for k in runtime}
            runtime_values = {**settings, "progress": not quiet}
            function(**values, options=options, runtime=_validated(Runtime, runtime_values))

        parameters = [*own, *generated, *shared]
        command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        command.__doc__ = function.__doc__
        command.__name__ = function.__name__
        (app if group is None else group).command(name)(command)
        return function

    return register


ModelT = TypeVar("ModelT", bound=BaseModel)


def _validated(model: type[ModelT], values: dict[str, Any]) -> ModelT:
    """``values`` (the flags given) as ``model``; each problem names the flag and the value as
    typed on the command line (``--cross-fit 1: use 0 (off) or 2 or more folds``)."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = str(error["loc"][0]) if error["loc"] else ""
            flag = (cli_flag(model, name) if name in model.model_fields else None) or name
            label = f"{flag} {values[name]}" if name in values else flag
            problems.append(f"{label}: {str(error['msg']).removeprefix('Value error, ')}")
        raise OptionsError("; ".join(problems)) from None


_QUIET = inspect.Parameter(
    "quiet", inspect.Parameter.KEYWORD_ONLY, annotation=QuietOpt, default=False
)


def keywords(
    options: StageOptions, *, exclude: Sequence[str] = (), **renamed: str
) -> dict[str, Any]:
    """The options as the keyword arguments of the stage's API function (``renamed``: field ->
    keyword where they differ; ``exclude``: fields that are no keyword of it)."""
    values = options.model_dump(exclude=set(exclude))
    return {renamed.get(k, k): v for k, v in values.items()}


@app.command("models")
def models_command() -> None:
    """List the supported architectures and whether their weights are available offline."""
    from object2brain.models.zoo import list_models

    typer.echo(f"{'model':<22}{'default weights':<32}status")
    for info in list_models():
        typer.echo(f"{info.name:<22}{info.default_weights:<32}{info.status}")


@app.command("layers")
def layers_command(
    model: Annotated[str, typer.Argument(help="Architecture name, e.g. resnet18.")],
    all_modules: Annotated[
        bool, typer.Option("--all", help="List every dotted module name, not just canonical.")
    ] = False,
) -> None:
    """List the canonical analysis layers of MODEL (dotted module names, network order)."""
    from object2brain.models.layers import list_layers
    from object2brain.models.zoo import build_architecture

    module = build_architecture(model, on_meta=True)
    for layer in list_layers(module, arch=model, canonical=not all_modules):
        typer.echo(f"{layer.name:<28}{layer.kind:<12}{layer.module_type}")


#: The runtime flags of the stages that run on an executor (``--executor local|ray``).
DISTRIBUTED = ("seed", "device", "executor", "ray_address")


@stage_command("extract", ExtractOptions, runtime=DISTRIBUTED)
def extract_command(
    *,
    options: ExtractOptions,
    runtime: Runtime,
    model: Annotated[str, typer.Option("--model", help="Architecture name.")],
    stimuli: Annotated[Path, typer.Option("--stimuli", help="Stimulus table or image folder.")],
    out: Annotated[Path, typer.Option("--out", help="Activation store to write (.h5).")],
    weights: WeightsOpt = "default",
    layers: Annotated[str, typer.Option("--layers", help="all | comma-separated names")] = "all",
    head: Annotated[
        Path | None, typer.Option("--head", help="Valence head (.safetensors): adds 'valence'.")
    ] = None,
    valence: Annotated[
        Path | None,
        typer.Option(
            "--valence",
            help="CSV (stimulus_id, predicted), e.g. train-head's out_of_fold.csv: stored as "
            "layer 'valence' instead of the head's outputs (with --head: takes precedence, "
            "with a warning).",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing store.")
    ] = False,
    name: Annotated[
        str | None,
        typer.Option("--name", help="Model label in result tables (default: MODEL)."),
    ] = None,
) -> None:
    """Extract activations of MODEL for every stimulus into an HDF5 activation store."""
    from object2brain.api.extract import extract
    from object2brain.data.stimuli import load_stimuli
    from object2brain.models.zoo import load_model

    if runtime.executor == "ray":
        from object2brain.executors import require_ray

        require_ray()  # before the images are read
    stimulus_set = load_stimuli(stimuli)
    loaded = load_model(model, weights=weights, head=head, seed=runtime.seed, name=name)
    if head is not None and valence is not None:
        logging.getLogger("object2brain.cli").warning(
            "--valence and --head both given: layer 'valence' holds the values of %s, not the "
            "head's outputs (--valence takes precedence)",
            valence,
        )
    path = extract(
        loaded,
        stimulus_set,
        layers=layers,
        out=out,
        overwrite=overwrite,
        valence=valence,
        seed=runtime.seed,
        device=runtime.device,
        progress=runtime.progress,
        executor=runtime.executor,
        ray_address=runtime.ray_address,
        **keywords(options, amp="amp_dtype"),
    )
    typer.echo(f"wrote {path}")


@stage_command("rsa", RsaOptions, runtime=DISTRIBUTED)
def rsa_command(
    *,
    options: RsaOptions,
    runtime: Runtime,
    activations: Annotated[
        list[Path], typer.Option("--activations", help="Activation store(s) (.h5); repeatable.")
    ],
    out: OutOpt,
    brain: BrainOpt = None,
    ratings: RatingsOpt = None,
    stimuli: Annotated[
        Path | None, typer.Option("--stimuli", help="Stimulus table (condition, valence optional).")
    ] = None,
    held_out: Annotated[
        Path | None,
        typer.Option(
            "--held-out",
            help="Split file (train-head's split.csv): predicted vs rated valence on its test "
            "stimuli only, when the heads were trained on these stimuli.",
        ),
    ] = None,
) -> None:
    """Align every layer of every model with behaviour and brain ROIs (RSA)."""
    from object2brain.api.rsa import rsa
    from object2brain.data.splits import held_out_ids

    behavior_ids = held_out_ids(held_out) if held_out is not None else None
    rsa(
        activations,
        brain=brain,
        ratings=ratings,
        stimuli=stimuli,
        out=out,
        seed=runtime.seed,
        device=runtime.device,
        progress=runtime.progress,
        executor=runtime.executor,
        ray_address=runtime.ray_address,
        behavior_ids=behavior_ids,
        **keywords(options),
    )
    typer.echo(f"wrote {out / 'alignment.csv'}")


@stage_command("encode", EncodeOptions, runtime=DISTRIBUTED)
def encode_command(
    *,
    options: EncodeOptions,
    runtime: Runtime,
    activations: Annotated[
        list[Path], typer.Option("--activations", help="Activation store(s) (.h5), one per model.")
    ],
    out: OutOpt,
    brain: Annotated[
        Path | None,
        typer.Option("--brain", help="Brain manifest (YAML) or patterns .h5 (voxels; not RDMs)."),
    ] = None,
    ratings: Annotated[
        Path | None,
        typer.Option(
            "--ratings", help="Ratings table (subject, stimulus_id, valence): a voxel per rater."
        ),
    ] = None,
    stimuli: Annotated[
        Path | None, typer.Option("--stimuli", help="Stimulus table (condition optional).")
    ] = None,
    layers: Annotated[
        str, typer.Option("--layers", help="all | comma-separated layer names")
    ] = "all",
) -> None:
    """Encoding models: cross-validated ridge from every layer to every voxel (or rater)."""
    from object2brain.api.encode import encode

    chosen = None if layers.strip() == "all" else [x.strip() for x in layers.split(",") if x]
    result = encode(
        activations,
        brain=brain,
        ratings=ratings,
        stimuli=stimuli,
        out=out,
        options=options,
        seed=runtime.seed,
        device=runtime.device,
        progress=runtime.progress,
        executor=runtime.executor,
        ray_address=runtime.ray_address,
        layers=chosen,
    )
    typer.echo(
        f"wrote {len(result.files)} files into {out} ({len(result.encoding)} rows in encoding.csv)"
    )


@stage_command("train-head", TrainHeadOptions, runtime=DISTRIBUTED)
def train_head_command(
    *,
    options: TrainHeadOptions,
    runtime: Runtime,
    model: Annotated[
        list[str], typer.Option("--model", help="Architecture name; repeat for several models.")
    ],
    out: OutOpt,
    weights: Annotated[
        list[str] | None,
        typer.Option("--weights", help="default | enum | checkpoint | none; once, or per model."),
    ] = None,
    findingemo: Annotated[
        str | None,
        typer.Option("--findingemo", help="FindingEmo annotation file, or 'default' (package)."),
    ] = None,
    image_root: Annotated[
        Path | None, typer.Option("--image-root", help="Folder of the FindingEmo images.")
    ] = None,
    stimuli: Annotated[
        Path | None, typer.Option("--stimuli", help="Stimulus table with a valence column.")
    ] = None,
    split: Annotated[
        Path | None, typer.Option("--split", help="Reuse this split file (stimulus_id, split).")
    ] = None,
) -> None:
    """Train a one-output valence head on frozen backbone(s): FindingEmo or a rated stimulus set."""
    from object2brain.api.train_head import train_head

    result = train_head(
        model,
        out=out,
        weights=weights or "default",
        findingemo=findingemo,
        image_root=image_root,
        stimuli=stimuli,
        split=split,
        device=runtime.device,
        seed=runtime.seed,
        progress=runtime.progress,
        executor=runtime.executor,
        ray_address=runtime.ray_address,
        **keywords(options, exclude=["ratings"]) | {"cross_fit": options.folds(in_study=False)},
    )
    if result.n_missing:
        typer.echo(f"skipped {result.n_missing} missing image(s): {result.missing_path}")
    for name, head in result.models.items():
        test = head.metrics["test"]
        scores = ", ".join(_metric(test, key) for key in ("spearman", "pearson", "r2"))
        typer.echo(f"{name}: test {scores} -> {head.head_path}")
        if head.out_of_fold_path is not None:
            oof = head.metrics["out_of_fold"]
            rho = _metric(oof, "spearman").removeprefix("spearman ")
            typer.echo(
                f"{name}: out-of-fold spearman {rho} over {oof['n']} stimuli "
                f"-> {head.out_of_fold_path}"
            )


def _metric(metrics: dict[str, Any], key: str) -> str:
    """``key 0.123``, or ``key n/a (why)`` / ``key -1.000 (why)`` with the metric's reason
    (:func:`~object2brain.heads.fit.regression_metrics`)."""
    value = metrics.get(key)
    shown = "n/a" if value is None else f"{value:.3f}"
    why = metrics.get("reasons", {}).get(key)
    return f"{key} {shown}" + (f" ({why})" if why else "")


@stage_command("dissect", DissectOptions, runtime=DISTRIBUTED)
def dissect_command(
    *,
    options: DissectOptions,
    runtime: Runtime,
    model: Annotated[str, typer.Option("--model", help="Architecture name.")],
    stimuli: Annotated[Path, typer.Option("--stimuli", help="Stimulus table or image folder.")],
    out: OutOpt,
    weights: WeightsOpt = "default",
    head: Annotated[
        Path | None, typer.Option("--head", help="Valence head (.safetensors) to explain.")
    ] = None,
) -> None:
    """Per-filter Grad-CAM x object detections: which object groups each filter attends to."""
    from object2brain.api.dissect import dissect

    dissect(
        model,
        stimuli,
        weights=weights,
        head=head,
        out=out,
        device=runtime.device,
        seed=runtime.seed,
        progress=runtime.progress,
        executor=runtime.executor,
        ray_address=runtime.ray_address,
        **keywords(options, detection_cache="cache_dir"),
    )
    typer.echo(f"wrote {out / 'filter_objects.csv'}")


@app.command("demo")
def demo_command(
    out: OutOpt = Path("demo_out"),
    size: Annotated[
        str, typer.Option("--size", help="full (a few hundred images) | quick (for tests).")
    ] = "full",
    batch_size: BatchOpt = 16,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Run the embedded demo study: shipped photos, real EfficientNet-Lite0, simulated data."""
    from object2brain.demo import recovered_truth, run_demo

    _quiet(quiet)
    typer.echo(
        "object2brain demo: brain and rating data are SIMULATED (planted truth in truth.json)"
    )
    report = run_demo(out, size=size, batch_size=batch_size, device=device, progress=not quiet)
    truth = recovered_truth(Path(out) / "results")
    typer.echo(
        f"recovered: EVC best layer {truth['evc_best_layer']} "
        f"({truth['evc_best_layer_index'] + 1} of {truth['n_layers']}); largest FFA lesion effect: "
        f"{truth['ffa_top_lesion_group']} (delta r {truth['ffa_top_lesion_delta_r']:.3f}); "
        f"EVC best layer by encoding {truth['evc_encoding_best_layer']} "
        f"(r {truth['evc_encoding_best_r']:.3f})"
    )
    typer.echo(f"report: {report}")


@stage_command("simulate", SimulateOptions, runtime=("seed",))
def simulate_command(
    *,
    options: SimulateOptions,
    runtime: Runtime,
    activations: Annotated[Path, typer.Option("--activations", help="Activation store (.h5).")],
    out: OutOpt,
    stimuli: Annotated[
        Path | None, typer.Option("--stimuli", help="Stimulus table (condition, valence).")
    ] = None,
) -> None:
    """Simulate ratings and ROI patterns with a planted truth from an activation store."""
    from object2brain.api.simulate import simulate

    result = simulate(
        activations,
        options.rois,
        out=out,
        stimuli=stimuli,
        seed=runtime.seed,
        **keywords(options, exclude=["rois"]),
    )
    typer.echo(
        f"wrote {result.patterns}, {result.brain_manifest}, {result.ratings}, {result.truth}"
    )


@stage_command("lesion", LesionOptions, runtime=DISTRIBUTED)
def lesion_command(
    *,
    options: LesionOptions,
    runtime: Runtime,
    activations: Annotated[
        list[Path], typer.Option("--activations", help="Activation store(s), one per model.")
    ],
    filters: Annotated[
        Path, typer.Option("--filters", help="filter_objects table from `dissect`.")
    ],
    out: OutOpt,
    brain: BrainOpt = None,
    ratings: RatingsOpt = None,
    stimuli: Annotated[
        Path | None, typer.Option("--stimuli", help="Stimulus table (conditions; images).")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Architecture (for --propagate).")
    ] = None,
    weights: Annotated[str, typer.Option("--weights", help="Weights (for --propagate).")] = (
        "default"
    ),
    head: Annotated[
        Path | None, typer.Option("--head", help="Valence head (for --propagate).")
    ] = None,
) -> None:
    """Object2Brain: lesion / keep only each object group's filters and test the change in r."""
    from object2brain.api.lesion import lesion

    loaded = None
    if options.propagate:
        from object2brain.models.zoo import load_model

        if model is None:
            raise typer.BadParameter("--propagate needs --model (and --weights, --head)")
        loaded = load_model(model, weights, head=head, seed=runtime.seed)
    result = lesion(
        activations,
        filters,
        brain=brain,
        ratings=ratings,
        stimuli=stimuli,
        out=out,
        seed=runtime.seed,
        device=runtime.device,
        executor=runtime.executor,
        ray_address=runtime.ray_address,
        model=loaded,
        **keywords(options),
    )
    rows = len(result.object2brain)
    typer.echo(f"wrote {len(result.files)} files into {out} ({rows} rows in object2brain.csv)")


findingemo_app = typer.Typer(
    help="FindingEmo: the image set of the valence heads (published as URLs only).",
    no_args_is_help=True,
)
app.add_typer(findingemo_app, name="findingemo")


@stage_command("fetch", FetchOptions, runtime=(), group=findingemo_app)
def findingemo_fetch_command(
    out: Annotated[Path, typer.Option("--out", help="Image root to fetch into (resumable).")],
    urls: Annotated[
        Path | None, typer.Option("--urls", help="URL list (JSON records rel_path, idx_url, url).")
    ] = None,
    annotations: Annotated[
        Path | None, typer.Option("--annotations", help="Annotation file whose images are fetched.")
    ] = None,
    *,
    options: FetchOptions,
    runtime: Runtime,
) -> None:
    """Download every FindingEmo image of the annotation file (default: the findingemo-light
    package's) into OUT, trying each image's alternative URLs; a rerun fetches only what is
    missing or damaged."""
    from object2brain.data.fetch import fetch_findingemo

    result = fetch_findingemo(
        out, urls=urls, annotations=annotations, options=options, progress=runtime.progress
    )
    typer.echo(f"findingemo fetch: {result.summary()}")


@app.command("run")
def run_command(
    config: Annotated[Path, typer.Argument(help="Study config (YAML).")],
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Check the study (every problem at once, exit 2 if any) and print which "
            "stages would run and why; writes nothing.",
        ),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Run every stage of a study; finished stages are reused, an interrupted run resumes."""
    _quiet(quiet)
    if dry_run:
        _dry_run(config)
        return
    from object2brain.pipeline.run import run_study

    result = run_study(config, progress=not quiet)
    ran, reused = ", ".join(result.ran) or "nothing", ", ".join(result.skipped) or "nothing"
    typer.echo(f"ran: {ran}; reused: {reused}")
    for name, seconds in result.timings.items():
        typer.echo(f"  {name}: {seconds:.1f} s" + ("" if name in result.ran else " (reused)"))
    if result.report is not None:
        typer.echo(f"report: {result.report}")


@app.command("export-rsatoolbox")
def export_rsatoolbox_command(
    rsa_dir: Annotated[Path, typer.Argument(help="rsa output folder (with rdms.h5) or rdms.h5.")],
    out: Annotated[Path, typer.Argument(help="File to write (rsatoolbox HDF5, e.g. rdms.hdf5).")],
    kind: Annotated[
        str | None,
        typer.Option("--kind", help="model | brain | behaviour: only those RDMs (default: all)."),
    ] = None,
) -> None:
    """Write an analysis' RDMs in rsatoolbox's own format (rsatoolbox.rdm.load_rdm reads it)."""
    from object2brain.api.rdms import export_rsatoolbox

    typer.echo(f"rsatoolbox RDMs: {export_rsatoolbox(rsa_dir, out, kind=kind)}")


def _dry_run(config: Path) -> None:
    """``run --dry-run``: every problem (exit 2), else the stage plan."""
    from object2brain.pipeline.plan import dry_run

    checked = dry_run(config)
    if not checked.ok:
        typer.echo(f"error: {config}: {len(checked.problems)} problem(s):", err=True)
        for problem in checked.problems:
            typer.echo(f"  - {problem}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{config}: valid; stages in run order:")
    for line in checked.lines():
        typer.echo(f"  {line}")


@app.command("report")
def report_command(
    folder: Annotated[Path, typer.Argument(help="Results folder (tables, figures).")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Folder for report.html (default: FOLDER); a path ending in .html names the file.",
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Write one self-contained HTML report of the results under FOLDER."""
    from object2brain.report.build import build_report

    _quiet(quiet)
    if out is not None and out.suffix.lower() not in (".html", ".htm"):
        if out.exists() and not out.is_dir():
            raise DataError(f"{out}: --out names a folder (or a file ending in .html)")
        out.mkdir(parents=True, exist_ok=True)
        out = out / "report.html"
    typer.echo(f"report: {build_report(folder, out=out)}")


# Options that take several values after one flag: `--activations a.h5 [b.h5 ...]`.
MULTI_VALUE_OPTIONS = frozenset({"--activations"})


def expand_multi_value(argv: list[str]) -> list[str]:
    """``--activations a b`` -> ``--activations a --activations b`` (typer repeats the flag)."""
    out: list[str] = []
    flag: str | None = None
    for token in argv:
        if token.startswith("-"):
            flag = token if token in MULTI_VALUE_OPTIONS else None
            out.append(token)
        elif flag is not None and out[-1] != flag:
            out += [flag, token]
        else:
            out.append(token)
    return out


#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130


#: What rerunning an interrupted command does (Ctrl-C message), by command.
_ON_RERUN = {
    "extract": "rerun the same command to resume from the last written batch",
    "run": "rerun the same command to resume: finished stages are not run again",
    "dissect": (
        "the output folder is unchanged; rerun the same command to start again (detections "
        "already made are cached and reused)"
    ),
    "rsa": "the output folder is unchanged; rsa does not resume: rerun it to start again",
    "lesion": "the output folder is unchanged; lesion does not resume: rerun it to start again",
    "train-head": "the output folder is unchanged; rerun the same command to start again",
}


def interrupted_message(args: Sequence[str]) -> str:
    """The Ctrl-C line of the command in ``args``: whether rerunning it resumes or restarts."""
    command = next((a for a in args if not a.startswith("-")), "")
    return "interrupted: " + _ON_RERUN.get(command, "rerun the same command to start again")


def _exit_if_disk_full(exc: OSError) -> None:
    """A write that failed for lack of room (not caught where it happened): one line, exit 2."""
    reason = disk_error_reason(exc)
    if reason is None or _state["debug"]:
        return
    where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
    typer.echo(f"error: {where}cannot write: {reason}; free space and rerun", err=True)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; ``argv`` defaults to ``sys.argv[1:]``. Exits with the status.

    Errors of the user's input or environment are one line on stderr and exit status 2: an
    :class:`Object2BrainError`, and a write that failed for lack of room (``No space left on
    device``) wherever it happened; Ctrl-C says whether rerunning resumes or restarts (130).
    """
    args = expand_multi_value(sys.argv[1:] if argv is None else argv)
    try:
        # Without standalone mode typer *returns* an exit status instead of exiting, e.g. 130
        # when it caught Ctrl-C (KeyboardInterrupt) itself.
        status = app(args=args, standalone_mode=False)
        if status == INTERRUPTED:
            raise KeyboardInterrupt
        if isinstance(status, int) and status != 0:
            sys.exit(status)
    except Object2BrainError as exc:
        if _state["debug"]:
            raise
        # one line, even where the cause quotes a multi-line message (PyYAML, torch.load)
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo(interrupted_message(args), err=True)
        sys.exit(INTERRUPTED)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort as exc:
        # click turns an EOFError raised anywhere (e.g. a truncated .gz read deep inside a
        # library) into a silent Abort: say what happened
        if isinstance(exc.__cause__, EOFError):
            if _state["debug"]:
                raise exc.__cause__ from None
            typer.echo(
                f"error: unexpected end of a file ({exc.__cause__ or 'EOFError'}): an input file "
                "is truncated; rerun with --debug to see where",
                err=True,
            )
            sys.exit(2)
        sys.exit(1)
    except OSError as exc:
        _exit_if_disk_full(exc)
        raise
    except Exception as exc:
        # Usage errors (typer's click exceptions) know how to show themselves.
        show, code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        raise


if __name__ == "__main__":
    main()
