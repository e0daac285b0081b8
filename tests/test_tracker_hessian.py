"""B_noise during training: GradientNoiseScale(hessian_every=K) with step(closure=...).

The tracker's draws are the same computation as measure(hessian=True) (tests/test_measure.py checks
that against brute force): fed the same micro-batches at fixed parameters they give the same numbers.
Training with the Hessian draws is bit-identical to training without noisescale.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import noisescale as ns
from noisescale.data import digits_mlp, load_digits
from noisescale.measure import split_batch


@pytest.fixture(scope="module")
def digits():
    X, y, _, _ = load_digits(seed=0)
    return X, y


def _batches(X, y, n, size, seed):
    gen = torch.Generator().manual_seed(seed)
    return [(X[i], y[i]) for i in torch.randint(len(y), (n, size), generator=gen)]


@pytest.mark.parametrize("method", ["microbatch", "per_example"])
def test_tracker_draws_equal_measure_on_the_same_batches(digits, method):
    """At fixed parameters, with beta=1, the tracker's b_noise, eps_max and b_simple equal measure()'s."""
    X, y = digits
    model = digits_mlp(hidden=16)
    batches = _batches(X, y, 40, 48, seed=3)
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])
    ref = ns.measure(model, loss_fn, batches, micro_batches=3, hessian=True)
    gns = ns.GradientNoiseScale(model, "microbatch", beta=1.0, robust=False, hessian_every=1)
    if method == "per_example":  # the per-example probe's instrumented layers step aside for the draws
        gns2 = ns.GradientNoiseScale(model, "per_example", beta=1.0, robust=False, hessian_every=1)
    for batch in batches:
        parts = split_batch(batch, 3)
        for part in parts:
            (loss_fn(model, part) / 3).backward()
        it = iter(parts)
        gns.step(closure=lambda it=it: loss_fn(model, next(it)))
        if method == "per_example":
            it2 = iter(parts)
            gns2.step(closure=lambda it2=it2: loss_fn(model, next(it2)))
        for p in model.parameters():
            p.grad = None
    assert gns.hessian_draws == 40
    assert gns.b_noise == pytest.approx(ref.b_noise, rel=1e-9)
    assert gns.eps_max == pytest.approx(ref.eps_max, rel=1e-9)
    assert gns.b_noise_interval() == pytest.approx(ref.b_noise_interval())
    assert gns.b_simple == pytest.approx(ref.b_simple, rel=1e-9)
    if method == "per_example":
        assert gns2.b_noise == pytest.approx(ref.b_noise, rel=1e-9)
        gns2.close()
    m = gns.metrics()
    assert m["gns/b_noise"] == pytest.approx(ref.b_noise) and m["gns/hessian_draws"] == 40
    assert m["gns/b_noise_low"] <= m["gns/b_noise"] <= m["gns/b_noise_high"]
    assert "B_noise = " in gns.summary() and "40 draws" in gns.summary()
    rec = gns.history[-1]
    assert rec["b_noise"] == pytest.approx(ref.b_noise) and rec["hessian_status"] == "measured"
    gns.close()


def _train(X, y, steps, hessian_every=None, seed=0):
    """SGD + momentum, 2 micro-batches per step, clipping; with or without a tracker measuring B_noise."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    hgen = torch.Generator().manual_seed(seed + 100)  # the closure's own draws
    gns = None
    if hessian_every is not None:
        gns = ns.GradientNoiseScale(model, "microbatch", hessian_every=hessian_every)

    def closure():
        i = torch.randint(len(y), (32,), generator=hgen)
        return F.cross_entropy(model(X[i]), y[i])

    for _ in range(steps):
        idx = torch.randint(len(y), (64,), generator=gen)
        for xb, yb in zip(X[idx].chunk(2), y[idx].chunk(2)):
            (F.cross_entropy(model(xb), yb) / 2).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if gns is not None:
            gns.step(closure=closure)
        opt.step()
        opt.zero_grad()
    return model, gns, torch.get_rng_state()


def test_training_with_hessian_draws_is_bit_identical(digits):
    X, y = digits
    plain, _, rng_plain = _train(X, y, 12)
    model, gns, rng = _train(X, y, 12, hessian_every=3)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))
    assert torch.equal(rng_plain, rng)
    assert gns.hessian_draws == 4  # steps 1, 4, 7, 10
    assert gns.hessian_seconds > 0
    statuses = [r.get("hessian_status") for r in gns.history]
    assert statuses.count("measured") == 4 and statuses[0] == "measured" and statuses[1] is None
    # averaged with decay beta**K per draw: the same span of steps as b_simple
    assert gns._hessian.beta == pytest.approx(0.99**3)
    gns.close()


