"""Learning-rate rules against their closed forms and against slow references (noisescale.lr_rules)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import noisescale as ns
from noisescale import estimators, sweeps
from noisescale.lr_rules import (
    LRRule,
    adam_sqrt_hyperparameters,
    eps_central,
    eps_saturating,
    fit_power_law,
    linear_scale,
    lr_scaling,
    power_scale,
    resolve_rule,
    saturating_scale,
    sqrt_scale,
)


def brute_force_eps_opt(B: float, g2: float, gHg: float, tr_hsigma: float) -> float:
    """argmin over a fine grid of the quadratic model's expected loss after one step (McCandlish Eq. 2.5):
    E[L(theta - eps G_est)] - L = -eps |G|^2 + eps^2/2 (G^T H G + tr(H Sigma)/B)."""
    lo, hi = 0.0, 4.0 * g2 / gHg
    for _ in range(3):  # a grid, then finer grids around its best point (a flat minimum: ~1e-8 relative)
        eps = np.linspace(lo, hi, 20_001)
        i = int(np.argmin(-eps * g2 + 0.5 * eps**2 * (gHg + tr_hsigma / B)))
        lo, hi = eps[max(i - 1, 0)], eps[min(i + 1, len(eps) - 1)]
    return float(eps[i])


@pytest.mark.parametrize("B", [1.0, 7.0, 64.0, 1000.0, 1e5])
def test_saturating_rule_is_the_quadratic_models_optimum(B):
    g2, gHg, tr_hsigma = 2.0, 0.5, 40.0  # eps_max = 4, B_noise = 80
    eps_max, b_noise = g2 / gHg, tr_hsigma / gHg
    ref = brute_force_eps_opt(B, g2, gHg, tr_hsigma)
    assert eps_saturating(B, eps_max, b_noise) == pytest.approx(ref, rel=1e-6)
    assert eps_saturating(B, eps_max, b_noise) == estimators.eps_opt(B, eps_max, b_noise)
    # the rule's multiplier is the ratio of two optima, whatever eps_max
    B0 = 16.0
    ratio = brute_force_eps_opt(B, g2, gHg, tr_hsigma) / brute_force_eps_opt(B0, g2, gHg, tr_hsigma)
    assert saturating_scale(B, B0, b_noise) == pytest.approx(ratio, rel=1e-6)


def test_saturating_limits_are_linear_and_flat():
    # far below the noise scale: the linear rule (Goyal et al.); far above: no change
    assert saturating_scale(2.0, 1.0, 1e9) == pytest.approx(2.0, rel=1e-8)
    assert saturating_scale(2e9, 1e9, 1.0) == pytest.approx(1.0, rel=1e-8)
    # bounded by 1 + B_noise/B0 however large the batch
    assert saturating_scale(1e12, 10.0, 90.0) == pytest.approx(10.0, rel=1e-9)
    assert saturating_scale(50.0, 10.0, 0.0) == 1.0


def test_linear_sqrt_power_closed_forms():
    for B, B0 in [(64, 32), (32, 64), (1000, 7), (3.5, 3.5)]:
        assert linear_scale(B, B0) == B / B0
        assert sqrt_scale(B, B0) == pytest.approx(math.sqrt(B / B0), rel=1e-15)
        for a in (0.0, 0.5, 0.73, 1.0):
            assert power_scale(B, B0, a) == pytest.approx((B / B0) ** a, rel=1e-15)
    assert power_scale(64, 16, 0.5) == sqrt_scale(64, 16) == 2.0


def test_eps_central_has_one_home():
    assert estimators.eps_central is eps_central and ns.eps_central is eps_central
    assert sweeps.lr_scaling is lr_scaling and ns.lr_scaling is lr_scaling
    # App. A.2: eps*/(1 + B*/B)^alpha is the saturating rule's curve for alpha = 1
    for B in (3.0, 256.0, 1e4):
        assert eps_central(B, 0.4, 100.0) == pytest.approx(eps_saturating(B, 0.4, 100.0), rel=1e-15)
        assert eps_central(B, 0.4, 100.0, alpha=0.5) == pytest.approx(0.4 / math.sqrt(1 + 100.0 / B), rel=1e-15)
    assert lr_scaling("sgd")(8) == 8.0 and lr_scaling("adamw")(16) == 4.0


def test_adam_sqrt_rule_of_malladi():
    h = adam_sqrt_hyperparameters(4.0, (0.9, 0.999), 1e-8)
    assert h.lr_factor == 2.0
    assert h.betas[0] == pytest.approx(1 - 4 * 0.1, rel=1e-12) and h.betas[1] == pytest.approx(1 - 4 * 0.001, rel=1e-12)
    assert h.eps == pytest.approx(0.5e-8, rel=1e-15)
    # the EMA's time constant in examples stays the same: steps ~ 1/(1-beta), examples ~ B/(1-beta)
    B = 32.0
    for b_old, b_new in zip((0.9, 0.999), h.betas):
        assert B / (1 - b_old) == pytest.approx(4 * B / (1 - b_new), rel=1e-9)
    # kappa = 1 leaves everything as it was
    same = adam_sqrt_hyperparameters(1.0, (0.9, 0.95), 1e-6)
    assert same.betas == pytest.approx((0.9, 0.95)) and same.eps == 1e-6 and same.lr_factor == 1.0
    with pytest.raises(ValueError, match=r"kappa \(1 - beta\) < 1"):
        adam_sqrt_hyperparameters(16.0, (0.9, 0.999), 1e-8)  # 16 x 0.1 >= 1


def test_fit_power_law_recovers_alpha():
    rng = np.random.default_rng(0)
    Bs = [16, 32, 64, 128, 256]
    lrs = [3e-4 * (b / 16) ** 0.62 for b in Bs]
    alpha, c = fit_power_law(Bs, lrs)
    assert alpha == pytest.approx(0.62, abs=1e-12) and c * 16**0.62 == pytest.approx(3e-4, rel=1e-12)
    # a sweep's fit: the frontier points carry the fastest run's learning rate
    noisy = [lr * math.exp(0.01 * rng.standard_normal()) for lr in lrs]
    fit = SimpleNamespace(points=[SimpleNamespace(batch_size=b, lr=lr) for b, lr in zip(Bs, noisy)])
    a2, _ = fit_power_law(fit)
    ref = np.polyfit(np.log(Bs), np.log(noisy), 1)[0]
    assert a2 == pytest.approx(ref, rel=1e-10) and abs(a2 - 0.62) < 0.03
    with pytest.raises(ValueError, match="at least 2 distinct"):
        fit_power_law([32, 32], [1e-3, 2e-3])
    with pytest.raises(ValueError, match="one lr per batch size"):
        fit_power_law([32, 64], [1e-3])
    with pytest.raises(ValueError, match="not a finite positive"):
        fit_power_law([32, 64], [1e-3, -1.0])


def test_rule_objects_and_auto():
    assert LRRule("linear").scale(64, 16) == 4.0
    assert LRRule("sqrt").scale(64, 16) == 2.0
    assert LRRule("none").scale(64, 16) == 1.0
    assert LRRule("power", alpha=0.75).scale(81, 1) == pytest.approx(27.0, rel=1e-14)
    assert LRRule("saturating").scale(64, 16, 48.0) == saturating_scale(64, 16, 48.0)
    assert LRRule("saturating", b_noise=48.0).scale(64, 16) == saturating_scale(64, 16, 48.0)
    assert LRRule("saturating").needs_noise_scale and not LRRule("saturating", b_noise=1.0).needs_noise_scale
    p = torch.nn.Parameter(torch.zeros(1))
    assert resolve_rule("auto", torch.optim.SGD([p], lr=0.1, momentum=0.9)).name == "saturating"
    for opt in (torch.optim.Adam([p]), torch.optim.AdamW([p]), torch.optim.RMSprop([p])):
        assert resolve_rule("auto", opt).name == "sqrt"
    assert resolve_rule("auto", None).name == "none"
    assert resolve_rule("linear", None) == LRRule("linear")
    with pytest.raises(ValueError, match="no rule for the optimizer LBFGS"):
        resolve_rule("auto", torch.optim.LBFGS([p]))
    with pytest.raises(ValueError, match="needs its exponent"):
        resolve_rule("power")
    with pytest.raises(ValueError, match="must be one of"):
        LRRule("cubic")
    with pytest.raises(ValueError, match="alpha applies to the 'power' rule only"):
        LRRule("linear", alpha=0.5)
    with pytest.raises(ValueError, match="needs a noise scale"):
        LRRule("saturating").scale(64, 16)
    with pytest.raises(ValueError, match="batch_size must be a finite positive batch size, got 0"):
        linear_scale(0, 16)
    with pytest.raises(ValueError, match="b_noise must be a finite noise scale"):
        saturating_scale(64, 16, float("nan"))
