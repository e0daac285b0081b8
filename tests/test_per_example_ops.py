"""per_example_ops driven directly: per-group accumulator slots (w_idx/b_idx) and the exact
elementwise weight (w_pre/b_pre), against per-example gradients from torch.func on the stock
layer (float64), plus bit-identical .grad against the stock layer."""

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.func import functional_call, grad, vmap

from noisescale.probes import per_example_ops as ops
from noisescale.probes.per_example_ops import ConvFn, EmbeddingFn, GroupNormFn, LayerNormFn, LinearFn, ScaleFn

torch.set_num_threads(1)

IDX = [(0, 0), (0, 2), (-1, 1), (2, -1)]  # joint slot, separate slots, weight off, bias off
PRE = ["none", "both", "w", "b"]


def _pre(t, gen, dtype=None):
    """A positive, far from constant elementwise weight (a wrong formula cannot hide behind it)."""
    return (torch.rand(t.shape, generator=gen, dtype=torch.float64) * 3 + 0.05).to(dtype or t.dtype)


def _pres(mod, which, gen, dtype=None):
    w, b = mod.weight, getattr(mod, "bias", None)
    wp = _pre(w, gen, dtype) if which in ("both", "w") else None
    bp = _pre(b, gen, dtype) if which in ("both", "b") and b is not None else None
    return wp, bp


def _reference(mod, x, r):
    """{name: [B, *shape] per-example gradients} of sum(out * r) per example, stock layer, float64."""
    m64 = copy.deepcopy(mod).double()
    params = {k: v.detach() for k, v in m64.named_parameters()}
    x64 = x.double() if x.is_floating_point() else x

    def loss(p, xi, ri):
        return (functional_call(m64, p, (xi.unsqueeze(0),)) * ri.unsqueeze(0)).sum()

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x64, r.double())


def check(mod, x, apply, w_idx, b_idx, w_pre, b_pre, exact=True, rtol=1e-5):
    """Run ``apply(x, w, b, acc, w_idx, b_idx, w_pre, b_pre) -> out`` and the stock ``mod(x)``
    on the same loss; compare acc slot by slot with the reference and the grads with the stock ones."""
    gen = torch.Generator().manual_seed(7)
    w = mod.weight.detach().clone().requires_grad_()
    b = None if getattr(mod, "bias", None) is None else mod.bias.detach().clone().requires_grad_()
    fx = x.is_floating_point()
    xa, xs = (x.clone().requires_grad_(), x.clone().requires_grad_()) if fx else (x, x)
    acc = torch.zeros(3, dtype=torch.float64)
    out = apply(xa, w, b, acc, w_idx, b_idx, w_pre, b_pre)
    r = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    (out * r).sum().backward()
    mod.zero_grad(set_to_none=True)
    out_s = mod(xs)
    (out_s * r).sum().backward()

    same = torch.equal if exact else (lambda a, c: torch.allclose(a, c, rtol=1e-5, atol=1e-6))
    assert torch.equal(out, out_s)
    pairs = [(w.grad, mod.weight.grad)] + ([(b.grad, mod.bias.grad)] if b is not None else [])
    pairs += [(xa.grad, xs.grad)] if fx else []
    for got, want in pairs:
        assert same(got, want)

    ref = _reference(mod, x, r)
    want = torch.zeros(3, dtype=torch.float64)
    for idx, name, pre in ((w_idx, "weight", w_pre), (b_idx, "bias", b_pre)):
        if idx >= 0 and name in ref:
            g = ref[name] * (1 if pre is None else pre.double())
            want[idx] += g.pow(2).sum()
    assert want.abs().sum() > 0 or (w_idx < 0 and (b is None or b_idx < 0))
    torch.testing.assert_close(acc, want, rtol=rtol, atol=0)  # atol=0: unused slots stay exactly 0
    return acc


def linear_apply(fused=False):
    return lambda x, w, b, acc, wi, bi, wp, bp: LinearFn.apply(x, w, b, acc, wi, bi, wp, bp, fused)


