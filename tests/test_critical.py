"""critical.py: frontier, censoring, the log-space fit with its bootstrap interval, the forward model.

Synthetic sweeps are drawn from the paper's model S(B) = S_min (1 + b_crit/B) (Eq. 2.11) with
multiplicative log-normal noise; every test states its seed and tolerance.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from noisescale.critical import (
    RunRecord,
    _em_censored,
    batch_for_speed,
    fit_critical_batch,
    fit_sweep,
    frontier,
    group_by_target,
    plot_fit,
    speed_efficiency,
)

S_MIN, E_MIN = 1000.0, 256_000.0
B_CRIT = E_MIN / S_MIN  # 256
BATCHES = [2**k for k in range(3, 14)]  # 8 .. 8192


def synthetic_sweep(
    seed: int,
    *,
    noise: float = 0.1,
    budget: float = 30_000,
    target=None,
    s_min: float = S_MIN,
    b_crit: float = B_CRIT,
    batches=BATCHES,
    lr_factors=(1.0, 1.3, 2.0),
) -> list[RunRecord]:
    """Three learning rates per batch size: the best one follows the model times exp(noise * N(0,1)),
    the others are 1.3x and 2x slower. A run needing more than ``budget`` steps is censored
    (reached=False, steps=budget): with b_crit = 256 the B = 8 runs need ~33,000 steps, so that whole
    batch size is censored, and the slower runs at B = 16 are too."""
    rng = np.random.default_rng(seed)
    out = []
    for B in batches:
        s_best = s_min * (1 + b_crit / B) * math.exp(noise * rng.standard_normal())
        for f in lr_factors:
            s = s_best * f
            if s > budget:
                out.append(RunRecord(B, budget, target=target, lr=0.1 * f, reached=False))
            else:
                out.append(RunRecord(B, round(s), target=target, lr=0.1 * f))
    return out


# ---------------------------------------------------------------------------------------
# Acceptance: recovery and coverage.


def test_fit_recovers_b_crit_with_noise_and_censoring():
    """Acceptance: 10% multiplicative noise, censored runs; b_crit within 10% and covered (seed 0)."""
    recs = synthetic_sweep(0, noise=0.1)
    assert sum(not r.reached for r in recs) >= 4  # a few censored runs, one whole batch size
    fit = fit_critical_batch(recs, n_boot=1000, seed=0)
    assert fit.n_censored == 1 and fit.points[0].status == "censored"
    assert abs(fit.b_crit / B_CRIT - 1) < 0.10
    lo, hi = fit.b_crit_interval
    assert lo < B_CRIT < hi
    assert abs(fit.s_min / S_MIN - 1) < 0.10 and fit.s_min_interval[0] < S_MIN < fit.s_min_interval[1]
    assert abs(fit.e_min / E_MIN - 1) < 0.15 and fit.e_min_interval[0] < E_MIN < fit.e_min_interval[1]
    assert fit.e_min == pytest.approx(fit.s_min * fit.b_crit)
    assert 0.03 < fit.sigma < 0.2  # the scatter put in is 0.1
    assert fit.identified and not fit.messages


def test_fit_accuracy_and_coverage_over_seeds():
    """Over 30 seeded sweeps (noise 0.1): median error < 10%, and the 95% interval covers the truth
    in >= 26/30 (expected 28.5; 26 or fewer has probability ~5% at true coverage 95%)."""
    errs, covered = [], 0
    for seed in range(100, 130):
        fit = fit_critical_batch(synthetic_sweep(seed, noise=0.1), n_boot=200, seed=seed)
        errs.append(abs(fit.b_crit / B_CRIT - 1))
        covered += fit.b_crit_interval[0] <= B_CRIT <= fit.b_crit_interval[1]
    assert np.median(errs) < 0.10
    assert covered >= 26


def test_noiseless_sweep_is_recovered_exactly():
    recs = [RunRecord(B, S_MIN * (1 + B_CRIT / B)) for B in BATCHES]  # non-integer steps are fine
    fit = fit_critical_batch(recs, n_boot=0)
    assert fit.b_crit == pytest.approx(B_CRIT, rel=1e-5)
    assert fit.s_min == pytest.approx(S_MIN, rel=1e-5)
    assert fit.sigma < 1e-5
    assert math.isnan(fit.b_crit_interval[0])  # n_boot=0: no interval


def test_fitting_examples_instead_of_steps_is_the_same():
    """At fixed B, log E = log B + log S: the residuals are equal, so the fit must not depend on
    whether the sweep reports steps or examples (App. A.3 fits the (E, S) hyperbola)."""
    recs = synthetic_sweep(3, budget=1e9)
    a = fit_critical_batch(recs, n_boot=0)
    b = fit_critical_batch([RunRecord(r.batch_size, r.steps, examples=r.batch_size * r.steps) for r in recs], n_boot=0)
    assert a.b_crit == pytest.approx(b.b_crit, rel=1e-9)


# ---------------------------------------------------------------------------------------
# Frontier.


def test_frontier_takes_fastest_run_per_batch_size():
    recs = [
        RunRecord(16, 500, lr=0.1),
        RunRecord(16, 300, lr=0.2),
        RunRecord(16, 900, lr=0.4),
        RunRecord(64, 120, lr=0.5),
        RunRecord(64, 100, lr=1.0),
    ]
    pts = frontier(recs)
    assert [(p.batch_size, p.steps, p.lr, p.status, p.n_runs) for p in pts] == [
        (16, 300, 0.2, "exact", 3),
        (64, 100, 1.0, "exact", 2),
    ]
    assert pts[0].examples == 16 * 300 and pts[1].examples == 6400


def test_frontier_censoring_states():
    recs = [
        # B=8: nobody reached the target within 1000 steps -> censored, S* > 1000
        RunRecord(8, 1000, reached=False),
        RunRecord(8, 1000, reached=False),
        # B=16: the fastest finished in 400; another was given 1000 steps -> S* = 400 exactly
        RunRecord(16, 400),
        RunRecord(16, 1000, reached=False),
        # B=32: a run stopped at 100 steps without reaching it might have been faster than 250
        RunRecord(32, 250),
        RunRecord(32, 100, reached=False),
    ]
    p8, p16, p32 = frontier(recs)
    assert (p8.status, p8.steps, p8.lower, p8.n_reached) == ("censored", 1000, 1000, 0)
    assert (p16.status, p16.steps, p16.lower) == ("exact", 400, 400)
    assert (p32.status, p32.steps, p32.lower) == ("interval", 250, 100)
    assert p8.censored and p32.censored and not p16.censored


def test_frontier_marks_dominated_points_but_keeps_them():
    recs = [RunRecord(16, 100), RunRecord(32, 120), RunRecord(64, 40)]  # B=32: more steps and examples than B=16
    pts = frontier(recs)
    assert [p.dominated for p in pts] == [False, True, False]
    fit = fit_critical_batch(recs, n_boot=0)
    assert fit.n_points == 3


def test_frontier_rejects_mixed_targets_and_group_by_target_splits():
    recs = synthetic_sweep(0, target=0.5) + synthetic_sweep(1, target=0.1, s_min=3000)
    with pytest.raises(ValueError, match="mix 2 targets"):
        frontier(recs)
    groups = group_by_target(recs)
    assert list(groups) == [0.5, 0.1]
    fits = fit_sweep(recs, n_boot=100)
    assert set(fits) == {0.5, 0.1}
    assert fits[0.1].s_min == pytest.approx(3000, rel=0.15)
    assert fits[0.5].target == 0.5


# ---------------------------------------------------------------------------------------
# Censoring in the fit.


def test_censored_point_below_the_model_carries_no_weight():
    """S > 10 steps says nothing when the model predicts ~33,000: the fit is unchanged."""
    recs = [r for r in synthetic_sweep(5, budget=1e9) if r.batch_size != 8]
    base = fit_critical_batch(recs, n_boot=0)
    with_c = fit_critical_batch(recs + [RunRecord(8, 10, reached=False)], n_boot=0)
    assert with_c.b_crit == pytest.approx(base.b_crit, rel=1e-3)
    assert with_c.n_censored == 1


def test_censored_point_above_the_model_pulls_b_crit_up_not_dropped():
    """A censored small batch that needed more steps than the other points predict must raise
    b_crit (dropping it, as a naive fit would, leaves b_crit where the base fit has it)."""
    recs = [r for r in synthetic_sweep(5, budget=1e9) if r.batch_size != 8]
    base = fit_critical_batch(recs, n_boot=0)
    bound = 3.0 * S_MIN * (1 + B_CRIT / 8)  # far above S(8) ~ 33,000
    cens = fit_critical_batch(recs + [RunRecord(8, bound, reached=False)], n_boot=0)
    as_exact = fit_critical_batch(recs + [RunRecord(8, bound)], n_boot=0)
    assert cens.b_crit > base.b_crit * 1.05
    assert cens.steps(8) > base.steps(8) * 1.05  # the prediction moves toward S(8) > bound
    assert as_exact.b_crit > base.b_crit


def test_interval_point_is_fitted():
    """A batch size whose fastest finisher took 1.2x the model but where another run was stopped
    early (below the model) without arriving: the point is interval-censored, lower < S* <= steps."""
    recs = [r for r in synthetic_sweep(2, budget=1e9) if r.batch_size != 64]
    s64 = S_MIN * (1 + B_CRIT / 64)
    recs += [RunRecord(64, round(1.2 * s64)), RunRecord(64, round(0.5 * s64), reached=False)]
    fit = fit_critical_batch(recs, n_boot=200)
    p64 = next(p for p in fit.points if p.batch_size == 64)
    assert p64.status == "interval"
    assert abs(fit.b_crit / B_CRIT - 1) < 0.10
    assert fit.b_crit_interval[0] < B_CRIT < fit.b_crit_interval[1]


def test_em_bootstrap_solver_matches_direct_mle():
    """Reference twin: the vectorised EM used for censored bootstrap replicates reaches the same
    Tobit MLE as the direct L-BFGS fit of the data."""
    from scipy import special

    recs = synthetic_sweep(7, noise=0.1, budget=20_000)
    fit = fit_critical_batch(recs, n_boot=0)
    pts = fit.points
    assert sum(p.status == "censored" for p in pts) >= 1 and all(p.status != "interval" for p in pts)
    logb = np.log([p.batch_size for p in pts])
    y = np.log([p.steps for p in pts])[None, :]
    miss = np.array([p.status == "censored" for p in pts])[None, :]
    cgrid = np.linspace(logb.min() - math.log(1e3), logb.max() + math.log(1e3), 801)
    c, a = _em_censored(y, miss, y.copy(), logb, cgrid, special, start=(math.log(500), math.log(50), 0.3), iters=500)
    assert math.exp(c[0]) == pytest.approx(fit.b_crit, rel=2e-3)
    assert math.exp(a[0]) == pytest.approx(fit.s_min, rel=2e-3)


# ---------------------------------------------------------------------------------------
# Identification and errors.


def test_b_crit_outside_the_sweep_is_flagged():
    """Every batch far above b_crit: S is flat, b_crit cannot be measured; the fit says so."""
    recs = [RunRecord(B, 1000 * (1 + 0.01 / B) * f) for B, f in zip([1024, 2048, 4096, 8192], [1.0, 1.05, 0.97, 1.02])]
    with pytest.warns(UserWarning) as caught:
        fit = fit_critical_batch(recs, n_boot=200)
    assert any("one side only" in str(w.message) for w in caught)
    assert fit.b_crit < 1024 / 4  # the point estimate: far below the sweep
    assert not fit.identified
    assert fit.b_crit_interval[0] == 0.0


@pytest.mark.parametrize(
    "recs, match",
    [
        ([RunRecord(32, 100), RunRecord(32, 200)], "only one batch size"),
        ([RunRecord(32, 100, reached=False), RunRecord(64, 100, reached=False)], "no run reached the target"),
        ([RunRecord(32, 100), RunRecord(64, 100, reached=False)], "at only one batch size"),
        ([], "no runs"),
    ],
)
def test_fit_errors(recs, match):
    with pytest.raises(ValueError, match=match):
        fit_critical_batch(recs)


def test_two_batch_sizes_fit_without_interval():
    with pytest.warns(UserWarning, match="no interval"):
        fit = fit_critical_batch([RunRecord(32, 300), RunRecord(256, 100)], n_boot=100)
    # two points determine the curve: S(32) and S(256) are matched exactly
    assert fit.steps(32) == pytest.approx(300, rel=1e-4) and fit.steps(256) == pytest.approx(100, rel=1e-4)
    assert math.isnan(fit.b_crit_interval[0])


@pytest.mark.parametrize(
    "kw",
    [
        dict(batch_size=-1, steps=10),
        dict(batch_size=8, steps=0),
        dict(batch_size=8, steps=float("nan")),
        dict(batch_size=8, steps=5, lr=-0.1),
    ],
)
def test_run_record_validation(kw):
    with pytest.raises(ValueError):
        RunRecord(**kw)


# ---------------------------------------------------------------------------------------
# Forward model.


def test_forward_model_identities():
    fit = fit_critical_batch([RunRecord(B, S_MIN * (1 + B_CRIT / B)) for B in BATCHES], n_boot=0)
    # At B = b_crit the run takes 2 S_min steps and 2 E_min examples (Eq. 2.11)
    assert fit.steps(fit.b_crit) == pytest.approx(2 * fit.s_min)
    assert fit.examples(fit.b_crit) == pytest.approx(2 * fit.e_min)
    B = np.geomspace(1, 1e5, 50)
    S, E = fit.steps(B), fit.examples(B)
    np.testing.assert_allclose((S / fit.s_min - 1) * (E / fit.e_min - 1), 1.0, rtol=1e-9)
    speed, eff = speed_efficiency(B, fit.b_crit)
    np.testing.assert_allclose(speed + eff, 1.0)
    np.testing.assert_allclose(speed, fit.s_min / S)
    assert batch_for_speed(0.5, 256.0) == pytest.approx(256.0)
    assert speed_efficiency(batch_for_speed(0.9, 256.0), 256.0)[0] == pytest.approx(0.9)


def test_optimal_batch_minimises_steps_plus_examples_over_r():
    """App. D: the fixed B minimising S + E/r is sqrt(r b_crit); check against a brute-force grid."""
    fit = fit_critical_batch([RunRecord(B, S_MIN * (1 + B_CRIT / B)) for B in BATCHES], n_boot=0)
    for r in (10.0, 256.0, 5000.0):
        B = np.geomspace(0.1, 1e6, 200_001)
        brute = B[np.argmin(fit.steps(B) + fit.examples(B) / r)]
        assert fit.optimal_batch(r) == pytest.approx(math.sqrt(r * fit.b_crit), rel=1e-6)
        assert fit.optimal_batch(r) == pytest.approx(brute, rel=1e-3)


def test_to_dict_and_summary():
    fit = fit_critical_batch(synthetic_sweep(0, target=0.25), n_boot=100)
    d = fit.to_dict()
    assert d["target"] == 0.25 and d["n_censored"] == 1 and d["n_points"] == len(BATCHES)
    assert d["b_crit_interval"][0] < d["b_crit"] < d["b_crit_interval"][1]
    assert "b_crit = " in fit.summary() and "target 0.25" in fit.summary()


def test_plot_fit_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    fits = list(
        fit_sweep(synthetic_sweep(0, target=0.5) + synthetic_sweep(1, target=0.1, s_min=3000), n_boot=50).values()
    )
    out = tmp_path / "f.png"
    _fig, axes = plot_fit(fits, out)
    assert out.stat().st_size > 10_000
    assert len(axes) == 2 and len(axes[0].lines) > 2 * len(BATCHES)


def test_import_noisescale_stays_light():
    code = (
        "import sys, noisescale; noisescale.sweep; noisescale.fit_critical_batch; "
        "print('scipy' in sys.modules, 'matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
