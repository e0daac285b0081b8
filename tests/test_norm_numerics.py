"""Squared norms are finite and correct float64 numbers for any finite gradient (issue "Trustworthy
numbers"): no underflow to 0 for tiny gradients, no overflow to inf for huge ones, in fp16, bf16,
fp32 and fp64, weighted or not, grouped or not, on the CPU path and on the accelerator path
(simulated on the CPU by calling the device branch directly)."""

import math

import pytest
import torch
import torch.nn.functional as F

import noisescale as ns
from noisescale.data import digits_mlp, load_digits
from noisescale.probes import base
from noisescale.probes.base import grouped_sq_norms, sq_norm

RTOL = 1e-6
SCALES = [1e-30, 1e-25, 1e-20, 1.0, 1e20, 1e25, 1e30]
# sizes small enough that fp32 accumulation of the fast path stays well within RTOL
SHAPES = [(7,), (64, 33), (3000,)]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _grad(shape, scale, dtype=torch.float32, seed=0):
    """A gradient with entries of magnitude ~scale, drawn in float64 and rounded to ``dtype``."""
    g = torch.randn(shape, dtype=torch.float64, generator=_gen(seed)) * scale
    return g.to(dtype)


def _ref(g, w=None):
    x = g.to(torch.float64)
    if w is not None:
        x = x * w.to(torch.float64)
    return float((x * x).sum())


def _close(got, want):
    assert math.isfinite(want) and want > 0  # the reference itself is a normal float64
    assert got == pytest.approx(want, rel=RTOL)


def _device_sq_norm(g, w=None):
    """The accelerator branch, run on the CPU (it is plain tensor code with no host read)."""
    return base._sq_norm_device(g.detach(), w)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
def test_fp32_any_scale(scale, shape):
    g = _grad(shape, scale)
    s = sq_norm(g)
    assert isinstance(s, torch.Tensor) and s.dim() == 0 and s.dtype == torch.float64
    _close(float(s), _ref(g))
    _close(float(sq_norm(g.t() if g.dim() == 2 else g[::2])), _ref(g.t() if g.dim() == 2 else g[::2]))
    d = _device_sq_norm(g)
    assert d.dtype == torch.float64
    _close(float(d), _ref(g))


@pytest.mark.parametrize(
    "dtype,scale",
    [
        (torch.float16, 1e-6),  # subnormal fp16: squares 1e-12, a normal number only in fp32/fp64
        (torch.float16, 3e-8),
        (torch.float16, 1e4),  # up to ~4e4, near fp16's max 65504: squares far above it
        (torch.bfloat16, 1e-30),
        (torch.bfloat16, 1e-38),
        (torch.bfloat16, 1e25),
        (torch.bfloat16, 1e37),
        (torch.float32, 1e-40),  # fp32 subnormals
        (torch.float32, 1e37),
        (torch.float64, 1e-150),
        (torch.float64, 1e150),
    ],
)
def test_low_precision_and_extreme_entries(dtype, scale):
    g = _grad((40, 25), scale, dtype=dtype, seed=1)
    assert torch.isfinite(g).all() and (g != 0).any()
    for s in (sq_norm(g), sq_norm(g.t()), _device_sq_norm(g), _device_sq_norm(g.t())):
        assert s.dtype == torch.float64
        _close(float(s), _ref(g))


@pytest.mark.parametrize(
    "g_scale,w_scale",
    [(1e-30, 1e-8), (1e-25, 1.0), (1.0, 1.0), (1e-20, 1e8), (1e25, 1e8), (1e30, 1e8), (1e30, 1e-8), (1e20, 1e-30)],
)
@pytest.mark.parametrize("shape", [(64, 33), (3000,)])
def test_weighted_any_scale(g_scale, w_scale, shape):
    g = _grad(shape, g_scale, seed=2)
    w = (torch.rand(shape, dtype=torch.float64, generator=_gen(3)) * w_scale).float()  # product may leave fp32
    want = _ref(g, w)
    for s in (sq_norm(g, w), _device_sq_norm(g, w)):
        assert s.dtype == torch.float64
        _close(float(s), want)
    gt, wt = g.t(), w.t()  # not contiguous: the plain product path
    if g.dim() == 2:
        _close(float(sq_norm(gt, wt)), want)
        _close(float(_device_sq_norm(gt, wt)), want)


def test_weighted_low_precision_gradient_fp32_weight():
    for dtype, scale in [(torch.bfloat16, 1e-30), (torch.bfloat16, 1e30), (torch.float16, 1e-6), (torch.float16, 6e4)]:
        g = _grad((50, 20), scale / 4 if dtype == torch.float16 else scale, dtype=dtype, seed=4)
        w = torch.rand(50, 20, generator=_gen(5)) * 1e8
        for s in (sq_norm(g, w), _device_sq_norm(g, w)):
            _close(float(s), _ref(g, w))


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_sparse_gradient(scale):
    emb = torch.nn.Embedding(50, 8, sparse=True)
    (emb(torch.tensor([1, 3, 3, 7])).sum() * scale).backward()
    g = emb.weight.grad
    assert g.is_sparse
    want = _ref(g.to_dense())
    _close(float(sq_norm(g)), want)
    _close(float(_device_sq_norm(g)), want)
    w = torch.rand(50, 8, generator=_gen(6)) * 1e8
    want_w = _ref(g.to_dense(), w)
    _close(float(sq_norm(g, w)), want_w)
    _close(float(_device_sq_norm(g, w)), want_w)


