"""Per-example norms are finite and correct for any finite gradient (issue "Trustworthy numbers").

Squared norms formed in float32 underflowed for gradients around 1e-23 (B_simple came out -16) and
overflowed for gradients >= ~1e19 (the step was skipped as non-finite although it was finite). The
ops now rescale the output gradient by a power of two where a float32 sum would leave float32's
range (exact: the rescaled sums equal the unscaled ones times a power of two), and sum the squares
of small per-example vectors in float64.

- model level: the loss multiplied by 1e-25 ... 1e25 (float32) leaves b_simple unchanged (to 2%;
  observed 1e-6), never negative, never skipped; also with ``fused=True``;
- op level: every op and branch, the output gradient multiplied by 2**-110 and 2**110 (float32,
  bfloat16; float64 at 2**+-500): the accumulated sums are exactly the unscaled ones times
  2**(2k) (to 1e-5 relative).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import noisescale as ns
from helpers import read_stats
from models import CharTransformer
from noisescale.probes.base import StepContext
from noisescale.probes.per_example import PerExampleProbe
from noisescale.probes.per_example_ops import ConvFn, EmbeddingFn, GroupNormFn, LayerNormFn, LinearFn, ScaleFn
from test_per_example_ops import CONV, EMBEDDING, LINEAR
from test_per_example_robust import _Mixed

SCALES = [1e-25, 1e-10, 1.0, 1e10, 1e25]


def _models():
    g = torch.Generator().manual_seed(0)
    mixed = [torch.randint(1, 11, (8, 6), generator=g) for _ in range(4)]
    tf = [torch.randint(0, 20, (8, 8), generator=g) for _ in range(4)]
    return {
        "mixed": (_Mixed, mixed),  # every layer type
        "transformer": (lambda: CharTransformer(20, d=16, heads=2, layers=1, block=8), tf),
    }


MODELS = _models()


@pytest.mark.parametrize("name", list(MODELS))
def test_loss_scale_leaves_b_simple_unchanged(name):
    make, batches = MODELS[name]
    model = make()
    got = {}
    for c in SCALES:

        def loss_fn(m, b, c=c):
            return m(b).pow(2).mean() * c

        r = ns.measure(copy.deepcopy(model), loss_fn, batches, method="per_example")
        assert r.n == len(batches) and r.skipped == 0, (c, r.reason)
        assert r.b_simple is not None and r.b_simple > 0, (c, r.b_simple, r.reason)
        got[c] = r.b_simple
    for c in SCALES:
        assert got[c] == pytest.approx(got[1.0], rel=0.02), (c, got)


@pytest.mark.parametrize("fused", [False, True])
def test_loss_scale_probe_level(fused):
    """The probe directly (fused=True materialises the sequence Linear and the convolutions): per-step
    estimates finite and equal across loss scales, pooled b_simple within 2%, no step unmeasurable."""
    make, batches = MODELS["mixed"]
    got = {}
    for c in SCALES:
        model = make()
        probe = PerExampleProbe(model, fused=fused)
        g2 = ts = 0.0
        for b in batches:
            model.zero_grad(set_to_none=True)
            (model(b).pow(2).mean() * c).backward()
            st = probe.collect(StepContext(None))
            assert st.reason is None, (c, st.reason)
            p = read_stats(st)
            g2, ts = g2 + p.g2 / c**2, ts + p.trace_sigma / c**2
        probe.close()
        got[c] = ts / g2
        assert got[c] > 0
    for c in SCALES:
        assert got[c] == pytest.approx(got[1.0], rel=0.02), (c, got)


# -- op level ------------------------------------------------------------------------------------


def _linear(shape, fused=False, pre=False):
    lead, d, p = LINEAR[shape]

    def make(dt, gen):
        mod = nn.Linear(d, p).to(dt)
        x = torch.randn(lead + (d,), generator=gen).to(dt)
        wp = torch.rand(mod.weight.shape, generator=gen).to(dt) + 0.5 if pre else None

        def apply(acc):
            return LinearFn.apply(x, mod.weight, mod.bias, acc, 0, 1, wp, None, fused)

        return apply

    return make


def _conv(shape, fused=False):
    build, xshape, _ = CONV[shape]

    def make(dt, gen):
        torch.manual_seed(0)
        mod = build().to(dt)
        x = torch.randn(xshape, generator=gen).to(dt)

        def apply(acc):
            return ConvFn.apply(
                x, mod.weight, mod.bias, acc, mod.stride, mod.padding, mod.dilation, mod.groups, 0, 1, None, None, fused
            )

        return apply

    return make


def _embedding(shape):
    V, ishape, hi = EMBEDDING[shape]

    def make(dt, gen):
        mod = nn.Embedding(V, 4, padding_idx=2).to(dt)
        ids = torch.randint(0, hi, ishape, generator=gen)
        return lambda acc: EmbeddingFn.apply(ids, mod.weight, acc, 0, None, 2, False)

    return make


def _norm(kind):
    def make(dt, gen):
        x = torch.randn(5, 4, 6, generator=gen).to(dt)
        w = (torch.randn(6, generator=gen) + 1).to(dt).requires_grad_()
        b = torch.randn(6, generator=gen).to(dt).requires_grad_()
        if kind == "layernorm":
            return lambda acc: LayerNormFn.apply(x, w, b, acc, (6,), 1e-5, 0, 1, None, None)[0]
        if kind == "groupnorm":
            return lambda acc: GroupNormFn.apply(x.transpose(1, 2).contiguous(), w, b, acc, 3, 1e-5, 0, 1, None, None)[
                0
            ]
        xhat = torch.nn.functional.rms_norm(x, (6,), None, 1e-6)
        return lambda acc: ScaleFn.apply(xhat, w, acc, 0, None)

    return make


OPS = {
    **{f"linear-{s}": _linear(s) for s in LINEAR},
    "linear-materialise-fused": _linear("materialise", fused=True),
    "linear-rows-weighted": _linear("rows", pre=True),
    **{f"conv-{s}": _conv(s) for s in ("2d_ghost", "2d_materialise", "1d_materialise")},
    "conv-2d-fused": _conv("2d_materialise", fused=True),
    **{f"embedding-{s}": _embedding(s) for s in EMBEDDING},
    "layernorm": _norm("layernorm"),
    "groupnorm": _norm("groupnorm"),
    "rmsnorm": _norm("rmsnorm"),
}


def _acc(make, dt, scale):
    gen = torch.Generator().manual_seed(1)
    apply = make(dt, gen)
    acc = torch.zeros(2, dtype=torch.float64)
    with torch.enable_grad():
        out = apply(acc)
        r = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dt)
        out.backward(r * scale)  # the output gradient, scaled exactly (a power of two)
    return acc


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("op", list(OPS))
def test_op_sums_are_exact_under_extreme_gradients(op, dt):
    if dt == torch.bfloat16 and op in ("groupnorm", "rmsnorm"):
        pytest.skip("exercised in float32")
    k = 500 if dt == torch.float64 else 110
    ref = _acc(OPS[op], dt, 1.0)
    assert (ref > 0).all() or op.startswith("embedding") or op == "rmsnorm", ref
    for e in (-k, k):
        got = _acc(OPS[op], dt, 2.0**e)
        assert torch.isfinite(got).all(), (e, got)
        torch.testing.assert_close(got * 2.0 ** (-2 * e), ref, rtol=1e-5, atol=0)