# name: (leading input shape, d, p); the branch each shape is meant to hit is asserted below
LINEAR = {"rows": ((6,), 5, 4), "ghost": ((4, 3), 8, 6), "materialise": ((4, 7), 5, 3), "multi_dim": ((3, 2, 4), 5, 3)}


@pytest.mark.parametrize("shape", list(LINEAR))
@pytest.mark.parametrize("idx", IDX)
@pytest.mark.parametrize("pre", PRE)
@pytest.mark.parametrize("bias", [True, False])
def test_linear(shape, idx, pre, bias):
    lead, d, p = LINEAR[shape]
    if len(lead) > 1:
        T = lead[1] * (lead[2] if len(lead) > 2 else 1)
        assert (T * (d + p) <= d * p) == (shape == "ghost")
    gen = torch.Generator().manual_seed(0)
    mod = nn.Linear(d, p, bias=bias)
    wp, bp = _pres(mod, pre, gen)
    x = torch.randn(lead + (d,), generator=gen)
    check(mod, x, linear_apply(), *idx, wp, bp)


@pytest.mark.parametrize("shape", ["ghost", "materialise"])
@pytest.mark.parametrize("pre", PRE)
def test_linear_fused(shape, pre):
    """fused=True is taken where materialisation is cheaper or a w_pre forces it (grads then equal
    the stock ones up to rounding); for a ghost-shaped layer without w_pre it is not (bit-identical)."""
    lead, d, p = LINEAR[shape]
    gen = torch.Generator().manual_seed(1)
    mod = nn.Linear(d, p)
    wp, bp = _pres(mod, pre, gen)
    x = torch.randn(lead + (d,), generator=gen)
    taken = shape == "materialise" or wp is not None
    check(mod, x, linear_apply(fused=True), 0, 1, wp, bp, exact=not taken)


@pytest.mark.parametrize("shape", ["rows", "ghost", "materialise"])
def test_linear_float64_and_mixed_pre(shape):
    """float64 layers are computed in float64 (tight tolerance); a float64 pre on a float32 layer works."""
    lead, d, p = LINEAR[shape]
    gen = torch.Generator().manual_seed(2)
    mod = nn.Linear(d, p).double()
    x = torch.randn(lead + (d,), generator=gen, dtype=torch.float64)
    check(mod, x, linear_apply(), 0, 1, *_pres(mod, "both", gen), rtol=1e-11)
    mod32 = nn.Linear(d, p)
    check(mod32, x.float(), linear_apply(), 1, 1, *_pres(mod32, "both", gen, torch.float64))


def conv_apply(mod, fused=False):
    def apply(x, w, b, acc, wi, bi, wp, bp):
        return ConvFn.apply(x, w, b, acc, mod.stride, mod.padding, mod.dilation, mod.groups, wi, bi, wp, bp, fused)

    return apply


# name: (module, input shape); ghost iff L (dd + pp) <= dd pp (asserted below)
CONV = {
    "2d_ghost": (lambda: nn.Conv2d(16, 16, 3, stride=2, padding=1, dilation=2, groups=2), (3, 16, 5, 5), True),
    "2d_materialise": (
        lambda: nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1), groups=2),
        (3, 4, 8, 7),
        False,
    ),
    "1d_ghost": (lambda: nn.Conv1d(16, 16, 3, stride=2, padding=1, dilation=2, groups=2), (3, 16, 8), True),
    "1d_materialise": (lambda: nn.Conv1d(4, 6, 3, padding=2, dilation=2, groups=2), (3, 4, 20), False),
}


def _conv_is_ghost(mod, x):
    L = mod(x)[0, 0].numel()
    dd = mod.in_channels // mod.groups * mod.weight[0, 0].numel()
    pp = mod.out_channels // mod.groups
    return L * (dd + pp) <= dd * pp


@pytest.mark.parametrize("shape", list(CONV))
@pytest.mark.parametrize("idx", IDX)
@pytest.mark.parametrize("pre", PRE)
@pytest.mark.parametrize("fused", [False, True])
def test_conv(shape, idx, pre, fused):
    make, xshape, ghost = CONV[shape]
    gen = torch.Generator().manual_seed(3)
    mod = make()
    x = torch.randn(xshape, generator=gen)
    assert _conv_is_ghost(mod, x) == ghost
    wp, bp = _pres(mod, pre, gen)
    check(mod, x, conv_apply(mod, fused), *idx, wp, bp, exact=not (fused and idx[0] >= 0))


