"""The App. A.1 estimators and the paper's model functions, on synthetic gradients with known G and Sigma."""

import math

import numpy as np
import pytest
import torch

from helpers import pooled
from noisescale import estimators as est
from noisescale.estimators import estimate, make_step_stats, step_estimates

D = 40


def _truth(seed=0):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=D) * 0.5
    sd = rng.uniform(0.5, 2.0, size=D)
    return rng, G, sd, float((G**2).sum()), float((sd**2).sum())


def _within_3se(samples, truth):
    samples = np.asarray(samples)
    se = samples.std(ddof=1) / math.sqrt(len(samples))
    return abs(samples.mean() - truth) <= 3 * se, (samples.mean(), truth, se)


@pytest.mark.parametrize("b_small,b_big", [(1, 8), (4, 32), (16, 64), (3, 5)])
def test_estimate_unbiased_nested_batches(b_small, b_big):
    rng, G, sd, g2_true, ts_true = _truth(1)
    n = 4000
    x = G + sd * rng.normal(size=(n, b_big, D))  # per-example gradients, i.i.d. N(G, diag(sd^2))
    small = (x[:, :b_small].mean(1) ** 2).sum(-1)  # the small batch is part of the big one, as in training
    big = (x.mean(1) ** 2).sum(-1)
    g2, ts = estimate(small, b_small, big, b_big)  # elementwise on arrays
    ok, info = _within_3se(g2, g2_true)
    assert ok, info
    ok, info = _within_3se(ts, ts_true)
    assert ok, info


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_pooled_estimate_unbiased_unequal_sizes(reduction):
    rng, G, sd, g2_true, ts_true = _truth(2)
    sizes = [1, 3, 8, 4]
    n = 4000
    g2s, tss = [], []
    for _ in range(n):
        parts = [G + sd * rng.normal(size=(b, D)) for b in sizes]
        if reduction == "mean":  # every micro-batch weighted equally: v_j = mean_j / k
            v = [p.mean(0) / len(sizes) for p in parts]
        else:  # every example weighted equally: v_j = sum_j / B
            v = [p.sum(0) / sum(sizes) for p in parts]
        V = np.sum(v, axis=0)
        m = pooled([float((vj**2).sum()) for vj in v], sizes, float((V**2).sum()), reduction=reduction)
        g2s.append(m.g2)
        tss.append(m.trace_sigma)
    for samples, truth in ((g2s, g2_true), (tss, ts_true)):
        ok, info = _within_3se(samples, truth)
        assert ok, info


def test_pooled_equal_sizes_is_the_paper_recipe():
    rng = np.random.default_rng(3)
    k, b = 4, 8
    v = rng.normal(size=(k, D)) / k
    V = v.sum(0)
    m = pooled([float((x**2).sum()) for x in v], [b] * k, float((V**2).sum()))
    assert m.b_small == pytest.approx(b) and m.b_big == pytest.approx(k * b)
    # the small-batch norm is the mean of the micro-batch norms of the micro-batch *mean* gradients
    assert m.sq_small == pytest.approx(np.mean([((x * k) ** 2).sum() for x in v]))
    # and the effective pair is invariant to a common factor of the norms up to c^2 (b_simple unchanged)
    m2 = pooled([9 * float((x**2).sum()) for x in v], [b] * k, 9 * float((V**2).sum()))
    assert m2.trace_sigma / m2.g2 == pytest.approx(m.trace_sigma / m.g2, rel=1e-12)


def test_pooled_per_example_is_bessel_corrected_variance():
    rng = np.random.default_rng(4)
    B = 16
    g = rng.normal(size=(B, D)) + 0.3
    v = g / B  # mean loss: per-example contributions to the batch gradient
    m = pooled([float((x**2).sum()) for x in v], [1] * B, float((v.sum(0) ** 2).sum()))
    g2, ts = m.g2, m.trace_sigma
    assert ts == pytest.approx(g.var(axis=0, ddof=1).sum(), rel=1e-10)
    # |G|^2 unbiased: |mean|^2 minus the variance of the mean
    assert g2 == pytest.approx((g.mean(0) ** 2).sum() - g.var(axis=0, ddof=1).sum() / B, rel=1e-10)


def test_step_stats_are_additive_over_ranks_and_groups():
    """Two ranks' statistics (each weighted by 1/n, as the distributed probe does) sum to the one-process
    statistics of the whole step, and the groups' estimates sum to the total's."""
    rng = np.random.default_rng(7)
    sizes = [3.0, 5.0, 2.0, 6.0]
    u = rng.normal(size=(4, 2, D))  # part j's contribution to V, in 2 groups of elements
    V = u.sum(0)
    sq = (u**2).sum(-1)  # [part, group]
    whole = make_step_stats(sq.sum(0), (V**2).sum(-1), sizes, reduction="sum")
    ranks = []
    for r, (lo, hi) in enumerate(((0, 2), (2, 4))):
        # rank r's own gradient holds its parts at twice their weight in V (the step averages 2 ranks):
        # the rank normalises its weights (sum reduction) and scales a by 1/2, norms by 1/4
        st = make_step_stats(4 * sq[lo:hi].sum(0), (V**2).sum(-1) * (r == 0), sizes[lo:hi], reduction="sum")
        st.vec[0] /= 4
        st.vec[1] /= 4
        st.vec[6:8] /= 4
        ranks.append(st)
    both = ranks[0] + ranks[1]
    # "sum" within a rank (alpha = b / rank total), "mean" across ranks: a = alpha / 2
    direct = make_step_stats(sq.sum(0), (V**2).sum(-1), sizes, weights=[3 / 16, 5 / 16, 2 / 16, 6 / 16])
    b, d = both.read(), direct.read()
    assert b[4] == 2 and d[4] == 1  # the ranks that contributed
    b[4] = 1
    assert np.allclose(b, d, rtol=1e-14)
    g2, ts, status, _ = step_estimates(whole.read(), 2)
    assert status == "measured"
    tot_g2, tot_ts, _, _ = step_estimates(make_step_stats([sq.sum()], [(V**2).sum()], sizes, reduction="sum").read(), 1)
    assert g2.sum() == pytest.approx(tot_g2[0], rel=1e-12) and ts.sum() == pytest.approx(tot_ts[0], rel=1e-12)


