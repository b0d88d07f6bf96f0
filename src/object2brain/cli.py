"""Command-line interface: a thin typer shell over the Python API, one function per subcommand.

Errors caused by the user's input (:class:`~object2brain.errors.Object2BrainError`) are printed as
one line on stderr with exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from object2brain.errors import DataError, Object2BrainError
from object2brain.lesion.engine import NullKind
from object2brain.options import AmpDtype, DecodeMode, StorageDtype

app = typer.Typer(
    name="object2brain",
    help="Alignment of valence-appraising CNNs with human behaviour and fMRI (Object2Brain).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False, "quiet": False}

DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (weights=none, SRP, stats).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="No progress bars or info messages.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Output folder.")]
BrainOpt = Annotated[
    Path | None, typer.Option("--brain", help="Brain manifest (YAML) or patterns/RDMs .h5.")
]
RatingsOpt = Annotated[
    Path | None, typer.Option("--ratings", help="Ratings table: subject, stimulus_id, valence.")
]
RdmOpt = Annotated[str, typer.Option("--rdm", help="correlation | euclidean | cosine")]
CompareOpt = Annotated[str, typer.Option("--compare", help="spearman | pearson | kendall_tau_a")]


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


@app.command("extract")
def extract_command(
    model: Annotated[str, typer.Option("--model", help="Architecture name.")],
    stimuli: Annotated[Path, typer.Option("--stimuli", help="Stimulus table or image folder.")],
    out: Annotated[Path, typer.Option("--out", help="Activation store to write (.h5).")],
    weights: Annotated[
        str, typer.Option("--weights", help="default | enum name | checkpoint path | none")
    ] = "default",
    layers: Annotated[str, typer.Option("--layers", help="all | comma-separated names")] = "all",
    head: Annotated[
        Path | None, typer.Option("--head", help="Valence head (.safetensors): adds 'valence'.")
    ] = None,
    valence: Annotated[
        Path | None,
        typer.Option(
            "--valence",
            help="CSV (stimulus_id, predicted), e.g. train-head's out_of_fold.csv: stored as "
            "layer 'valence' instead of the head's outputs.",
        ),
    ] = None,
    dtype: Annotated[StorageDtype, typer.Option("--dtype", help="Storage precision.")] = "float32",
    srp: Annotated[
        int | None, typer.Option("--srp", min=1, help="Sparse random projection to DIM.")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", min=0, help="Image decoding workers (0: in the main process)."),
    ] = None,
    amp: Annotated[
        AmpDtype | None,
        typer.Option("--amp", help="Mixed precision on CUDA (stored as float32/--dtype)."),
    ] = None,
    channels_last: Annotated[
        bool, typer.Option("--channels-last", help="channels_last memory format (GPU speed).")
    ] = False,
    decode: Annotated[
        DecodeMode,
        typer.Option("--decode", help="pil | torch (plain JPEGs on the device) | auto."),
    ] = "pil",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing store.")
    ] = False,
    name: Annotated[
        str | None,
        typer.Option("--name", help="Model label in result tables (default: MODEL)."),
    ] = None,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Extract activations of MODEL for every stimulus into an HDF5 activation store."""
    from object2brain.api.extract import extract
    from object2brain.data.stimuli import load_stimuli
    from object2brain.models.zoo import load_model

    _quiet(quiet)
    stimulus_set = load_stimuli(stimuli)
    loaded = load_model(model, weights=weights, head=head, seed=seed, name=name)
    path = extract(
        loaded,
        stimulus_set,
        layers=layers,
        out=out,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        srp=srp,
        seed=seed,
        num_workers=workers,
        overwrite=overwrite,
        progress=not quiet,
        amp_dtype=amp,
        channels_last=channels_last,
        decode=decode,
        valence=valence,
    )
    typer.echo(f"wrote {path}")


