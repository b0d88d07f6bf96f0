"""False-positive rate and power of the Object2Brain starred rule (``p_group`` and ``p_perm``).

Small synthetic layers (direct activation arrays, no CNN): ``K`` filters of ``P`` positions for
``n`` stimuli, each filter a random mixture of ``d`` latent stimulus features plus its own noise,
with log-normal norms (sd 0.25). One group of ``g`` filters per dataset; the target is one ROI of
voxels (a random projection of the named activations plus noise):

- ``a``: random group, target unrelated to the layer (independent patterns);
- ``b``: random group, target built from the whole layer;
- ``c``: a group atypical of the layer in norm (its filters scaled 3x), target from the whole layer;
- ``d``: a planted group-specific effect: target built from the group's filters only.

For a..c the starred rule (``significant``) must reject at most inside the binomial 95% interval
around 0.05; for d it must reject in >= 80%. The rejection rates of ``p_null`` (random subsets)
and ``p_perm`` alone are recorded for comparison. Run (about 10 minutes on 1 core)::

    nice -n 10 python validation/object2brain_null.py --datasets 200 \
        --out validation/object2brain_null.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.distance import pdist, squareform
from scipy.stats import binomtest

from object2brain.lesion.analysis import LayerFilters, lesion_layer, starred
from object2brain.lesion.engine import FilterStats
from object2brain.options import LesionOptions
from object2brain.rsa.inference import with_fdr
from object2brain.rsa.targets import AnalysisSet, Target

CASES = ("a", "b", "c", "d")


def dataset(
    case: str, seed: int, k: int, n: int, g: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activations ``(n, k, 4)``, the group's filters ``(g,)`` and the target patterns."""
    rng = np.random.default_rng([seed, CASES.index(case)])
    latent = rng.normal(size=(n, 8))
    mixing = rng.normal(size=(k, 4, 8))
    acts = np.einsum("nd,kpd->nkp", latent, mixing) + rng.normal(size=(n, k, 4)) * 1.5
    acts *= np.exp(rng.normal(scale=0.25, size=k))[None, :, None]
    group = np.sort(rng.choice(k, g, replace=False))
    if case == "c":
        acts[:, group] *= 3.0
    if case == "a":
        source = rng.normal(size=(n, 60))
    else:
        part = acts if case in ("b", "c") else acts[:, group]
        flat = part.reshape(n, -1)
        source = flat @ rng.normal(size=(flat.shape[1], 60)) / np.sqrt(flat.shape[1])
        source = source + rng.normal(size=source.shape) * source.std()
    return acts, group, source


def one(case: str, seed: int, options: LesionOptions, k: int, n: int, g: int) -> dict[str, bool]:
    acts, group, patterns = dataset(case, seed, k, n, g)
    ids = [f"s{i}" for i in range(n)]
    rdm = torch.as_tensor(squareform(pdist(patterns, "correlation")))[None]
    analysis = AnalysisSet.from_targets(
        ids, [Target("ROI", "roi", ["group"], rdm, group_only=True)]
    )
    task = LayerFilters("m", "L", FilterStats.from_activations(acts, ids), {"G": group})
    rows = lesion_layer(task, analysis, options, seed=seed, device=torch.device("cpu"))
    import pandas as pd

    from object2brain.tables import OBJECT2BRAIN

    frame = with_fdr(
        pd.DataFrame(rows, columns=OBJECT2BRAIN.column_names),
        ["model", "layer", "variant", "condition", "subject"],
        [("p_null", "p_fdr"), ("p_perm", "p_perm_fdr"), ("p_group", "p_group_fdr")],
    )
    frame["significant"] = starred(frame)
    out = {}
    for _, row in frame.iterrows():
        v = row["variant"]
        out[f"{v}_starred"] = bool(row["significant"])
        out[f"{v}_p_group"] = bool(row["p_group"] < 0.05)
        out[f"{v}_p_null"] = bool(row["p_null"] < 0.05)
        out[f"{v}_p_perm"] = bool(row["p_perm"] < 0.05)
    return out


def interval(n: int, alpha: float = 0.05) -> list[float]:
    ci = binomtest(round(alpha * n), n, alpha).proportion_ci(0.95)
    return [float(ci.low), float(ci.high)]


def run(datasets: int, k: int, n: int, g: int, draws: int, cases: tuple[str, ...]) -> dict:
    options = LesionOptions(
        n_null=draws, n_perm=draws, n_group_null=draws, selection="same", compare_method="spearman"
    )
    results: dict = {}
    for case in cases:
        start = time.time()
        counts: dict[str, int] = {}
        for seed in range(datasets):
            for key, value in one(case, seed, options, k, n, g).items():
                counts[key] = counts.get(key, 0) + int(value)
            if (seed + 1) % 50 == 0:
                print(f"case {case}: {seed + 1}/{datasets}", file=sys.stderr, flush=True)
        results[case] = {
            "rates": {key: value / datasets for key, value in sorted(counts.items())},
            "seconds": round(time.time() - start, 1),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", type=int, default=200)
    parser.add_argument("--filters", type=int, default=64)
    parser.add_argument("--stimuli", type=int, default=48)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--draws", type=int, default=199)
    parser.add_argument("--cases", default="abcd")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    record: dict = {
        "datasets": args.datasets,
        "filters": args.filters,
        "stimuli": args.stimuli,
        "group": args.group,
        "draws": args.draws,
        "interval_0.05": interval(args.datasets),
        "cases": {},
        "machine": f"{platform.machine()} {platform.processor() or ''} {platform.system()}".strip(),
        "python": platform.python_version(),
    }
    for case in args.cases:  # written after each case: a stopped run keeps what it finished
        record["cases"] |= run(args.datasets, args.filters, args.stimuli, args.group, args.draws,
                               (case,))  # fmt: skip
        record["seconds"] = round(time.time() - start, 1)
        text = json.dumps(record, indent=2)
        if args.out:
            args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
