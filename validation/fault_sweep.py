"""The outside tester's sweep: the command line run as a user runs it, through bad inputs and
faults, each outcome classified.

A tiny study is made in a temporary folder (16 noise images of 40 x 40 pixels, ``resnet18`` with
random weights, two layers, simulated ratings and ROI patterns, an RDM file, NIfTI betas, a
filter table, a valence head, a study config). Each case then runs ``object2brain ...`` in a
child process on a copy of one input made bad, or with a bad flag value, or under a fault (an
output locked by another run, a full disk, SIGINT / SIGKILL then a rerun), and is classified:

- **GOOD**: bad input -> exit 2, one line naming the culprit (the file, flag or key; a usage error
  of the command-line parser is click's short box whose ``Error:`` line names the flag), no
  traceback, nothing half-written in ``--out`` (absent if it was, byte-identical if it held an
  earlier result) and no temporary file left beside it; a case that must succeed (an explicit
  switch, a rerun after a kill) -> exit 0 with the expected result (a resumed store identical to
  a store that was never interrupted).
- **BAD**: anything else (a traceback, exit 0 on bad input, exit 1, a half-written or changed
  output, a stray temporary file, a message that does not name the culprit).

Run (about 10 minutes on 2 shared cores)::

    PYTHONPATH=src nice -n 10 python validation/fault_sweep.py            # all cases
    PYTHONPATH=src python validation/fault_sweep.py --reduced             # ~20 representative

Writes ``validation/fault_sweep_results.json`` and ``validation/fault_sweep_results.md`` (one row
per case: case, command, exit status, first line of the message, verdict) unless ``--no-write``.
``tests/faults/test_fault_sweep.py`` runs the reduced sweep.
"""

from __future__ import annotations

import argparse
import fcntl
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
from PIL import Image

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
CLI = "import sys; from object2brain.cli import main; main(sys.argv[1:])"
N = 16
LAYERS = "layer1,layer4"
TIMEOUT = 300.0
#: Names beside an output that only a run in progress (or a killed one) leaves.
TEMPORARY = (".stage-", ".old-", ".o2b-probe-", ".tmp")


def env() -> dict[str, str]:
    found = os.environ.copy()
    found["PYTHONPATH"] = str(SRC) + os.pathsep + found.get("PYTHONPATH", "")
    found.setdefault("OMP_NUM_THREADS", "2")
    return found


