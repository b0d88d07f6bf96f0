"""The report rendered in headless Chromium: nothing fails to load, no console errors, every
image decodes, each alignment panel holds one ceiling band, screenshots of the main sections.

Screenshots go to the test's ``tmp_path``; with ``OBJECT2BRAIN_TEST_ARTIFACTS=1`` they are also
copied to ``tests/artifacts/``. Skipped, with the reason, when playwright or Chromium is missing
(``make test`` installs Chromium with apt-get when it runs as root and it is missing).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from object2brain.report.build import build_report

from .report_study import TARGETS, write_study

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
SECTIONS = ("summary", "alignment", "inference", "contrast", "rdms", "encoding", "lesion",
            "provenance")  # fmt: skip
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def chromium() -> str:
    """The system Chromium, or skip saying why."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium found (chromium, chromium-browser, google-chrome); install it")


def test_report_in_headless_chromium(tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    executable = chromium()
    folder = write_study(tmp_path / "results", tmp_path / "elsewhere" / "head.safetensors")
    report = build_report(folder)
    failed: list[str] = []
    errors: list[str] = []
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("requestfailed", lambda request: failed.append(request.url[:120]))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate(
            "Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)"
        )
        panels = page.evaluate(
            """name => { const f = document.querySelector(`figure[data-figure="${name}"]`);
            const n = Number(f.dataset.panels); const counts = [];
            for (let i = 0; i < n; i++)
              counts.push(f.querySelectorAll(`svg .o2b-ceiling[data-panel="${i}"]`).length);
            return counts; }""",
            "alignment",
        )
        # the band is drawn: it has an area on the page
        band_area = page.evaluate(
            """Array.from(document.querySelectorAll('figure[data-figure="alignment"] .o2b-ceiling'))
            .map(g => { const b = g.getBoundingClientRect(); return b.width * b.height; })"""
        )
        svgs = page.evaluate(
            "Array.from(document.querySelectorAll('figure.svg svg'))"
            ".map(s => s.getBoundingClientRect().width)"
        )
        for section in SECTIONS:
            page.locator(f"section#{section}").screenshot(path=str(shots / f"{section}.png"))
        banner = page.locator("p.note", has_text="Simulated data.")  # at the top, plainly
        simulated = banner.count() == 1 and banner.is_visible()
        page.evaluate("window.scrollTo(0, 0)")
        top = page.evaluate("document.querySelector('p.note').getBoundingClientRect().top")
        page.screenshot(path=str(shots / "top.png"))  # the page as it opens
        browser.close()
    assert failed == [] and errors == []
    assert simulated and top < 300  # the page says the data are simulated before any result
    assert images and all(images)  # the lesion heatmaps (PNG) decode
    assert svgs and min(svgs) > 100  # every inline figure is laid out
    assert panels == [1] * len(TARGETS)
    assert len(band_area) == len(TARGETS) and min(band_area) > 0
    for section in SECTIONS:
        assert (shots / f"{section}.png").stat().st_size > 5_000, section
    if os.environ.get("OBJECT2BRAIN_TEST_ARTIFACTS"):
        ARTIFACTS.mkdir(exist_ok=True)
        for shot in shots.iterdir():
            shutil.copy(shot, ARTIFACTS / f"report_{shot.name}")