def test_closure_required_on_due_steps_and_state_round_trip(digits):
    X, y = digits
    model = digits_mlp(hidden=8)
    gns = ns.GradientNoiseScale(model, "microbatch", hessian_every=2)
    loss_fn = lambda b: F.cross_entropy(model(b[0]), b[1])
    batches = iter(_batches(X, y, 200, 16, seed=1))
    with pytest.raises(ValueError, match=r"needs step\(closure=...\)"):
        gns.step()
    for _ in range(6):
        for _ in range(2):
            (loss_fn(next(batches)) / 2).backward()
        gns.step(closure=lambda: loss_fn(next(batches)))
        model.zero_grad()
    sd = gns.state_dict()
    assert sd["hessian"]["every"] == 2 and sd["hessian"]["ema"]["count"] == 3
    other = ns.GradientNoiseScale(digits_mlp(hidden=8), "microbatch", hessian_every=2)
    other.load_state_dict(sd)
    assert other.b_noise == gns.b_noise and other.hessian_draws == 3 and other.b_noise_reason == gns.b_noise_reason
    with pytest.raises(ValueError, match="hessian_every"):
        ns.GradientNoiseScale(digits_mlp(hidden=8), "microbatch", hessian_every=5).load_state_dict(sd)
    with pytest.raises(ValueError, match="hessian_every"):
        ns.GradientNoiseScale(digits_mlp(hidden=8), "microbatch", hessian_every=0)
    plain = ns.GradientNoiseScale(digits_mlp(hidden=8), "microbatch")
    assert plain.b_noise is None and "hessian_every" in plain.b_noise_reason
    assert "gns/b_noise" not in plain.metrics() and "B_noise" not in plain.summary()
    for g in (gns, other, plain):
        g.close()


class _NoDoubleBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - torch.tanh(x) ** 2)


def test_a_failed_hessian_product_stops_b_noise_not_training(digits):
    """An op without a double backward: one warning, b_noise None with the reason, steps go on."""
    X, y = digits
    lin1, lin2 = torch.nn.Linear(64, 8), torch.nn.Linear(8, 10)
    model = torch.nn.Sequential(lin1, torch.nn.Identity(), lin2)
    model[1].forward = lambda x: _NoDoubleBackward.apply(x)
    gns = ns.GradientNoiseScale(model, "microbatch", hessian_every=1)
    batches = iter(_batches(X, y, 100, 16, seed=2))
    loss_fn = lambda b: F.cross_entropy(model(b[0]), b[1])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(4):
            for _ in range(2):
                (loss_fn(next(batches)) / 2).backward()
            gns.step(closure=lambda: loss_fn(next(batches)))
            model.zero_grad()
    msgs = [str(x.message) for x in w if "Hessian-vector product failed" in str(x.message)]
    assert len(msgs) == 1
    assert gns.b_noise is None and "failed at step 1" in gns.b_noise_reason
    assert gns.b_simple is not None and gns.steps == 4
    assert math.isnan(gns.metrics()["gns/b_noise"])
    gns.close()


def _train_char(data, steps, track=False, hessian_every=None):
    """The tinyshakespeare char transformer (SDPA attention, LayerNorm, RMSNorm, GELU) with AdamW,
    warm-up and clipping; exact per-example norms; B_noise every other step."""
    from models import CharTransformer, char_batches

    model = CharTransformer(d=32, heads=2, layers=1, block=32, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    train = char_batches(data, 8, 32, steps, seed=0)
    extra = iter(char_batches(data, 8, 32, 3 * steps, seed=1))
    gns = ns.GradientNoiseScale(model, "per_example", hessian_every=hessian_every) if track else None

    def closure():
        x, y = next(extra)
        return CharTransformer.loss(model(x), y)

    for x, y in train:
        loss = CharTransformer.loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if gns is not None:
            gns.step(closure=closure)
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, gns


def test_char_transformer_with_per_example_norms_and_hessian_draws(shakespeare_path):
    """Attention through the MATH kernel (the fused one has no double backward), per-example layers
    stepping aside: training bit-identical, B_simple unchanged by the draws, B_noise measured."""
    from models import char_data

    data, _ = char_data(shakespeare_path)
    data = data[:20000]
    plain, _ = _train_char(data, 6)
    _, without = _train_char(data, 6, track=True)
    model, gns = _train_char(data, 6, track=True, hessian_every=2)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))
    assert gns.hessian_draws == 3 and gns.measured == 6
    assert gns.b_simple == without.b_simple and gns.g2 == without.g2  # the draws leave the probe alone
    h = [r for r in gns.history if r.get("hessian_status") == "measured"]
    assert len(h) == 3 and all(math.isfinite(r["gHg_draw"]) and math.isfinite(r["trace_h_sigma_draw"]) for r in h)
    assert (gns.b_noise is not None) != (gns.b_noise_reason is not None)
    without.close()
    gns.close()