def child_cli(args: Sequence[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """``object2brain <args>`` in a child process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-c", CLI, *map(str, args)],
        capture_output=True, text=True, env=env(), timeout=timeout, check=False,
    )  # fmt: skip


def inprocess_cli(
    args: Sequence[str], timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """``object2brain <args>`` in this process (the reduced sweep of the tests: torch is
    imported once); an exception that escapes ``main`` is reported as its traceback, exit 1."""
    from object2brain.cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    code: int = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            cli_main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception:
            err.write(traceback.format_exc())
            code = 1
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


#: How commands run: a child process each (the sweep) or in this process (the tests).
RUNNER: dict[str, Callable[..., subprocess.CompletedProcess[str]]] = {"cli": child_cli}


def cli(args: Sequence[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return RUNNER["cli"](args, timeout)


def must(args: Sequence[str]) -> None:
    done = cli(args)
    if done.returncode != 0:
        raise SystemExit(f"setup failed: {' '.join(map(str, args))}\n{done.stderr}")


# --- the tiny study ------------------------------------------------------------------------------


def build_base(base: Path) -> None:
    """Every valid input of the sweep under ``base``."""
    rng = np.random.default_rng(0)
    (base / "img").mkdir(parents=True)
    rows, boxes = [], []
    for i in range(N):
        pixels = rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8)
        pixels[5:25, 5:25] = 255 if i % 2 else 0
        Image.fromarray(pixels).save(base / "img" / f"s{i:02d}.png")
        rows.append(
            {
                "stimulus_id": f"s{i:02d}",
                "path": f"img/s{i:02d}.png",
                "condition": "a" if i % 2 else "b",
                "valence": float(rng.normal()),
            }
        )
        boxes.append({"stimulus_id": f"s{i:02d}", "x0": 5, "y0": 5, "x1": 25, "y1": 25,
                      "label": "face" if i % 2 else "cup"})  # fmt: skip
    pd.DataFrame(rows).to_csv(base / "stimuli.csv", index=False)
    pd.DataFrame(boxes).to_csv(base / "boxes.csv", index=False)
    must(["extract", "--model", "resnet18", "--weights", "none", "--stimuli", base / "stimuli.csv",
          "--out", base / "acts.h5", "--layers", LAYERS, "--batch-size", "8", "--workers", "0",
          "--device", "cpu", "--quiet"])  # fmt: skip
    must(["simulate", "--activations", base / "acts.h5", "--stimuli", base / "stimuli.csv",
          "--out", base / "sim", "--roi", "EVC=layer:layer1;voxels=20", "--roi",
          "VAL=valence;voxels=20", "--subjects", "3", "--quiet"])  # fmt: skip
    ids = [r["stimulus_id"] for r in rows]
    with h5py.File(base / "rdms.h5", "w") as handle:
        handle.attrs["kind"] = "rdms"
        handle["stimulus_ids"] = np.asarray(ids, dtype=object).astype(h5py.string_dtype())
        for subject in ("s1", "s2"):
            x = rng.normal(size=(N, 5))
            rdm = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
            handle.create_group(subject)["ROI"] = rdm
    _nifti(base, ids, rng)
    filters = [{"model": "resnet18", "layer": "layer4", "filter": k,
                "group": "Faces" if k < 8 else "Kitchen",
                "importance": 1.0, "enrichment": 2.0, "p_assign": 0.01, "p_assign_fdr": 0.02,
                "n_images": 8, "assigned": True} for k in range(16)]  # fmt: skip
    pd.DataFrame(filters).to_csv(base / "filters.csv", index=False)
    must(["train-head", "--model", "resnet18", "--weights", "none", "--stimuli",
          base / "stimuli.csv", "--out", base / "heads", "--epochs", "1", "--batch-size", "8",
          "--device", "cpu", "--quiet"])  # fmt: skip
    (base / "study.yaml").write_text(
        "out: results\nstimuli: stimuli.csv\nmodels:\n  - {arch: resnet18, weights: none, "
        "layers: [layer1, layer4]}\nbrain: sim/brain.yaml\nratings: sim/ratings.csv\n"
        "extract: {batch_size: 8, num_workers: 0}\nrsa: {n_perm: 20, n_boot: 10}\n"
        "report: false\ndevice: cpu\n"
    )
    must(["rsa", *RSA_ARGS(base), "--out", base / "rsa_ref", "--quiet"])


def _nifti(base: Path, ids: list[str], rng: np.random.Generator) -> None:
    import nibabel as nib

    (base / "nii").mkdir()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    betas = rng.normal(size=(4, 4, 4, len(ids))).astype(np.float32)
    nib.save(nib.Nifti1Image(betas, affine), base / "nii" / "betas.nii.gz")
    pd.DataFrame({"stimulus_id": ids}).to_csv(base / "nii" / "betas.tsv", sep="\t", index=False)
    mask = np.zeros((4, 4, 4), dtype=np.uint8)
    mask[:2, :2, :2] = 1
    nib.save(nib.Nifti1Image(mask, affine), base / "nii" / "EVC.nii.gz")
    (base / "nii" / "brain.yaml").write_text(
        "sources:\n  - kind: nifti\n    subject: sub-01\n    betas: betas.nii.gz\n"
        "    stimuli: betas.tsv\n    rois: [EVC.nii.gz]\n"
    )


# --- cases ---------------------------------------------------------------------------------------


def RSA_ARGS(b: Path) -> list[Any]:  # noqa: N802  (a fixed argument list, read as a constant)
    return ["--activations", b / "acts.h5", "--stimuli", b / "stimuli.csv", "--ratings",
            b / "sim" / "ratings.csv", "--brain", b / "sim" / "brain.yaml", "--n-perm", "20",
            "--n-boot", "10", "--device", "cpu"]  # fmt: skip


Args = Callable[[Path, Path], list[Any]]  # (base, case folder) -> arguments


@dataclass
class Case:
    """One run: ``args(base, case)``; ``prepare(base, case)`` makes its bad input first.

    ``expect``: ``error`` (exit 2, one line naming any of ``names``) or ``ok`` (exit 0).
    ``out``: the output the run must leave whole (relative to the case folder); ``old``: an
    earlier result put there first, which a failed run must leave byte-identical.
    ``fault``: ``lock`` (another run holds the output), ``sigint`` / ``sigkill`` (sent after
    ``delay`` s, then the command is rerun and must match ``same_as`` under base).
    """

    name: str
    group: str
    args: Args
    names: tuple[str, ...] = ()
    expect: str = "error"
    prepare: Callable[[Path, Path], None] | None = None
    out: str | None = "out"
    old: bool = False
    fault: str | None = None
    delay: float = 0.0
    same_as: str | None = None
    reduced: bool = False


def write(name: str, content: str | bytes) -> Callable[[Path, Path], None]:
    def prepare(_base: Path, case: Path) -> None:
        path = case / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)

    return prepare


def edit_csv(source: str, target: str, change: Callable[[pd.DataFrame], pd.DataFrame],
             sep: str = ",") -> Callable[[Path, Path], None]:  # fmt: skip
    def prepare(base: Path, case: Path) -> None:
        frame = pd.read_csv(base / source, sep=sep, dtype=str, keep_default_na=False)
        (case / target).parent.mkdir(parents=True, exist_ok=True)
        change(frame).to_csv(case / target, index=False, sep=sep)

    return prepare


def damaged(source: str, target: str, fraction: float = 0.5, length: int = 4096,
            truncate: bool = False) -> Callable[[Path, Path], None]:  # fmt: skip
    """A copy of ``source`` with ``length`` bytes overwritten at ``fraction`` of its size (or cut
    there, ``truncate``)."""

    def prepare(base: Path, case: Path) -> None:
        data = bytearray((base / source).read_bytes())
        start = int(len(data) * fraction)
        if truncate:
            data = data[:start]
        else:
            data[start : start + length] = b"\xa5" * min(length, len(data) - start)
        (case / target).parent.mkdir(parents=True, exist_ok=True)
        (case / target).write_bytes(bytes(data))

    return prepare


def copy_tree(source: str, target: str) -> Callable[[Path, Path], None]:
    def prepare(base: Path, case: Path) -> None:
        if (base / source).is_dir():
            shutil.copytree(base / source, case / target)
        else:
            shutil.copy2(base / source, case / target)

    return prepare


def h5(target: str, build: Callable[[h5py.File, list[str]], None]) -> Callable[[Path, Path], None]:
    def prepare(_base: Path, case: Path) -> None:
        ids = [f"s{i:02d}" for i in range(N)]
        with h5py.File(case / target, "w") as handle:
            build(handle, ids)

    return prepare


def both(*steps: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    def prepare(base: Path, case: Path) -> None:
        for step in steps:
            step(base, case)

    return prepare


# Commands with valid arguments (``c`` is the case folder); flag cases append one bad flag.
def EXTRACT(b: Path, c: Path) -> list[Any]:  # noqa: N802
    return ["extract", "--model", "resnet18", "--weights", "none", "--stimuli",
            b / "stimuli.csv", "--out", c / "out" / "acts.h5", "--layers", LAYERS,
            "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet"]  # fmt: skip


def RSA(b: Path, c: Path) -> list[Any]:  # noqa: N802
    return ["rsa", *RSA_ARGS(b), "--out", c / "out", "--quiet"]


def ENCODE(b: Path, c: Path) -> list[Any]:  # noqa: N802
    return ["encode", "--activations", b / "acts.h5", "--brain", b / "sim" / "brain.yaml",
            "--out", c / "out", "--folds", "2", "--inner-folds", "2", "--n-perm", "5",
            "--reduce", "srp:16", "--device", "cpu", "--quiet"]  # fmt: skip


def LESION(b: Path, c: Path) -> list[Any]:  # noqa: N802
    return ["lesion", "--activations", b / "acts.h5", "--filters", b / "filters.csv",
            "--brain", b / "sim" / "brain.yaml", "--stimuli", b / "stimuli.csv", "--out",
            c / "out", "--n-null", "5", "--n-perm", "5", "--device", "cpu", "--quiet"]  # fmt: skip


def SIMULATE(b: Path, c: Path) -> list[Any]:  # noqa: N802
    return ["simulate", "--activations", b / "acts.h5", "--stimuli", b / "stimuli.csv",
            "--out", c / "out", "--roi", "EVC=layer:layer1;voxels=20", "--subjects", "3",
            "--quiet"]  # fmt: skip


def DISSECT(b: Path, c: Path) -> list[Any]:  # noqa: N802
    return ["dissect", "--model", "resnet18", "--weights", "none", "--stimuli",
            b / "stimuli.csv", "--out", c / "out", "--layer", "layer4", "--detector",
            f"boxes:{b / 'boxes.csv'}", "--target", "0", "--n-null-assign", "5",
            "--min-images", "2", "--workers", "0", "--device", "cpu", "--quiet"]  # fmt: skip


def TRAIN(b: Path, c: Path) -> list[Any]:  # noqa: N802
    return ["train-head", "--model", "resnet18", "--weights", "none", "--stimuli",
            b / "stimuli.csv", "--out", c / "out", "--epochs", "1", "--batch-size", "8",
            "--device", "cpu", "--quiet"]  # fmt: skip


def REPORT(b: Path, c: Path) -> list[Any]:  # noqa: N802
    return ["report", b / "rsa_ref", "--out", c / "out" / "report.html", "--quiet"]


COMMANDS: dict[str, Args] = {
    "extract": EXTRACT, "rsa": RSA, "encode": ENCODE, "lesion": LESION, "simulate": SIMULATE,
    "dissect": DISSECT, "train-head": TRAIN,
}  # fmt: skip

INT_BAD = ("nan", "-1", "1.5", "abc")
FLOAT_BAD = ("nan", "inf", "-inf", "abc")
#: Numeric flags and their bad values (a count beyond the resampling limit is bad too).
FLAGS: dict[str, dict[str, tuple[str, ...]]] = {
    "extract": {"--batch-size": (*INT_BAD, "0"), "--srp": (*INT_BAD, "0"),
                "--workers": INT_BAD, "--seed": ("abc", "1.5")},
    "rsa": {"--n-perm": (*INT_BAD, "1000000000000"), "--n-boot": (*INT_BAD, "1e20")},
    "encode": {"--folds": (*INT_BAD, "1"), "--inner-folds": ("1", "abc"),
               "--n-iter": ("0", "abc"), "--n-perm": ("-1", "1000000000000"),
               "--alphas": ("nan", "-1", "0", "abc", "inf")},
    "lesion": {"--n-null": (*INT_BAD, "1000000000000"), "--n-perm": ("-1", "1e30"),
               "--batch-size": ("0", "abc")},
    "simulate": {"--subjects": (*INT_BAD, "0"), "--rating-noise": (*FLOAT_BAD, "-1")},
    "dissect": {"--threshold": (*FLOAT_BAD, "1e400"), "--min-images": ("0", "abc", "nan"),
                "--n-null-assign": ("0", "-1", "1000000000000"), "--batch-size": ("0",),
                "--target": ("-1", "abc", "1000000")},
    "train-head": {"--epochs": ("0", "abc"), "--patience": ("0",), "--lr": FLOAT_BAD,
                   "--batch-size": ("0",), "--cross-fit": ("1", "-1")},
}  # fmt: skip
#: Vocabulary flags and an unknown value.
WORDS: list[tuple[str, str, str]] = [
    ("rsa", "--rdm", "manhattan"), ("rsa", "--compare", "foo"), ("rsa", "--pairs", "some"),
    ("rsa", "--fdr-family", "none"), ("rsa", "--bootstrap", "voxels"),
    ("rsa", "--compare-models", "nomodel:nolayer,x:y"), ("rsa", "--brain-rdm", "mahalanobis"),
    ("rsa", "--duplicate-ratings", "sum"), ("rsa", "--device", "tpu"),
    ("encode", "--reduce", "srp:0"), ("encode", "--reduce", "svd:3"),
    ("encode", "--perm-null", "labels"), ("encode", "--banded", "layer1"),
    ("encode", "--layers", "nolayer"), ("lesion", "--variant", "remove"),
    ("lesion", "--null-subsets", "fancy"), ("lesion", "--group", "NoSuchGroup"),
    ("lesion", "--layer", "nolayer"), ("dissect", "--direction", "up"),
    ("dissect", "--detector", "nodetector"), ("dissect", "--decode", "gpu"),
    ("dissect", "--layer", "nolayer"), ("dissect", "--detector", "boxes:/no/such/boxes.csv"),
    ("extract", "--dtype", "float64"), ("extract", "--model", "nonet"),
    ("extract", "--weights", "NoSuchWeights"), ("extract", "--layers", "nolayer"),
    ("extract", "--amp", "int8"), ("extract", "--decode", "magic"),
    ("train-head", "--loss", "huber"), ("train-head", "--weights", "/no/such/weights.pth"),
    ("simulate", "--roi", "EVC=layer:nolayer"), ("simulate", "--roi", "EVC"),
    ("simulate", "--roi", "EVC=filters:layer4:999"), ("simulate", "--roi", "EVC=valence;snr=-1"),
    ("simulate", "--roi", "EVC=condition:zzz"), ("simulate", "--valence-source", "layer:zzz"),
]  # fmt: skip


def replace_arg(args: list[Any], flag: str, value: Any) -> list[Any]:
    """``args`` with ``flag``'s value replaced (or the flag appended)."""
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
        return args
    return [*args[:-1], flag, value, args[-1]]  # before --quiet


def drop_flag(args: list[Any], flag: str) -> list[Any]:
    """``args`` without ``flag`` and its value."""
    at = args.index(flag)
    return args[:at] + args[at + 2 :]


def flag_cases() -> list[Case]:
    cases = []
    for command, flags in FLAGS.items():
        for flag, values in flags.items():
            for value in values:
                cases.append(Case(
                    f"{command} {flag} {value}", "flag value",
                    lambda b, c, cm=command, f=flag, v=value: replace_arg(COMMANDS[cm](b, c), f, v),
                    names=(flag,),
                ))  # fmt: skip
    for command, flag, value in WORDS:
        culprit = value.split(":")[-1] if flag == "--roi" else value.split(":", 1)[-1]
        cases.append(Case(
            f"{command} {flag} {value}", "unknown name",
            lambda b, c, cm=command, f=flag, v=value: replace_arg(COMMANDS[cm](b, c), f, v),
            names=(flag, culprit, value),
        ))  # fmt: skip
    return cases


def with_input(command: Args, flag: str, name: str) -> Args:
    """``command`` reading input ``flag`` from the case folder's ``name``."""
    return lambda b, c: replace_arg(command(b, c), flag, c / name)


def input_cases() -> list[Case]:
    def ratings(change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path, Path], None]:
        return edit_csv("sim/ratings.csv", "ratings.csv", change)

    def stimuli(change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path, Path], None]:
        def prepare(base: Path, case: Path) -> None:
            shutil.copytree(base / "img", case / "img")
            edit_csv("stimuli.csv", "stimuli.csv", change)(base, case)

        return prepare

    def dup_first(frame: pd.DataFrame) -> pd.DataFrame:
        return pd.concat([frame, frame.iloc[:1]], ignore_index=True)

    def set_cell(column: str, value: str, row: int = 0) -> Callable[[pd.DataFrame], pd.DataFrame]:
        def change(frame: pd.DataFrame) -> pd.DataFrame:
            frame = frame.copy()
            frame.loc[row, column] = value
            return frame

        return change

    garbage = bytes(range(256)) * 8
    ext_stim, rsa_rat = (
        with_input(EXTRACT, "--stimuli", "stimuli.csv"),
        with_input(RSA, "--ratings", "ratings.csv"),
    )
    rsa_brain = with_input(RSA, "--brain", "brain.yaml")
    rsa_h5 = with_input(RSA, "--brain", "data.h5")
    rsa_store = with_input(RSA, "--activations", "acts.h5")
    lesion_filters = with_input(LESION, "--filters", "filters.csv")
    brain_file = "sources:\n  - kind: patterns\n    path: {}\n"
    sim_patterns = "sim/patterns.h5"

    def sim_brain(text: str) -> Callable[[Path, Path], None]:
        def prepare(base: Path, case: Path) -> None:
            (case / "brain.yaml").write_text(text.replace("{}", str(base / sim_patterns)))

        return prepare

    def rdm_file(change: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path, Path], None]:
        def build(handle: h5py.File, ids: list[str]) -> None:
            handle.attrs["kind"] = "rdms"
            handle["stimulus_ids"] = np.asarray(ids, dtype=object).astype(h5py.string_dtype())
            x = np.random.default_rng(1).normal(size=(N, 4))
            rdm = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
            handle.create_group("s1")["ROI"] = change(rdm)

        return h5("data.h5", build)

    def nifti_case(mutate: Callable[[Path], None]) -> Callable[[Path, Path], None]:
        def prepare(base: Path, case: Path) -> None:
            shutil.copytree(base / "nii", case / "nii")
            mutate(case / "nii")

        return prepare

    def truncate(name: str, keep: float = 0.5) -> Callable[[Path], None]:
        def mutate(folder: Path) -> None:
            data = (folder / name).read_bytes()
            (folder / name).write_bytes(data[: int(len(data) * keep)])

        return mutate

    def overwrite(name: str, content: bytes) -> Callable[[Path], None]:
        return lambda folder: (folder / name).write_bytes(content)

    rsa_nii = with_input(RSA, "--brain", "nii/brain.yaml")
    cfg = "study.yaml"

    def config(text: str) -> Callable[[Path, Path], None]:
        def prepare(base: Path, case: Path) -> None:
            (case / cfg).write_text(text.replace("BASE", str(base)))

        return prepare

    good_cfg = (
        "out: out\nstimuli: BASE/stimuli.csv\nmodels:\n  - {arch: resnet18, weights: none, "
        "layers: [layer1, layer4]}\nbrain: BASE/sim/brain.yaml\nratings: BASE/sim/ratings.csv\n"
        "extract: {batch_size: 8, num_workers: 0}\nrsa: {n_perm: 20, n_boot: 10}\n"
        "report: false\ndevice: cpu\n"
    )

    def run_cfg(_b: Path, c: Path) -> list[Any]:
        return ["run", c / cfg, "--quiet"]

    def filters(change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path, Path], None]:
        return edit_csv("filters.csv", "filters.csv", change)

    def rename(old: str, new: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
        return lambda frame: frame.rename(columns={old: new})

    head = "heads/resnet18/head.safetensors"
    ext_head = lambda b, c: [*EXTRACT(b, c)[:-1], "--head", c / "head.safetensors", "--quiet"]  # noqa: E731

    C = Case
    return [
        # stimulus table (extract)
        C("stimuli: missing file", "stimuli", lambda b, c: replace_arg(EXTRACT(b, c), "--stimuli", c / "none.csv"), ("none.csv",), reduced=True),  # noqa: E501
        C("stimuli: empty file", "stimuli", ext_stim, ("stimuli.csv",), prepare=write("stimuli.csv", "")),  # noqa: E501
        C("stimuli: header only", "stimuli", ext_stim, ("stimuli.csv",), prepare=write("stimuli.csv", "stimulus_id,path\n")),  # noqa: E501
        C("stimuli: binary garbage", "stimuli", ext_stim, ("stimuli.csv",), prepare=write("stimuli.csv", garbage), reduced=True),  # noqa: E501
        C("stimuli: wrong column names", "stimuli", ext_stim, ("stimuli.csv",), prepare=stimuli(rename("path", "file"))),  # noqa: E501
        C("stimuli: duplicate ids", "stimuli", ext_stim, ("stimuli.csv", "s00"), prepare=stimuli(dup_first)),  # noqa: E501
        C("stimuli: id with spaces", "stimuli", ext_stim, ("stimuli.csv",), prepare=stimuli(set_cell("stimulus_id", " s00 "))),  # noqa: E501
        C("stimuli: empty id", "stimuli", ext_stim, ("stimuli.csv",), prepare=stimuli(set_cell("stimulus_id", ""))),  # noqa: E501
        C("stimuli: image missing", "stimuli", ext_stim, ("nothere.png",), prepare=stimuli(set_cell("path", "img/nothere.png"))),  # noqa: E501
        C("stimuli: image garbled", "stimuli", ext_stim, ("s03",), prepare=both(stimuli(lambda f: f), lambda b, c: (c / "img" / "s03.png").write_bytes(garbage)), reduced=True),  # noqa: E501
        C("stimuli: image empty", "stimuli", ext_stim, ("s04",), prepare=both(stimuli(lambda f: f), lambda b, c: (c / "img" / "s04.png").write_bytes(b""))),  # noqa: E501
        C("stimuli: image is a folder", "stimuli", ext_stim, ("s05",), prepare=both(stimuli(lambda f: f), lambda b, c: ((c / "img" / "s05.png").unlink(), (c / "img" / "s05.png").mkdir()))),  # noqa: E501
        C("stimuli: stimuli is a folder", "stimuli", lambda b, c: replace_arg(EXTRACT(b, c), "--stimuli", c / "emptydir"), ("emptydir",), prepare=lambda b, c: (c / "emptydir").mkdir()),  # noqa: E501
        C("stimuli (rsa, no ratings): valence not numeric", "stimuli", lambda b, c: drop_flag(replace_arg(RSA(b, c), "--stimuli", c / "stimuli.csv"), "--ratings"), ("stimuli.csv",), prepare=stimuli(set_cell("valence", "high"))),  # noqa: E501
        C("stimuli (rsa, with ratings): valence not numeric, not used", "stimuli", lambda b, c: replace_arg(RSA(b, c), "--stimuli", c / "stimuli.csv"), expect="ok", prepare=stimuli(set_cell("valence", "high"))),  # noqa: E501
        # ratings (rsa)
        C("ratings: missing file", "ratings", lambda b, c: replace_arg(RSA(b, c), "--ratings", c / "none.csv"), ("none.csv",)),  # noqa: E501
        C("ratings: empty file", "ratings", rsa_rat, ("ratings.csv",), prepare=write("ratings.csv", "")),  # noqa: E501
        C("ratings: binary garbage", "ratings", rsa_rat, ("ratings.csv",), prepare=write("ratings.csv", garbage)),  # noqa: E501
        C("ratings: wrong column names", "ratings", rsa_rat, ("ratings.csv", "valence"), prepare=ratings(rename("valence", "rating")), reduced=True),  # noqa: E501
        C("ratings: duplicate rows (default error)", "ratings", rsa_rat, ("ratings.csv", "more than once"), prepare=ratings(dup_first), reduced=True),  # noqa: E501
        C("ratings: duplicate rows --duplicate-ratings mean", "ratings", lambda b, c: replace_arg(rsa_rat(b, c), "--duplicate-ratings", "mean"), expect="ok", prepare=ratings(dup_first)),  # noqa: E501
        C("ratings: valence not numeric", "ratings", rsa_rat, ("ratings.csv",), prepare=ratings(set_cell("valence", "good"))),  # noqa: E501
        C("ratings: valence missing", "ratings", rsa_rat, ("ratings.csv",), prepare=ratings(set_cell("valence", ""))),  # noqa: E501
        C("ratings: valence inf", "ratings", rsa_rat, ("ratings.csv",), prepare=ratings(set_cell("valence", "inf"))),  # noqa: E501
        C("ratings: unknown stimulus id", "ratings", rsa_rat, ("ratings.csv", "zzz"), prepare=ratings(set_cell("stimulus_id", "zzz"))),  # noqa: E501
        C("ratings: subject named group", "ratings", rsa_rat, ("ratings.csv", "group"), prepare=ratings(set_cell("subject", "group"))),  # noqa: E501
        # brain manifest (rsa)
        C("brain manifest: missing", "brain manifest", lambda b, c: replace_arg(RSA(b, c), "--brain", c / "none.yaml"), ("none.yaml",)),  # noqa: E501
        C("brain manifest: empty", "brain manifest", rsa_brain, ("brain.yaml",), prepare=write("brain.yaml", "")),  # noqa: E501
        C("brain manifest: garbled YAML", "brain manifest", rsa_brain, ("brain.yaml",), prepare=write("brain.yaml", "sources: [\n  - {kind: patterns\n")),  # noqa: E501
        C("brain manifest: binary garbage", "brain manifest", rsa_brain, ("brain.yaml",), prepare=write("brain.yaml", garbage)),  # noqa: E501
        C("brain manifest: unknown key", "brain manifest", rsa_brain, ("brain.yaml", "colour"), prepare=sim_brain(brain_file + "    colour: red\n"), reduced=True),  # noqa: E501
        C("brain manifest: duplicate key", "brain manifest", rsa_brain, ("brain.yaml", "path"), prepare=sim_brain(brain_file + "    path: {}\n")),  # noqa: E501
        C("brain manifest: python tag", "brain manifest", rsa_brain, ("brain.yaml",), prepare=write("brain.yaml", "sources: !!python/object/apply:os.system ['true']\n")),  # noqa: E501
        C("brain manifest: unknown kind", "brain manifest", rsa_brain, ("brain.yaml", "voxels"), prepare=sim_brain("sources:\n  - kind: voxels\n    path: {}\n")),  # noqa: E501
        C("brain manifest: data file missing", "brain manifest", rsa_brain, ("brain.yaml", "gone.h5"), prepare=write("brain.yaml", "sources:\n  - kind: patterns\n    path: gone.h5\n")),  # noqa: E501
        # patterns / RDM HDF5
        C("patterns: empty file", "patterns HDF5", rsa_h5, ("data.h5",), prepare=write("data.h5", b"")),  # noqa: E501
        C("patterns: binary garbage", "patterns HDF5", rsa_h5, ("data.h5",), prepare=write("data.h5", garbage)),  # noqa: E501
        C("patterns: bytes damaged mid-file", "patterns HDF5", rsa_h5, ("data.h5",), prepare=damaged(sim_patterns, "data.h5", 0.3, 1024), reduced=True),  # noqa: E501
        C("patterns: damaged near the start", "patterns HDF5", rsa_h5, ("data.h5",), prepare=damaged(sim_patterns, "data.h5", 0.02, 512)),  # noqa: E501
        C("patterns: truncated", "patterns HDF5", rsa_h5, ("data.h5",), prepare=damaged(sim_patterns, "data.h5", 0.5, truncate=True)),  # noqa: E501
        C("patterns: no stimulus_ids", "patterns HDF5", rsa_h5, ("data.h5", "stimulus_ids"), prepare=h5("data.h5", lambda h, ids: (h.attrs.__setitem__("kind", "patterns"), h.create_group("s1").__setitem__("ROI", np.ones((N, 3)))))),  # noqa: E501
        C("patterns: no kind attribute", "patterns HDF5", rsa_h5, ("data.h5", "kind"), prepare=h5("data.h5", lambda h, ids: h.create_group("s1").__setitem__("ROI", np.ones((N, 3))))),  # noqa: E501
        C("patterns: wrong row count", "patterns HDF5", rsa_h5, ("data.h5",), prepare=h5("data.h5", lambda h, ids: (h.attrs.__setitem__("kind", "patterns"), h.__setitem__("stimulus_ids", np.asarray(ids, dtype=object).astype(h5py.string_dtype())), h.create_group("s1").__setitem__("ROI", np.ones((N - 2, 3)))))),  # noqa: E501
        C("patterns: NaN everywhere", "patterns HDF5", rsa_h5, ("data.h5",), prepare=h5("data.h5", lambda h, ids: (h.attrs.__setitem__("kind", "patterns"), h.__setitem__("stimulus_ids", np.asarray(ids, dtype=object).astype(h5py.string_dtype())), h.create_group("s1").__setitem__("ROI", np.full((N, 3), np.nan))))),  # noqa: E501
        C("patterns: string data", "patterns HDF5", rsa_h5, ("data.h5",), prepare=h5("data.h5", lambda h, ids: (h.attrs.__setitem__("kind", "patterns"), h.__setitem__("stimulus_ids", np.asarray(ids, dtype=object).astype(h5py.string_dtype())), h.create_group("s1").__setitem__("ROI", np.asarray([["x"] * 3] * N, dtype=object).astype(h5py.string_dtype()))))),  # noqa: E501
        C("patterns: duplicate stimulus ids", "patterns HDF5", rsa_h5, ("data.h5", "s01"), prepare=h5("data.h5", lambda h, ids: (h.attrs.__setitem__("kind", "patterns"), h.__setitem__("stimulus_ids", np.asarray(["s01", *ids[1:]], dtype=object).astype(h5py.string_dtype())), h.create_group("s1").__setitem__("ROI", np.random.default_rng(0).normal(size=(N, 3)))))),  # noqa: E501
        C("rdms: similarity (diagonal 1)", "RDM HDF5", rsa_h5, ("data.h5", "diagonal"), prepare=rdm_file(lambda r: 1 - r / r.max()), reduced=True),  # noqa: E501
        C("rdms: negative entries", "RDM HDF5", rsa_h5, ("data.h5", "negative"), prepare=rdm_file(lambda r: r - r.mean() * (1 - np.eye(N)))),  # noqa: E501
        C("rdms: not symmetric", "RDM HDF5", rsa_h5, ("data.h5", "symmetric"), prepare=rdm_file(lambda r: r + np.triu(np.ones((N, N)), 1))),  # noqa: E501
        C("rdms: not square", "RDM HDF5", rsa_h5, ("data.h5",), prepare=rdm_file(lambda r: r[:, :-1])),  # noqa: E501
        C("rdms: bytes damaged mid-file", "RDM HDF5", rsa_h5, ("data.h5",), prepare=damaged("rdms.h5", "data.h5", 0.4, 1024)),  # noqa: E501
        C("rdms: NaN entry", "RDM HDF5", rsa_h5, ("data.h5",), prepare=rdm_file(lambda r: np.where(np.eye(N, k=1) > 0, np.nan, r))),  # noqa: E501
        # NIfTI
        C("nifti: betas truncated", "NIfTI", rsa_nii, ("betas.nii.gz",), prepare=nifti_case(truncate("betas.nii.gz")), reduced=True),  # noqa: E501
        C("nifti: betas garbage", "NIfTI", rsa_nii, ("betas.nii.gz",), prepare=nifti_case(overwrite("betas.nii.gz", garbage))),  # noqa: E501
        C("nifti: betas empty", "NIfTI", rsa_nii, ("betas.nii.gz",), prepare=nifti_case(overwrite("betas.nii.gz", b""))),  # noqa: E501
        C("nifti: mask garbage", "NIfTI", rsa_nii, ("EVC.nii.gz",), prepare=nifti_case(overwrite("EVC.nii.gz", garbage))),  # noqa: E501
        C("nifti: betas TSV missing", "NIfTI", rsa_nii, ("betas.tsv",), prepare=nifti_case(lambda f: (f / "betas.tsv").unlink())),  # noqa: E501
        C("nifti: betas TSV short", "NIfTI", rsa_nii, ("betas.tsv",), prepare=nifti_case(lambda f: (f / "betas.tsv").write_text("stimulus_id\ns00\n"))),  # noqa: E501
        # activation store
        C("store: missing", "store", lambda b, c: replace_arg(RSA(b, c), "--activations", c / "none.h5"), ("none.h5",)),  # noqa: E501
        C("store: empty file", "store", rsa_store, ("acts.h5",), prepare=write("acts.h5", b"")),
        C("store: binary garbage", "store", rsa_store, ("acts.h5",), prepare=write("acts.h5", garbage)),  # noqa: E501
        C("store: bytes damaged mid-file", "store", rsa_store, ("acts.h5",), prepare=damaged("acts.h5", "acts.h5", 0.5, 65536), reduced=True),  # noqa: E501
        C("store: damaged near the start", "store", rsa_store, ("acts.h5",), prepare=damaged("acts.h5", "acts.h5", 0.001, 2048)),  # noqa: E501
        C("store: truncated", "store", rsa_store, ("acts.h5",), prepare=damaged("acts.h5", "acts.h5", 0.6, truncate=True)),  # noqa: E501
        C("store: a patterns file", "store", lambda b, c: replace_arg(RSA(b, c), "--activations", b / sim_patterns), ("patterns.h5",)),  # noqa: E501
        C("store (encode): damaged", "store", with_input(ENCODE, "--activations", "acts.h5"), ("acts.h5",), prepare=damaged("acts.h5", "acts.h5", 0.5, 65536)),  # noqa: E501
        C("store (simulate): damaged layer read", "store", lambda b, c: replace_arg(with_input(SIMULATE, "--activations", "acts.h5")(b, c), "--roi", "EVC=layer:layer4;voxels=20"), ("acts.h5",), prepare=damaged("acts.h5", "acts.h5", 0.5, 65536)),  # noqa: E501
        C("store (simulate): damaged layer not read", "store", with_input(SIMULATE, "--activations", "acts.h5"), expect="ok", prepare=damaged("acts.h5", "acts.h5", 0.5, 65536)),  # noqa: E501
        C("store (lesion): damaged", "store", with_input(LESION, "--activations", "acts.h5"), ("acts.h5",), prepare=damaged("acts.h5", "acts.h5", 0.5, 65536)),  # noqa: E501
        C("store (encode): brain is RDMs", "store", lambda b, c: replace_arg(ENCODE(b, c), "--brain", b / "rdms.h5"), ("rdms.h5", "RDM")),  # noqa: E501
        # head
        C("head: missing", "head", lambda b, c: [*EXTRACT(b, c)[:-1], "--head", c / "none.safetensors", "--quiet"], ("none.safetensors",)),  # noqa: E501
        C("head: garbage", "head", ext_head, ("head.safetensors",), prepare=write("head.safetensors", garbage)),  # noqa: E501
        C("head: truncated", "head", ext_head, ("head.safetensors",), prepare=damaged(head, "head.safetensors", 0.5, truncate=True), reduced=True),  # noqa: E501
        C("head: empty", "head", ext_head, ("head.safetensors",), prepare=write("head.safetensors", b"")),  # noqa: E501
        C("weights: pickled checkpoint", "head", lambda b, c: replace_arg(EXTRACT(b, c), "--weights", c / "w.pth"), ("w.pth",), prepare=write("w.pth", b"\x80\x04\x95" + garbage)),  # noqa: E501
        C("valence CSV: missing", "head", lambda b, c: [*EXTRACT(b, c)[:-1], "--valence", c / "none.csv", "--quiet"], ("none.csv",)),  # noqa: E501
        C("valence CSV: not numeric", "head", lambda b, c: [*EXTRACT(b, c)[:-1], "--valence", c / "v.csv", "--quiet"], ("v.csv",), prepare=write("v.csv", "stimulus_id,predicted\n" + "".join(f"s{i:02d},x\n" for i in range(N)))),  # noqa: E501
        C("--valence with --head", "head", lambda b, c: [*EXTRACT(b, c)[:-1], "--valence", c / "v.csv", "--head", b / head, "--quiet"], expect="ok", prepare=write("v.csv", "stimulus_id,predicted\n" + "".join(f"s{i:02d},{i}\n" for i in range(N)))),  # noqa: E501
        # filter table (lesion)
        C("filters: missing", "filter table", lambda b, c: replace_arg(LESION(b, c), "--filters", c / "none.csv"), ("none.csv",)),  # noqa: E501
        C("filters: empty", "filter table", lesion_filters, ("filters.csv",), prepare=write("filters.csv", "")),  # noqa: E501
        C("filters: wrong column names", "filter table", lesion_filters, ("filters.csv",), prepare=filters(rename("group", "category"))),  # noqa: E501
        C("filters: assigned yes/no", "filter table", lesion_filters, ("filters.csv", "assigned"), prepare=filters(lambda f: f.assign(assigned="yes")), reduced=True),  # noqa: E501
        C("filters: filter in two groups", "filter table", lesion_filters, ("filters.csv",), prepare=filters(lambda f: pd.concat([f, f.iloc[:1].assign(group="Kitchen")], ignore_index=True))),  # noqa: E501
        C("filters: filter out of range", "filter table", lesion_filters, ("filters.csv", "9999"), prepare=filters(set_cell("filter", "9999"))),  # noqa: E501
        C("filters: negative filter", "filter table", lesion_filters, ("filters.csv",), prepare=filters(set_cell("filter", "-3"))),  # noqa: E501
        C("filters: layer not in store", "filter table", lesion_filters, ("filters.csv", "layer9"), prepare=filters(lambda f: f.assign(layer="layer9"))),  # noqa: E501
        C("filters: garbage", "filter table", lesion_filters, ("filters.csv",), prepare=write("filters.csv", garbage)),  # noqa: E501
        # split file (rsa --held-out)
        C("split: missing", "split", lambda b, c: [*RSA(b, c)[:-1], "--held-out", c / "none.csv", "--quiet"], ("none.csv",)),  # noqa: E501
        C("split: wrong columns", "split", lambda b, c: [*RSA(b, c)[:-1], "--held-out", c / "split.csv", "--quiet"], ("split.csv",), prepare=write("split.csv", "id,part\ns00,test\n")),  # noqa: E501
        C("split: no test rows", "split", lambda b, c: [*RSA(b, c)[:-1], "--held-out", c / "split.csv", "--quiet"], ("split.csv",), prepare=write("split.csv", "stimulus_id,split\n" + "".join(f"s{i:02d},train\n" for i in range(N)))),  # noqa: E501
        # study config
        C("config: missing", "config", lambda b, c: ["run", c / "none.yaml", "--quiet"], ("none.yaml",), out=None),  # noqa: E501
        C("config: empty", "config", run_cfg, ("study.yaml",), prepare=config("")),
        C("config: garbled YAML", "config", run_cfg, ("study.yaml",), prepare=config("out: [\nmodels: {")),  # noqa: E501
        C("config: unknown key", "config", run_cfg, ("study.yaml", "colour"), prepare=config(good_cfg + "colour: red\n"), reduced=True),  # noqa: E501
        C("config: duplicate key", "config", run_cfg, ("study.yaml", "seed"), prepare=config(good_cfg + "seed: 1\nseed: 2\n")),  # noqa: E501
        C("config: python tag", "config", run_cfg, ("study.yaml",), prepare=config("out: !!python/object/apply:os.getcwd []\n")),  # noqa: E501
        C("config: lesioned layer not extracted", "config", run_cfg, ("dissect.layer", "layer3"), prepare=config(good_cfg.replace("layers: [layer1, layer4]}", "layers: [layer1, layer4], head: BASE/heads/resnet18/head.safetensors}") + "dissect: {layer: layer3, detector: 'boxes:BASE/boxes.csv'}\nlesion: {n_null: 5, n_perm: 5}\n")),  # noqa: E501
        C("config: threshold nan", "config", run_cfg, ("threshold",), prepare=config(good_cfg + "dissect: {layer: layer4, threshold: .nan, detector: 'boxes:BASE/boxes.csv'}\n")),  # noqa: E501
        C("config: n_perm huge", "config", run_cfg, ("n_perm",), prepare=config(good_cfg.replace("n_perm: 20", "n_perm: 1000000000000"))),  # noqa: E501
        C("config: n_perm a string", "config", run_cfg, ("n_perm",), prepare=config(good_cfg.replace("n_perm: 20", "n_perm: many"))),  # noqa: E501
        C("config: seed a bool", "config", run_cfg, ("seed",), prepare=config(good_cfg + "seed: true\n")),  # noqa: E501
        C("config: unknown model", "config", run_cfg, ("nonet",), prepare=config(good_cfg.replace("arch: resnet18", "arch: nonet"))),  # noqa: E501
        C("config: stimuli missing", "config", run_cfg, ("nofile.csv",), prepare=config(good_cfg.replace("BASE/stimuli.csv", "nofile.csv"))),  # noqa: E501
        C("config: duplicate_ratings wrong", "config", run_cfg, ("duplicate_ratings",), prepare=config(good_cfg.replace("n_boot: 10}", "n_boot: 10, duplicate_ratings: sum}"))),  # noqa: E501
        C("config: binary garbage", "config", run_cfg, ("study.yaml",), prepare=write("study.yaml", garbage)),  # noqa: E501
        # report
        C("report: folder missing", "report", lambda b, c: ["report", c / "none", "--quiet"], ("none",), out=None),  # noqa: E501
        C("report: folder is a file", "report", lambda b, c: ["report", b / "stimuli.csv", "--quiet"], ("stimuli.csv",), out=None),  # noqa: E501
        C("report: damaged table", "report", lambda b, c: ["report", c / "res", "--out", c / "r.html", "--quiet"], ("alignment",), prepare=both(copy_tree("rsa_ref", "res"), lambda b, c: [(c / "res" / f"alignment.{x}").write_bytes(garbage) for x in ("csv", "parquet")])),  # noqa: E501
    ]  # fmt: skip


def output_cases() -> list[Case]:
    cases = []
    for command, args in COMMANDS.items():
        target = "out/acts.h5" if command == "extract" else "out"
        cases.append(Case(f"{command}: --out is an existing file", "output",
                          lambda b, c, a=args: a(b, c), ("out",),
                          prepare=write(target, "not a folder or store"), old=True))  # fmt: skip
        cases.append(Case(f"{command}: another run holds the output", "output",
                          lambda b, c, a=args: a(b, c), ("is writing it",), fault="lock",
                          reduced=command in ("rsa", "extract")))  # fmt: skip
    cases.append(Case("rsa: --out under a file", "output",
                      lambda b, c: replace_arg(RSA(b, c), "--out", c / "file" / "out"), ("file",),
                      prepare=write("file", "x"), out="file", old=True))  # fmt: skip
    cases.append(Case("rsa: failed run keeps the old results", "output",
                      lambda b, c: replace_arg(RSA(b, c), "--rdm", "manhattan"), ("manhattan",),
                      prepare=copy_tree("rsa_ref", "out"), old=True, reduced=True))  # fmt: skip
    cases.append(Case("simulate: failed run keeps the old set", "output",
                      lambda b, c: replace_arg(SIMULATE(b, c), "--roi", "EVC=layer:zzz"),
                      ("zzz",), prepare=copy_tree("sim", "out"), old=True))  # fmt: skip
    return cases


def signal_cases() -> list[Case]:
    """A signal ``delay`` s after the run took its output's lock (it is then at work), a rerun."""

    def kill(name: str, args: Args, fault: str, delay: float, same_as: str | None,
             **more: Any) -> Case:  # fmt: skip
        return Case(name, "signal", args, expect="ok", fault=fault, delay=delay,
                    same_as=same_as, **more)  # fmt: skip

    return [
        kill(
            "extract: SIGKILL 2 s into the run, rerun resumes",
            EXTRACT,
            "sigkill",
            2.0,
            "acts.h5",
            reduced=True,
        ),
        kill("extract: SIGINT 2 s into the run, rerun resumes", EXTRACT, "sigint", 2.0, "acts.h5"),
        kill("extract: SIGKILL 0.5 s into the run, rerun", EXTRACT, "sigkill", 0.5, "acts.h5"),
        kill("rsa: SIGKILL 1 s into the run, rerun", RSA, "sigkill", 1.0, "rsa_ref"),
        kill("rsa: SIGINT 1 s into the run, rerun", RSA, "sigint", 1.0, "rsa_ref"),
        kill(
            "rsa: SIGKILL over old results, rerun",
            RSA,
            "sigkill",
            2.0,
            "rsa_ref",
            prepare=copy_tree("rsa_ref", "out"),
        ),
        kill("simulate: SIGKILL 0.5 s into the run, rerun", SIMULATE, "sigkill", 0.5, None),
    ]


# --- running and classifying ---------------------------------------------------------------------


@dataclass
class Outcome:
    case: str
    group: str
    command: str
    exit: int | None
    first_line: str
    verdict: str
    why: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def snapshot(path: Path) -> dict[str, bytes] | None:
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "detection_cache"}  # fmt: skip