@app.command("rsa")
def rsa_command(
    activations: Annotated[
        list[Path], typer.Option("--activations", help="Activation store(s) (.h5); repeatable.")
    ],
    out: OutOpt,
    brain: BrainOpt = None,
    ratings: RatingsOpt = None,
    stimuli: Annotated[
        Path | None, typer.Option("--stimuli", help="Stimulus table (condition, valence optional).")
    ] = None,
    rdm: RdmOpt = "correlation",
    compare: CompareOpt = "spearman",
    n_perm: Annotated[int, typer.Option("--n-perm", min=0, help="Permutations.")] = 10_000,
    n_boot: Annotated[int, typer.Option("--n-boot", min=0, help="Bootstrap resamples.")] = 1_000,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    held_out: Annotated[
        Path | None,
        typer.Option(
            "--held-out",
            help="Split file (train-head's split.csv): predicted vs rated valence on its test "
            "stimuli only, when the heads were trained on these stimuli.",
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Align every layer of every model with behaviour and brain ROIs (RSA)."""
    from object2brain.data.splits import held_out_ids
    from object2brain.rsa.align import run_alignment

    _quiet(quiet)
    behavior_ids = held_out_ids(held_out) if held_out is not None else None
    run_alignment(
        activations,
        brain=brain,
        ratings=ratings,
        stimuli=stimuli,
        out=out,
        rdm_metric=rdm,
        compare_method=compare,
        n_perm=n_perm,
        n_boot=n_boot,
        seed=seed,
        device=device,
        progress=not quiet,
        behavior_ids=behavior_ids,
    )
    typer.echo(f"wrote {out / 'alignment.csv'}")


@app.command("train-head")
def train_head_command(
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
    loss: Annotated[str, typer.Option("--loss", help="weighted_mse | mse")] = "weighted_mse",
    augment: Annotated[
        bool, typer.Option("--augment", help="Random crop + flip (disables the feature cache).")
    ] = False,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Maximum epochs.")] = 100,
    patience: Annotated[
        int, typer.Option("--patience", min=1, help="Early-stopping patience (epochs).")
    ] = 10,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Adam learning rate.")] = 1e-3,
    cross_fit: Annotated[
        int,
        typer.Option(
            "--cross-fit",
            min=0,
            help="K >= 2: also write out-of-fold predictions of K fold heads (out_of_fold.csv).",
        ),
    ] = 0,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Train a one-output valence head on frozen backbone(s): FindingEmo or a rated stimulus set."""
    from object2brain.heads.train import train_head

    _quiet(quiet)
    result = train_head(
        model,
        out=out,
        weights=weights or "default",
        findingemo=findingemo,
        image_root=image_root,
        stimuli=stimuli,
        split=split,
        loss=loss,  # type: ignore[arg-type]  # checked by train_head
        augment=augment,
        epochs=epochs,
        patience=patience,
        lr=lr,
        batch_size=batch_size,
        device=device,
        seed=seed,
        progress=not quiet,
        cross_fit=cross_fit,
    )
    if result.n_missing:
        typer.echo(f"skipped {result.n_missing} missing image(s): {result.missing_path}")
    for name, head in result.models.items():
        test = head.metrics["test"]
        scores = ", ".join(
            f"{key} {test[key]:.3f}" if test.get(key) is not None else f"{key} n/a"
            for key in ("spearman", "pearson", "r2")
        )
        typer.echo(f"{name}: test {scores} -> {head.head_path}")
        if head.out_of_fold_path is not None:
            oof = head.metrics["out_of_fold"]
            rho = "n/a" if oof.get("spearman") is None else f"{oof['spearman']:.3f}"
            typer.echo(
                f"{name}: out-of-fold spearman {rho} over {oof['n']} stimuli "
                f"-> {head.out_of_fold_path}"
            )


@app.command("dissect")
def dissect_command(
    model: Annotated[str, typer.Option("--model", help="Architecture name.")],
    layer: Annotated[str, typer.Option("--layer", help="Layer with spatial maps (dotted name).")],
    stimuli: Annotated[Path, typer.Option("--stimuli", help="Stimulus table or image folder.")],
    out: OutOpt,
    weights: Annotated[
        str, typer.Option("--weights", help="default | enum name | checkpoint path | none")
    ] = "default",
    head: Annotated[
        Path | None, typer.Option("--head", help="Valence head (.safetensors) to explain.")
    ] = None,
    detector: Annotated[
        str,
        typer.Option(
            "--detector", help="opencv | fasterrcnn | retinanet | fcos | ssdlite | boxes:FILE"
        ),
    ] = "opencv",
    groups: Annotated[
        Path | None, typer.Option("--groups", help="Class -> group map (YAML).")
    ] = None,
    direction: Annotated[
        str, typer.Option("--direction", help="positive | negative | abs")
    ] = "positive",
    target: Annotated[
        int | None,
        typer.Option(
            "--target", help="Output unit to explain without a head (e.g. ImageNet class)."
        ),
    ] = None,
    threshold: Annotated[
        float, typer.Option("--threshold", help="Minimum enrichment for an assignment.")
    ] = 1.5,
    min_images: Annotated[
        int, typer.Option("--min-images", min=1, help="Images a group must be detected in.")
    ] = 5,
    batch_size: BatchOpt = 16,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    decode: Annotated[
        DecodeMode,
        typer.Option("--decode", help="pil | torch (plain JPEGs on the device) | auto."),
    ] = "pil",
    quiet: QuietOpt = False,
) -> None:
    """Per-filter Grad-CAM x object detections: which object groups each filter attends to."""
    from object2brain.api.dissect import dissect

    _quiet(quiet)
    dissect(
        model,
        stimuli,
        layer=layer,
        weights=weights,
        head=head,
        detector=detector,
        groups=groups,
        direction=direction,
        target=target,
        threshold=threshold,
        min_images=min_images,
        out=out,
        batch_size=batch_size,
        device=device,
        seed=seed,
        decode=decode,
        progress=not quiet,
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
        f"{truth['ffa_top_lesion_group']} (delta r {truth['ffa_top_lesion_delta_r']:.3f})"
    )
    typer.echo(f"report: {report}")


@app.command("simulate")
def simulate_command(
    activations: Annotated[Path, typer.Option("--activations", help="Activation store (.h5).")],
    out: OutOpt,
    roi: Annotated[
        list[str],
        typer.Option(
            "--roi",
            help="NAME=SOURCE[;snr=X;voxels=N;gain.COND=G], SOURCE = layer:L | "
            "filters:L:k1,k2 | valence | condition:C. Repeat for several ROIs.",
        ),
    ],
    stimuli: Annotated[
        Path | None, typer.Option("--stimuli", help="Stimulus table (condition, valence).")
    ] = None,
    subjects: Annotated[int, typer.Option("--subjects", min=1, help="Simulated subjects.")] = 8,
    rating_noise: Annotated[
        float, typer.Option("--rating-noise", min=0.0, help="SD of each rater's noise.")
    ] = 1.0,
    continuous: Annotated[
        bool, typer.Option("--continuous", help="Keep ratings continuous (no -3..3 rounding).")
    ] = False,
    valence_source: Annotated[
        str | None,
        typer.Option("--valence-source", help="layer:L or valence, when the table has none."),
    ] = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Simulate ratings and ROI patterns with a planted truth from an activation store."""
    from object2brain.simulate import simulate

    _quiet(quiet)
    result = simulate(
        activations,
        roi,
        out=out,
        stimuli=stimuli,
        n_subjects=subjects,
        rating_noise=rating_noise,
        continuous_ratings=continuous,
        valence_source=valence_source,
        seed=seed,
    )
    typer.echo(
        f"wrote {result.patterns}, {result.brain_manifest}, {result.ratings}, {result.truth}"
    )


@app.command("lesion")
def lesion_command(
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
    layer: Annotated[
        list[str] | None, typer.Option("--layer", help="Layer(s) to analyse (default: all).")
    ] = None,
    group: Annotated[
        list[str] | None, typer.Option("--group", help="Restrict to these object groups.")
    ] = None,
    variant: Annotated[
        list[str] | None, typer.Option("--variant", help="lesion and/or keep (default both).")
    ] = None,
    rdm: RdmOpt = "correlation",
    compare: CompareOpt = "spearman",
    n_null: Annotated[int, typer.Option("--n-null", min=0, help="Random subsets.")] = 1000,
    null_subsets: Annotated[
        NullKind,
        typer.Option(
            "--null-subsets", help="random | matched (null subsets matched on filter norm)."
        ),
    ] = "random",
    n_perm: Annotated[
        int, typer.Option("--n-perm", min=0, help="Stimulus-label permutations (p_perm).")
    ] = 1000,
    propagate: Annotated[
        bool, typer.Option("--propagate", help="Zero the filters inside the forward pass.")
    ] = False,
    model: Annotated[
        str | None, typer.Option("--model", help="Architecture (for --propagate).")
    ] = None,
    weights: Annotated[str, typer.Option("--weights", help="Weights (for --propagate).")] = (
        "default"
    ),
    head: Annotated[
        Path | None, typer.Option("--head", help="Valence head (for --propagate).")
    ] = None,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Object2Brain: lesion / keep only each object group's filters and test the change in r."""
    from object2brain.lesion.analysis import run_lesion

    _quiet(quiet)
    loaded = None
    if propagate:
        from object2brain.models.zoo import load_model

        if model is None:
            raise typer.BadParameter("--propagate needs --model (and --weights, --head)")
        loaded = load_model(model, weights, head=head, seed=seed)
    result = run_lesion(
        activations,
        filters,
        brain=brain,
        ratings=ratings,
        stimuli=stimuli,
        out=out,
        layers=layer,
        groups=group,
        variants=tuple(variant or ("lesion", "keep")),  # type: ignore[arg-type]
        rdm_metric=rdm,
        compare_method=compare,
        n_null=n_null,
        n_perm=n_perm,
        seed=seed,
        device=device,
        propagate=propagate,
        model=loaded,
        null_subsets=null_subsets,
        batch_size=batch_size,
    )
    rows = len(result.object2brain)
    typer.echo(f"wrote {len(result.files)} files into {out} ({rows} rows in object2brain.csv)")


@app.command("run")
def run_command(
    config: Annotated[Path, typer.Argument(help="Study config (YAML).")],
    quiet: QuietOpt = False,
) -> None:
    """Run every stage of a study; finished stages are reused, an interrupted run resumes."""
    from object2brain.pipeline.run import run_study

    _quiet(quiet)
    result = run_study(config, progress=not quiet)
    ran, reused = ", ".join(result.ran) or "nothing", ", ".join(result.skipped) or "nothing"
    typer.echo(f"ran: {ran}; reused: {reused}")
    if result.report is not None:
        typer.echo(f"report: {result.report}")


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


# Options that take several values after one flag (DESIGN.md: `--activations a.h5 [b.h5 ...]`).
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


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; ``argv`` defaults to ``sys.argv[1:]``. Exits with the status."""
    try:
        # Without standalone mode typer *returns* an exit status instead of exiting, e.g. 130
        # when it caught Ctrl-C (KeyboardInterrupt) itself.
        status = app(
            args=expand_multi_value(sys.argv[1:] if argv is None else argv), standalone_mode=False
        )
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
        typer.echo("interrupted: rerun the same command to resume where it stopped", err=True)
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
    except Exception as exc:
        # Usage errors (typer's click exceptions) know how to show themselves.
        show, code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        raise


if __name__ == "__main__":
    main()
