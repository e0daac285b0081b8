"""Accuracy and interval coverage of noisescale.fit_lr_sweep (B_noise from learning-rate sweeps).

Sweeps are drawn from the paper's quadratic model (Eq. 2.4): a step of size eps at batch B
improves the loss by dL(eps) = eps |G|^2 - eps^2 (G^T H G + tr(H Sigma)/B)/2 and a run needs
S = dL_target/dL(eps) steps (dL <= 0: it diverges, not reached). B_noise = 256, eps_max = 0.5,
batch sizes 16..4096, 5 learning rates per batch size a factor 2 apart at a random offset from
eps_opt(B), 3 seeds per cell (or 1, 2, 5), 10% log-normal noise on the steps. Prints, per
refinement and number of seeds, the median, 90th percentile and largest |B_noise/true - 1|, how
often the 95% intervals of B_noise and eps_max cover the truth, and the median scatter of log lr
about the fit; then, for B_noise from 2 to 1e6 against the sweep's 16..4096, how often it is
resolved and right. The generator is the one in tests/test_lr_fit.py.

    python benchmarks/lr_sweep_fit.py          # about a minute on one core
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from noisescale.lr_sweep import fit_lr_sweep
from test_lr_fit import B_NOISE, EPS_MAX, lr_sweep


def row(refine: str, seeds: tuple[int, ...], n: int, base: int = 5000) -> str:
    t0 = time.perf_counter()
    err, cov_b, cov_e, sig = [], 0, 0, []
    for s in range(n):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f = fit_lr_sweep(lr_sweep(base + s, seeds=seeds), n_boot=200, seed=s, refine=refine)
        assert f.b_noise is not None and f.eps_max is not None
        err.append(abs(f.b_noise / B_NOISE - 1))
        lo, hi = f.b_noise_interval()
        elo, ehi = f.eps_max_interval()
        cov_b += lo <= B_NOISE <= hi
        cov_e += elo <= EPS_MAX <= ehi
        sig.append(f.sigma)
    e = np.array(err)
    return (
        f"| {refine} | {len(seeds)} | {n} | {np.median(e):.1%} | {np.percentile(e, 90):.1%} | {e.max():.0%} | "
        f"{cov_b}/{n} | {cov_e}/{n} | {np.median(sig):.3f} | {time.perf_counter() - t0:.1f} s |"
    )


def by_b_noise(b_noise: float, n: int = 30, base: int = 300) -> str:
    """Where B_noise sits relative to the sweep (16..4096): how often it is resolved, its error,
    and how often the interval covers it (or, unresolved, the one-sided bound is on the right side)."""
    err, ok, unresolved = [], 0, 0
    for s in range(n):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f = fit_lr_sweep(lr_sweep(base + s, b_noise=b_noise), n_boot=100, seed=s)
        if f.b_noise is None:
            unresolved += 1
            side, v = f.b_noise_bound or ("none", float("nan"))
            ok += (v < b_noise) if side == "lower" else (v > b_noise) if side == "upper" else False
        else:
            err.append(abs(f.b_noise / b_noise - 1))
            lo, hi = f.b_noise_interval()
            ok += lo <= b_noise <= hi
    med = f"{np.median(err):.1%}" if err else "-"
    return f"| {b_noise:g} | {n} | {unresolved} | {med} | {ok}/{n} |"


def main() -> None:
    print(
        "| refine | seeds | sweeps | median error | 90th pct | largest | B_noise covered | eps_max covered | scatter | time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for refine, seeds, n in (
        ("model", (0, 1, 2), 200),
        ("parabola", (0, 1, 2), 50),
        ("none", (0, 1, 2), 50),
        ("model", (0,), 50),
        ("model", (0, 1), 200),
        ("model", (0, 1, 2, 3, 4), 100),
    ):
        print(row(refine, seeds, n), flush=True)
    print(f"(errors relative to B_noise = {B_NOISE:g}; 95% percentile bootstrap intervals, 200 replicates)")
    print()
    print("| true B_noise | sweeps | unresolved (None + bound) | median error (resolved) | covered or bound right |")
    print("|---|---|---|---|---|")
    for b in (2, 8, 256, 4096, 3e4, 1e6):
        print(by_b_noise(b), flush=True)


if __name__ == "__main__":
    main()