def test_conv_without_bias_float64():
    gen = torch.Generator().manual_seed(4)
    for shape in CONV:
        make, xshape, _ = CONV[shape]
        mod = make().double()
        mod.bias = None
        x = torch.randn(xshape, generator=gen, dtype=torch.float64)
        check(mod, x, conv_apply(mod), 1, -1, _pres(mod, "w", gen)[0], None, rtol=1e-11)


def embedding_apply(mod):
    pidx = -1 if mod.padding_idx is None else mod.padding_idx
    return lambda ids, w, b, acc, wi, bi, wp, bp: EmbeddingFn.apply(ids, w, acc, wi, wp, pidx, False)


# name: (vocabulary, ids shape, token range); scatter iff V <= 2 T, else the compact table
EMBEDDING = {"scatter": (10, (4, 6), 5), "compact": (50, (4, 5), 50), "one_token": (12, (7,), 12)}


@pytest.mark.parametrize("shape", list(EMBEDDING))
@pytest.mark.parametrize("padding_idx", [None, 2])
@pytest.mark.parametrize("pre", ["none", "w"])
@pytest.mark.parametrize("w_idx", [0, 2, -1])
def test_embedding(shape, padding_idx, pre, w_idx):
    V, ishape, hi = EMBEDDING[shape]
    gen = torch.Generator().manual_seed(5)
    mod = nn.Embedding(V, 4, padding_idx=padding_idx)
    ids = torch.randint(0, hi, ishape, generator=gen)
    if ids.dim() == 2:
        ids[:, 1] = ids[:, 0]  # repeated tokens in every example
        ids[0, 2] = ids[1, 3] = 2  # the padding index, where there is one
        assert (ids.shape[1] ** 2 >= V) == (shape == "scatter")
    wp = _pre(mod.weight, gen) if pre == "w" else None
    check(mod, ids, embedding_apply(mod), w_idx, -1, wp, None)


@pytest.mark.parametrize("pre", PRE)
@pytest.mark.parametrize("idx", IDX)
@pytest.mark.parametrize("case", ["multi_dim", "no_positions", "no_bias"])
def test_layer_norm(pre, idx, case):
    gen = torch.Generator().manual_seed(6)
    shape, xshape = ((3, 4), (5, 2, 3, 4)) if case != "no_positions" else ((6,), (5, 6))
    mod = nn.LayerNorm(shape, bias=case != "no_bias")
    with torch.no_grad():
        mod.weight.normal_(generator=gen)
        if mod.bias is not None:
            mod.bias.normal_(generator=gen)
    wp, bp = _pres(mod, pre, gen)
    x = torch.randn(xshape, generator=gen)

    def apply(x, w, b, acc, wi, bi, wp, bp):
        return LayerNormFn.apply(x, w, b, acc, shape, mod.eps, wi, bi, wp, bp)[0]

    check(mod, x, apply, *idx, wp, bp)


@pytest.mark.parametrize("pre", PRE)
@pytest.mark.parametrize("idx", IDX)
@pytest.mark.parametrize("xshape", [(5, 6, 3, 3), (5, 6, 4)])
def test_group_norm(pre, idx, xshape):
    gen = torch.Generator().manual_seed(8)
    mod = nn.GroupNorm(3, 6)
    with torch.no_grad():
        mod.weight.normal_(generator=gen)
        mod.bias.normal_(generator=gen)
    wp, bp = _pres(mod, pre, gen)
    x = torch.randn(xshape, generator=gen)

    def apply(x, w, b, acc, wi, bi, wp, bp):
        return GroupNormFn.apply(x, w, b, acc, mod.num_groups, mod.eps, wi, bi, wp, bp)[0]

    check(mod, x, apply, *idx, wp, bp)


