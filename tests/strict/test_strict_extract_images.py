"""``--valence`` with ``--head``: documented precedence and a warning; a decompression-bomb
sized image is named with its stimulus (issue 17: 15)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from object2brain.activations.store import ActivationStore
from object2brain.api.extract import extract
from object2brain.data.images import LargeImageWarning, load_image
from object2brain.data.stimuli import load_stimuli
from object2brain.heads.io import save_head
from object2brain.models.zoo import load_model


def test_supplied_valence_wins_over_the_head_and_says_so(
    stimulus_table: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    head = nn.Linear(512, 1)
    torch.nn.init.normal_(head.weight, std=0.05)
    path = save_head(head, tmp_path / "h.safetensors", {"arch": "resnet18", "replaced_layer": "fc"})
    ids = load_stimuli(stimulus_table).ids
    supplied = {sid: float(i) for i, sid in enumerate(ids)}
    model = load_model("resnet18", "none", seed=0, head=path)
    # the API says so at INFO (a study passes both on purpose: cross-fitted valence); the CLI,
    # where a user gave both flags, warns (test below)
    with caplog.at_level(logging.INFO, logger="object2brain"):
        out = extract(model, stimulus_table, out=tmp_path / "v.h5", layers=["layer4"],
                      valence=supplied, progress=False)  # fmt: skip
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(
        "has a valence head and predicted valence was supplied" in m
        and "holds the supplied values, not the head's outputs" in m
        for m in warned
    ), warned
    with ActivationStore.open(out) as store:
        np.testing.assert_array_equal(store.read("valence"), np.arange(len(ids), dtype=float))
        assert store.attrs["valence_source"] == "supplied"

    caplog.clear()  # without a head: nothing to say
    with caplog.at_level(logging.INFO, logger="object2brain"):
        extract(load_model("resnet18", "none", seed=0), stimulus_table, out=tmp_path / "w.h5",
                layers=["layer4"], valence=supplied, progress=False)  # fmt: skip
    assert not [r for r in caplog.records if "valence head" in r.getMessage()]


def test_cli_warns_when_valence_and_head_are_both_given(
    stimulus_table: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from object2brain.cli import main

    head = nn.Linear(512, 1)
    path = save_head(head, tmp_path / "h.safetensors", {"arch": "resnet18", "replaced_layer": "fc"})
    valence = tmp_path / "valence.csv"
    ids = load_stimuli(stimulus_table).ids
    valence.write_text("stimulus_id,predicted\n" + "".join(f"{s},{i}\n" for i, s in enumerate(ids)))
    argv = ["extract", "--model", "resnet18", "--weights", "none", "--stimuli", str(stimulus_table)]
    argv += ["--out", str(tmp_path / "c.h5"), "--layers", "layer4", "--head", str(path)]
    with caplog.at_level(logging.WARNING, logger="object2brain"):
        main([*argv, "--valence", str(valence), "--quiet"])
    assert any("--valence takes precedence" in r.getMessage() for r in caplog.records)


def test_large_image_warning_names_the_stimulus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow's raw DecompressionBombWarning named neither the stimulus nor the file."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60 * 60)  # a 10,000^2 image, scaled down
    big = tmp_path / "huge.png"
    Image.new("RGB", (80, 80), (10, 20, 30)).save(big)
    table = tmp_path / "stimuli.csv"
    pd.DataFrame({"stimulus_id": ["giant"], "path": ["huge.png"]}).to_csv(table, index=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LargeImageWarning)
        load_stimuli(table, workers=1)
        load_image(big)  # once per file
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"stimulus 'giant' ({big.resolve()}): 80 x 80 = 6,400 pixels")
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
