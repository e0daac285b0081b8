"""Per-example probe: exact or say so, on the real cases of issue "Trustworthy numbers".

- gradient that reaches a covered parameter outside its layer's instrumented forward (a tied
  output head used functionally, an L2 penalty inside the loss) is detected by the exactness
  check, the parameter is excluded with a warning naming it (``strict=True``: ValueError), the
  step of the detection is not measured, and the following steps equal brute force over the
  remaining parameters;
- position ids shared by all examples are excluded also when ``B == T`` (and ``[1, T]`` ones);
- Hugging Face's GPT-2 ``Conv1D`` is covered exactly (bit-identical gradients), and a tiny GPT-2
  is measured against ``torch.func`` per-sample gradients.

Reference: ``torch.func`` ``vmap(grad)`` per-example gradients (float32); norms agree to 1e-5
relative (test_per_example.RTOL). Fixed seeds everywhere.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import noisescale as ns
from helpers import collect
from noisescale.probes.base import StepContext
from noisescale.probes.per_example import PerExampleProbe, per_example_coverage
from test_per_example import RTOL, covered_names
from test_per_example_ops import _pres, _reference

NOT_EXACT = "per-example norms are not exact for"


def _brute(model, loss_one, batch, names):
    """``(mean_i |G_i|^2, |mean_i G_i|^2)`` over ``names`` from per-example gradients of
    ``loss_one(params, x_i, *rest_i)`` (the params are passed, so the loss may use them directly)."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    g = vmap(grad(loss_one), in_dims=(None,) + (0,) * len(batch))(params, *batch)
    small = sum(g[n].reshape(g[n].shape[0], -1).double().pow(2).sum(1) for n in names).mean()
    big = sum(g[n].double().mean(0).pow(2).sum() for n in names)
    return float(small), float(big)


def _step(probe, model, loss):
    model.zero_grad(set_to_none=True)
    loss().backward()
    return collect(probe, StepContext(None))


def _numel(model, names):
    p = dict(model.named_parameters())
    return sum(p[n].numel() for n in names)


# -- a GPT-like model whose output head is the token embedding, used functionally ------------


class TiedHeadLM(nn.Module):
    """``logits = F.linear(h, tok.weight)``: the tie is invisible in the module tree (one owner)."""

    def __init__(self, vocab=24, d=16, block=8):
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(block, d)
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, ids):
        B, T = ids.shape
        h = self.tok(ids) + self.pos(torch.arange(T).expand(B, T))  # per-example position ids
        h = h + torch.tanh(self.fc(self.ln(h)))
        return F.linear(self.norm(h), self.tok.weight)


