"""B_noise = tr(H Sigma)/(G^T H G) from Hessian-vector products (noisescale.hessian).

A noisy quadratic with a *random per-example Hessian* makes every piece of the estimator matter:
``L_x(theta) = 1/2 theta^T (A + e_x E) theta - (c + L z_x)^T theta`` with ``e_x ~ N(0, s^2)``,
``z_x ~ N(0, I)``. Then ``H = A``, ``G = A theta - c``, ``Sigma = s^2 (E theta)(E theta)^T + L L^T``,
and a Hessian taken on the gradients' own examples is biased (``e_x`` enters both).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from noisescale.hessian import BNoiseAverage, HessianDraw, hessian_draw, hessian_terms


class NoisyQuadratic(torch.nn.Module):
    def __init__(self, d: int = 6, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        M = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.A = M @ M.T / d + 0.5 * torch.eye(d, dtype=torch.float64)  # positive definite mean Hessian
        E = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.E = (E + E.T) / 2
        self.c = torch.randn(d, generator=g, dtype=torch.float64)
        self.L = 0.7 * torch.randn(d, d, generator=g, dtype=torch.float64)
        self.s = 0.8
        self.theta = torch.nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))

    def forward(self, e: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Mean loss over the examples ``(e_x, z_x)``."""
        th = self.theta
        quad = 0.5 * (th @ self.A @ th + e.mean() * (th @ self.E @ th))
        lin = (self.c + (z @ self.L.T).mean(0)) @ th
        return quad - lin

    def sample(self, b: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.theta.numel()
        return self.s * torch.randn(b, generator=gen, dtype=torch.float64), torch.randn(
            b, d, generator=gen, dtype=torch.float64
        )

    def truth(self) -> dict[str, float]:
        th = self.theta.detach()
        G = self.A @ th - self.c
        u = self.E @ th
        Sigma = self.s**2 * torch.outer(u, u) + self.L @ self.L.T
        gHg = float(G @ self.A @ G)
        tr = float(torch.trace(self.A @ Sigma))
        return {"gHg": gHg, "trace_h_sigma": tr, "g2": float(G @ G), "b_noise": tr / gHg, "eps_max": float(G @ G) / gHg}


def closure_for(model: NoisyQuadratic, b: int, gen: torch.Generator):
    def closure():
        e, z = model.sample(b, gen)
        return model(e, z)

    return closure


def test_quadratic_forms_equal_explicit_matrices() -> None:
    """hessian_draw's HVPs against the explicit Hessian of the Hessian micro-batch."""
    model = NoisyQuadratic()
    gen = torch.Generator().manual_seed(1)
    batches = [model.sample(5, gen) for _ in range(4)]
    it = iter(batches)
    draw = hessian_draw(model, [model.theta], lambda: model(*next(it)), parts=3)
    th = model.theta.detach()
    grads = [model.A @ th + e.mean() * (model.E @ th) - model.c - (z @ model.L.T).mean(0) for e, z in batches[:3]]
    H = model.A + batches[3][0].mean() * model.E
    Q = np.array([[float(gi @ H @ gj) for gj in grads] for gi in grads])
    D = np.array([[float(gi @ gj) for gj in grads] for gi in grads])
    expect = hessian_terms(Q, D, [5, 5, 5])
    assert draw.sizes == (5.0, 5.0, 5.0)
    np.testing.assert_allclose([draw.gHg, draw.trace_h_sigma, draw.g2], expect, rtol=1e-10)


def test_hessian_terms_closed_form() -> None:
    """Two gradients: gHg is the cross term, tr(H Sigma) = b (Q_11 + Q_22)/2 - b Q_12."""
    Q = np.array([[5.0, 2.0], [2.0, 7.0]])
    D = np.array([[3.0, 1.5], [1.5, 4.0]])
    gHg, tr, g2 = hessian_terms(Q, D, [4, 4])
    assert gHg == 2.0 and g2 == 1.5
    assert tr == pytest.approx(4 * ((5 + 7) / 2 - 2))
    with pytest.raises(ValueError, match="m >= 2"):
        hessian_terms(Q[:1, :1], D[:1, :1], [4])
    with pytest.raises(ValueError, match="positive"):
        hessian_terms(Q, D, [4, 0])


@pytest.mark.parametrize("parts,b", [(2, 4), (3, 2)])
def test_draws_are_unbiased_on_the_noisy_quadratic(parts: int, b: int) -> None:
    """Mean of many draws within 3 standard errors of G^T H G, tr(H Sigma) and |G|^2."""
    torch.manual_seed(0)
    model = NoisyQuadratic()
    truth = model.truth()
    gen = torch.Generator().manual_seed(2)
    close = closure_for(model, b, gen)
    draws = np.array([hessian_draw(model, [model.theta], close, parts=parts).as_array() for _ in range(1500)])
    mean, se = draws.mean(0), draws.std(0, ddof=1) / math.sqrt(len(draws))
    for k, name in enumerate(("gHg", "trace_h_sigma", "g2")):
        assert abs(mean[k] - truth[name]) < 3 * se[k], (name, mean[k], truth[name], se[k])


def test_hessian_on_the_gradients_own_examples_would_be_biased() -> None:
    """Why the Hessian needs its own micro-batch: H_x correlates with g_x through e_x."""
    model = NoisyQuadratic()
    truth = model.truth()
    gen = torch.Generator().manual_seed(3)
    th = model.theta.detach()
    vals = []
    for _ in range(4000):
        e, z = model.sample(2, gen)
        g = model.A @ th + e.mean() * (model.E @ th) - model.c - (z @ model.L.T).mean(0)
        H = model.A + e.mean() * model.E  # the same examples
        vals.append(float(g @ H @ g) - float(g @ model.A @ g))  # the correlated part alone
    mean, se = np.mean(vals), np.std(vals) / math.sqrt(len(vals))
    assert abs(mean) > 6 * se  # a real bias, not noise
    assert abs(mean) > 0.05 * truth["trace_h_sigma"] / 2  # and not a small one next to tr(H Sigma)/b


def test_interval_coverage_on_the_noisy_quadratic() -> None:
    """The 95% Fieller interval of B_noise covers the truth in 90-99% of 240 seeded repetitions.

    The draws are simulated with the exact per-draw formulas (gradients and Hessian sampled as the
    quadratic defines them, hessian_terms applied) so that 240 x 40 draws take a second;
    test_quadratic_forms_equal_explicit_matrices ties hessian_draw to the same formulas.
    """
    model = NoisyQuadratic()
    truth = model.truth()
    th = model.theta.detach().numpy()
    s = model.s
    A, E, c, L = (t.numpy() for t in (model.A, model.E, model.c, model.L))
    rng = np.random.default_rng(4)
    b, parts, n, reps = 4, 2, 40, 240
    covered = covered_eps = 0
    for _ in range(reps):
        avg = BNoiseAverage(1.0)
        for _ in range(n):
            e = rng.normal(0, s, size=(parts + 1, b)).mean(1)
            z = rng.normal(size=(parts + 1, b, len(th))).mean(1)
            g = (A @ th)[None] + e[:parts, None] * (E @ th)[None] - c[None] - z[:parts] @ L.T
            H = A + e[parts] * E
            Q, D = g @ H @ g.T, g @ g.T
            avg.update(HessianDraw(*hessian_terms(Q, D, [b] * parts), sizes=(b,) * parts, seconds=0.0))
        iv = avg.b_noise_interval(0.95)
        assert iv is not None
        covered += iv[0] <= truth["b_noise"] <= iv[1]
        ive = avg.eps_max_interval(0.95)
        assert ive is not None
        covered_eps += ive[0] <= truth["eps_max"] <= ive[1]
    assert 0.90 <= covered / reps <= 0.99, covered / reps
    assert 0.90 <= covered_eps / reps <= 0.99, covered_eps / reps


def test_average_reasons_and_state() -> None:
    avg = BNoiseAverage(0.9)
    assert avg.b_noise is None and "no Hessian draw" in (avg.reason or "")
    avg.update(HessianDraw(-1.0, 2.0, 1.0, (4.0, 4.0), 0.01))
    assert avg.b_noise is None and "not convex" in (avg.reason or "")
    for v in (3.0, 5.0, 4.0):
        avg.update(HessianDraw(v, 2 * v, v / 2, (4.0, 4.0), 0.01))
    assert avg.b_noise is not None and avg.eps_max is not None
    sd = avg.state_dict()
    other = BNoiseAverage(0.9)
    other.load_state_dict(sd)
    assert other.b_noise == avg.b_noise and other.b_noise_interval() == avg.b_noise_interval()
    assert other.seconds == pytest.approx(0.04)
    with pytest.raises(ValueError, match="beta"):
        BNoiseAverage(0.5).load_state_dict(sd)


def test_draw_is_inert_and_validates_the_closure() -> None:
    model = NoisyQuadratic()
    model.theta.grad = torch.ones_like(model.theta)
    before = (model.theta.detach().clone(), model.theta.grad.clone(), torch.get_rng_state())
    gen = torch.Generator().manual_seed(5)

    def noisy_closure():
        torch.rand(3)  # consumes the global RNG: must not leak out of the draw
        e, z = model.sample(3, gen)
        return model(e, z)

    hessian_draw(model, [model.theta], noisy_closure)
    assert torch.equal(model.theta.detach(), before[0]) and torch.equal(model.theta.grad, before[1])
    assert torch.equal(torch.get_rng_state(), before[2])
    with pytest.raises(ValueError, match="size"):  # no batched input reaches the model's forward
        hessian_draw(model, [model.theta], lambda: (model.theta**2).sum())
    with pytest.raises(ValueError, match="unit is 'tokens'"):
        hessian_draw(model, [model.theta], noisy_closure, unit="tokens")
    with pytest.raises(TypeError, match="scalar loss"):
        hessian_draw(model, [model.theta], lambda: (model.theta * 1.0, 3))
    with pytest.raises(ValueError, match=">= 2"):
        hessian_draw(model, [model.theta], noisy_closure, parts=1)


def test_draw_on_a_tied_head_gpt_equals_the_explicit_hessian() -> None:
    """One draw on a character GPT whose output head is tied to the token embedding (one parameter, two
    uses: its Hessian block couples them), with attention, LayerNorm, RMSNorm and GELU, in float64:
    ``(G^T H G, tr(H Sigma), |G|^2)`` equal hessian_terms() of the quadratic forms built from the
    explicit Hessian of the flattened parameters (one double-backward row per parameter) and explicit
    gradients, to 1e-9.

    (Not torch.func.hessian: in torch 2.13 its forward-over-reverse, and jacrev(jacrev), give a
    LayerNorm Hessian whose weight-by-input block is wrong -- asymmetric by 0.04 here, off from finite
    differences by 0.6 on a 4-wide LayerNorm -- while autograd's double backward, which the draws use,
    matches finite differences to 1e-9; cf. pytorch/pytorch#196700.)"""
    import sys
    from pathlib import Path

    from torch.func import functional_call
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sys.path.insert(0, str(Path(__file__).parent))
    from models import CharTransformer

    torch.manual_seed(0)
    model = CharTransformer(vocab=8, d=4, heads=2, layers=1, block=8, seed=3).double()
    model.head.weight = model.tok.weight  # tied head
    for p in model.parameters():  # (larger weights than the LM's init: curvature well away from zero)
        p.data.normal_(0, 0.4)
    names = [n for n, _ in model.named_parameters()]  # (the tied weight once)
    params = [p for _, p in model.named_parameters()]
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 8, (5, 9), generator=gen) for _ in range(3)]  # 2 gradient parts + Hessian

    def loss_of(ids: torch.Tensor) -> torch.Tensor:
        return CharTransformer.loss(model(ids[:, :-1]), ids[:, 1:])

    shapes = [p.shape for p in params]
    numels = [p.numel() for p in params]

    def flat_loss(theta: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        chunks = [c.view(s) for c, s in zip(theta.split(numels), shapes)]
        logits = functional_call(model, dict(zip(names, chunks)), (ids[:, :-1],))  # (both uses of the tied weight)
        return CharTransformer.loss(logits, ids[:, 1:])

    served = iter(batches)
    with sdpa_kernel(SDPBackend.MATH):  # (the fused kernel has no double backward)
        draw = hessian_draw(model, params, lambda: loss_of(next(served)), parts=2)
        theta = torch.cat([p.detach().reshape(-1) for p in params]).requires_grad_(True)
        grads = [torch.autograd.grad(flat_loss(theta, b), theta)[0] for b in batches[:2]]
        g = torch.autograd.grad(flat_loss(theta, batches[2]), theta, create_graph=True)[0]
        H = torch.stack([torch.autograd.grad(g[i], theta, retain_graph=True)[0] for i in range(len(g))])
    assert float((H - H.T).abs().max()) < 1e-12 * float(H.abs().max()) * len(g)
    Q = np.array([[float(a @ H @ c) for c in grads] for a in grads])
    D = np.array([[float(a @ c) for c in grads] for a in grads])
    want = hessian_terms(Q, D, [5.0, 5.0])
    for got, w in zip((draw.gHg, draw.trace_h_sigma, draw.g2), want):
        assert got == pytest.approx(w, rel=1e-9, abs=1e-12), (draw, want)
    assert abs(want[0]) > 1e-3  # a curvature along G well away from zero: the comparison means something
