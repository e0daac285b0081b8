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