def _lm(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _lm_batch(vocab=24, B=6, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)


def test_functionally_tied_head_is_excluded_then_exact():
    model = TiedHeadLM()
    ref = copy.deepcopy(model)
    names_all = [n for n, _ in model.named_parameters()]
    assert per_example_coverage(model).fraction == 1.0  # the tie cannot be seen before running
    probe = PerExampleProbe(model)
    x, y = _lm_batch()
    with pytest.warns(UserWarning, match=rf"{NOT_EXACT} tok\.weight: gradient that did not come through"):
        m, reason, _ = _step(probe, model, lambda: _lm(model(x), y))
    assert m is None and "tok.weight" in reason  # the step of the detection is not measured
    cov = probe.coverage
    kept = [n for n in names_all if n != "tok.weight"]
    assert set(cov.uncovered) == {"tok.weight"} and "tied output head" in cov.uncovered["tok.weight"]
    assert cov.fraction == pytest.approx(_numel(model, kept) / _numel(model, names_all))
    assert covered_names(model, probe) == kept
    for seed in (1, 2):  # the following steps: exact over the remaining parameters, no new warning
        x, y = _lm_batch(seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            m, reason, _ = _step(probe, model, lambda x=x, y=y: _lm(model(x), y))
        want = _brute(ref, lambda p, xi, yi: _lm(functional_call(ref, p, (xi[None],)), yi[None]), (x, y), kept)
        assert m is not None, reason
        assert float(m.sq_norm_small) == pytest.approx(want[0], rel=RTOL)
        assert float(m.sq_norm_big) == pytest.approx(want[1], rel=RTOL)
    probe.close()
    with pytest.raises(ValueError, match=rf"strict=True: {NOT_EXACT} tok\.weight"):
        strict = PerExampleProbe(model, strict=True)
        try:
            _step(strict, model, lambda: _lm(model(x), y))
        finally:
            strict.close()


def test_tracker_reports_the_reduced_coverage():
    """Through the tracker: the warning, one unmeasurable step, and ``gns/coverage`` reduced."""
    model = TiedHeadLM()
    gns = ns.GradientNoiseScale(model, method="per_example")
    with pytest.warns(UserWarning, match=rf"{NOT_EXACT} tok\.weight"):
        for seed in range(3):
            x, y = _lm_batch(seed=seed)
            _lm(model(x), y).backward()
            gns.step()
            model.zero_grad()
    assert gns.unmeasurable == 1 and gns.measured == 2
    frac = gns.probe.coverage.fraction
    assert frac < 1.0 and gns.metrics()["gns/coverage"] == pytest.approx(frac)
    gns.close()


# -- a loss with a term on a parameter itself (an L2 penalty inside loss_fn) ------------------


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


LAM = 0.05


def test_l2_penalty_in_the_loss_is_excluded_then_exact():
    model = _mlp()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)

    def loss():  # the batch mean plus a penalty on one weight (each example's loss carries it too)
        return F.cross_entropy(model(x), y) + LAM * model[2].weight.pow(2).sum()

    probe = PerExampleProbe(model)
    with pytest.warns(UserWarning, match=rf"{NOT_EXACT} 2\.weight: .*L2 penalty"):
        m, reason, _ = _step(probe, model, loss)
    assert m is None and "2.weight" in reason
    kept = ["0.weight", "0.bias", "2.bias"]
    assert set(probe.coverage.uncovered) == {"2.weight"}
    assert probe.coverage.fraction == pytest.approx(_numel(model, kept) / _numel(model, ["2.weight"] + kept))

    def loss_one(p, xi, yi):
        return F.cross_entropy(functional_call(ref, p, (xi[None],)), yi[None]) + LAM * p["2.weight"].pow(2).sum()

    m, reason, _ = _step(probe, model, loss)
    want = _brute(ref, loss_one, (x, y), kept)
    assert m is not None, reason
    assert float(m.sq_norm_small) == pytest.approx(want[0], rel=RTOL)
    assert float(m.sq_norm_big) == pytest.approx(want[1], rel=RTOL)
    probe.close()


def test_l2_penalty_on_every_parameter_leaves_nothing_to_measure():
    """Weight decay written into the loss: every parameter is inexact; explicit mode says so (warns,
    coverage 0, later steps unmeasurable with a reason) and strict mode refuses."""
    model = _mlp()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))

    def loss():
        return model(x).pow(2).mean() + LAM * sum(p.pow(2).sum() for p in model.parameters())

    probe = PerExampleProbe(model)
    with pytest.warns(UserWarning, match=rf"{NOT_EXACT} 0\.weight, 0\.bias, 2\.weight, 2\.bias"):
        m, _, _ = _step(probe, model, loss)
    assert m is None and probe.coverage.fraction == 0.0
    m, reason, _ = _step(probe, model, loss)
    assert m is None and "every layer" in reason
    probe.close()
    strict = PerExampleProbe(model, strict=True)
    with pytest.raises(ValueError, match=rf"strict=True: {NOT_EXACT} 0\.weight"):
        _step(strict, model, loss)
    strict.close()


def test_exact_models_are_checked_silently_and_rechecked_periodically(monkeypatch):
    """No false alarm on an exact model (also with gradient accumulation and bf16 autocast), and the
    check runs on the first steps and then every CHECK_EVERY-th step."""
    from noisescale.probes import per_example as pe
    from test_per_example_robust import _Mixed

    monkeypatch.setattr(pe, "CHECK_EVERY", 4)
    model = _Mixed()
    ids = torch.randint(1, 11, (6, 5), generator=torch.Generator().manual_seed(0))
    probe = PerExampleProbe(model)
    checked = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(9):
            checked.append(probe._checking)
            for part in ids.split(3):  # two micro-batches
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=step % 2 == 1):
                    model(part).float().pow(2).mean().backward()
            m, reason, _ = collect(probe, StepContext(None))
            assert m is not None, reason
            model.zero_grad()
    assert checked == [True, True, True, False, True, False, False, False, True]
    assert probe.coverage.fraction == 1.0
    probe.close()


# -- position ids shared by all examples, also when B == T ------------------------------------