def test_zero_empty_and_non_finite():
    for g in (torch.zeros(100), torch.zeros(0), torch.zeros(4, 5).t(), torch.zeros(10, dtype=torch.bfloat16)):
        for s in (sq_norm(g), _device_sq_norm(g), sq_norm(g, torch.ones_like(g, dtype=torch.float32))):
            assert s.dtype == torch.float64 and float(s) == 0.0
    # one huge entry among tiny ones, and one tiny entry among zeros
    g = torch.full((1000,), 1e-30)
    g[17] = 1e30
    _close(float(sq_norm(g)), _ref(g))
    g = torch.zeros(1000)
    g[3] = 1e-40
    _close(float(sq_norm(g)), _ref(g))
    _close(float(_device_sq_norm(g)), _ref(g))
    # non-finite gradients stay non-finite (the tracker skips such steps)
    assert math.isnan(float(sq_norm(torch.tensor([1.0, float("nan")]))))
    assert float(sq_norm(torch.tensor([1.0, float("inf")]))) == math.inf
    assert float(_device_sq_norm(torch.tensor([1.0, float("inf")]))) == math.inf


def test_normal_gradients_take_the_fast_path(monkeypatch):
    """The exact float64 recomputation runs only when the fp32 result is out of range."""
    calls = []
    exact = base._sq_norm_exact
    monkeypatch.setattr(base, "_sq_norm_exact", lambda t, w: calls.append(1) or exact(t, w))
    for scale in (1e-12, 1e-3, 1.0, 1e3, 1e15):
        g = _grad((300, 20), scale)
        sq_norm(g)
        sq_norm(g, torch.rand(300, 20, generator=_gen(7)))
        sq_norm(g.to(torch.bfloat16))
    assert calls == []
    sq_norm(_grad((300, 20), 1e-25))
    sq_norm(_grad((300, 20), 1e25))
    assert len(calls) == 2


def _groups_case():
    scales = [1e-30, 1.0, 1e30, 1e-25, 1e25, 1e-20, 1e20]
    grads = [_grad((17 + i, 5), s, seed=10 + i) for i, s in enumerate(scales)]
    grads[3] = grads[3].t()  # one non-contiguous
    index = [0, 1, 0, 2, 2, 1, 0]
    return grads, index


@pytest.mark.parametrize("weighted", [False, True])
def test_grouped_sq_norms(weighted):
    grads, index = _groups_case()
    weights = [torch.rand(g.shape, generator=_gen(20 + i)) * 1e4 if weighted else None for i, g in enumerate(grads)]
    want = [0.0, 0.0, 0.0]
    for g, w, i in zip(grads, weights, index):
        want[i] += _ref(g, w)
    got = grouped_sq_norms(grads, weights, index, 3, torch.device("cpu"))
    assert got.dtype == torch.float64 and got.shape == (3,)
    for a, b in zip(got.tolist(), want):
        _close(a, b)
    # the accelerator branches: fused (unweighted, one dtype) and per tensor (weighted)
    if not weighted:
        fused = base._grouped_sq_norms_fused(grads, index, 3, torch.device("cpu"))
        for a, b in zip(fused.tolist(), want):
            _close(a, b)
    terms = [_device_sq_norm(g, w) for g, w in zip(grads, weights)]
    for a, b in zip(base.group_sums(terms, index, 3, torch.device("cpu")).tolist(), want):
        _close(a, b)


def test_grouped_sq_norms_low_precision_fused():
    for dtype, scale in [(torch.bfloat16, 1e-30), (torch.bfloat16, 1e30), (torch.float16, 1e-6)]:
        grads = [_grad((30, 7), scale, dtype=dtype, seed=30 + i) for i in range(3)]
        got = base._grouped_sq_norms_fused(grads, [0, 1, 0], 2, torch.device("cpu"))
        _close(float(got[0]), _ref(grads[0]) + _ref(grads[2]))
        _close(float(got[1]), _ref(grads[1]))


@pytest.fixture(scope="module")
def digits():
    X, y, _, _ = load_digits(seed=0)
    return X, y


def _b_simple_at_loss_scale(X, y, loss_scale, steps=30, k=4, b=16):
    model = digits_mlp(hidden=32)  # the same parameters every time, never updated
    gen = _gen(0)
    gns = ns.GradientNoiseScale(model, "microbatch", beta=1.0)
    for _ in range(steps):
        idx = torch.randint(len(y), (k * b,), generator=gen)
        for xb, yb in zip(X[idx].chunk(k), y[idx].chunk(k)):
            (F.cross_entropy(model(xb), yb) / k * loss_scale).backward()
        gns.step()
        model.zero_grad()
    out, skipped = gns.b_simple, gns.skipped
    gns.close()
    return out, skipped


def test_b_simple_does_not_depend_on_the_loss_scale(digits):
    """A loss multiplied by 1e-25 .. 1e25 (fp32 gradients from ~1e-27 to ~1e24) gives the same b_simple
    and no skipped step: before, the squared norms underflowed to 0 or overflowed to inf in fp32."""
    X, y = digits
    ref, skipped = _b_simple_at_loss_scale(X, y, 1.0)
    assert ref is not None and ref > 0 and skipped == 0
    for s in (1e-25, 1e-10, 1e10, 1e25):
        got, skipped = _b_simple_at_loss_scale(X, y, s)
        assert skipped == 0, s
        assert got == pytest.approx(ref, rel=0.02), s
