"""Per-example probe in real training code: inert (bit-identical gradients), torch.compile without
graph breaks, in-place ops after wrapped layers, non-reentrant activation checkpointing, gradient
accumulation, and AMP with a GradScaler. Fixed seeds; tolerances stated per test."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import noisescale as ns
from helpers import collect
from models import CharTransformer, SmallCNN, char_batches, char_data, mlp
from noisescale.probes.base import StepContext
from noisescale.probes.per_example import PerExampleProbe
from test_per_example import RTOL, per_example_grads, reference


class _Mixed(nn.Module):
    """Every supported layer type in one small model, with in-place ops after wrapped layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 8, padding_idx=0)
        self.ln = nn.LayerNorm(8)
        self.lin = nn.Linear(8, 8)
        self.rms = nn.RMSNorm(8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Linear(8 + 2, 3)

    def forward(self, ids):
        h = torch.relu_(self.lin(self.ln(self.emb(ids))))  # in place on a wrapped layer's output
        h = self.rms(h)
        h = self.gn(self.conv(h.transpose(1, 2)))
        h.mul_(0.5)  # in place on GroupNorm's output
        img = F.relu(self.conv2(h[:, :1].unsqueeze(1)), inplace=True).mean((2, 3))
        return self.head(torch.cat([h.mean(2), img], 1))


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("fused", [False, True])
def test_inert_gradients_bit_identical(shakespeare_path, fused):
    """Outputs and .grad are bit-identical with and without the probe (fused=True: Linear weight
    and conv gradients equal to 1e-5 relative instead, everything else bit-identical)."""
    data, vocab = char_data(shakespeare_path)
    ((x, y),) = char_batches(data, 4, 32, 1, seed=3)
    ids = torch.randint(0, 11, (5, 6), generator=torch.Generator().manual_seed(0))
    imgs = torch.randn(6, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    cases = [
        (
            CharTransformer(len(vocab), d=32, heads=2, layers=2, block=32),
            x,
            lambda o: F.cross_entropy(o.reshape(-1, o.shape[-1]), y.reshape(-1)),
        ),
        (SmallCNN(width=8, inplace=True), imgs, lambda o: o.pow(2).mean()),
        (_Mixed(), ids, lambda o: o.pow(2).mean()),
        (mlp(12, 16, 3), torch.randn(7, 12, generator=torch.Generator().manual_seed(1)), lambda o: o.pow(2).mean()),
    ]
    for model, inp, lossf in cases:
        twin = copy.deepcopy(model)
        out0 = model(inp)
        lossf(out0).backward()
        probe = PerExampleProbe(twin, fused=fused)
        out1 = twin(inp)
        lossf(out1).backward()
        collect(probe, StepContext(None))
        probe.close()
        assert torch.equal(out0, out1)
        for (n, a), b in zip(model.named_parameters(), twin.parameters()):
            fused_here = n.startswith("conv") or (a.dim() >= 2 and n.endswith("weight") and "ln" not in n)
            if fused and fused_here:  # conv weight+bias, Linear weights: summed by us
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)
            else:
                assert torch.equal(a.grad, b.grad), n


def test_torch_compile_no_graph_breaks_and_same_norms():
    """Registered before compiling: 0 graph breaks (dynamo explain) and fullgraph=True compiles;
    the compiled step (aot_eager: AOTAutograd traces forward and backward) gives the eager norms."""
    model = _Mixed()
    ids = torch.randint(0, 11, (5, 6), generator=torch.Generator().manual_seed(0))
    eager = copy.deepcopy(model)
    probe = PerExampleProbe(model)

    def loss(m, i):
        return m(i).pow(2).mean()

    torch._dynamo.reset()
    explain = torch._dynamo.explain(lambda i: loss(model, i))(ids)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    collect(probe, StepContext(None))  # drop explain's forward
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(lambda i: loss(model, i), fullgraph=True, backend="aot_eager")
    for _ in range(2):  # a second step reuses the compiled graph and the (reset) accumulators
        compiled(ids).backward()
        mc, _, _ = collect(probe, StepContext(None))
        model.zero_grad(set_to_none=True)
    probe.close()
    torch._dynamo.reset()
    want = reference(eager, lambda o: o.pow(2).mean(), (ids,))
    assert float(mc.sq_norm_small) == pytest.approx(want[0], rel=RTOL)
    assert float(mc.sq_norm_big) == pytest.approx(want[1], rel=RTOL)


class _Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU()) for _ in range(2))
        self.head = nn.Linear(8, 2)
        self.use_checkpoint = True

    def forward(self, x):
        for b in self.blocks:
            x = x + (checkpoint(b, x, use_reentrant=False) if self.use_checkpoint else b(x))
        return self.head(x)


