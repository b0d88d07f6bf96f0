"""Calibration and power of the ``p`` column (one-sided, r > 0) of ``group_inference``.

Compares, on the same simulated datasets (the world of ``inference_calibration.py``: stimulus
features ``x``, model patterns ``x M + model noise``, subject patterns ``x W_s + noise`` with
``W_s = W_0 + tau Z_s``, correlation-distance RDMs, Spearman, 6 subjects):

- ``score/both`` (what the table reports for ``both``) and ``score/stimuli``:
  :func:`object2brain.rsa.group.association_test`, the subject mean studentised by its exact
  stimulus-relabelling variance (plus, for ``both``, the between-subject variance net of it);
- ``mantel``: the exact permutation test of the subject mean (one relabelling of the model's
  stimuli shared by all subjects, ``N_PERM`` permutations; the ``group`` row of ``alignment``);
- ``t/both``, ``t/stimuli``: the bootstrap t-tests that the table reported before (corrected
  variance of :func:`object2brain.rsa.group.estimate`).

Sections (fresh stimuli and subjects in every dataset):

1. ``sharp``: models ``unrelated`` (its own stimulus features: no association with any subject;
   the null) and three planted models of decreasing quality (model noise ``PLANTED``): rejection
   rates at n = 40 and n = 200 stimuli.
2. ``random_effects``: a population of subjects whose mean association is 0 while each subject's
   is not: subject RDM ``lambda_s z(D_s) + eps_s`` (``D_s`` the subject's correlation RDM of
   ``x W_s + noise``, ``lambda_s ~ N(0, 1)``, ``eps_s`` i.i.d. normal pair noise, so the sign of
   ``lambda`` flips r in distribution), model ``x M + 1.0 noise``; n = 40. Only a test that
   generalises over subjects holds this null; the sharp-null tests (``mantel``,
   ``score/stimuli``) are expected to reject it.

3. ``stimuli`` (n = 40: planted models ``PLANTED``; n = 200: ``WEAK``): the ``stimuli`` mode's
   ``p`` of this version, ``perm/stimuli`` (:func:`object2brain.rsa.group.relabelling_test`, the
   Monte Carlo relabelling test of the subject mean, ``N_PERM`` relabellings), against the score
   test it replaces (``score/stimuli``), on the same datasets (1,000 per size).
4. ``kendall`` (n = ``KENDALL_N``, the unrelated model and one planted model, noise 12):
   ``kendall_tau_a``'s ``p``: ``perm/stimuli`` (``KENDALL_PERM`` relabellings) and the bootstrap
   t-tests ``t/stimuli``, ``t/both`` (``KENDALL_BOOT`` resamples; ``both`` keeps it).
5. ``subjects``: the ``subjects`` mode's bootstrap t-test (``t/subjects``) under its own null,
   the random-effects world of section 2 (given the stimuli, each subject's expected r is 0 by
   the symmetry of ``lambda``), and its power on the planted models of section 1; the sharp
   world's unrelated model is listed too (not a null of this mode: its r given the stimuli is
   not 0 on average over subjects).
6. ``kendall_both`` (n = ``KENDALL_N``, the unrelated model and one planted model, noise 12)
   and ``kendall_random_effects`` (the world of section 2 at n = ``KENDALL_N``):
   ``kendall_tau_a`` under ``both``: the score test with Monte Carlo relabelling moments
   (``score/both``, ``KENDALL_MOMENT_PERM`` relabellings; the table's ``p`` now), its ``stimuli``
   form from the same moments (``score/stimuli``, ``B0 = 0``) and the bootstrap t-test that
   ``both`` reported before (``t/both``, ``KENDALL_BOOT`` resamples).

Run: ``PYTHONPATH=src nice -n 10 python validation/inference_null_p.py [--quick]``; writes
``validation/inference_null_p.json`` after every 20 datasets (``--quick``: ``/tmp``).
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

from object2brain.rsa import group as g
from object2brain.rsa.inference import mantel_test
from object2brain.rsa.rdm import squareform, upper_triangle

D, DM, DV = 8, 30, 40
S, NOISE, TAU, N_BOOT, N_PERM, ALPHA = 6, 6.0, 0.7, 250, 1000, 0.05
PLANTED = (8.0, 12.0, 16.0)  # model noise of the planted models (higher: weaker)
WEAK = (32.0, 48.0)  # section ``weak``: planted models for n = 200 (no Mantel there)
METHODS = ("score/both", "score/stimuli", "mantel", "t/both", "t/stimuli")
KENDALL_N, KENDALL_PERM, KENDALL_BOOT = 30, 199, 100  # tau-a costs O(m^2) per evaluation
KENDALL_MOMENT_PERM = 500  # relabellings of tau-a's Monte Carlo null moments (`both`)
SECTION_METHODS = {
    "null_only": ("score/both", "score/stimuli"),
    "stimuli": ("perm/stimuli", "score/stimuli"),
    "kendall": ("perm/stimuli", "t/stimuli", "t/both"),
    "kendall_both": ("score/both", "score/stimuli", "t/both"),
    "kendall_random_effects": ("score/both", "score/stimuli", "t/both"),
    "subjects": ("t/subjects",),
}


def corr_rdms(patterns: np.ndarray) -> torch.Tensor:
    """Correlation-distance RDMs ``(R, n, n)`` of patterns ``(R, n, p)``."""
    z = patterns - patterns.mean(axis=-1, keepdims=True)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    return torch.as_tensor(1.0 - z @ np.swapaxes(z, -1, -2))


def sharp_world(
    rng: np.random.Generator, n: int, planted: tuple[float, ...] = PLANTED
) -> tuple[torch.Tensor, torch.Tensor]:
    """Models ``(1 + len(planted), n, n)`` (unrelated first) and ``S`` subject RDMs."""
    x = rng.normal(size=(n, D))
    m = rng.normal(size=(D, DM))
    models = [rng.normal(size=(n, D)) @ m + rng.normal(size=(n, DM))]
    models += [x @ m + noise * rng.normal(size=(n, DM)) for noise in planted]
    w = rng.normal(size=(D, DV))[None] + TAU * rng.normal(size=(S, D, DV))
    subs = np.einsum("nd,sdv->snv", x, w) + NOISE * rng.normal(size=(S, n, DV))
    return corr_rdms(np.stack(models)), corr_rdms(subs)


def random_effects_world(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One related model and ``S`` subjects whose association has population mean 0."""
    x = rng.normal(size=(n, D))
    m = rng.normal(size=(D, DM))
    model = corr_rdms((x @ m + rng.normal(size=(n, DM)))[None])
    w = rng.normal(size=(D, DV))[None] + TAU * rng.normal(size=(S, D, DV))
    d = upper_triangle(
        corr_rdms(np.einsum("nd,sdv->snv", x, w) + NOISE * rng.normal(size=(S, n, DV)))
    )
    d = (d - d.mean(dim=1, keepdim=True)) / d.std(dim=1, keepdim=True)
    lam = torch.as_tensor(rng.normal(size=(S, 1)))
    eps = torch.as_tensor(rng.normal(size=d.shape))
    return model, squareform(lam * d + eps)


