"""Calibration of the stimulus-bootstrap intervals of ``alignment`` and of the
``condition_contrast`` bootstrap (``object2brain.rsa.inference``): the exact pair form
(``corrected``, :func:`~object2brain.rsa.inference.pair_corrected_variance`, the default), its
large-``n`` limit ``2 V_jack - V_boot`` (``corrected (limit)``, the estimator before issue 18's
exact form; same resamples) and the plain percentile interval (``uncorrected``).

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
``validation/alignment_calibration.json`` (and the table ``.md``) after every 25 repetitions, the
contrast sections first (fast), then the coverage at ``n = 40`` and ``n = 200``.
"""

from __future__ import annotations

import argparse
import json
import os
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


LIMIT = "corrected (limit)"
PERCENTILE = "uncorrected (percentile)"


def coverage(
    pop: Population, n: int, reps: int, n_boot: int, seed: int, save: Any = None
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    truth = float(pop.r_pop[0, 0])
    hits = {"corrected": 0, LIMIT: 0, PERCENTILE: 0}
    width = {k: 0.0 for k in hits}

    def result(done: int) -> dict[str, Any]:
        return {
            "truth": truth,
            "repetitions": done,
            "coverage": {k: v / max(done, 1) for k, v in hits.items()},
            "mean_width": {k: v / max(done, 1) for k, v in width.items()},
        }

    for rep in range(reps):
        stim = rng.choice(pop.models.shape[1], size=n, replace=False)
        models, subs = pop.draw(stim, np.array([0]))
        # one set of resamples, both intervals (bootstrap_ci with corrected=True / False)
        boot = bootstrap_values(models[:1], subs, "spearman", n_boot, rep, "cpu")
        jack = jackknife_values(models[:1], subs, "spearman", "cpu")
        observed = observed_values(models[:1], subs, "spearman", "cpu")
        intervals = {
            "corrected": corrected_spread(boot, jack, observed).interval(0.95),
            LIMIT: corrected_spread(boot, jack, observed, exact=False).interval(0.95),
            PERCENTILE: percentile_interval(boot, 0.95),
        }
        for key, (low, high) in intervals.items():
            hits[key] += int(low[0, 0] <= truth <= high[0, 0])
            width[key] += float(high[0, 0] - low[0, 0])
        if (rep + 1) % 25 == 0:
            print(f"  n={n} rep {rep + 1}/{reps}", flush=True)
            if save is not None:
                save(result(rep + 1))
    return result(reps)


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
    rejects = {"corrected": 0, LIMIT: 0, PERCENTILE: 0}
    covers = dict.fromkeys(rejects, 0)
    for rep in range(datasets):
        model, brain, labels = two_conditions(rng, n, 3.0, noise_b)
        cache: dict[tuple[str, int], ConditionResamples] = {}  # every interval: same resamples
        for key, corrected in (("corrected", True), (PERCENTILE, False)):
            res = condition_difference_bootstrap(
                model, brain, labels, "a", "b", "spearman", n_boot, rep, "cpu", cache=cache,
                corrected=corrected,
            )  # fmt: skip
            rejects[key] += int(res.p[0, 0] < ALPHA)
            covers[key] += int(res.low[0, 0] <= 0 <= res.high[0, 0])
        # the limit form from the same resamples (what condition_difference_bootstrap did before)
        a, b = (corrected_spread(c.boot, c.jack, c.observed, exact=False) for c in cache.values())
        spread = a.difference(b)
        low, high = spread.interval(0.95)
        rejects[LIMIT] += int(spread.p_two_sided()[0, 0] < ALPHA)
        covers[LIMIT] += int(low[0, 0] <= 0 <= high[0, 0])
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


def markdown(record: dict[str, Any], stem: str = "alignment_calibration") -> str:
    """The record as the tables of ``STEM.md``."""
    keys = ("corrected", LIMIT, PERCENTILE)
    lines = [
        "# Alignment and contrast interval calibration",
        "",
        f"Written by `validation/alignment_calibration.py` (numbers: `{stem}.json`).",
        f"Command: `{record['command']}`; machine: {record['machine']}; load average at start "
        f"{record.get('load_at_start', '?')}, at the last write {record.get('load_now', '?')}.",
        f"Setup: {json.dumps(record['setup'])}. `corrected`: the exact pair form "
        "`max((2n-3)/(n-1) V_jack - n/(n-2) V_boot, n/(3n-4) V_boot)`; `corrected (limit)`: "
        "`max(2 V_jack - V_boot, V_boot / 3)` (the estimator before); both from the same "
        "resamples.",
        "",
        "## Coverage of the 95% alignment interval (target [0.92, 0.98])",
        "",
        "| n | repetitions | " + " | ".join(f"{k} coverage (width)" for k in keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for name, res in record.get("alignment_ci", {}).items():
        cells = [f"{res['coverage'][k]:.3f} ({res['mean_width'][k]:.4f})" for k in keys]
        lines.append(f"| {name[2:]} | {res['repetitions']} | " + " | ".join(cells) + " |")
    for name in ("contrast_null", "contrast_power"):
        if name not in record:
            continue
        res = record[name]
        low, high = res["binomial_95_interval"]
        lines += [
            "",
            f"## {name} ({res['datasets']} datasets, {res['n_per_condition']} stimuli per "
            f"condition; binomial 95% interval around 0.05: [{low:.3f}, {high:.3f}])",
            "",
            "| interval | rejection rate (p < 0.05) | interval covers 0 |",
            "|---|---|---|",
        ]
        for k in keys:
            lines.append(
                f"| {k} | {res['rejection_rate'][k]:.3f} | {res['interval_covers_0'][k]:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, help="repetitions per coverage case (default 150)")
    parser.add_argument("--sizes", default="40,200", help="stimulus counts of the coverage cases")
    parser.add_argument(
        "--tag", default="", help="write alignment_calibration_TAG.json/md, coverage only"
    )
    args = parser.parse_args()
    quick = args.quick
    torch.set_num_threads(1)
    setup = {"n_pop": 600 if quick else 2000, "noise": 6.0, "n_boot": 200 if quick else 300,
             "reps": 20 if quick else 150, "contrast_datasets": 40 if quick else 240,
             "power_datasets": 20 if quick else 100,
             "contrast_n": 30}  # fmt: skip
    if args.reps:
        setup["reps"] = args.reps
    out_dir = Path("/tmp" if quick else "validation")
    stem = f"alignment_calibration_{args.tag}" if args.tag else "alignment_calibration"
    out_path = out_dir / f"{stem}.json"
    record: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.machine()} {platform.system()} (shared 2-core development "
        "machine, one torch thread, nice 10)",
        "load_at_start": [round(x, 1) for x in os.getloadavg()],
        "setup": setup,
        "alignment_ci": {},
    }
    start = time.time()

    def save() -> None:
        record["seconds"] = round(time.time() - start, 1)
        record["load_now"] = [round(x, 1) for x in os.getloadavg()]
        out_path.write_text(json.dumps(record, indent=1))
        (out_dir / f"{stem}.md").write_text(markdown(record, stem))

    for name, noise_b, datasets in (
        ()
        if args.tag
        else (
            ("contrast_null", 5.0, setup["contrast_datasets"]),
            ("contrast_power", 8.0, setup["power_datasets"]),
        )
    ):
        record[name] = contrast(datasets, setup["contrast_n"], noise_b, setup["n_boot"], 3)
        save()
    pop = Population(1, setup["n_pop"], 1, setup["noise"], 0.7)
    for n in (int(x) for x in args.sizes.split(",")):

        def partial(res: dict[str, Any], key: str = f"n={n}") -> None:
            record["alignment_ci"][key] = res
            save()

        partial(coverage(pop, n, setup["reps"], setup["n_boot"], n, partial))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