def test_non_reentrant_activation_checkpointing():
    """Recomputation in backward neither double-counts nor trips the reuse check; norms exact."""
    model = _Checkpointed()
    x = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(0))
    plain = copy.deepcopy(model)
    plain.use_checkpoint = False
    want = reference(plain, lambda o: o.pow(2).mean(), (x,))
    probe = PerExampleProbe(model)
    model(x).pow(2).mean().backward()
    m, reason, _ = collect(probe, StepContext(None))
    probe.close()
    assert m is not None, reason
    assert float(m.sq_norm_small) == pytest.approx(want[0], rel=RTOL)
    assert float(m.sq_norm_big) == pytest.approx(want[1], rel=RTOL)
    g = copy.deepcopy(plain)
    g(x).pow(2).mean().backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(g.parameters(), model.parameters()))


def test_tracker_with_gradient_accumulation_matches_reference():
    """3 micro-batches of 4 per step, loss/3: pooled per-example estimate = exact formula."""
    torch.manual_seed(0)
    model = mlp(6, 8, 3)
    x = torch.randn(12, 6)
    g = per_example_grads(copy.deepcopy(model), lambda o: o.pow(2).mean(), x)
    flat = torch.cat([t.reshape(12, -1).double() for t in g.values()], 1)
    # v_i = G_i / 12 (equal weights); b_small = 1, b_big = 12 -> the per-example estimator
    small = float(flat.pow(2).sum(1).mean())
    big = float(flat.mean(0).pow(2).sum())
    g2_want, ts_want = ns.estimate(small, 1, big, 12)
    gns = ns.GradientNoiseScale(model, method="per_example", beta=1.0)
    for part in x.split(4):
        (model(part).pow(2).mean() / 3).backward()
    gns.step()
    assert gns.g2 == pytest.approx(g2_want, rel=1e-5)
    assert gns.trace_sigma == pytest.approx(ts_want, rel=1e-5)
    assert gns.examples == 12
    gns.close()


def test_amp_bf16_autocast_with_grad_scaler():
    """CPU bf16 autocast + GradScaler: norms taken from S-scaled gradients are divided by S^2,
    the measurement equals the one without a scaler (powers of two scale exactly), is within 3%
    of the float32 reference, and gradients are bit-identical with and without the probe."""
    model = _Mixed()
    ids = torch.randint(1, 11, (6, 5), generator=torch.Generator().manual_seed(0))
    want = reference(copy.deepcopy(model), lambda o: o.pow(2).mean(), (ids,))
    plain = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss0 = plain(ids).float().pow(2).mean()
    loss0.backward()

    results = []
    for use_scaler in (False, True):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if use_scaler else None
        gns = ns.GradientNoiseScale(m, method="per_example", beta=1.0, scaler=scaler)
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = m(ids).float().pow(2).mean()
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(opt)
            if not use_scaler:
                grads = [p.grad.clone() for p in m.parameters()]
            gns.step()
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad()
        results.append((gns.g2, gns.trace_sigma))
        gns.close()
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-6)
    _g2_ref, ts_ref = ns.estimate(want[0], 1, want[1], 6)
    assert results[0][1] == pytest.approx(ts_ref, rel=0.03)
    assert all(torch.equal(a.grad, b) for a, b in zip(plain.parameters(), grads))


