"""Calibration of the group inference (``object2brain.rsa.group``): coverage, null rates, power.

1. **Coverage with a known population truth.** A finite population of ``N_POP`` stimuli (true
   features ``x``, fixed model patterns ``x M_k + model noise``) and ``N_SUBJ`` subjects (patterns
   ``x W_s + noise``, ``W_s = W_0 + tau Z_s``, fixed per subject and stimulus). Each experiment
   draws ``n`` stimuli (without replacement) and ``S`` subjects and builds the 95% interval of
   the subject-mean Spearman r of model A (and of ``delta = r_A - r_B``) with each bootstrap.
   The truth each bootstrap generalises to:

   - ``stimuli``: mean over the drawn subjects of r over all ``N_POP`` stimuli;
   - ``subjects``: mean over all ``N_SUBJ`` subjects of r over the drawn stimuli;
   - ``both``: mean over all subjects of r over all stimuli.

   Recorded: coverage of the corrected intervals (what the tables report) and of the
   uncorrected ones (plain dual bootstrap, rsatoolbox's estimator), and mean SE over the actual
   root-mean-square error of the estimate.
2. **Null rejection rates** (fresh stimuli and subjects each dataset, so the nulls hold
   exactly by symmetry): ``p`` of ``r > 0`` for a model unrelated to the brain, and the
   two-sided comparison ``p`` of two exchangeable models (same map, independent model noise).
3. **Planted truths**: model A (little model noise) against model B (much noise): power of
   ``delta_r > 0`` with ``p_fdr < 0.05`` (Benjamini-Hochberg over the three pairs of A, B and
   B's twin); the twins B, B' (equally good): share with ``p > 0.05``.

Run: ``PYTHONPATH=src nice -n 10 python validation/inference_calibration.py [--quick]``; writes
``validation/inference_calibration.json`` after each section (``--quick``: a small run, written
to ``/tmp``).
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

from object2brain.rsa import group as g
from object2brain.rsa.compare import compare
from object2brain.rsa.inference import fdr_bh
from object2brain.rsa.rdm import upper_triangle

D, DM, DV = 8, 30, 40
ALPHA = 0.05
MODES = ("stimuli", "subjects", "both")


def corr_rdms(patterns: np.ndarray) -> torch.Tensor:
    """Correlation-distance RDMs ``(R, n, n)`` of patterns ``(R, n, p)``."""
    z = patterns - patterns.mean(axis=-1, keepdims=True)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    return torch.as_tensor(1.0 - z @ np.swapaxes(z, -1, -2))


class Population:
    """The finite population of section 1 (module docstring)."""

    def __init__(self, seed: int, n_pop: int, n_subj: int, noise: float, tau: float) -> None:
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(n_pop, D))
        maps = rng.normal(size=(2, D, DM))
        # model A: little model noise; model B: more (A aligns better)
        self.models = np.stack([x @ maps[0] + 1.0 * rng.normal(size=(n_pop, DM)),
                                x @ maps[0] + 2.5 * rng.normal(size=(n_pop, DM))])  # fmt: skip
        w = rng.normal(size=(D, DV))[None] + tau * rng.normal(size=(n_subj, D, DV))
        noise_patterns = noise * rng.normal(size=(n_subj, n_pop, DV))
        self.subjects = np.einsum("nd,sdv->snv", x, w) + noise_patterns
        self.r_pop = self._population_r()  # (2, n_subj)

    def _population_r(self) -> np.ndarray:
        models = upper_triangle(corr_rdms(self.models))
        out = []
        for start in range(0, len(self.subjects), 8):
            subs = upper_triangle(corr_rdms(self.subjects[start : start + 8]))
            out.append(compare(models, subs, "spearman").numpy())
        return np.concatenate(out, axis=1)

    def draw(self, stim: np.ndarray, subj: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return corr_rdms(self.models[:, stim]), corr_rdms(self.subjects[subj][:, stim])

    def subject_truth(self, stim: np.ndarray) -> np.ndarray:
        """Mean over all subjects of r over the stimuli ``stim``, per model ``(2,)``."""
        models = upper_triangle(corr_rdms(self.models[:, stim]))
        subs = upper_triangle(corr_rdms(self.subjects[:, stim]))
        return compare(models, subs, "spearman").numpy().mean(axis=1)


def coverage(
    pop: Population, n: int, S: int, reps: int, n_boot: int, seed: int,
    partial: Any = None,
) -> dict[str, Any]:  # fmt: skip
    rng = np.random.default_rng(seed)
    hits: dict[str, list[int]] = {}
    errors: dict[str, list[float]] = {}
    ses: dict[str, list[float]] = {}
    for rep in range(reps):
        stim = rng.choice(pop.models.shape[1], size=n, replace=False)
        subj = rng.choice(pop.subjects.shape[0], size=S, replace=False)
        models, subs = pop.draw(stim, subj)
        plan = g.resample_plan(n, S, n_boot, (seed, rep))
        coef = g.subject_coefficients(models, subs, "spearman", plan)
        subject_truth = pop.subject_truth(stim)
        truths = {"stimuli": pop.r_pop[:, subj].mean(axis=1), "subjects": subject_truth,
                  "both": pop.r_pop.mean(axis=1)}  # fmt: skip
        for mode in MODES:
            t = truths[mode]
            cases = (("r", coef.rows([0]), t[0]),
                     ("delta", coef.rows([0]) - coef.rows([1]), t[0] - t[1]))  # fmt: skip
            for label, c, truth in cases:
                for corr in (True, False):
                    if mode == "subjects" and not corr:
                        continue  # no pair correction in the subject bootstrap
                    est = g.estimate(c, plan, mode, pair_correction=corr)
                    key = f"{mode}/{label}/{'corrected' if corr else 'uncorrected'}"
                    hits.setdefault(key, []).append(int(est.low[0] <= truth <= est.high[0]))
                    errors.setdefault(key, []).append(float(est.mean[0] - truth))
                    ses.setdefault(key, []).append(float(est.se[0]))
        if (rep + 1) % 25 == 0:
            print(f"  n={n} rep {rep + 1}/{reps}", flush=True)
        if partial is not None and (rep + 1) % 10 == 0:
            partial(_summary(hits, errors, ses) | {"experiments_done": rep + 1})
    return _summary(hits, errors, ses)


def _summary(
    hits: dict[str, list[int]], errors: dict[str, list[float]], ses: dict[str, list[float]]
) -> dict[str, Any]:
    out = {}
    for key, h in hits.items():
        rmse = float(np.sqrt(np.mean(np.square(errors[key]))))
        out[key] = {"coverage": float(np.mean(h)), "mean_se": float(np.mean(ses[key])),
                    "rmse": rmse, "se_over_rmse": float(np.mean(ses[key]) / rmse)}  # fmt: skip
    return out


def fresh(
    rng: np.random.Generator, n: int, S: int, noise: float, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Models ``(4, n, n)``: unrelated, A (good), B and B' (twins, worse), and ``S`` subjects."""
    x = rng.normal(size=(n, D))
    m = rng.normal(size=(D, DM))
    models = np.stack([rng.normal(size=(n, D)) @ m + rng.normal(size=(n, DM)),
                       x @ m + 1.0 * rng.normal(size=(n, DM)),
                       x @ m + 2.5 * rng.normal(size=(n, DM)),
                       x @ m + 2.5 * rng.normal(size=(n, DM))])  # fmt: skip
    w = rng.normal(size=(D, DV))[None] + tau * rng.normal(size=(S, D, DV))
    subs = np.einsum("nd,sdv->snv", x, w) + noise * rng.normal(size=(S, n, DV))
    return corr_rdms(models), corr_rdms(subs)


