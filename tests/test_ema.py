"""Debiased EMA of (g2, trace_sigma) and the Fieller interval for b_simple."""

import math

import numpy as np
import pytest

from helpers import pooled
from noisescale.ema import EMAState, NoiseScaleEMA, ema_update


def test_debiased_ema_is_the_normalised_weighted_mean():
    rng = np.random.default_rng(0)
    g, s = rng.normal(size=50), rng.normal(size=50) + 3
    beta = 0.9
    ema = NoiseScaleEMA(beta)
    for a, b in zip(g, s):
        ema.update(float(a), float(b))
    w = beta ** np.arange(49, -1, -1)
    assert ema.g2 == pytest.approx((w * g).sum() / w.sum(), rel=1e-12)
    assert ema.trace_sigma == pytest.approx((w * s).sum() / w.sum(), rel=1e-12)
    assert ema.state.n_eff == pytest.approx(w.sum() ** 2 / (w**2).sum(), rel=1e-12)
    # Adam-style debiasing: the first value is reproduced exactly, not shrunk toward 0
    one = NoiseScaleEMA(0.999)
    one.update(2.0, 5.0)
    assert one.g2 == 2.0 and one.trace_sigma == 5.0


def test_plain_mean_variances_match_numpy():
    rng = np.random.default_rng(1)
    g = rng.normal(size=30)
    s = rng.normal(size=30) * 2 + g
    ema = NoiseScaleEMA(1.0)
    for a, b in zip(g, s):
        ema.update(float(a), float(b))
    vg, vs, c = ema.variances()
    assert vg == pytest.approx(g.var(ddof=1) / 30, rel=1e-10)
    assert vs == pytest.approx(s.var(ddof=1) / 30, rel=1e-10)
    assert c == pytest.approx(np.cov(g, s)[0, 1] / 30, rel=1e-10)


def test_interval_needs_three_measurements_and_a_valid_level():
    ema = NoiseScaleEMA(0.9)
    assert ema.interval() is None and ema.b_simple is None
    ema.update(1.0, 10.0)
    ema.update(1.2, 9.0)
    assert ema.interval() is None
    ema.update(0.9, 11.0)
    lo, hi = ema.interval(0.9)
    assert 0 <= lo < ema.b_simple < hi
    for bad in (0.0, 1.0, 95, -0.5):
        with pytest.raises(ValueError, match="level must be in"):
            ema.interval(bad)


def test_reasons():
    ema = NoiseScaleEMA(0.5)
    assert "no measurement" in ema.reason()
    ema.update(0.0, 0.0)
    assert ema.b_simple is None and "exactly zero" in ema.reason()
    ema.update(-1.0, 3.0)
    assert ema.b_simple is None and "<= 0" in ema.reason()


def test_never_clamps_before_averaging():
    # negative single-step estimates of |G|^2 are averaged as they are; clamping them at 0 would
    # bias the mean upward (fairscale's bug) -- here the mean of (-1, 3) is exactly 1
    ema = NoiseScaleEMA(1.0)
    ema.update(-1.0, 4.0)
    ema.update(3.0, 4.0)
    assert ema.g2 == 1.0 and ema.b_simple == 4.0


def test_bad_beta_and_nonfinite_inputs():
    for bad in (0.0, 1.5, -0.1, "0.9"):
        with pytest.raises(ValueError, match="beta must be in"):
            NoiseScaleEMA(bad)
    with pytest.raises(ValueError, match="non-finite"):
        ema_update(EMAState(), float("nan"), 1.0, 0.9)


def test_state_dict_round_trip():
    a = NoiseScaleEMA(0.95)
    for i in range(10):
        a.update(1.0 + 0.1 * i, 20.0 - i)
    b = NoiseScaleEMA(0.5)
    b.load_state_dict(a.state_dict())
    for i in range(5):
        a.update(0.3 * i, 5.0)
        b.update(0.3 * i, 5.0)
    assert a.state_dict() == b.state_dict()
    with pytest.raises(ValueError, match="missing keys"):
        b.load_state_dict({"beta": 0.9})


# -- coverage ---------------------------------------------------------------------------------


def _synthetic_run(rng, G, sd, beta, steps, k=4, b=8):
    """Micro-batch measurements of Gaussian per-example gradients (k micro-batches of b per step)."""
    ema = NoiseScaleEMA(beta)
    x = G + sd * rng.normal(size=(steps, k, b, G.size))
    v = x.mean(2) / k  # micro-batch gradients as seen when the loss is divided by k
    V = v.sum(1)
    small, big = (v**2).sum(-1), (V**2).sum(-1)
    for t in range(steps):
        m = pooled(list(small[t]), [b] * k, float(big[t]))
        ema.update(m.g2, m.trace_sigma)
    return ema


@pytest.mark.parametrize("beta,steps", [(1.0, 100), (0.98, 400)])
def test_interval_coverage(beta, steps):
    """A nominal 95% interval covers the true b_simple in 90-99% of 300 seeded repetitions."""
    rng = np.random.default_rng(12345)
    d = 50
    G = rng.normal(size=d) * 0.3
    sd = rng.uniform(0.5, 2.0, size=d)
    true = float((sd**2).sum() / (G**2).sum())
    reps, covered, widths = 300, 0, []
    for _ in range(reps):
        ema = _synthetic_run(rng, G, sd, beta, steps)
        lo, hi = ema.interval(0.95)
        covered += lo <= true <= hi
        widths.append(hi - lo)
    rate = covered / reps
    assert 0.90 <= rate <= 0.99, rate
    assert math.isfinite(np.median(widths)) and np.median(widths) < true  # informative, not vacuous


def test_fast_median_and_window_totals_match_numpy():
    """The filter's sort-based median equals np.median (odd and even windows), and the drift check's
    float totals stay equal to series 0 of the kept steps through appends, trims, restarts and loads."""
    from noisescale.ema import RobustAverage, _median0

    rng = np.random.default_rng(5)
    for n in (3, 4, 31, 32):
        arr = rng.lognormal(size=(n, 2))
        assert np.array_equal(_median0(arr), np.median(arr, axis=0))
    avg = RobustAverage(0.9, size=3, window=16)
    for t in range(200):
        g = rng.lognormal(size=3) * (100.0 if t == 120 else 1.0)  # a spike: held, then dropped
        avg.fold(g, g * 7.0)
        assert avg._totals == [(float(a[0]), float(b[0])) for a, b in avg.recent]
        assert len(avg.recent) <= 16
    again = RobustAverage(0.9, size=3, window=16)
    again.load_state_dict(avg.state_dict())
    assert again._totals == avg._totals