class SharedPositions(nn.Module):
    """nanoGPT-style ``pos(arange(T))`` broadcast over the batch (``shape="1d"``), HF-style ``[1, T]``
    (``"row"``), with an offset (a cache, ``"offset"``), or per-example ``[B, T]`` (``"batch"``)."""

    def __init__(self, shape="1d", vocab=10, d=4, block=16):
        super().__init__()
        torch.manual_seed(0)
        self.shape = shape
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(block, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        B, T = ids.shape
        pos = torch.arange(T) + (3 if self.shape == "offset" else 0)
        if self.shape == "row":
            pos = pos[None]
        elif self.shape == "batch":
            pos = pos.expand(B, T)
        return self.head(self.tok(ids) + self.pos(pos))


def _sq(o):
    return o.pow(2).mean()


@pytest.mark.parametrize("shape", ["1d", "row", "offset"])
def test_shared_position_ids_with_as_many_positions_as_examples(shape):
    """B == T == 6: dim 0 of the position ids equals the batch size. Before, ``1d`` and ``offset``
    passed the batch check (each position was taken for an example) and ``row`` raised as "not
    batch-first"."""
    model = SharedPositions(shape)
    ids = torch.randint(0, 10, (6, 6), generator=torch.Generator().manual_seed(0))
    probe = PerExampleProbe(model)
    with pytest.warns(UserWarning, match=r"layer pos \(Embedding\) gets inputs of shape .*shared by all examples"):
        m, reason, _ = _step(probe, model, lambda: _sq(model(ids)))
    assert m is not None, reason  # excluded in forward, before its backward: this step is exact already
    kept = ["tok.weight", "head.weight", "head.bias"]
    assert set(probe.coverage.uncovered) == {"pos.weight"}
    assert probe.coverage.fraction == pytest.approx(_numel(model, kept) / _numel(model, kept + ["pos.weight"]))
    ref = copy.deepcopy(model)
    want = _brute(ref, lambda p, xi: _sq(functional_call(ref, p, (xi[None],))), (ids,), kept)
    assert float(m.sq_norm_small) == pytest.approx(want[0], rel=RTOL)
    assert float(m.sq_norm_big) == pytest.approx(want[1], rel=RTOL)
    probe.close()
    strict = PerExampleProbe(model, strict=True)
    with pytest.raises(ValueError, match="shared by all examples|position ids"):
        model(ids)
    strict.close()


def test_per_example_position_ids_and_one_token_per_example_stay_covered():
    """Position ids with the batch dimension ([B, T], rows identical) are per-example inputs, and so
    is a 1-d Embedding input with one token per example: both covered and exact."""
    model = SharedPositions("batch")
    ids = torch.randint(0, 10, (6, 6), generator=torch.Generator().manual_seed(0))
    probe = PerExampleProbe(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m, reason, _ = _step(probe, model, lambda: _sq(model(ids)))
    assert m is not None, reason and probe.coverage.fraction == 1.0
    ref = copy.deepcopy(model)
    want = _brute(
        ref, lambda p, xi: _sq(functional_call(ref, p, (xi[None],))), (ids,), list(dict(ref.named_parameters()))
    )
    assert float(m.sq_norm_small) == pytest.approx(want[0], rel=RTOL)
    probe.close()
    cls = nn.Sequential(nn.Embedding(10, 4), nn.Tanh(), nn.Linear(4, 2))
    probe = PerExampleProbe(cls)
    labels = torch.tensor([3, 1, 4, 1, 5, 9])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m, reason, _ = _step(probe, cls, lambda: _sq(cls(labels)))
    assert m is not None and probe.coverage.fraction == 1.0
    probe.close()


# -- Hugging Face GPT-2 Conv1D -----------------------------------------------------------------


def _conv1d_cls():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    return Conv1D


# name: (leading input shape, in, out); rows: Goodfellow, ghost: T (d + p) <= d p, materialise: else
CONV1D = {"rows": ((6,), 5, 4), "ghost": ((4, 3), 8, 6), "materialise": ((4, 7), 5, 3)}


@pytest.mark.parametrize("shape", list(CONV1D))
@pytest.mark.parametrize("pre", ["none", "both"])
@pytest.mark.parametrize("fused", [False, True])
def test_hf_conv1d_op_matches_vmap_and_is_bit_identical(shape, pre, fused):
    """LinearFn(transposed=True) against the stock Conv1D: the same output and (unfused) bit-identical
    gradients, and per-example squared norms (with elementwise weights of the [in, out] weight)
    equal to torch.func's on the stock layer."""
    from noisescale.probes.per_example_ops import LinearFn

    Conv1D = _conv1d_cls()
    lead, d, p = CONV1D[shape]
    gen = torch.Generator().manual_seed(3)
    mod = Conv1D(p, d)
    with torch.no_grad():
        mod.bias.normal_(generator=gen)
    wp, bp = _pres(mod, pre, gen)
    x = torch.randn(lead + (d,), generator=gen)
    w = mod.weight.detach().clone().requires_grad_()
    b = mod.bias.detach().clone().requires_grad_()
    xa, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    acc = torch.zeros(6, dtype=torch.float64)
    out = LinearFn.apply(xa, w, b, acc, 0, 1, wp, bp, fused, 2, 3, True)
    r = torch.randn(out.shape, generator=gen)
    (out * r).sum().backward()
    out_s = mod(xs)
    (out_s * r).sum().backward()
    assert torch.equal(out, out_s)
    exact = not (fused and len(lead) > 1 and (shape == "materialise" or wp is not None))
    for got, want in ((w.grad, mod.weight.grad), (b.grad, mod.bias.grad), (xa.grad, xs.grad)):
        assert torch.equal(got, want) if exact else torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    ref = _reference(mod, x, r)
    want_w = ((ref["weight"] * (1 if wp is None else wp.double())) ** 2).sum()
    want_b = ((ref["bias"] * (1 if bp is None else bp.double())) ** 2).sum()
    torch.testing.assert_close(acc[:2], torch.stack([want_w, want_b]), rtol=RTOL, atol=0)
    # the exactness check's slots: the squared norms of the gradients returned
    torch.testing.assert_close(acc[2:4], torch.stack([w.grad.double().pow(2).sum(), b.grad.double().pow(2).sum()]))


def _gpt2(n_positions=32):
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=65,
        n_positions=n_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg)


def test_gpt2_is_covered_and_measured_exactly():
    """A tiny GPT-2 (2 layers, d = 32, vocabulary 65, 32 positions; 28,576 parameters). Its
    Conv1D layers are covered with bit-identical gradients (fp32 and bf16 autocast). The token
    embedding is tied to the head (2,080 elements): excluded at construction, coverage 92.7%.
    GPT-2's default position ids are ``[1, T]`` (shared by the batch): the position embedding
    (1,024 elements) is excluded at the first step, coverage 89.1%, below auto's 0.9. With
    ``position_ids`` of shape ``[B, T]`` it stays covered (92.7%). Per-example norms equal
    torch.func's over the covered parameters, and b_simple over 4 batches is within 10% of
    brute force (observed: 6e-8 relative)."""
    model = _gpt2()
    total = sum(p.numel() for p in model.parameters())
    assert total == 28576
    with pytest.warns(UserWarning, match=r"tied or reused parameters .*transformer\.wte\.weight"):
        probe = PerExampleProbe(model)
    assert probe.coverage.fraction == pytest.approx((total - 65 * 32) / total)  # 92.7%
    assert sum(L.kind == "hf_conv1d" for L in probe._layers) == 8
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 65, (8, 16), generator=gen)
    plain = copy.deepcopy(model)
    for autocast in (False, True):
        plain.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            plain(ids, labels=ids).loss.backward()
            if autocast:
                model(ids, labels=ids).loss.backward()
            else:  # GPT-2's position ids [1, T]: shared by the batch
                with pytest.warns(
                    UserWarning, match=r"layer transformer\.wpe \(Embedding\) gets inputs of shape \(1, 16\)"
                ):
                    model(ids, labels=ids).loss.backward()
        m, reason, _ = collect(probe, StepContext(None))
        assert m is not None, reason
        for (n, a), b in zip(plain.named_parameters(), model.parameters()):
            assert torch.equal(a.grad, b.grad), (n, autocast)
    assert probe.coverage.fraction == pytest.approx((total - 65 * 32 - 32 * 32) / total)  # 89.1%
    assert set(probe.coverage.uncovered) == {"transformer.wte.weight", "transformer.wpe.weight"}
    probe.close()

    # position ids with the batch dimension keep the position embedding: 92.7% >= 0.9
    model = _gpt2()
    with pytest.warns(UserWarning, match="tied"):
        probe = PerExampleProbe(model)
    batches = [torch.randint(0, 65, (8, 16), generator=gen) for _ in range(4)]
    pos = torch.arange(16).expand(8, 16)
    measured = []
    for x in batches:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            m, reason, _ = _step(probe, model, lambda x=x: model(x, labels=x, position_ids=pos).loss)
        assert m is not None, reason
        measured.append(m)
    names = covered_names(model, probe)
    assert probe.coverage.fraction == pytest.approx((total - 65 * 32) / total) and probe.coverage.fraction >= 0.9
    probe.close()
    assert "transformer.wte.weight" not in names and len(names) == len(list(model.parameters())) - 1

    def loss_one(p, xi):
        return functional_call(model, p, (xi[None],), {"labels": xi[None], "position_ids": pos[:1]}).loss

    brute = [_brute(model, loss_one, (x,), names) for x in batches]
    for m, (small, big) in zip(measured, brute):
        assert float(m.sq_norm_small) == pytest.approx(small, rel=RTOL)
        assert float(m.sq_norm_big) == pytest.approx(big, rel=RTOL)

    def b_simple(pairs):  # the pooled estimate over the batches: mean tr(Sigma) / mean |G|^2
        est = [ns.estimate(small, 1, big, 8) for small, big in pairs]
        return sum(ts for _, ts in est) / sum(g2 for g2, _ in est)

    got = b_simple([(float(m.sq_norm_small), float(m.sq_norm_big)) for m in measured])
    want = b_simple(brute)
    assert got > 0 and abs(got - want) / want < 0.10, (got, want)


def test_import_noisescale_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, noisescale, noisescale.probes.per_example; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
