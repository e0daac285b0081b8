"""measure(): a careful one-shot estimate at fixed parameters, against brute force; nothing the user
had is changed (parameters, .grad, buffers, RNG, hooks)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import noisescale as ns
from noisescale.data import digits_mlp, load_digits


@pytest.fixture(scope="module")
def digits():
    X, y, _, _ = load_digits(seed=0)
    return X, y


def _exact_b_simple(model, X, y):
    """Brute force: per-sample gradients of the whole dataset with torch.func (sampling with replacement)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_one(p, x, t):
        return F.cross_entropy(functional_call(model, p, (x[None],)), t[None])

    per = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, X, y)
    flat = torch.cat([g.reshape(len(y), -1).double() for g in per.values()], dim=1)
    G = flat.mean(0)
    trace_sigma = ((flat - G) ** 2).sum(1).mean()  # population covariance: draws are with replacement
    return float(trace_sigma / (G**2).sum())


def test_b_simple_matches_brute_force_at_fixed_parameters(digits):
    """measure() (micro-batch probe) is within 10% of tr(Sigma)/|G|^2 from all per-sample gradients."""
    X, y = digits
    torch.manual_seed(0)
    model = digits_mlp(hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(100):  # move off initialisation a little so |G| is not trivially large
        idx = torch.randint(len(y), (64,))
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
    exact = _exact_b_simple(model, X, y)
    gen = torch.Generator().manual_seed(1)
    batches = [(X[i], y[i]) for i in torch.randint(len(y), (400, 64), generator=gen)]
    r = ns.measure(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), batches, micro_batches=4)
    assert r.n == 400 and r.skipped == 0 and r.coverage == 1.0
    assert r.b_simple == pytest.approx(exact, rel=0.10), (r.b_simple, exact)
    lo, hi = r.interval(0.95)
    assert lo <= exact <= hi


def test_measure_leaves_model_exactly_as_it_was(digits):
    X, y = digits
    model = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 10))
    model.train()
    F.cross_entropy(model(X[:32]), y[:32]).backward()  # the user has gradients of their own
    before = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    rng_before = torch.get_rng_state()
    r = ns.measure(
        model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), [(X[i : i + 32], y[i : i + 32]) for i in range(0, 320, 32)]
    )
    assert r.b_simple is not None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert not model._forward_pre_hooks and all(not p._backward_hooks for p in model.parameters())


def _exact_b_noise(model, X, y):
    """Brute force: tr(H Sigma) = mean_i (g_i - G)^T H (g_i - G), one Hessian-vector product of the
    whole-dataset loss per centred per-example gradient (batched through one double-backward graph),
    and G^T H G from one more; eps_max = |G|^2/(G^T H G)."""
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]

    def loss_one(ps, x, t):
        return F.cross_entropy(functional_call(model, dict(zip(names, ps)), (x[None],)), t[None])

    per = vmap(grad(loss_one), in_dims=(None, 0, 0))(tuple(p.detach() for p in params), X, y)
    G = [g.mean(0) for g in per]
    gl = torch.autograd.grad(F.cross_entropy(model(X), y), params, create_graph=True)

    def quad(v, hv):
        return sum((a.double() * b.double()).flatten(1).sum(1) for a, b in zip(v, hv))

    hg = torch.autograd.grad(gl, params, grad_outputs=G, retain_graph=True)
    gHg = float(quad([g[None] for g in G], [h[None] for h in hg]))
    total = 0.0
    for s in range(0, len(y), 256):
        centred = [(g[s : s + 256] - m) for g, m in zip(per, G)]
        hv = torch.autograd.grad(gl, params, grad_outputs=centred, retain_graph=True, is_grads_batched=True)
        total += float(quad(centred, hv).sum())
    g2 = float(sum((g.double() ** 2).sum() for g in G))
    return total / len(y) / gHg, g2 / gHg


def test_b_noise_matches_brute_force_at_fixed_parameters(digits):
    """measure(hessian=True).b_noise within 10% of tr(H Sigma)/(G^T H G) from every example's gradient and
    whole-dataset Hessian-vector products; eps_max likewise; both intervals cover the exact values.

    At initialisation: a few SGD steps later G^T H G of this tanh MLP wanders through zero (it is -0.015
    after 100 steps at lr 0.05: B_noise is then undefined, and measure() says so), and where it is
    positive again B_noise is ~1000 examples, so resolving G^T H G to a few percent needs many more draws.
    """
    X, y = digits
    model = digits_mlp(hidden=32)
    exact, exact_eps = _exact_b_noise(model, X, y)
    gen = torch.Generator().manual_seed(2)
    batches = [(X[i], y[i]) for i in torch.randint(len(y), (600, 384), generator=gen)]
    before = [p.detach().clone() for p in model.parameters()]
    r = ns.measure(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), batches, micro_batches=3, hessian=True)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert r.hessian_draws == 600 and r.b_noise_reason is None
    assert r.b_noise == pytest.approx(exact, rel=0.10), (r.b_noise, exact)
    assert r.eps_max == pytest.approx(exact_eps, rel=0.10), (r.eps_max, exact_eps)
    lo, hi = r.b_noise_interval(0.95)
    assert lo <= exact <= hi
    lo, hi = r.eps_max_interval(0.95)
    assert lo <= exact_eps <= hi
    assert r.b_simple is not None  # measured alongside, from the same batches


def test_b_noise_undefined_where_the_curvature_along_g_is_negative(digits):
    """After 100 SGD steps G^T H G < 0 exactly (see above): b_noise is None with the reason, not a number."""
    X, y = digits
    torch.manual_seed(0)
    model = digits_mlp(hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(100):
        idx = torch.randint(len(y), (64,))
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
    params = list(model.parameters())
    gl = torch.autograd.grad(F.cross_entropy(model(X), y), params, create_graph=True)
    hg = torch.autograd.grad(gl, params, grad_outputs=[g.detach() for g in gl])
    assert float(sum((a.detach() * b).sum() for a, b in zip(gl, hg))) < 0
    gen = torch.Generator().manual_seed(2)
    batches = [(X[i], y[i]) for i in torch.randint(len(y), (100, 96), generator=gen)]
    r = ns.measure(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), batches, micro_batches=3, hessian=True)
    assert r.b_noise is None and "not convex" in r.b_noise_reason and r.b_noise_interval() is None


def test_measure_hessian_needs_three_parts(digits):
    X, y = digits
    model = digits_mlp(hidden=8)
    with pytest.raises(ValueError, match="micro_batches >= 3"):
        ns.measure(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), [(X[:8], y[:8])], micro_batches=2, hessian=True)
    r = ns.measure(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), [(X[:8], y[:8])] * 3)
    assert r.b_noise is None and "hessian=True" in r.b_noise_reason and r.b_noise_interval() is None