def test_torch_compile_inductor_fullgraph():
    """The default inductor backend, fullgraph: same norms as eager (inductor may reorder float
    sums: 1e-5 relative). About 15-30 s of compilation on 2 CPU cores."""
    model = _Mixed()
    ids = torch.randint(0, 11, (5, 6), generator=torch.Generator().manual_seed(1))
    want = reference(copy.deepcopy(model), lambda o: o.pow(2).mean(), (ids,))
    probe = PerExampleProbe(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    compiled(ids).pow(2).mean().backward()
    m, reason, _ = collect(probe, StepContext(None))
    probe.close()
    torch._dynamo.reset()
    assert m is not None, reason
    assert float(m.sq_norm_small) == pytest.approx(want[0], rel=RTOL)
    assert float(m.sq_norm_big) == pytest.approx(want[1], rel=RTOL)


@pytest.mark.parametrize("layers", [None, "norm"])
def test_one_backward_pass_per_forward_pass_or_the_step_says_why(layers):
    """Per-example norms need one backward pass per forward pass. Two backward passes through one forward
    pass's graph (retain_graph=True) make each example's gradient a sum over passes, whose cross terms the
    summed per-example norms lack; two forward passes whose losses are added into one backward pass break the
    count of examples and the exactness check. Neither step is measured, each says why, and nothing is
    excluded (with layers='norm' too, past the checked first steps, where the norm layers run the stock ops
    with a hook). Two forward passes each with its own backward pass are measured and exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 3))
    gns = ns.GradientNoiseScale(model, method="per_example", **({"layers": layers} if layers else {}))
    x, y = torch.randn(12, 8), torch.randint(0, 3, (12,))
    # layers="norm" measures the normalisation layers' parameters only
    want = reference(copy.deepcopy(model), F.cross_entropy, (x, y), names=["1.weight", "1.bias"] if layers else None)
    coverage = gns.probe.coverage.fraction
    why = {
        "twice": "2 backward passes for 1 forward pass: a graph was backpropagated more than once",
        "merged": "2 forward passes but 1 backward pass: per-example norms need one backward pass per forward",
    }
    plan = ["one", "halves", "twice", "merged", "halves", "one", "twice", "merged", "one"]  # steps 1-3 checked
    warned: set[str] = set()
    for case in plan:
        if case == "one":
            F.cross_entropy(model(x), y).backward()
        elif case == "halves":  # two micro-batches, each with its own backward pass
            for h in (slice(0, 6), slice(6, 12)):
                (F.cross_entropy(model(x[h]), y[h]) / 2).backward()
        elif case == "twice":
            loss = F.cross_entropy(model(x), y)
            loss.backward(retain_graph=True)
            (0.5 * loss).backward()
        else:  # merged: two forward passes, their losses added, one backward pass
            ((F.cross_entropy(model(x[:6]), y[:6]) + F.cross_entropy(model(x[6:]), y[6:])) / 2).backward()
        sizes = [6.0, 6.0] if case in ("halves", "merged") else [12.0]
        if case in why:
            if case not in warned:  # (the tracker warns once per reason)
                warned.add(case)
                with pytest.warns(UserWarning, match=why[case]):
                    gns.step(sizes=sizes)
            else:
                gns.step(sizes=sizes)
            r = gns.history[-1]
            assert r["status"] == "unmeasurable" and r["reason"].startswith(why[case]), r
        else:
            gns.step(sizes=sizes)
            r = gns.history[-1]
            assert r["status"] == "measured", (case, r)
            assert r["sq_big"] == pytest.approx(want[1], rel=RTOL)
            if case == "one":  # (sq_small: the mean per-example norm)
                assert r["sq_small"] == pytest.approx(want[0], rel=RTOL)
        model.zero_grad()
    assert gns.probe.coverage.fraction == coverage  # nothing was excluded
    gns.close()