def score_only(models: torch.Tensor, subs: torch.Tensor) -> dict[str, np.ndarray]:
    """Section ``null_only``: the score tests alone (no resamples, no relabellings)."""
    out = {}
    for mode in ("both", "stimuli"):
        test = g.association_test(models, subs, "spearman", mode)
        assert test is not None
        out[f"score/{mode}"] = test.p
    return out


def p_values(
    models: torch.Tensor, subs: torch.Tensor, seed: int, with_mantel: bool = True
) -> dict[str, np.ndarray]:
    """One-sided p of r > 0 of every model ``(K,)`` by every method of :data:`METHODS`
    (``mantel`` NaN without ``with_mantel``)."""
    n = models.shape[-1]
    plan = g.resample_plan(n, S, N_BOOT, (seed, 0))
    coef = g.subject_coefficients(models, subs, "spearman", plan)
    combine = torch.full((S, 1), 1.0 / S, dtype=torch.float64)
    out = {"mantel": np.full(models.shape[0], np.nan)}
    if with_mantel:
        out["mantel"] = mantel_test(
            upper_triangle(models), upper_triangle(subs), "spearman", N_PERM, seed, "cpu", combine
        ).p[:, -1]
    for mode in ("both", "stimuli"):
        test = g.association_test(models, subs, "spearman", mode)
        assert test is not None
        out[f"score/{mode}"] = test.p
        out[f"t/{mode}"] = g.estimate(coef, plan, mode).p_greater
    return out