def strays(folder: Path) -> list[str]:
    """Temporary files or folders a run left in ``folder`` (recursively)."""
    found = []
    for p in folder.rglob("*"):
        if any(mark in p.name for mark in TEMPORARY) or p.name.endswith(".lock"):
            found.append(str(p.relative_to(folder)))
    return found


def message_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def shown(args: Sequence[Any], base: Path, case: Path) -> str:
    text = " ".join(str(a) for a in args)
    return "object2brain " + text.replace(str(case), "CASE").replace(str(base), "BASE")


def classify(case: Case, done: subprocess.CompletedProcess[str], before: Any, after: Any,
             left: list[str]) -> tuple[str, str]:  # fmt: skip
    lines = message_lines(done.stderr)
    text = done.stderr + done.stdout
    if "Traceback" in text:
        return "BAD", "traceback"
    if left:
        return "BAD", f"left behind: {', '.join(left[:3])}"
    if case.expect == "ok":
        if done.returncode != 0:
            return "BAD", f"exit {done.returncode} where the run must succeed"
        return "GOOD", ""
    if done.returncode == 0:
        return "BAD", "exit 0 on bad input"
    if done.returncode != 2:
        return "BAD", f"exit {done.returncode}"
    usage = bool(lines) and lines[0].startswith("Usage:")
    errors = [line for line in lines if line.startswith(("error:", "Error:"))]
    if not usage and len(lines) != 1:
        return "BAD", f"{len(lines)} lines of message"
    if usage and len(errors) != 1:
        return "BAD", "a usage message without one Error line"
    line = errors[0] if errors else lines[0]
    if case.names and not any(name.lower() in line.lower() for name in case.names):
        return "BAD", f"the message names none of {', '.join(case.names)}"
    if case.out is not None and before != after:
        return "BAD", "the output changed (half-written)"
    return "GOOD", "usage error (click box)" if usage else ""