def nulls(
    n: int, S: int, datasets: int, n_boot: int, noise: float, tau: float, seed: int
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}
    for rep in range(datasets):
        models, subs = fresh(rng, n, S, noise, tau)
        plan = g.resample_plan(n, S, n_boot, (seed, rep))
        coef = g.subject_coefficients(models, subs, "spearman", plan)
        for mode in MODES:
            unrelated = g.estimate(coef.rows([0]), plan, mode).p_greater[0]
            pairs = [coef.rows([1]) - coef.rows([2]), coef.rows([1]) - coef.rows([3]),
                     coef.rows([2]) - coef.rows([3])]  # fmt: skip
            ests = [g.estimate(c, plan, mode) for c in pairs]
            p_fdr = fdr_bh(np.array([e.p_two_sided[0] for e in ests]))
            found = {
                "r>0 null rejected": unrelated < ALPHA,
                "twins compared rejected (p < 0.05)": ests[2].p_two_sided[0] < ALPHA,
                "A > B found (delta > 0, p_fdr < 0.05)": ests[0].mean[0] > 0 and p_fdr[0] < ALPHA,
            }
            for name, value in found.items():
                counts[f"{mode}/{name}"] = counts.get(f"{mode}/{name}", 0) + int(value)
        if (rep + 1) % 50 == 0:
            print(f"  nulls n={n} dataset {rep + 1}/{datasets}", flush=True)
    low, high = scipy.stats.binom.interval(0.95, datasets, ALPHA)
    return {"datasets": datasets, "binomial_95_interval": [low / datasets, high / datasets],
            "rates": {k: v / datasets for k, v in counts.items()}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--n200-only", action="store_true", help="add the n = 200 coverage, written every 10"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    quick = args.quick
    setup = {"n_pop": 600 if quick else 2000, "n_subjects_pop": 40 if quick else 100,
             "S": 6, "noise": 6.0, "tau": 0.7, "n_boot": 200 if quick else 250,
             "reps": 20 if quick else 200, "null_datasets": 40 if quick else 240}  # fmt: skip
    out_path = Path(
        "/tmp/inference_calibration.json" if quick else "validation/inference_calibration.json"
    )
    record: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.machine()} {platform.processor() or ''} "
        f"{platform.system()} (shared 2-core development machine, one torch thread, nice 10)",
        "setup": setup,
    }
    start = time.time()
    pop = Population(1, setup["n_pop"], setup["n_subjects_pop"], setup["noise"], setup["tau"])
    record["population_r"] = {"A": float(pop.r_pop[0].mean()), "B": float(pop.r_pop[1].mean())}
    print("population", record["population_r"], f"{time.time() - start:.0f} s", flush=True)
    record.setdefault("coverage", {})
    sections = [("coverage", 40), ("nulls", 40), ("coverage", 200)]  # cheap ones first
    if args.n200_only:
        record = json.loads(out_path.read_text()) | {"n200_command": record["command"]}
        sections = sections[2:]

    def partial(summary: dict[str, Any]) -> None:
        record["coverage"]["n=200"] = summary
        record["seconds_n200"] = round(time.time() - start, 1)
        out_path.write_text(json.dumps(record, indent=1))

    for section, n in sections:
        if section == "nulls":
            record["nulls"] = nulls(n, setup["S"], setup["null_datasets"], setup["n_boot"],
                                    setup["noise"], setup["tau"], 7)  # fmt: skip
        else:
            record["coverage"][f"n={n}"] = coverage(
                pop, n, setup["S"], setup["reps"], setup["n_boot"], n, partial if n == 200 else None
            )
        record["seconds"] = round(time.time() - start, 1)
        out_path.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