def stimuli_p(models: torch.Tensor, subs: torch.Tensor, seed: int) -> dict[str, np.ndarray]:
    """Section ``stimuli``: the relabelling test (the table's ``p`` for ``stimuli`` now) and the
    score test it replaces."""
    test = g.association_test(models, subs, "spearman", "stimuli")
    assert test is not None
    return {
        "perm/stimuli": g.relabelling_test(models, subs, "spearman", N_PERM, seed),
        "score/stimuli": test.p,
    }


def kendall_p(models: torch.Tensor, subs: torch.Tensor, seed: int) -> dict[str, np.ndarray]:
    """Section ``kendall``: tau-a's relabelling test and bootstrap t-tests."""
    n = models.shape[-1]
    plan = g.resample_plan(n, S, KENDALL_BOOT, (seed, 0))
    coef = g.subject_coefficients(models, subs, g.KENDALL, plan)
    return {
        "perm/stimuli": g.relabelling_test(models, subs, g.KENDALL, KENDALL_PERM, seed),
        "t/stimuli": g.estimate(coef, plan, "stimuli").p_greater,
        "t/both": g.estimate(coef, plan, "both").p_greater,
    }


def kendall_both_p(
    models: torch.Tensor, subs: torch.Tensor, seed: int
) -> dict[str, np.ndarray]:  # fmt: skip
    """Sections ``kendall_both``, ``kendall_random_effects``: tau-a's score test with Monte Carlo
    relabelling moments (``KENDALL_MOMENT_PERM`` relabellings; ``both``, the table's ``p`` now,
    and its ``stimuli`` form, ``B0 = 0``, from the same moments) and the bootstrap t-test that
    ``both`` reported before (``KENDALL_BOOT`` resamples)."""
    n = models.shape[-1]
    test = g.association_test(
        models, subs, g.KENDALL, "both", n_perm=KENDALL_MOMENT_PERM, seed=seed
    )
    assert test is not None
    # the stimuli form from the same moments: z rescaled to B0 = 0, normal reference
    z = test.z * np.sqrt((test.null_variance + test.subject_variance) / test.null_variance)
    out = {"score/both": test.p, "score/stimuli": scipy.stats.norm.sf(z)}
    plan = g.resample_plan(n, S, KENDALL_BOOT, (seed, 0))
    coef = g.subject_coefficients(models, subs, g.KENDALL, plan)
    out["t/both"] = g.estimate(coef, plan, "both").p_greater
    return out


def subjects_p(rng: np.random.Generator, n: int, seed: int) -> dict[str, np.ndarray]:
    """Section ``subjects``: the ``subjects`` t-test of a random-effects null dataset and of the
    models of a sharp-world dataset (unrelated, then the planted ones)."""
    out = []
    for models, subs in (random_effects_world(rng, n), sharp_world(rng, n)):
        plan = g.resample_plan(n, S, N_BOOT, (seed, 0))
        coef = g.subject_coefficients(models, subs, "spearman", plan)
        out.append(g.estimate(coef, plan, "subjects").p_greater)
    return {"t/subjects": np.concatenate(out)}


def section_p(
    section: str, rng: np.random.Generator, n: int, seed: int
) -> dict[str, np.ndarray]:  # fmt: skip
    """The p-values of one fresh dataset of ``section``."""
    if section == "subjects":
        return subjects_p(rng, n, seed)
    if section == "random_effects":
        return p_values(*random_effects_world(rng, n), seed)
    if section == "null_only":
        return score_only(*sharp_world(rng, n, ()))
    planted = WEAK if n >= 200 and section in ("weak", "stimuli") else PLANTED
    if section == "kendall":
        return kendall_p(*sharp_world(rng, n, (12.0,)), seed)
    if section == "kendall_both":
        return kendall_both_p(*sharp_world(rng, n, (12.0,)), seed)
    if section == "kendall_random_effects":
        return kendall_both_p(*random_effects_world(rng, n), seed)
    models, subs = sharp_world(rng, n, planted)
    if section == "stimuli":
        return stimuli_p(models, subs, seed)
    return p_values(models, subs, seed, with_mantel=section != "weak")


