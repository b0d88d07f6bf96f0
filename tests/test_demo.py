"""The embedded demo: offline end to end, planted truth recovered, report renders in a browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from object2brain.demo import recovered_truth, run_demo

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    os.environ["OBJECT2BRAIN_OFFLINE"] = "1"
    run_demo(out, size="quick", progress=False)
    return out


def test_demo_recovers_the_planted_truth(demo: Path) -> None:
    truth = recovered_truth(demo / "results")
    planted = json.loads((demo / "results" / "simulation" / "truth.json").read_text())
    assert planted["simulated"] is True
    # the early-visual ROI was built from _blocks.2: its best layer is among the first three
    assert truth["evc_best_layer_index"] <= 2, truth
    # ... and its best-predicting layer in the encoding models too
    assert truth["evc_encoding_best_layer_index"] <= 2, truth
    # the face ROI was built from face-selective filters: lesioning Faces hurts it most
    assert truth["ffa_top_lesion_group"] == "Faces", truth
    assert truth["ffa_top_lesion_delta_r"] < 0
    # the test of the group itself (p_group) reported, not the random-subset p_null
    assert 0 < truth["ffa_top_lesion_p_group"] <= 1 and "ffa_top_lesion_p" not in truth
    assert truth["ffa_top_lesion_p_null"] < 0.05
    assert isinstance(truth["ffa_top_lesion_significant"], bool)


def test_demo_outputs_and_report(demo: Path) -> None:
    page = (demo / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)=["'](https?:)?//""", page)  # self-contained
    assert "Simulated data" in page and "Planted truth vs recovered" in page
    for section in (
        "Alignment of layers",
        "Behaviour: predicted vs rated",
        "Condition contrast",
        "Which object groups",
        "Object2Brain",
        "Encoding models",
        "Tables (CSV downloads)",
    ):
        assert section in page, section
    results = demo / "results"
    for name in (
        "rsa/alignment.csv",
        "rsa/behavior_direct.csv",
        "rsa/condition_contrast.csv",
        "dissect/efficientnet_lite0/filter_objects.csv",
        "lesion/efficientnet_lite0/object2brain.csv",
        "manifest.json",
        "heads/efficientnet_lite0/head.safetensors",
        "encode/encoding.csv",
        "encode/folds.csv",
    ):
        assert (results / name).is_file(), name
    assert (demo / "stimuli" / "boxes.csv").is_file()


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "chromium"],
        ):
            try:
                subprocess.run(command, check=True, capture_output=True, timeout=600, env=env)
            except (subprocess.SubprocessError, OSError):
                return None
        return shutil.which("chromium")
    return None


def test_report_in_headless_chromium(demo: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright not installed")
    executable = _chromium()
    if executable is None:
        pytest.skip("Chromium is not installed and could not be installed (apt-get)")
    failed: list[str] = []
    console_errors: list[str] = []
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=executable,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-quic",
            ],
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("requestfailed", lambda request: failed.append(request.url[:120]))
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        page.goto((demo / "report.html").as_uri())
        page.wait_for_load_state("load")
        broken = page.evaluate(
            "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length"
        )
        n_images = page.evaluate("document.images.length")
        page.screenshot(path=str(ARTIFACTS / "demo_report.png"), full_page=False)
        browser.close()
    assert failed == []
    assert console_errors == []
    assert n_images >= 4 and broken == 0
    assert (ARTIFACTS / "demo_report.png").stat().st_size > 10_000
