"""The command line: one clear message, exit status 2, and nothing half-written on bad input."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from object2brain.activations.store import ActivationStore
from object2brain.cli import main
from object2brain.models.zoo import build_architecture


def run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def assert_fails_cleanly(
    capsys: pytest.CaptureFixture[str], argv: list[str], out: Path, *expected: str
) -> str:
    code = run(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    error_lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(error_lines) == 1 and error_lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    for text in expected:
        assert text in captured.err
    assert not out.exists()
    assert not out.with_name(out.name + ".partial").exists()
    assert not list(out.parent.glob(".*.tmp"))
    return captured.err


def extract_args(table: Path, out: Path, *extra: str) -> list[str]:
    return [
        "extract",
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--stimuli",
        str(table),
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def test_extract_succeeds(
    stimulus_table: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "acts.h5"
    assert run(extract_args(stimulus_table, out, "--layers", "layer4,fc")) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with ActivationStore.open(out) as store:
        assert store.layers == ["layer4", "fc"]


def test_missing_images_all_listed(
    stimulus_table: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frame = pd.read_csv(stimulus_table)
    frame.loc[[2, 6], "path"] = ["gone1.jpg", "gone2.jpg"]
    frame.to_csv(stimulus_table, index=False)
    out = tmp_path / "a.h5"
    assert_fails_cleanly(
        capsys,
        extract_args(stimulus_table, out),
        out,
        "2 missing image file(s)",
        "s02_astronaut",
        "s06_horse",
    )


def test_corrupt_image(photo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "imgs"
    shutil.copytree(photo_dir, folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "a.h5"
    assert_fails_cleanly(capsys, extract_args(folder, out), out, "unreadable image", "broken")


def test_duplicate_ids(photo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "t.csv"
    pd.DataFrame({"stimulus_id": ["x", "x"], "path": [str(photo_dir / "cat.jpg")] * 2}).to_csv(
        table, index=False
    )
    out = tmp_path / "a.h5"
    assert_fails_cleanly(capsys, extract_args(table, out), out, "duplicate stimulus_id(s): x")


def test_empty_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "t.csv"
    table.write_text("stimulus_id,path\n")
    out = tmp_path / "a.h5"
    assert_fails_cleanly(capsys, extract_args(table, out), out, "no rows", str(table))


def test_unknown_model(
    stimulus_table: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "a.h5"
    argv = extract_args(stimulus_table, out)
    argv[argv.index("resnet18")] = "resnet19"
    assert_fails_cleanly(capsys, argv, out, "unknown model 'resnet19'", "resnet18")


def test_unknown_layer(
    stimulus_table: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "a.h5"
    assert_fails_cleanly(
        capsys,
        extract_args(stimulus_table, out, "--layers", "layer9"),
        out,
        "unknown layer(s) for resnet18",
        "'layer9'",
        "layer1",
    )


def test_checkpoint_for_wrong_architecture(
    stimulus_table: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tmp_path / "alexnet.pth"
    torch.save(build_architecture("alexnet").state_dict(), checkpoint)
    out = tmp_path / "a.h5"
    argv = extract_args(stimulus_table, out)
    argv[argv.index("none")] = str(checkpoint)
    assert_fails_cleanly(capsys, argv, out, str(checkpoint), "does not match architecture resnet18")


def test_weights_unavailable_offline(
    stimulus_table: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "a.h5"
    argv = extract_args(stimulus_table, out)
    argv[argv.index("none")] = "default"
    assert_fails_cleanly(capsys, argv, out, "not available", "TORCH_HOME", "--weights PATH")


def test_unwritable_output(
    stimulus_table: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "acts.h5"
    assert run(extract_args(stimulus_table, out)) == 2
    assert "is not a folder" in capsys.readouterr().err
    out = Path("/proc/object2brain-test.h5")  # /proc refuses new files, even to root
    assert_fails_cleanly(capsys, extract_args(stimulus_table, out), out, "not writable")


def test_usage_error_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["extract", "--model", "resnet18"]) == 2
    assert "Missing option" in capsys.readouterr().err


def test_debug_shows_traceback(stimulus_table: Path, tmp_path: Path) -> None:
    from object2brain.errors import ModelError

    argv = ["--debug", *extract_args(stimulus_table, tmp_path / "a.h5")]
    argv[argv.index("resnet18")] = "nope"
    with pytest.raises(ModelError):
        main(argv)


def test_models_and_layers_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["models"]) == 0
    listing = capsys.readouterr().out
    assert "efficientnet_lite0" in listing and "bundled" in listing and "convnext_tiny" in listing
    assert run(["layers", "vgg16"]) == 0
    layers = capsys.readouterr().out.split("\n")
    assert layers[0].split()[0] == "features.4" and "classifier.6" in layers[-2]
    assert run(["layers", "vgg17"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_several_activation_stores_after_one_flag(tmp_path: Path) -> None:
    import json

    import h5py
    import numpy as np

    from object2brain.cli import expand_multi_value

    assert expand_multi_value(["rsa", "--activations", "a.h5", "b.h5", "--out", "x"]) == [
        "rsa", "--activations", "a.h5", "--activations", "b.h5", "--out", "x",
    ]  # fmt: skip
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(12)]
    stores = []
    for name in ("m1", "m2"):
        path = tmp_path / f"{name}.h5"
        with h5py.File(path, "w") as handle:
            handle["stimulus_ids"] = np.array(ids, dtype=object)
            handle.create_group("layers")["conv"] = rng.normal(size=(12, 4, 2, 2))
            handle.attrs.update(complete=True, order=json.dumps(["conv"]), model=name)
        stores.append(str(path))
    table = tmp_path / "t.csv"
    pd.DataFrame({"stimulus_id": ids, "valence": rng.normal(size=12)}).to_csv(table, index=False)
    out = tmp_path / "rsa"
    assert run(["rsa", "--activations", *stores, "--stimuli", str(table), "--out", str(out),
                "--n-perm", "10", "--n-boot", "0", "--quiet"]) == 0  # fmt: skip
    assert set(pd.read_csv(out / "alignment.csv")["model"]) == {"m1", "m2"}


def test_ctrl_c_exits_130_with_a_resume_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """typer catches KeyboardInterrupt itself and returns 130: that must not become exit 0."""
    zoo = importlib.import_module("object2brain.models.zoo")

    def interrupted() -> list[str]:
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo, "list_models", interrupted)
    assert run(["models"]) == 130
    assert "interrupted: rerun the same command" in capsys.readouterr().err


def test_a_truncated_file_read_deep_in_a_library_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """click turns any EOFError into a silent Abort (exit 1, a blank line): we say what it was."""
    zoo = importlib.import_module("object2brain.models.zoo")

    def truncated() -> list[str]:
        raise EOFError("Compressed file ended before the end-of-stream marker was reached")

    monkeypatch.setattr(zoo, "list_models", truncated)
    assert run(["models"]) == 2
    assert "error: unexpected end of a file (Compressed file ended" in capsys.readouterr().err
    with pytest.raises(EOFError):
        main(["--debug", "models"])


@pytest.mark.parametrize(
    "argv",
    [
        ["rsa", "--activations", "missing.h5"],
        ["lesion", "--activations", "missing.h5", "--filters", "missing.csv"],
        ["dissect", "--model", "resnet18", "--weights", "none", "--stimuli", "missing.csv",
         "--layer", "layer4", "--target", "0"],
    ],
)  # fmt: skip
def test_out_that_is_a_file_fails_before_any_work(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked first (the inputs here do not even exist), not by mkdir after the work."""
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for out in (afile, afile / "sub"):
        assert run([*argv, "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
        assert "is not a folder" in err and "missing" not in err
    assert afile.read_text() == "keep me"


def test_layer_that_runs_twice_fails_before_the_store_is_created(
    stimulus_table: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """resnet18's ``layer4.1.relu`` runs twice per block: found by a probe pass, no .partial."""
    out = tmp_path / "acts.h5"
    argv = extract_args(stimulus_table, out, "--layers", "layer4.1.relu")
    assert_fails_cleanly(capsys, argv, out, "'layer4.1.relu' runs more than once")


def test_negative_workers_is_a_usage_error(
    stimulus_table: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "acts.h5"
    assert run(extract_args(stimulus_table, out, "--workers", "-2")) == 2
    assert "--workers" in capsys.readouterr().err
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_two_stores_of_one_architecture_get_distinct_names(
    stimulus_table: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """e.g. ImageNet vs Places365 resnet18: --name labels them apart in the result tables."""
    stores = []
    for seed in ("0", "1"):
        out = tmp_path / f"r{seed}.h5"
        argv = extract_args(stimulus_table, out, "--layers", "layer4", "--seed", seed)
        assert run([*argv, "--name", f"resnet18_seed{seed}"]) == 0
        stores.append(str(out))
    with ActivationStore.open(stores[1]) as store:
        assert store.attrs["model"] == "resnet18_seed1"
    table = tmp_path / "v.csv"
    ids = pd.read_csv(stimulus_table)["stimulus_id"]
    pd.DataFrame({"stimulus_id": ids, "valence": range(len(ids))}).to_csv(table, index=False)
    out = tmp_path / "rsa"
    assert run(["rsa", "--activations", *stores, "--stimuli", str(table), "--out", str(out),
                "--n-perm", "5", "--n-boot", "0", "--quiet"]) == 0  # fmt: skip
    models = set(pd.read_csv(out / "alignment.csv")["model"])
    assert models == {"resnet18_seed0", "resnet18_seed1"}


def test_python_dash_m_runs_the_cli() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "object2brain", "layers", "resnet18"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "layer4" in done.stdout


def test_malformed_yaml_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "study.yaml"
    config.write_text("models: [resnet18\nout: x\n")
    assert run(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {config}: not valid YAML") and err.count("\n") == 1, err


def test_stage_options_come_from_the_options_models() -> None:
    """Each field of a stage's options model with a flag is that command's option, with the
    model's default, bounds and choices; fields marked ``cli: None`` have none."""
    from typing import get_args

    import typer.main

    from object2brain.cli import app
    from object2brain.options import STAGE_OPTIONS, RdmMetric, Runtime

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    for stage, model in STAGE_OPTIONS.items():
        params = {p.name: p for p in commands[stage.replace("_", "-")].params}
        for name, info in model.model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            flag = extra.get("cli", "--" + name.replace("_", "-"))
            if flag is None:
                assert name not in params, (stage, name)
                continue
            param = params[name]
            assert flag in param.opts, (stage, name, param.opts)
            if not info.is_required() and info.default_factory is None:
                assert param.default == info.default, (stage, name)
        assert {"seed", "quiet"} <= set(params)
    rsa = {p.name: p for p in commands["rsa"].params}
    assert rsa["n_perm"].default == 10_000 and rsa["n_perm"].min == 0  # type: ignore[attr-defined]
    # vocabularies are parsed as text and checked by the model, whose message names the
    # vocabulary ("unknown RDM metric ..."); the help lists the choices
    assert all(m in str(rsa["rdm_metric"].help) for m in get_args(RdmMetric))
    assert rsa["device"].default == Runtime().device
    assert "layers" not in rsa and "held_out" in rsa


def test_an_option_the_model_refuses_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train-head", "--model", "resnet18", "--out", str(tmp_path / "h"), "--lr", "0"]
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: --lr 0.0: Input should be greater than 0") and err.count("\n") == 1
    )
    assert not (tmp_path / "h").exists()


def test_every_boolean_option_can_be_turned_off_and_on() -> None:
    """A boolean option is the pair ``--x/--no-x``: one whose default is true (``--save-rdms``,
    ``--channels-last``) can be switched off on the command line, one whose default is false on;
    the value parsed is the one given, whatever the default."""
    import typer.main

    from object2brain.cli import app

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    pairs = {}
    for command_name, command in [*commands.items(), *commands["findingemo"].commands.items()]:
        for param in command.params:
            if getattr(param, "is_flag", False) and getattr(param, "secondary_opts", None):
                pairs[(command_name, param.name)] = (command, param)
    assert ("rsa", "save_rdms") in pairs and ("extract", "channels_last") in pairs
    assert ("extract", "fold_batchnorm") in pairs and ("encode", "standardize") in pairs
    for (command_name, name), (command, param) in pairs.items():
        (on,), (off,) = param.opts, param.secondary_opts
        assert off == "--no-" + on.removeprefix("--"), (command_name, name)
        for flag, expected in ((on, True), (off, False)):
            context = command.make_context(command_name, [flag], resilient_parsing=True)
            assert context.params[name] is expected, (command_name, flag)