def section_labels(section: str, n: int) -> list[str]:
    """The models of a section, in the order of its p-values."""
    if section in ("random_effects", "null_only", "kendall_random_effects"):
        return ["null"]
    if section in ("kendall", "kendall_both"):
        return ["null", "12.0"]
    if section == "subjects":
        return ["random-effects null", "unrelated (not this mode's null)", *map(str, PLANTED)]
    planted = WEAK if n >= 200 and section in ("weak", "stimuli") else PLANTED
    return ["null", *map(str, planted)]


def run(
    section: str, n: int, datasets: int, seed: int, save: Any
) -> dict[str, Any]:  # fmt: skip
    rng = np.random.default_rng(seed)
    methods = SECTION_METHODS.get(section, METHODS)
    ps: dict[str, list[np.ndarray]] = {k: [] for k in methods}
    start, load0 = time.time(), os.getloadavg()[0]
    cpu0 = time.process_time()
    result: dict[str, Any] = {}
    for rep in range(datasets):
        values = section_p(section, rng, n, seed * 100_003 + rep)
        for key, value in values.items():
            ps[key].append(value)
        if (rep + 1) % (100 if section == "null_only" else 20) == 0 or rep + 1 == datasets:
            low, high = scipy.stats.binom.interval(0.95, rep + 1, ALPHA)
            arr = {k: np.array(v) for k, v in ps.items()}
            labels = section_labels(section, n)
            result = {
                "n": n, "datasets": rep + 1, "seconds": round(time.time() - start, 1),
                "cpu_seconds": round(time.process_time() - cpu0, 1),
                "load_average_start_end": [round(load0, 1), round(os.getloadavg()[0], 1)],
                "binomial_95_interval": [low / (rep + 1), high / (rep + 1)],
                "models": labels,
                "rejected": {k: dict(zip(labels, (v < ALPHA).mean(axis=0).round(4).tolist(),
                                         strict=True)) for k, v in arr.items()},
                "ks_uniform_null": {k: float(scipy.stats.kstest(v[:, 0], "uniform").pvalue)
                                    for k, v in arr.items()},
            }  # fmt: skip
            save(result)
            print(f"  {section} n={n} {rep + 1}/{datasets} {time.time() - start:.0f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated section keys to run")
    parser.add_argument("--datasets", type=int, default=0, help="datasets per section")
    parser.add_argument("--out", default="", help="output json (default: see the docstring)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    datasets = args.datasets or (30 if args.quick else 240)
    path = Path(
        args.out
        or ("/tmp/inference_null_p.json" if args.quick else "validation/inference_null_p.json")
    )
    record: dict[str, Any] = json.loads(path.read_text()) if path.exists() and args.only else {}
    record |= {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.machine()} {platform.system()} (shared 2-core development "
        "machine, one torch thread, nice 10)",
        "setup": {"subjects": S, "noise": NOISE, "tau": TAU, "n_boot": N_BOOT, "n_perm": N_PERM,
                  "planted_model_noise": PLANTED, "weak_model_noise": WEAK,
                  "compare": "spearman",
                  "kendall": {"n": KENDALL_N, "n_perm": KENDALL_PERM, "n_boot": KENDALL_BOOT,
                              "n_perm_moments": KENDALL_MOMENT_PERM}},
    }  # fmt: skip
    record.setdefault("sections", {})
    plan = [("sharp", 40, 11), ("random_effects", 40, 12), ("sharp", 200, 13), ("weak", 200, 14),
            ("null_only", 40, 15), ("null_only", 200, 16), ("stimuli", 40, 17),
            ("stimuli", 200, 18), ("kendall", KENDALL_N, 19), ("subjects", 40, 20),
            ("kendall_both", KENDALL_N, 21), ("kendall_random_effects", KENDALL_N, 22)]  # fmt: skip
    for section, n, seed in plan:
        key = f"{section}/n={n}"
        if args.only and key not in args.only.split(","):
            continue

        def save(result: dict[str, Any], key: str = key) -> None:
            record["sections"][key] = result
            path.write_text(json.dumps(record, indent=1))

        run(section, n, datasets, seed, save)
    print(json.dumps(record["sections"], indent=1))


if __name__ == "__main__":
    main()
