import sys
import time

import numpy as np

sys.path.insert(0, "validation")
from inference_common import World, population_r

from object2brain.rsa import group as g

w = World.make(1, noise=float(sys.argv[3]))
rng = np.random.default_rng(5)
W = w.subjects(rng, 1)
t = time.time()
truth = population_r(w, W, 2000, 9).mean()
print("truth", truth, time.time() - t)
n = int(sys.argv[1])
reps = int(sys.argv[2])
cov = {"raw": 0, "corr": 0}
ests = []
ses = []
raw = []
jk = []
for rep in range(reps):
    M, S = w.draw(rng, n, W)
    plan = g.resample_plan(n, 1, 400, rep)
    c = g.subject_coefficients(M, S, "spearman", plan)
    v = g.bootstrap_variances(c, plan)
    e = g.estimate(c, plan, "stimuli")
    ests.append(e.mean[0])
    ses.append(e.se[0])
    raw.append(np.sqrt(v.stimuli[0]))
    jk.append(np.sqrt(v.jackknife[0]))
    cov["corr"] += abs(e.mean[0] - truth) < 1.96 * e.se[0]
    cov["raw"] += abs(e.mean[0] - truth) < 1.96 * np.sqrt(v.stimuli[0])
print(
    "sd est",
    np.std(ests),
    "mean se corr",
    np.mean(ses),
    "mean raw",
    np.mean(raw),
    "jk",
    np.mean(jk),
    "bias",
    np.mean(ests) - truth,
    cov,
)
