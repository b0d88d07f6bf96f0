"""The report on bad, empty and stale result tables: one clear error or a report, never a crash."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from object2brain.errors import DataError
from object2brain.report.build import build_report
from object2brain.tables import ALIGNMENT, BEHAVIOR_DIRECT, CONDITION_CONTRAST, OBJECT2BRAIN

ALIGNMENT_COLUMNS = ALIGNMENT.column_names
BEHAVIOR_DIRECT_COLUMNS = BEHAVIOR_DIRECT.column_names
CONTRAST_COLUMNS = CONDITION_CONTRAST.column_names
OBJECT2BRAIN_COLUMNS = OBJECT2BRAIN.column_names


def alignment(n_layers: int = 2, condition: str = "all") -> pd.DataFrame:
    rows = []
    for i in range(n_layers):
        for subject in ("sub-01", "group"):
            rows.append(
                {
                    "model": "resnet18",
                    "layer": f"layer{i + 1}",
                    "layer_index": i,
                    "target": "EVC",
                    "target_kind": "roi",
                    "subject": subject,
                    "condition": condition,
                    "rdm_metric": "correlation",
                    "compare_method": "spearman",
                    "r": 0.1 * (i + 1),
                    "p_perm": 0.05,
                    "p_fdr": 0.05,
                    "ci_low": 0.0,
                    "ci_high": 0.3,
                    "nc_low": 0.4,
                    "nc_high": 0.6,
                    "n_stimuli": 12,
                    "n_perm": 20,
                }
            )
    return pd.DataFrame(rows, columns=ALIGNMENT_COLUMNS)


def behavior_direct() -> pd.DataFrame:
    row = ["resnet18", "all", "spearman", 0.5, 0.01, 0.2, 0.7, 12]
    return pd.DataFrame([row], columns=BEHAVIOR_DIRECT_COLUMNS)


def condition_contrast() -> pd.DataFrame:
    row: dict[str, Any] = dict.fromkeys(CONTRAST_COLUMNS, 0.1)
    row.update(model="resnet18", layer="layer1", target="EVC", target_kind="roi")
    row.update(subject="group", condition_a="pos", condition_b="neg")
    row.update(rdm_metric="correlation", compare_method="spearman")
    return pd.DataFrame([row], columns=CONTRAST_COLUMNS)


def object2brain_table() -> pd.DataFrame:
    row: dict[str, Any] = dict.fromkeys(OBJECT2BRAIN_COLUMNS, 0.1)
    row.update(model="resnet18", layer="layer4", group="Faces", variant="lesion", target="EVC")
    row.update(subject="group", condition="all", n_filters=3, n_null=10)
    return pd.DataFrame([row], columns=OBJECT2BRAIN_COLUMNS)


def write_manifest(folder: Path, command: str, outputs: list[str]) -> None:
    payload = {"command": command, "config": {}, "outputs": outputs}
    (folder / "manifest.json").write_text(json.dumps(payload))


def rsa_folder(folder: Path, *, contrast: bool = False) -> Path:
    """What ``rsa --out folder`` writes (tables as CSV and Parquet and the manifest)."""
    folder.mkdir(parents=True, exist_ok=True)
    tables = {"alignment": alignment(), "behavior_direct": behavior_direct()}
    if contrast:
        tables["condition_contrast"] = condition_contrast()
    outputs = []
    for name, frame in tables.items():
        frame.to_csv(folder / f"{name}.csv", index=False)
        frame.to_parquet(folder / f"{name}.parquet", index=False)
        outputs += [f"{name}.csv", f"{name}.parquet"]
    write_manifest(folder, "rsa", sorted(outputs))
    return folder


def report_error(folder: Path) -> str:
    with pytest.raises(DataError) as info:
        build_report(folder)
    assert not (folder / "report.html").exists()
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# 1. wrong columns, unreadable files


def test_wrong_columns_name_the_file_and_the_missing_columns(tmp_path: Path) -> None:
    folder = rsa_folder(tmp_path / "res")
    (folder / "alignment.csv").write_text("a,b\n1,2\n")
    message = report_error(folder)
    assert str(folder / "alignment.csv") in message
    assert "missing column(s) model, layer, layer_index" in message
    assert "n_perm" in message and "(found: a, b)" in message
    assert "\n" not in message


def test_wrong_columns_in_a_lesion_table(tmp_path: Path) -> None:
    folder = tmp_path / "res"
    folder.mkdir()
    object2brain_table().drop(columns=["delta_r", "p_fdr"]).to_csv(
        folder / "object2brain.csv", index=False
    )
    message = report_error(folder)
    assert str(folder / "object2brain.csv") in message
    assert "missing column(s) delta_r, p_fdr" in message


def test_corrupt_csv_names_the_file(tmp_path: Path) -> None:
    folder = rsa_folder(tmp_path / "res")
    (folder / "alignment.csv").write_bytes(b"\xff\xfe\x00\x81garbage\x00\x9d\n\xc3\x28,\x00\n")
    message = report_error(folder)
    assert str(folder / "alignment.csv") in message


def test_corrupt_parquet_names_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "res"
    folder.mkdir()
    (folder / "alignment.parquet").write_bytes(b"PAR1 this is not parquet")
    message = report_error(folder)
    assert str(folder / "alignment.parquet") in message
    assert "cannot be read" in message


def test_parquet_without_csv_is_reported(tmp_path: Path) -> None:
    folder = rsa_folder(tmp_path / "res")
    (folder / "alignment.csv").unlink()
    page = build_report(folder).read_text()
    assert "Alignment of layers with behaviour and brain" in page


def test_cli_prints_one_line_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from object2brain.cli import main

    folder = rsa_folder(tmp_path / "res")
    (folder / "alignment.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit) as info:
        main(["report", str(folder)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "alignment.csv" in err and "missing column(s) model" in err
    assert "Traceback" not in err
    alignment().to_csv(folder / "alignment.csv", index=False)
    main(["report", str(folder), "--quiet"])  # the common option, as on every command
    assert (folder / "report.html").is_file()
    main(["report", str(folder), "--out", str(tmp_path / "pages"), "--quiet"])  # a folder
    assert (tmp_path / "pages" / "report.html").is_file()
    main(["report", str(folder), "--out", str(tmp_path / "study.html"), "--quiet"])  # a file
    assert (tmp_path / "study.html").is_file()
    (tmp_path / "notes").write_text("a file, not a folder")
    with pytest.raises(SystemExit) as info:
        main(["report", str(folder), "--out", str(tmp_path / "notes")])
    assert info.value.code == 2
    assert "--out names a folder (or a file ending in .html)" in capsys.readouterr().err
    assert (tmp_path / "notes").read_text() == "a file, not a folder"  # left as it was


# ---------------------------------------------------------------------------------------------
# 2. tables without rows


def test_header_only_alignment_is_reported_as_empty(tmp_path: Path) -> None:
    folder = rsa_folder(tmp_path / "res")
    pd.DataFrame(columns=ALIGNMENT_COLUMNS).to_csv(folder / "alignment.csv", index=False)
    page = build_report(folder).read_text()
    assert "empty tables" in page and "alignment.csv</a> (0 rows)" in page
    assert "Alignment of layers with behaviour and brain" not in page
    assert "Behaviour: predicted vs rated valence" in page


def test_only_empty_tables_still_give_a_report(tmp_path: Path) -> None:
    folder = tmp_path / "res"
    folder.mkdir()
    pd.DataFrame(columns=ALIGNMENT_COLUMNS).to_csv(folder / "alignment.csv", index=False)
    pd.DataFrame(columns=OBJECT2BRAIN_COLUMNS).to_csv(folder / "object2brain.csv", index=False)
    page = build_report(folder).read_text()
    assert "alignment, object2brain" in page
    assert "Object2Brain: object groups behind the alignment" not in page


def test_alignment_without_condition_all(tmp_path: Path) -> None:
    folder = tmp_path / "res"
    folder.mkdir()
    frame = alignment(condition="pos")
    frame["n_perm"] = float("nan")
    frame.to_csv(folder / "alignment.csv", index=False)
    page = build_report(folder).read_text()
    assert "n/a" in page and "12" in page


# ---------------------------------------------------------------------------------------------
# 3. stale tables of an earlier run into the same folder


def test_tables_the_manifest_does_not_list_are_stale(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = rsa_folder(tmp_path / "res", contrast=True)
    rsa_folder(folder)  # re-run without conditions: condition_contrast.* stay behind
    assert (folder / "condition_contrast.csv").is_file()
    with caplog.at_level(logging.WARNING, logger="object2brain"):
        page = build_report(folder).read_text()
    assert "Condition contrast" not in page and "condition_contrast.csv" not in page
    assert "Behaviour: predicted vs rated valence" in page
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(folder / "condition_contrast.csv") in warnings[0] and "stale" in warnings[0]


def test_tables_listed_by_the_manifest_are_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = rsa_folder(tmp_path / "res", contrast=True)
    with caplog.at_level(logging.WARNING, logger="object2brain"):
        page = build_report(folder).read_text()
    assert "Condition contrast" in page
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_folder_without_manifest_keeps_every_table(tmp_path: Path) -> None:
    folder = rsa_folder(tmp_path / "res", contrast=True)
    (folder / "manifest.json").unlink()
    assert "Condition contrast" in build_report(folder).read_text()


def test_unreadable_manifest_keeps_every_table_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = rsa_folder(tmp_path / "res", contrast=True)
    (folder / "manifest.json").write_text("{bad")
    with caplog.at_level(logging.WARNING, logger="object2brain"):
        page = build_report(folder).read_text()
    assert "Condition contrast" in page
    assert any("manifest.json" in r.getMessage() for r in caplog.records)


def test_manifest_of_another_command_does_not_hide_tables(tmp_path: Path) -> None:
    folder = rsa_folder(tmp_path / "res", contrast=True)
    (folder / "object2brain.csv").write_text(object2brain_table().to_csv(index=False))
    # a lesion run into the rsa folder overwrote its manifest: the rsa tables are not stale
    write_manifest(folder, "lesion", [str(folder / "object2brain.csv")])
    page = build_report(folder).read_text()
    assert "Condition contrast" in page and "Object2Brain: object groups" in page
    write_manifest(folder, "extract", ["store.h5"])
    assert "Condition contrast" in build_report(folder).read_text()


def test_run_folder_with_stage_subfolders(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "results"
    rsa_folder(out / "rsa", contrast=True)
    rsa_folder(out / "rsa")  # the rsa stage re-ran without conditions
    lesion = out / "lesion" / "resnet18"
    lesion.mkdir(parents=True)
    object2brain_table().to_csv(lesion / "object2brain.csv", index=False)
    # lesion records absolute paths (here of a folder since moved): matched by file name
    write_manifest(lesion, "lesion", ["/elsewhere/lesion/resnet18/object2brain.csv"])
    write_manifest(out, "run", [str(out / "activations" / "resnet18.h5")])
    with caplog.at_level(logging.WARNING, logger="object2brain"):
        page = build_report(out).read_text()
    assert "Alignment of layers with behaviour and brain" in page
    assert "Object2Brain: object groups behind the alignment" in page
    assert "Condition contrast" not in page
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(out / "rsa" / "condition_contrast.csv") in warnings[0]


def test_corrupt_truth_names_the_file(tmp_path: Path) -> None:
    folder = rsa_folder(tmp_path / "res")
    (folder / "simulation").mkdir()
    (folder / "simulation" / "truth.json").write_text("{not json")
    message = report_error(folder)
    assert str(folder / "simulation" / "truth.json") in message


def test_figures_the_manifest_does_not_list_are_stale(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An earlier run's figure of a model no longer analysed is left out, with a warning.

    (The alignment figures are drawn by the report from the tables; the lesion heatmaps are
    the stage's PNG files, so they carry this check.)"""
    from PIL import Image

    folder = tmp_path / "res"
    (folder / "figures").mkdir(parents=True)
    object2brain_table().to_csv(folder / "object2brain.csv", index=False)
    for name in ("lesion_resnet18_layer4.png", "lesion_oldmodel_layer4.png"):
        Image.new("RGB", (4, 4)).save(folder / "figures" / name)
    write_manifest(folder, "lesion", ["object2brain.csv", "figures/lesion_resnet18_layer4.png"])
    with caplog.at_level(logging.WARNING, logger="object2brain"):
        page = build_report(folder).read_text()
    assert 'alt="resnet18 / layer4: delta r per object group' in page and "oldmodel" not in page
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "lesion_oldmodel_layer4.png" in warnings[0]