def hold_lock(target: Path) -> int:
    """Take the output lock of ``target`` as another run would (see ``io.output_lock``)."""
    lock = target.with_name(f".{target.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, b"4242", 0)
    return fd


def run_case(case: Case, base: Path, folder: Path) -> Outcome:
    folder.mkdir(parents=True)
    if case.prepare is not None:
        case.prepare(base, folder)
    args = case.args(base, folder)
    out = folder / case.out if case.out else None
    if out is not None and case.name.startswith("extract") and case.out == "out":
        out = folder / "out" / "acts.h5"
    before = snapshot(out) if out is not None else None
    start = time.monotonic()
    notes: list[str] = []
    if case.fault == "lock":
        assert out is not None
        fd = hold_lock(out)
        try:
            done = cli(args)
        finally:
            os.close(fd)
        out.with_name(f".{out.name}.lock").unlink(missing_ok=True)
    elif case.fault in ("sigint", "sigkill"):
        done, notes = interrupted(case, args, base, out)
    else:
        try:
            done = cli(args)
        except subprocess.TimeoutExpired:
            return Outcome(case.name, case.group, shown(args, base, folder), None, "",
                           "BAD", f"no answer after {TIMEOUT:.0f} s")  # fmt: skip
    after = snapshot(out) if out is not None else None
    left = [s for s in strays(folder) if not s.endswith(".partial")] if case.fault != "lock" else []
    verdict, why = classify(case, done, before, after, left)
    if verdict == "GOOD" and notes:
        verdict, why = "BAD", "; ".join(notes)
    lines = message_lines(done.stderr)
    first = next(
        (ln for ln in lines if ln.startswith(("error:", "Error:"))), lines[0] if lines else ""
    )
    first = first.replace(str(folder), "CASE").replace(str(base), "BASE")
    return Outcome(case.name, case.group, shown(args, base, folder), done.returncode, first[:300],
                   verdict, why, round(time.monotonic() - start, 1))  # fmt: skip


def interrupted(case: Case, args: list[Any], base: Path, out: Path | None
                ) -> tuple[subprocess.CompletedProcess[str], list[str]]:  # fmt: skip
    """Start ``args``, send the signal ``case.delay`` s after the run took its output's lock,
    then rerun to completion; the rerun's result is compared with the reference under
    ``base``."""
    notes: list[str] = []
    child = subprocess.Popen([sys.executable, "-c", CLI, *map(str, args)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env())  # fmt: skip
    if out is not None:  # the run is at work once it holds its output's lock
        lock = out.with_name(f".{out.name}.lock")
        deadline = time.monotonic() + TIMEOUT
        while not lock.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    time.sleep(case.delay)
    finished = child.poll() is not None
    child.send_signal(signal.SIGINT if case.fault == "sigint" else signal.SIGKILL)
    _, err = child.communicate(timeout=TIMEOUT)
    if finished:
        notes.append("(the run had finished before the signal)")
    elif case.fault == "sigint" and child.returncode != 130:
        notes.append(f"SIGINT gave exit {child.returncode}: {err.strip()[-200:]}")
    if out is not None and out.is_dir() and any(p.name.endswith(".tmp") for p in out.rglob("*")):
        notes.append("a temporary file inside the result folder after the kill")
    done = cli(args)
    if done.returncode == 0 and case.same_as and out is not None:
        notes += compare(base / case.same_as, out)
    if finished:
        notes = [n for n in notes if not n.startswith("(")]
    return done, notes


def compare(reference: Path, result: Path) -> list[str]:
    if reference.suffix == ".h5":
        return [] if same_store(reference, result) else ["the resumed store differs"]
    differ = []
    for table in sorted(reference.glob("*.csv")):
        a, b = pd.read_csv(table), pd.read_csv(result / table.name)
        if not a.equals(b):
            differ.append(table.name)
    return [f"rerun differs from an uninterrupted run: {', '.join(differ)}"] if differ else []


def same_store(a: Path, b: Path) -> bool:
    def content(path: Path) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        with h5py.File(path, "r") as handle:
            handle.visititems(lambda n, node: found.__setitem__(n, node[()])
                              if isinstance(node, h5py.Dataset) else None)  # fmt: skip
        return found

    x, y = content(a), content(b)
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def all_cases() -> list[Case]:
    return [*input_cases(), *output_cases(), *signal_cases(), *flag_cases()]


def sweep(
    cases: list[Case],
    work: Path,
    log: Callable[[str], None] = print,
    workers: int = 1,
    progress: Callable[[list[Outcome]], None] | None = None,
) -> list[Outcome]:
    """Build the tiny study under ``work`` and run ``cases`` (``workers`` at a time, the
    signal cases alone at the end); the outcomes in the order of ``cases``."""
    base = work / "base"
    start = time.monotonic()
    if not (base / "study.yaml").exists():
        build_base(base)
    log(f"tiny study ready in {time.monotonic() - start:.0f} s")

    def one(number: int) -> Outcome:
        case = cases[number]
        try:
            outcome = run_case(case, base, work / "cases" / f"{number:03d}")
        except Exception as exc:
            outcome = Outcome(case.name, case.group, "", None, "", "ERROR", f"sweep: {exc!r}")
        with guard:
            found[number] = outcome
            if progress is not None:
                progress([found[i] for i in sorted(found)])
        log(f"[{number + 1}/{len(cases)}] {outcome.verdict} {case.name} ({outcome.seconds} s)"
            + (f": {outcome.why}" if outcome.why else ""))  # fmt: skip
        return outcome

    calm = [i for i, c in enumerate(cases) if c.fault not in ("sigint", "sigkill")]
    timed = [i for i, c in enumerate(cases) if c.fault in ("sigint", "sigkill")]
    found: dict[int, Outcome] = {}
    guard = threading.Lock()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, calm))
    for number in timed:  # alone: the signal's moment depends on the machine's load
        one(number)
    return [found[i] for i in range(len(cases))]


