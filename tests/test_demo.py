"""The embedded demo runs offline end to end and writes a self-contained report."""

from __future__ import annotations

import json
import re
from pathlib import Path

from object2brain.demo import run_demo, shipped_photos
from object2brain.store import ActivationStore


def test_shipped_photos_cover_three_categories() -> None:
    photos = shipped_photos(n_lfw_per_class=2)
    categories = {photo.category for photo in photos}
    assert categories == {"face", "non-face", "photo"}
    assert len({photo.stimulus_id for photo in photos}) == len(photos)


def test_demo_end_to_end(tmp_path: Path) -> None:
    report = run_demo(tmp_path / "demo", batch_size=16, progress=False)
    assert report == tmp_path / "demo" / "report.html"
    page = report.read_text()
    assert page.startswith("<!DOCTYPE html>")
    # self-contained: no external resources of any kind
    assert not re.search(r"""(src|href)=["']https?://""", page)
    assert "no network, no user data" in page
    assert page.count("<img") >= 40
    manifest = json.loads((tmp_path / "demo" / "manifest.json").read_text())
    assert manifest["config"]["model"] == "efficientnet_lite0"
    assert manifest["versions"]["torch"]
    with ActivationStore.open(tmp_path / "demo" / "activations.h5") as store:
        assert len(store.stimulus_ids) == manifest["n_stimuli"] >= 40
        assert store.layers[0] == "_blocks.0" and store.layers[-1] == "_fc"
    for stem in ("layer_rdms", "layer_similarity"):
        assert (tmp_path / "demo" / "figures" / f"{stem}.png").stat().st_size > 1000
        assert (tmp_path / "demo" / "figures" / f"{stem}.svg").is_file()
