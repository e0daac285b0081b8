"""Accuracy and interval coverage of noisescale.fit_critical_batch on synthetic sweeps.

Sweeps are drawn from the paper's model S(B) = S_min (1 + b_crit/B) (Eq. 2.11): 11 batch sizes
8..8192, S_min = 1000, b_crit = 256, three learning rates per batch size (the best follows the
model times exp(noise N(0,1)), the others are 1.3x and 2x slower), a step budget of 30,000 (so B=8
is censored at every noise level). Prints, per noise level, the median and 90th percentile of
|b_crit/true - 1| and how often the 95% interval covers the truth.

    python benchmarks/critical_fit_coverage.py          # about a minute
"""

from __future__ import annotations

import math
import time

import numpy as np

from noisescale.critical import RunRecord, fit_critical_batch

S_MIN, B_CRIT, BUDGET = 1000.0, 256.0, 30_000
BATCHES = [2**k for k in range(3, 14)]


def sweep(seed: int, noise: float) -> list[RunRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for B in BATCHES:
        s_best = S_MIN * (1 + B_CRIT / B) * math.exp(noise * rng.standard_normal())
        for f in (1.0, 1.3, 2.0):
            s = s_best * f
            out.append(RunRecord(B, BUDGET, reached=False) if s > BUDGET else RunRecord(B, round(s)))
    return out


def main(n: int = 100) -> None:
    print("| noise (s.d. of log S) | sweeps | median error | 90th pct error | 95% interval covers | time |")
    print("|---|---|---|---|---|---|")
    for noise in (0.05, 0.1, 0.2):
        t0 = time.perf_counter()
        errs, cov = [], 0
        for seed in range(n):
            f = fit_critical_batch(sweep(seed, noise), n_boot=300, seed=seed)
            errs.append(abs(f.b_crit / B_CRIT - 1))
            cov += f.b_crit_interval[0] <= B_CRIT <= f.b_crit_interval[1]
        print(
            f"| {noise} | {n} | {np.median(errs):.1%} | {np.percentile(errs, 90):.1%} | {cov}/{n} "
            f"| {time.perf_counter() - t0:.0f} s |"
        )


if __name__ == "__main__":
    main()
