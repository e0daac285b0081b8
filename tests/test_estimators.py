"""The App. A.1 estimators and the paper's model functions, on synthetic gradients with known G and Sigma."""

import math

import numpy as np
import pytest
import torch

from noisescale import estimators as est
from noisescale.estimators import Measurement, estimate, pool_parts

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
def test_pool_parts_unbiased_unequal_sizes(reduction):
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
        m = pool_parts([float((vj**2).sum()) for vj in v], sizes, float((V**2).sum()), reduction=reduction)
        g2, ts = estimate(m.sq_norm_small, m.b_small, m.sq_norm_big, m.b_big)
        g2s.append(g2)
        tss.append(ts)
    for samples, truth in ((g2s, g2_true), (tss, ts_true)):
        ok, info = _within_3se(samples, truth)
        assert ok, info


def test_pool_parts_equal_sizes_is_the_paper_recipe():
    rng = np.random.default_rng(3)
    k, b = 4, 8
    v = rng.normal(size=(k, D)) / k
    V = v.sum(0)
    m = pool_parts([float((x**2).sum()) for x in v], [b] * k, float((V**2).sum()))
    assert m.b_small == pytest.approx(b) and m.b_big == pytest.approx(k * b)
    # the small-batch norm is the mean of the micro-batch norms of the micro-batch *mean* gradients
    assert m.sq_norm_small == pytest.approx(np.mean([((x * k) ** 2).sum() for x in v]))
    # and the effective pair is invariant to a common factor of the norms up to c^2 (b_simple unchanged)
    m2 = pool_parts([9 * float((x**2).sum()) for x in v], [b] * k, 9 * float((V**2).sum()))
    g, s = estimate(m.sq_norm_small, m.b_small, m.sq_norm_big, m.b_big)
    g9, s9 = estimate(m2.sq_norm_small, m2.b_small, m2.sq_norm_big, m2.b_big)
    assert s9 / g9 == pytest.approx(s / g, rel=1e-12)


def test_pool_parts_per_example_is_bessel_corrected_variance():
    rng = np.random.default_rng(4)
    B = 16
    g = rng.normal(size=(B, D)) + 0.3
    v = g / B  # mean loss: per-example contributions to the batch gradient
    m = pool_parts([float((x**2).sum()) for x in v], [1] * B, float((v.sum(0) ** 2).sum()))
    g2, ts = estimate(m.sq_norm_small, m.b_small, m.sq_norm_big, m.b_big)
    assert ts == pytest.approx(g.var(axis=0, ddof=1).sum(), rel=1e-10)
    # |G|^2 unbiased: |mean|^2 minus the variance of the mean
    assert g2 == pytest.approx((g.mean(0) ** 2).sum() - g.var(axis=0, ddof=1).sum() / B, rel=1e-10)


def test_pool_parts_accepts_tensors_and_keeps_them_on_device():
    m = pool_parts([torch.tensor(2.0), torch.tensor(4.0)], [2, 2], torch.tensor(1.5))
    assert isinstance(m.sq_norm_small, torch.Tensor)
    assert float(m.sq_norm_small) == pytest.approx((2 + 4) / 0.5)
    assert m.as_floats().sq_norm_small == pytest.approx(12.0)


def test_estimate_rejects_bad_sizes():
    with pytest.raises(ValueError, match="b_small < b_big"):
        estimate(1.0, 8, 0.5, 8)
    with pytest.raises(ValueError, match="b_small < b_big"):
        estimate(1.0, 16, 0.5, 8)
    with pytest.raises(ValueError, match="b_small must be a finite positive"):
        estimate(1.0, 0, 0.5, 8)
    with pytest.raises(ValueError, match="b_big must be a finite positive"):
        estimate(1.0, 1, 0.5, float("nan"))


def test_pool_parts_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2 parts"):
        pool_parts([1.0], [4], 1.0)
    with pytest.raises(ValueError, match="pair up"):
        pool_parts([1.0, 2.0, 3.0], [4, 4], 1.0)
    with pytest.raises(ValueError, match="part 1 has size -2"):
        pool_parts([1.0, 2.0], [4, -2], 1.0)
    with pytest.raises(ValueError, match="reduction must be"):
        pool_parts([1.0, 2.0], [4, 4], 1.0, reduction="avg")


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
        assert E == pytest.approx(B * S)  # E = B S
        assert (S / s_min - 1) * (E / e_min - 1) == pytest.approx(1.0)  # the hyperbola
    # Eqs. 2.6-2.7: half of the maximal step and progress at B = B_noise
    assert est.eps_opt(50.0, 0.2, 50.0) == pytest.approx(0.1)
    assert est.dL_opt(np.array([1e9]), 3.0, 50.0)[0] == pytest.approx(3.0, rel=1e-6)
    assert est.eps_central(1e9, 0.4, 100.0, alpha=0.5) == pytest.approx(0.4, rel=1e-6)
    assert est.optimal_batch_for_exchange_rate(100.0, 400.0) == pytest.approx(200.0)
    with pytest.raises(ValueError, match="e_min and s_min must be positive"):
        est.b_crit(0.0, 10.0)


@pytest.mark.parametrize("df,expected,tol", [(3, 3.182446, 5e-3), (5, 2.570582, 4e-4), (10, 2.228139, 1e-5),
                                             (30, 2.042272, 1e-5), (math.inf, 1.959964, 1e-6)])
def test_t_quantile(df, expected, tol):
    assert est.t_quantile(0.975, df) == pytest.approx(expected, abs=tol)


def test_fieller_reduces_to_delta_when_precise_and_opens_when_not():
    lo, hi = est.fieller_interval(10.0, 2.0, 1e-6, 1e-8, 0.0, 1.96)
    assert lo < 5.0 < hi and hi - lo < 1e-2
    lo, hi = est.fieller_interval(10.0, 0.01, 0.01, 1.0, 0.0, 1.96)  # denominator not resolved
    assert hi == math.inf and lo > 0


def test_measurement_record():
    m = Measurement(torch.tensor(3.0), 2, 1.0, 8, "x")
    assert m.to_dict() == {"sq_norm_small": 3.0, "b_small": 2.0, "sq_norm_big": 1.0, "b_big": 8.0, "source": "x"}