@pytest.mark.parametrize("pre", ["none", "w"])
@pytest.mark.parametrize("w_idx", [0, 1, -1])
@pytest.mark.parametrize("shape,xshape", [((3, 4), (5, 2, 3, 4)), ((6,), (5, 6))])
def test_rms_norm_scale(pre, w_idx, shape, xshape):
    gen = torch.Generator().manual_seed(9)
    mod = nn.RMSNorm(shape, eps=1e-6)
    with torch.no_grad():
        mod.weight.normal_(generator=gen)
    wp = _pre(mod.weight, gen) if pre == "w" else None
    x = torch.randn(xshape, generator=gen)

    def apply(x, w, b, acc, wi, bi, wp, bp):  # what the probe runs: stock rms_norm, then the affine step
        return ScaleFn.apply(torch.nn.functional.rms_norm(x, shape, None, mod.eps), w, acc, wi, wp)

    check(mod, x, apply, w_idx, -1, wp, None)


def test_chunked(monkeypatch):
    """Tiny CHUNK_ELEMS: every chunked loop runs over several chunks (one example each)."""
    monkeypatch.setattr(ops, "CHUNK_ELEMS", 16)
    gen = torch.Generator().manual_seed(10)
    for shape in ("rows", "ghost", "materialise"):
        lead, d, p = LINEAR[shape]
        mod = nn.Linear(d, p)
        x = torch.randn(lead + (d,), generator=gen)
        for pre in ("none", "both"):
            for fused in (False, True):
                check(mod, x, linear_apply(fused), 0, 1, *_pres(mod, pre, gen), exact=False)
    for shape in CONV:
        make, xshape, _ = CONV[shape]
        mod = make()
        x = torch.randn(xshape, generator=gen)
        for pre in ("none", "both"):
            for fused in (False, True):
                check(mod, x, conv_apply(mod, fused), 0, 1, *_pres(mod, pre, gen), exact=not fused)
    for shape in ("scatter", "compact"):
        V, ishape, hi = EMBEDDING[shape]
        mod = nn.Embedding(V, 4, padding_idx=2)
        ids = torch.randint(0, hi, ishape, generator=gen)
        check(mod, ids, embedding_apply(mod), 1, -1, _pre(mod.weight, gen), None)


class _Net(nn.Module):
    """Linear (ghost-shaped on sequences) + LayerNorm through the ops, weights in three groups."""

    def __init__(self, acc, pres):
        super().__init__()
        self.lin, self.ln, self.acc, self.pres = nn.Linear(6, 5), nn.LayerNorm(5), acc, pres

    def forward(self, x):
        wp, bp, lwp, lbp = self.pres
        h = LinearFn.apply(x, self.lin.weight, self.lin.bias, self.acc, 0, 1, wp, bp, False)
        return LayerNormFn.apply(torch.tanh(h), self.ln.weight, self.ln.bias, self.acc, (5,), 1e-5, 2, 2, lwp, lbp)[0]


@pytest.mark.parametrize("with_pre", [False, True])
def test_torch_compile_fullgraph(with_pre):
    """fullgraph=True traces forward and backward (aot_eager); acc matches eager, also after the
    weights are refreshed in place between steps (nothing derived from them is cached)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(11)
    acc = torch.zeros(3, dtype=torch.float64)
    shapes = [(5, 6), (5,), (5,), (5,)]
    pres = [torch.rand(s, generator=gen) + 0.1 for s in shapes] if with_pre else [None] * 4
    net = _Net(acc, pres)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    counters.clear()
    for x in (torch.randn(4, 2, 6, generator=gen), torch.randn(4, 6, generator=gen)) * 2:  # sequences, rows
        r = torch.randn(x.shape[:-1] + (5,), generator=gen)
        acc.zero_()
        (net(x) * r).sum().backward()
        eager = acc.clone()
        acc.zero_()
        (compiled(x) * r).sum().backward()
        assert (eager > 0).all()
        torch.testing.assert_close(acc, eager, rtol=1e-6, atol=0)
        for p in pres:
            if p is not None:
                p.mul_(torch.rand(p.shape, generator=gen) + 0.5)
    assert counters["aot_autograd"]["ok"] == 2  # one graph per input rank, backward traced too
