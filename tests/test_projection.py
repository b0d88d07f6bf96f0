"""Sparse random projection keeps correlation distances within the documented bound."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from object2brain.activations.projection import project, srp_error_bound, srp_matrix
from object2brain.activations.store import ActivationStore
from object2brain.api.extract import extract
from object2brain.models.zoo import load_model


def correlation_distances(x: np.ndarray) -> np.ndarray:
    r = np.corrcoef(x.reshape(x.shape[0], -1))
    return (1.0 - r)[np.triu_indices(x.shape[0], k=1)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correlation_distances_within_bound(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, d, k = 40, 20_000, 1024
    latent = rng.normal(size=(n, 5)) @ rng.normal(size=(5, d))
    features = (
        np.maximum(latent + rng.normal(scale=2.0, size=(n, d)), 0.0) + 3.0
    )  # ReLU-like, offset
    matrix = srp_matrix(d, k, seed=seed, layer="conv")
    projected = project(torch.from_numpy(features).float(), matrix).numpy()
    assert projected.shape == (n, k)
    original, kept = correlation_distances(features), correlation_distances(projected)
    errors = np.abs(kept - original)
    bound = srp_error_bound(n, k)
    assert errors.max() <= bound
    assert np.median(errors) < 1.5 / np.sqrt(k)  # typical error: about 1/sqrt(k) or less
    assert np.corrcoef(original, kept)[0, 1] > 0.95


def test_matrix_is_reproducible_and_scaled() -> None:
    a = srp_matrix(5000, 256, seed=3, layer="x").to_dense()
    b = srp_matrix(5000, 256, seed=3, layer="x").to_dense()
    c = srp_matrix(5000, 256, seed=3, layer="y").to_dense()
    assert torch.equal(a, b) and not torch.equal(a, c)
    # E ||x R||^2 = ||x||^2: the squared column norms of R^T average to 1
    assert float((a**2).sum(dim=0).mean()) == pytest.approx(1.0, rel=0.05)
    assert (a != 0).float().mean().item() == pytest.approx(1 / np.sqrt(5000), rel=0.1)


def test_extract_with_srp(stimulus_table: Path, tmp_path: Path) -> None:
    model = load_model("resnet18", "none", seed=0)
    out = extract(
        model,
        stimulus_table,
        out=tmp_path / "srp.h5",
        layers="layer1,layer4,fc",
        srp=300,
        progress=False,
    )
    with ActivationStore.open(out) as store:
        assert store.shape("layer1") == (8, 300)
        assert store.shape("layer4") == (8, 300)
        assert store.shape("fc") == (8, 300)  # 1000 features > 300: projected too
        srp = store.attrs["srp"]
        assert srp["dim"] == 300 and srp["centred"] is True
        assert srp["projected_layers"] == ["fc", "layer1", "layer4"]
    small = extract(
        model, stimulus_table, out=tmp_path / "srp2.h5", layers="fc", srp=2000, progress=False
    )
    with ActivationStore.open(small) as store:
        assert store.shape("fc") == (8, 1000)  # not larger than the projection: kept as is