def write_results(
    outcomes: list[Outcome], seconds: float, reduced: bool, planned: int | None = None
) -> None:
    """The JSON and markdown records; ``planned``: the number of cases of the run, when it
    stopped (or is still running) before all of them finished."""
    bad = [o for o in outcomes if o.verdict != "GOOD"]
    machine = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()})"  # noqa: E501
    payload = {
        "cases": len(outcomes), "good": len(outcomes) - len(bad), "bad": len(bad),
        "seconds": round(seconds), "machine": machine, "reduced": reduced, "planned": planned,
        "outcomes": [o.__dict__ for o in outcomes],
    }  # fmt: skip
    (HERE / "fault_sweep_results.json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = [
        "# Fault sweep: results",
        "",
        f"`validation/fault_sweep.py`: {len(outcomes)} cases, **{len(bad)} BAD**, "
        f"{len(outcomes) - len(bad)} GOOD; {seconds / 60:.1f} min on {machine}."
        + (f" **Partial: {len(outcomes)} of {planned} cases ran.**" if planned else ""),
        "",
        "GOOD: exit 2, one line naming the culprit, no traceback, the output untouched and no "
        "temporary file left (or, for a case that must succeed, exit 0 with the expected "
        "result). BAD: anything else. Paths: CASE = the case folder, BASE = the tiny study.",
        "",
        "| # | group | case | exit | first line of the message | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for i, o in enumerate(outcomes, 1):
        cell = o.first_line.replace("|", "\\|")[:160]
        verdict = o.verdict + (f" ({o.why})" if o.why else "")
        lines.append(f"| {i} | {o.group} | {o.case} | {o.exit} | {cell} | {verdict} |")
    (HERE / "fault_sweep_results.md").write_text("\n".join(lines) + "\n")


def merged(outcomes: list[Outcome], seconds: float) -> tuple[list[Outcome], float]:
    """The recorded outcomes with those of ``outcomes`` (cases run again after a fix) in their
    place, in the order of :func:`all_cases`; the run time is the sum of both runs."""
    recorded = json.loads((HERE / "fault_sweep_results.json").read_text())
    by_name = {o["case"]: Outcome(**o) for o in recorded["outcomes"]}
    by_name.update({o.case: o for o in outcomes})
    order = [c.name for c in all_cases() if c.name in by_name]
    return [by_name[name] for name in order], recorded["seconds"] + seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reduced", action="store_true", help="~20 representative cases")
    parser.add_argument("--no-write", action="store_true", help="do not write the results")
    parser.add_argument("--only", help="run the cases whose name contains this text")
    parser.add_argument("--workers", type=int, default=2, help="cases run at a time")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="with --only or --group: replace those cases' rows in the recorded results",
    )
    parser.add_argument("--group", help="run the cases of this group")
    parser.add_argument("--base", help="a tiny study built by an earlier run (reused)")
    parsed = parser.parse_args(argv)
    cases = all_cases()
    if parsed.reduced:
        cases = [c for c in cases if c.reduced]
    if parsed.only:
        cases = [c for c in cases if any(part in c.name for part in parsed.only.split("|"))]
    if parsed.group:
        cases = [c for c in cases if c.group == parsed.group]
    start = time.monotonic()
    writing = not parsed.no_write and not (parsed.only or parsed.group)

    def progress(done: list[Outcome]) -> None:  # a record after every case
        if writing and len(done) < len(cases):
            write_results(done, time.monotonic() - start, parsed.reduced, len(cases))

    with tempfile.TemporaryDirectory(prefix="o2b-sweep-") as work:
        if parsed.base:
            shutil.copytree(parsed.base, Path(work) / "base", symlinks=True)
        outcomes = sweep(cases, Path(work), workers=parsed.workers, progress=progress)
    seconds = time.monotonic() - start
    bad = [o for o in outcomes if o.verdict != "GOOD"]
    print(f"{len(outcomes)} cases, {len(bad)} BAD or ERROR, {seconds:.0f} s")
    if parsed.merge:
        outcomes, seconds = merged(outcomes, seconds)
    if not parsed.no_write and (parsed.merge or not (parsed.only or parsed.group)):
        write_results(outcomes, seconds, parsed.reduced)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
