"""Shared simulation of a model-brain RSA study with a known population truth.

Stimuli are drawn from an infinite population: true features ``x_i ~ N(0, I_d)``; a model layer
sees ``x_i M + model noise`` (fixed per stimulus); subject ``s`` measures ``x_i W_s + noise``
with ``W_s = W_0 + tau Z_s`` (subjects differ in how strongly they express the features). RDMs
are correlation distances. The population value of the statistic (mean over the population of
subjects of Spearman r over the population of stimuli) is computed once from a large sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from object2brain.rsa.compare import compare
from object2brain.rsa.rdm import upper_triangle

D, DM, DV = 8, 30, 40


def correlation_rdm(patterns: np.ndarray) -> torch.Tensor:
    """``1 - corrcoef`` of the rows of ``patterns`` ``(n, p)`` as a float64 tensor."""
    return torch.as_tensor(1.0 - np.corrcoef(patterns))


@dataclass
class World:
    """A population: model map(s), the subject mapping distribution and noise levels."""

    maps: list[np.ndarray]  # one (D, DM) per model
    w0: np.ndarray
    tau: float
    noise: float
    model_noise: float

    @classmethod
    def make(cls, seed: int, n_models: int = 1, noise: float = 3.0, tau: float = 0.7,
             model_noise: float = 1.0) -> World:  # fmt: skip
        rng = np.random.default_rng(seed)
        return cls([rng.normal(size=(D, DM)) for _ in range(n_models)],
                   rng.normal(size=(D, DV)), tau, noise, model_noise)  # fmt: skip

    def subjects(self, rng: np.random.Generator, count: int) -> np.ndarray:
        return self.w0[None] + self.tau * rng.normal(size=(count, D, DV))

    def draw(
        self, rng: np.random.Generator, n: int, weights: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Model RDMs ``(K, n, n)`` and subject RDMs ``(S, n, n)`` of ``n`` new stimuli."""
        x = rng.normal(size=(n, D))
        models = torch.stack([
            correlation_rdm(x @ M + self.model_noise * rng.normal(size=(n, DM))) for M in self.maps
        ])  # fmt: skip
        subs = torch.stack([
            correlation_rdm(x @ W + self.noise * rng.normal(size=(n, DV))) for W in weights
        ])  # fmt: skip
        return models, subs


def population_r(world: World, weights: np.ndarray, n_big: int, seed: int) -> np.ndarray:
    """Spearman r ``(K, S)`` of every model with every subject over ``n_big`` stimuli."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, len(weights), 20):
        models, subs = world.draw(rng, n_big, weights[start : start + 20])
        out.append(compare(upper_triangle(models), upper_triangle(subs), "spearman").numpy())
    return np.concatenate(out, axis=1)