def test_step_stats_stay_on_their_device_and_skip_with_reasons():
    s = make_step_stats(torch.tensor([2.0, 4.0]), torch.tensor([1.0, 0.5]), [2, 2])
    assert s.vec.dtype == torch.float64 and s.n_groups == 2
    v = s.read()
    assert v[6:8].tolist() == [2.0, 4.0] and v[8:].tolist() == [1.0, 0.5]
    one = make_step_stats([1.0], [1.0], [4])
    assert step_estimates(one.read(), 1)[2:] == ("unmeasurable", step_estimates(one.read(), 1)[3])
    bad = make_step_stats([float("inf")], [1.0], [4, 4])
    assert step_estimates(bad.read(), 1)[2] == "skipped"
    two = make_step_stats([1.0], [1.0], [4, 4])
    assert step_estimates(two.read(), 1, ranks=2)[2] == "skipped"  # a rank missing (Join)


def test_estimate_rejects_bad_sizes():
    with pytest.raises(ValueError, match="b_small < b_big"):
        estimate(1.0, 8, 0.5, 8)
    with pytest.raises(ValueError, match="b_small < b_big"):
        estimate(1.0, 16, 0.5, 8)
    with pytest.raises(ValueError, match="b_small must be a finite positive"):
        estimate(1.0, 0, 0.5, 8)
    with pytest.raises(ValueError, match="b_big must be a finite positive"):
        estimate(1.0, 1, 0.5, float("nan"))


def test_make_step_stats_rejects_bad_input():
    with pytest.raises(ValueError, match="groups but sq_total"):
        make_step_stats([1.0, 2.0, 3.0], [1.0, 2.0], [4, 4])
    with pytest.raises(ValueError, match="part 1 has size -2"):
        make_step_stats([1.0], [1.0], [4, -2])
    with pytest.raises(ValueError, match="reduction must be"):
        make_step_stats([1.0], [1.0], [4, 4], reduction="avg")


def test_b_simple_undefined_for_nonpositive_g2():
    assert est.b_simple(0.0, 1.0) is None
    assert est.b_simple(-1e-3, 1.0) is None
    assert est.b_simple(0.5, 2.0) == 4.0


def test_tradeoff_model_identities():
    s_min, e_min = 1000.0, 64000.0
    bc = est.b_crit(e_min, s_min)
    assert bc == 64.0
    # At B = B_crit the run costs twice the minimum steps and twice the minimum examples (Eq. 2.11).
    assert est.S(bc, s_min, bc) == pytest.approx(2 * s_min)
    assert est.E(bc, e_min, bc) == pytest.approx(2 * e_min)
    for B in (1.0, 7.0, 64.0, 1e4):
        S, E = est.S(B, s_min, bc), est.E(B, e_min, bc)
        assert pytest.approx(B * S) == E  # E = B S
        assert (S / s_min - 1) * (E / e_min - 1) == pytest.approx(1.0)  # the hyperbola
    # Eqs. 2.6-2.7: half of the maximal step and progress at B = B_noise
    assert est.eps_opt(50.0, 0.2, 50.0) == pytest.approx(0.1)
    assert est.dL_opt(np.array([1e9]), 3.0, 50.0)[0] == pytest.approx(3.0, rel=1e-6)
    assert est.eps_central(1e9, 0.4, 100.0, alpha=0.5) == pytest.approx(0.4, rel=1e-6)
    assert est.optimal_batch_for_exchange_rate(100.0, 400.0) == pytest.approx(200.0)
    with pytest.raises(ValueError, match="e_min and s_min must be positive"):
        est.b_crit(0.0, 10.0)


@pytest.mark.parametrize(
    "df,expected,tol",
    [(3, 3.182446, 5e-3), (5, 2.570582, 4e-4), (10, 2.228139, 1e-5), (30, 2.042272, 1e-5), (math.inf, 1.959964, 1e-6)],
)
def test_t_quantile(df, expected, tol):
    assert est.t_quantile(0.975, df) == pytest.approx(expected, abs=tol)


def test_fieller_reduces_to_delta_when_precise_and_opens_when_not():
    lo, hi = est.fieller_interval(10.0, 2.0, 1e-6, 1e-8, 0.0, 1.96)
    assert lo < 5.0 < hi and hi - lo < 1e-2
    lo, hi = est.fieller_interval(10.0, 0.01, 0.01, 1.0, 0.0, 1.96)  # denominator not resolved
    assert hi == math.inf and lo > 0


def test_b_simple_is_never_negative_and_intervals_are_ordered():
    from noisescale.ema import EMAState, state_interval, state_reason

    assert est.b_simple(1.0, -0.5) is None
    st = EMAState(count=10, weight=10.0, weight_sq=10.0, g2=1.0, trace_sigma=-0.5, m2_g2=0.1, m2_trace_sigma=0.01)
    assert "tr(Sigma) is -0.5 < 0" in state_reason(st)
    lo, hi = state_interval(st)
    assert 0 <= lo <= hi
