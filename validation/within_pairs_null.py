"""False-positive rate and power of the within-condition-pairs Mantel test (``--pairs within``).

Null: two conditions that differ in content (a mean pattern shared by model and brain) and
nothing shared within a condition. The all-pairs Mantel test rejects far above alpha there (the
between-condition pairs carry the shared content); the stratified within-pairs test should
reject at alpha. Power: the brain also shares the model's within-condition structure.

Run: ``PYTHONPATH=src python validation/within_pairs_null.py`` (writes
``validation/within_pairs_null.json``).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import scipy.stats

from object2brain.rsa.inference import mantel_test
from object2brain.rsa.rdm import rdm_from_features, upper_triangle
from object2brain.rsa.within import within_mantel_test

ALPHA = 0.05


def dataset(rng: np.random.Generator, n_per: int, shared: float) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat([0, 1], n_per)
    direction = rng.normal(size=(2, 30))
    model = 1.5 * direction[labels] + rng.normal(size=(2 * n_per, 30))
    brain = 1.5 * direction[labels] + rng.normal(size=(2 * n_per, 30)) + shared * model
    return model, brain


def rates(n_per: int, shared: float, datasets: int, n_perm: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    labels = ["x"] * n_per + ["y"] * n_per
    within = every = 0
    for d in range(datasets):
        model, brain = dataset(rng, n_per, shared)
        a = rdm_from_features(model, "correlation", "cpu")[None]
        b = rdm_from_features(brain, "correlation", "cpu")[None]
        within += within_mantel_test(a, b, labels, "spearman", n_perm, d).p[0, 0] <= ALPHA
        all_pairs = mantel_test(upper_triangle(a), upper_triangle(b), n_perm=n_perm, seed=d)
        every += all_pairs.p[0, 0] <= ALPHA
        if (d + 1) % 50 == 0:
            print(f"n={2 * n_per} shared={shared}: {d + 1}/{datasets}", flush=True)
    return {"within_rate": within / datasets, "all_pairs_rate": every / datasets}


def main() -> None:
    start = time.time()
    datasets, n_perm = 300, 199
    low, high = (scipy.stats.binom.ppf(q, datasets, ALPHA) / datasets for q in (0.025, 0.975))
    results = {
        "datasets": datasets,
        "n_perm": n_perm,
        "alpha": ALPHA,
        "binomial_95_interval": [low, high],
        "null": {
            "n=40": rates(20, 0.0, datasets, n_perm, 20),
            "n=100": rates(50, 0.0, 200, n_perm, 50),
        },
        "null_datasets": {"n=40": datasets, "n=100": 200},
        "power_shared_0.5": {f"n={2 * n}": rates(n, 0.5, 60, n_perm, 7 + n) for n in (20, 50)},
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, CPU",
    }
    results["seconds"] = round(time.time() - start, 1)
    out = Path(__file__).with_suffix(".json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