def test_planted_truth_is_compared_with_the_simulation_s_runs_only(tmp_path: Path) -> None:
    """A folder with an RSA on real data and one on simulated data: the planted truth is compared
    with the run whose manifest records the simulated files' hashes; the other is named."""
    from object2brain.manifest import file_sha256

    folder = tmp_path / "study"
    simulation = folder / "simulation"
    simulation.mkdir(parents=True)
    (simulation / "patterns.h5").write_bytes(b"simulated patterns")
    truth = {
        "rois": [{"name": "EVC", "source": "layer:layer1", "snr": 2.0}],
        "n_subjects": 3, "seed": 0, "rating_noise": 1.0, "valence_origin": "stimulus table",
    }  # fmt: skip
    (simulation / "truth.json").write_text(json.dumps(truth))
    brain_yaml = "sources:\n- kind: patterns\n  path: patterns.h5\n"  # any study may write it
    (simulation / "brain.yaml").write_text(brain_yaml)
    write_manifest(simulation, "simulate", ["patterns.h5", "brain.yaml", "truth.json"])
    real, simulated = folder / "rsa_real", folder / "rsa_sim"
    rsa_folder(real)
    rsa_folder(simulated)
    sim_alignment = alignment()
    sim_alignment.loc[sim_alignment["layer"] == "layer1", "r"] = 0.9  # best layer: the planted one
    sim_alignment.to_csv(simulated / "alignment.csv", index=False)
    real_alignment = alignment()
    real_alignment.loc[real_alignment["layer"] == "layer2", "r"] = 0.95  # the higher r overall
    real_alignment.to_csv(real / "alignment.csv", index=False)
    for where, data in ((real, "real patterns"), (simulated, None)):
        manifest = json.loads((where / "manifest.json").read_text())
        digest = file_sha256(simulation / "patterns.h5") if data is None else "0" * 64
        # the real study's brain manifest has the same three lines as the simulation's
        manifest["inputs"] = {"brain.yaml": file_sha256(simulation / "brain.yaml"), "data": digest}
        (where / "manifest.json").write_text(json.dumps(manifest))
    dissection = folder / "dissect"  # no brain or rating data: neither simulated nor other data
    dissection.mkdir()
    filters = pd.DataFrame(
        [["resnet18", "layer4", 0, "Faces", 1.0, 2.0, 3, True]],
        columns=["model", "layer", "filter", "group", "importance", "enrichment", "n_images",
                 "assigned"],
    )  # fmt: skip
    filters.to_csv(dissection / "filter_objects.csv", index=False)
    write_manifest(dissection, "dissect", ["filter_objects.csv"])
    manifest = json.loads((dissection / "manifest.json").read_text())
    (dissection / "manifest.json").write_text(json.dumps({**manifest, "inputs": {"x": "1" * 64}}))
    page = build_report(folder).read_text()
    assert "dissect" not in page.split("Not compared with the planted truth")[1].split("</p>")[0]
    assert "best layer layer1 (r = 0.90)" in page
    assert "best layer layer2" not in page  # the real-data run's best layer
    assert "Not compared with the planted truth" in page and "rsa_real" in page
    assert "Some of the results in this folder come from brain and rating data" in page


def test_report_imports_no_stage() -> None:
    """report/ reads column lists from object2brain.tables, never from a stage package."""
    import ast

    import object2brain.report

    # rdm_file: the rdms.h5 format (numpy and h5py only), a bottom layer like tables and io
    allowed = ("tables", "io", "manifest", "errors", "data", "report", "_version", "rdm_file")
    package = Path(object2brain.report.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "object2brain" and (len(parts) < 2 or parts[1] not in allowed):
                    found.append(f"{path.name}: {name}")
    assert not found, found


def test_report_out_in_a_missing_folder_is_created(tmp_path: Path) -> None:
    results = rsa_folder(tmp_path / "results")
    target = tmp_path / "not" / "yet" / "report.html"
    assert build_report(results, out=target) == target
    assert target.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_a_failing_report_creates_no_folder(tmp_path: Path) -> None:
    results = rsa_folder(tmp_path / "results")
    (results / "alignment.csv").write_text("model,layer\nm,l\n")  # columns missing
    target = tmp_path / "not" / "yet" / "report.html"
    with pytest.raises(DataError):
        build_report(results, out=target)
    assert not (tmp_path / "not").exists()
