"""Calibration of the stimulus-bootstrap intervals of ``alignment`` and of the
``condition_contrast`` bootstrap (``object2brain.rsa.inference``), corrected and uncorrected.

1. **Coverage of ``alignment.ci_low/ci_high``** with a known population truth: a finite
   population of ``N_POP`` stimuli with fixed model and subject patterns (one subject, as a row
   of ``alignment``; the population of ``validation/inference_calibration.py``); each experiment
   draws ``n`` stimuli without replacement; the truth is Spearman r over all ``N_POP`` stimuli.
2. **Contrast under the null** (``p_boot``): two conditions of 30 stimuli with equal true r,
   each with its own mean pattern shared by model and brain (the stimuli of the two conditions
   are not exchangeable); fresh data per dataset. Rejection rate of ``p_boot < 0.05`` and
   coverage of ``delta = 0``.
3. **Contrast power**: in condition b the brain is noisier (true ``r_b < r_a``).

Run: ``PYTHONPATH=src nice -n 10 python validation/alignment_calibration.py [--quick]``; writes
``validation/alignment_calibration.json`` after each section.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_calibration import Population, corr_rdms

from object2brain.rsa.inference import (
    ConditionResamples,
    bootstrap_values,
    condition_difference_bootstrap,
    corrected_spread,
    jackknife_values,
    observed_values,
    percentile_interval,
)

ALPHA = 0.05


def coverage(pop: Population, n: int, reps: int, n_boot: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    truth = float(pop.r_pop[0, 0])
    hits = {"corrected": 0, "uncorrected (percentile)": 0}
    width = {k: 0.0 for k in hits}
    for rep in range(reps):
        stim = rng.choice(pop.models.shape[1], size=n, replace=False)
        models, subs = pop.draw(stim, np.array([0]))
        # one set of resamples, both intervals (bootstrap_ci with corrected=True / False)
        boot = bootstrap_values(models[:1], subs, "spearman", n_boot, rep, "cpu")
        spread = corrected_spread(
            boot,
            jackknife_values(models[:1], subs, "spearman", "cpu"),
            observed_values(models[:1], subs, "spearman", "cpu"),
        )
        intervals = {"corrected": spread.interval(0.95),
                     "uncorrected (percentile)": percentile_interval(boot, 0.95)}  # fmt: skip
        for key, (low, high) in intervals.items():
            hits[key] += int(low[0, 0] <= truth <= high[0, 0])
            width[key] += float(high[0, 0] - low[0, 0]) / reps
        if (rep + 1) % 25 == 0:
            print(f"  n={n} rep {rep + 1}/{reps}", flush=True)
    return {
        "truth": truth,
        "coverage": {k: v / reps for k, v in hits.items()},
        "mean_width": width,
    }


def two_conditions(
    rng: np.random.Generator, n: int, offset: float, noise_b: float
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Model and brain RDMs of two conditions of ``n`` stimuli (own mean pattern each, shared by
    model and brain); brain noise 5 in condition a, ``noise_b`` in b."""
    dims = 10
    mix_x, mix_y = rng.normal(size=(dims, 40)), rng.normal(size=(dims, 30))
    means = rng.normal(size=(2, dims))
    means *= offset * np.sqrt(dims) / np.linalg.norm(means, axis=1, keepdims=True)
    latent = np.vstack([means[c] + rng.normal(size=(n, dims)) for c in (0, 1)])
    noise = np.vstack([5.0 * rng.normal(size=(n, 30)), noise_b * rng.normal(size=(n, 30))])
    model = corr_rdms((latent @ mix_x)[None])
    brain = corr_rdms((latent @ mix_y + noise)[None])
    return model, brain, ["a"] * n + ["b"] * n


def contrast(datasets: int, n: int, noise_b: float, n_boot: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    rejects = {"corrected": 0, "uncorrected (percentile)": 0}
    covers = dict.fromkeys(rejects, 0)
    for rep in range(datasets):
        model, brain, labels = two_conditions(rng, n, 3.0, noise_b)
        cache: dict[tuple[str, int], ConditionResamples] = {}  # both intervals: same resamples
        for key, corrected in (("corrected", True), ("uncorrected (percentile)", False)):
            res = condition_difference_bootstrap(
                model, brain, labels, "a", "b", "spearman", n_boot, rep, "cpu", cache=cache,
                corrected=corrected,
            )  # fmt: skip
            rejects[key] += int(res.p[0, 0] < ALPHA)
            covers[key] += int(res.low[0, 0] <= 0 <= res.high[0, 0])
        if (rep + 1) % 100 == 0:
            print(f"  contrast noise_b={noise_b} dataset {rep + 1}/{datasets}", flush=True)
    low, high = scipy.stats.binom.interval(0.95, datasets, ALPHA)
    return {
        "datasets": datasets,
        "n_per_condition": n,
        "binomial_95_interval": [low / datasets, high / datasets],
        "rejection_rate": {k: v / datasets for k, v in rejects.items()},
        "interval_covers_0": {k: v / datasets for k, v in covers.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--contrast-only", action="store_true", help="add the contrast sections to the JSON"
    )
    args = parser.parse_args()
    quick = args.quick
    torch.set_num_threads(1)
    setup = {"n_pop": 600 if quick else 2000, "noise": 6.0, "n_boot": 200 if quick else 300,
             "reps": 20 if quick else 150, "contrast_datasets": 40 if quick else 240,
             "power_datasets": 20 if quick else 100,
             "contrast_n": 30}  # fmt: skip
    out_path = Path("/tmp" if quick else "validation") / "alignment_calibration.json"
    record: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.machine()} {platform.system()} (shared 2-core development "
        "machine, one torch thread, nice 10)",
        "setup": setup,
    }
    start = time.time()
    if args.contrast_only:
        record = json.loads(out_path.read_text())
        record["contrast_command"] = " ".join(["python", *sys.argv])
        record["setup"] |= {"contrast_datasets": setup["contrast_datasets"],
                            "power_datasets": setup["power_datasets"]}  # fmt: skip
    pop = None if args.contrast_only else Population(1, setup["n_pop"], 1, setup["noise"], 0.7)
    record.setdefault("alignment_ci", {})
    for n in () if pop is None else (40, 200):
        record["alignment_ci"][f"n={n}"] = coverage(pop, n, setup["reps"], setup["n_boot"], n)
        record["seconds"] = round(time.time() - start, 1)
        out_path.write_text(json.dumps(record, indent=1))
    for name, noise_b, datasets in (
        ("contrast_null", 5.0, setup["contrast_datasets"]),
        ("contrast_power", 8.0, setup["power_datasets"]),
    ):
        record[name] = contrast(datasets, setup["contrast_n"], noise_b, setup["n_boot"], 3)
        record[f"{name}_seconds"] = round(time.time() - start, 1)
        out_path.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
