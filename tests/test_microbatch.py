"""Micro-batch probe and tracker: against explicit references, on real data (scikit-learn digits)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import noisescale as ns
from helpers import pooled, read_stats, train_digits
from noisescale.data import digits_mlp, load_digits
from noisescale.probes import ProbeConfig


@pytest.fixture(scope="module")
def digits():
    X, y, _, _ = load_digits(seed=0)
    return X, y


def _flat_sq(grads):
    return sum(float((g.double() ** 2).sum()) for g in grads if g is not None)


def _reference_parts(model, parts, scale_fn):
    """Explicit per-micro-batch gradients with torch.autograd.grad (the obviously-correct twin)."""
    params = [p for p in model.parameters() if p.requires_grad]
    vs = []
    for j, (xb, yb) in enumerate(parts):
        loss = scale_fn(j, xb, yb)
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        vs.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)])
    total = [sum(v[i] for v in vs) for i in range(len(params))]
    return [_flat_sq(v) for v in vs], _flat_sq(total)


CONVENTIONS = {
    # name: (loss of micro-batch j given its mean loss, sizes, reduction to declare)
    "mean_div_k": (lambda loss_mean, b, k, B: loss_mean / k, "mean"),
    "mean_not_divided": (lambda loss_mean, b, k, B: loss_mean, "mean"),
    "sum": (lambda loss_mean, b, k, B: loss_mean * b, "sum"),
    "sum_div_B": (lambda loss_mean, b, k, B: loss_mean * b / B, "sum"),
}


@pytest.mark.parametrize("convention", list(CONVENTIONS))
@pytest.mark.parametrize("sizes", [[16, 16, 16, 16], [5, 20, 9, 30]])
def test_measurement_matches_explicit_gradients(digits, convention, sizes):
    X, y = digits
    scale, reduction = CONVENTIONS[convention]
    model = digits_mlp(hidden=32)
    k, B = len(sizes), sum(sizes)
    bounds = torch.tensor([0] + sizes).cumsum(0).tolist()
    parts = [(X[bounds[j] : bounds[j + 1]], y[bounds[j] : bounds[j + 1]]) for j in range(k)]

    def loss_j(j, xb, yb):
        return scale(F.cross_entropy(model(xb), yb), len(yb), k, B)

    ref_small, ref_big = _reference_parts(model, parts, loss_j)
    probe = ns.probes.MicroBatchProbe(model, list(model.parameters()), ProbeConfig(reduction=reduction))
    for j, (xb, yb) in enumerate(parts):
        loss_j(j, xb, yb).backward()
    st = probe.collect(ns.probes.StepContext(None))
    probe.close()
    assert st.reason is None and st.read()[2] == B
    m = read_stats(st)
    ref = pooled(ref_small, sizes, ref_big, reduction=reduction)
    assert m.b_small == pytest.approx(ref.b_small) and m.b_big == pytest.approx(ref.b_big)
    assert m.sq_small == pytest.approx(ref.sq_small, rel=1e-5)
    assert m.sq_big == pytest.approx(ref.sq_big, rel=1e-5)


def _fixed_theta_b_simple(model, X, y, convention, steps=30, k=4, b=16, seed=0):
    scale, reduction = CONVENTIONS[convention]
    gen = torch.Generator().manual_seed(seed)
    gns = ns.GradientNoiseScale(model, "microbatch", beta=1.0, reduction=reduction)
    for _ in range(steps):
        idx = torch.randint(len(y), (k * b,), generator=gen)
        for xb, yb in zip(X[idx].chunk(k), y[idx].chunk(k)):
            scale(F.cross_entropy(model(xb), yb), b, k, k * b).backward()
        gns.step()
        model.zero_grad()
    out = gns.b_simple
    gns.close()
    return out


def test_b_simple_does_not_depend_on_the_loss_convention(digits):
    X, y = digits
    model = digits_mlp(hidden=32)
    values = {c: _fixed_theta_b_simple(model, X, y, c) for c in CONVENTIONS}
    ref = values["mean_div_k"]
    for c, v in values.items():
        assert v == pytest.approx(ref, rel=1e-4), (c, values)


def test_inert_bit_identical_gradients_and_parameters(digits):
    X, y = digits
    a, b = digits_mlp(hidden=32, seed=3), digits_mlp(hidden=32, seed=3)
    gns = ns.GradientNoiseScale(b, "microbatch")
    ga = train_digits(a, X, y, 25)
    gb = train_digits(b, X, y, 25, gns=gns)
    assert gns.b_simple is not None
    for sa, sb in zip(ga, gb):
        assert all(torch.equal(u, v) for u, v in zip(sa, sb))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    gns.close()


def test_frozen_unused_and_tied_parameters(digits):
    X, y = digits

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen = nn.Linear(64, 16)
            self.frozen.requires_grad_(False)
            self.shared = nn.Linear(16, 16)  # used twice: a tied weight
            self.unused = nn.Linear(16, 16)  # never gets a gradient
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            h = torch.tanh(self.frozen(x))
            h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
            return self.head(h)

    torch.manual_seed(0)
    model = Net()
    parts = [(X[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    ref_small, ref_big = _reference_parts(model, parts, lambda j, xb, yb: F.cross_entropy(model(xb), yb) / 4)
    gns = ns.GradientNoiseScale(model, "microbatch", beta=1.0)
    assert len(gns.params) == 6  # frozen excluded; shared counted once
    for xb, yb in parts:
        (F.cross_entropy(model(xb), yb) / 4).backward()
    gns.step()
    rec = gns.history[-1]
    ref = pooled(ref_small, [8] * 4, ref_big)
    assert rec["g2_step"] == pytest.approx(ref.g2, rel=1e-5)
    assert rec["trace_sigma_step"] == pytest.approx(ref.trace_sigma, rel=1e-5)
    gns.close()


def test_gradscaler_same_b_simple_and_inf_step_skipped(digits):
    X, y = digits
    plain = digits_mlp(hidden=32, seed=1)
    scaled = digits_mlp(hidden=32, seed=1)
    g_plain = ns.GradientNoiseScale(plain, "microbatch", beta=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    g_scaled = ns.GradientNoiseScale(scaled, "microbatch", beta=1.0, scaler=scaler)
    train_digits(plain, X, y, 12, gns=g_plain)
    train_digits(scaled, X, y, 12, gns=g_scaled, scaler=scaler)
    assert g_plain.b_simple is not None
    # power-of-two loss scales are exact in fp32, so the unscaled measurement is the same number
    assert g_scaled.b_simple == pytest.approx(g_plain.b_simple, rel=1e-6)
    assert g_scaled.g2 == pytest.approx(g_plain.g2, rel=1e-6)

    # an overflowing step: skipped by the scaler and by noisescale, counted, not averaged
    before = g_scaled.state_dict()["ema"]
    train_digits(scaled, X, y, 1, gns=g_scaled, scaler=scaler, nan_at=0, seed=99)
    assert g_scaled.skipped == 1 and g_scaled.measured == 12
    assert g_scaled.state_dict()["ema"] == before
    assert scaler.get_scale() == 2.0**11  # the scaler saw it too and backed off
    g_plain.close()
    g_scaled.close()


def test_gradscaler_with_bf16_autocast_close_to_fp32(digits):
    X, y = digits
    model = digits_mlp(hidden=32, seed=2)
    batches = [torch.randint(len(y), (64,), generator=torch.Generator().manual_seed(s)) for s in range(40)]

    def run(amp):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=amp)
        gns = ns.GradientNoiseScale(model, "microbatch", beta=1.0, scaler=scaler)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # fixed parameters: compare like with like
        for idx in batches:
            for xb, yb in zip(X[idx].chunk(4), y[idx].chunk(4)):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    loss = F.cross_entropy(model(xb), yb) / 4
                scaler.scale(loss).backward()
            gns.step()  # before unscale_: the tracker divides the step norm by S^2 as well
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        out = gns.b_simple
        gns.close()
        return out

    assert run(True) == pytest.approx(run(False), rel=0.05)


def test_single_micro_batch(digits):
    X, y = digits
    model = digits_mlp(hidden=16)
    explicit = ns.GradientNoiseScale(model, method="microbatch")
    F.cross_entropy(model(X[:16]), y[:16]).backward()
    with pytest.warns(UserWarning, match="only one backward pass.*method='per_example'"):
        explicit.step()  # the same policy as auto: warn (once) and say why, never raise
    assert explicit.b_simple is None and "only one backward pass" in explicit.reason
    explicit.close()
    # with batch norm in training mode the advice must not point to per-example norms (wrong there)
    bn = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Linear(16, 10))
    gbn = ns.GradientNoiseScale(bn, method="microbatch")
    F.cross_entropy(bn(X[:16]), y[:16]).backward()
    with pytest.warns(UserWarning, match="batch norm") as rec:
        gbn.step()
    assert all("per_example" not in str(w.message) for w in rec)
    gbn.close()

    class RawMatmul(nn.Module):  # a parameter outside any layer type the per-example probe covers
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(64, 10) * 0.1)

        def forward(self, x):
            return x @ self.w

    raw = RawMatmul()
    auto = ns.GradientNoiseScale(raw)
    assert auto.method == "microbatch"  # auto falls back to the micro-batch probe
    F.cross_entropy(raw(X[:16]), y[:16]).backward()
    with pytest.warns(UserWarning, match="only one backward pass"):
        auto.step()
    assert auto.b_simple is None and "accumulate gradients" in auto.reason
    assert auto.unmeasurable == 1
    auto.close()


def test_sizes_explicit_inferred_and_inconsistent(digits):
    X, y = digits
    model = digits_mlp(hidden=16)
    gns = ns.GradientNoiseScale(model, "microbatch", unit="tokens")
    for xb, yb in zip(X[:30].split([10, 20]), y[:30].split([10, 20])):
        F.cross_entropy(model(xb), yb).backward()
    with pytest.raises(ValueError, match="could not infer the sizes"):
        gns.step()  # tokens cannot be inferred from the inputs
    for xb, yb in zip(X[:30].split([10, 20]), y[:30].split([10, 20])):
        F.cross_entropy(model(xb), yb).backward()
    with pytest.raises(ValueError, match="got 3 sizes"):
        gns.step(sizes=[100, 200, 5])
    with pytest.raises(TypeError, match="one size per micro-batch"):
        gns.step(sizes=300)
    gns.close()

    model.zero_grad()
    gns = ns.GradientNoiseScale(model, "microbatch", unit="tokens")
    for xb, yb in zip(X[:30].split([10, 20]), y[:30].split([10, 20])):
        F.cross_entropy(model(xb), yb).backward()
    with pytest.raises(ValueError, match="finite and positive"):
        gns.step(sizes=[100, 0])
    for xb, yb in zip(X[:30].split([10, 20]), y[:30].split([10, 20])):
        F.cross_entropy(model(xb), yb).backward()
    gns.step(sizes=[100, 200])
    assert gns.examples == 300.0 and gns.measured == 1
    gns.close()

    inferred = ns.GradientNoiseScale(model, "microbatch")
    for xb, yb in zip(X[:30].split([10, 20]), y[:30].split([10, 20])):
        F.cross_entropy(model(xb), yb).backward()
    inferred.step()
    assert inferred.examples == 30.0
    with torch.no_grad():
        model(X[:5])  # evaluation forwards do not count as micro-batches
    for xb, yb in zip(X[:30].split([10, 20]), y[:30].split([10, 20])):
        F.cross_entropy(model(xb), yb).backward()
    inferred.step()
    assert inferred.examples == 60.0
    inferred.close()


@pytest.fixture
def count_reads():
    """Counts the probe's reads of the accumulated .grad (StepTotal.compute calls)."""
    from noisescale.probes import base

    reads = []
    real = base.StepTotal.compute

    def counting(self):
        reads.append(1)
        return real(self)

    base.StepTotal.compute = counting
    yield reads
    base.StepTotal.compute = real


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_step_gradient_read_once_per_step(digits, count_reads, set_to_none, k):
    """|V|^2 is read at the end of every pass but the first in the first step (the pass count is not
    known yet; a step of one pass is not measured), then once per step, at the end of the pass
    expected to be the last. Every step's |V|^2 equals the explicit gradients' (a frozen layer
    included), with .grad cleared to None or to zeros."""
    X, y = digits
    model = digits_mlp(hidden=32, seed=3)
    model[0].bias.requires_grad_(False)  # never gets a .grad
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gns = ns.GradientNoiseScale(model, method="microbatch", beta=1.0)
    for step in range(3):
        rows = [slice(64 * step + 16 * j, 64 * step + 16 * j + 16) for j in range(k)]
        parts = [(X[r], y[r]) for r in rows]
        model.zero_grad(set_to_none=set_to_none)
        count_reads.clear()
        twin = copy.deepcopy(model)  # (the tracker's hooks do not come along: autograd.grad would fire them)
        _, sq_total = _reference_parts(twin, parts, lambda j, xb, yb, m=twin: F.cross_entropy(m(xb), yb) / k)
        for xb, yb in parts:
            (F.cross_entropy(model(xb), yb) / k).backward()
        assert len(count_reads) == (k - 1 if step == 0 else min(k - 1, 1)), (step, count_reads)
        gns.step(sizes=[16.0] * k)
        if k > 1:
            assert gns.history[-1]["sq_big"] == pytest.approx(sq_total, rel=1e-6)
        opt.step()
    gns.close()


@pytest.mark.parametrize("clip_first", [False, True])
def test_steps_with_other_pass_counts_exact_or_skipped_with_reason(digits, count_reads, clip_first):
    """Pass counts that change from step to step (an epoch's tail). A longer step is read again at its
    later passes, a shorter one at step(): exact while nothing touches .grad in between. Clipping
    before step() in a shorter step loses that step (skipped, with the reason), once per pass count:
    steps of that count are read at their last pass from then on. Checked against explicit gradients
    taken before the clip."""
    X, y = digits
    model = digits_mlp(hidden=32, seed=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    counts = [4, 4, 2, 4, 2, 5, 3, 4, 3]
    lost = {2, 6} if clip_first else set()
    reads = [3, 1, 0, 3, 1, 4, 1, 3, 2] if clip_first else [3, 1, 1, 3, 1, 4, 1, 2, 1]
    gns = ns.GradientNoiseScale(model, method="microbatch", beta=1.0)
    at = 0
    for step, k in enumerate(counts):
        parts = [(X[at + 16 * j : at + 16 * j + 16], y[at + 16 * j : at + 16 * j + 16]) for j in range(k)]
        at += 16 * k
        twin = copy.deepcopy(model)
        _, sq_total = _reference_parts(twin, parts, lambda j, xb, yb, m=twin, k=k: F.cross_entropy(m(xb), yb) / k)
        count_reads.clear()
        for xb, yb in parts:
            (F.cross_entropy(model(xb), yb) / k).backward()
        if clip_first:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        if step in lost:
            with pytest.warns(
                UserWarning, match=f"changed .*step of {k} passes where {counts[step - 1]} were expected"
            ):
                gns.step(sizes=[16.0] * k)
            r = gns.history[-1]
            assert r["status"] == "unmeasurable" and "clipping" in r["reason"], r
        else:
            gns.step(sizes=[16.0] * k)
            r = gns.history[-1]
            assert r["status"] == "measured" and r["sq_big"] == pytest.approx(sq_total, rel=1e-6), (step, r)
        # reads of V: after passes 2..k in the first step; from the expected count on in a longer step;
        # at step() in a shorter one (none if it is lost); at the counts of lost steps from then on
        assert len(count_reads) == reads[step], (step, k, count_reads)
        if not clip_first:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        opt.step()
        opt.zero_grad()
    assert gns.unmeasurable == len(lost)
    gns.close()


def test_tied_head_gpt_adamw_bf16_clipping_and_varying_accumulation(shakespeare_path):
    """The way users train: a character GPT with its head tied to the token embedding, AdamW with a
    linear warm-up, bf16 autocast, clip_grad_norm_ before gns.step(), and steps of 4, 2 and 3 micro-batches
    (an epoch's tail). Each step's |G|^2 and tr(Sigma) equal those of explicit per-micro-batch gradients of
    a twin (torch.autograd.grad, the same autocast) taken before clipping; the one short step whose .grad
    was clipped after a longer step is skipped with the reason; the bf16 training is bit-identical with
    and without the tracker."""
    from models import CharTransformer, char_batches, char_data
    from noisescale import estimate

    data, vocab = char_data(shakespeare_path)
    counts = [4, 4, 2, 4, 2, 4, 3, 3, 4]
    batches = char_batches(data, 3, 16, sum(counts), seed=1)

    def build():
        m = CharTransformer(len(vocab), d=32, heads=2, layers=1, block=16, seed=5)
        m.head.weight = m.tok.weight  # tied head: one parameter, two uses
        return m

    def loss_of(m, xb, yb, k):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(xb)
        return CharTransformer.loss(logits.float(), yb) / k

    def run(track):
        model = build()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
        gns = ns.GradientNoiseScale(model, method="microbatch", beta=1.0) if track else None
        refs, at = [], 0
        for k in counts:
            parts = batches[at : at + k]
            at += k
            if track:
                twin = copy.deepcopy(model)
                sq, sq_total = _reference_parts(twin, parts, lambda j, xb, yb, m=twin, k=k: loss_of(m, xb, yb, k))
                refs.append((k, [k * k * s for s in sq], sq_total))  # (|k u_j|^2: micro-batch j's own mean gradient)
            for xb, yb in parts:
                loss_of(model, xb, yb, k).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            if gns is not None:
                gns.step()
            opt.step()
            sched.step()
            opt.zero_grad()
        return model, gns, refs

    plain, _, _ = run(False)
    model, gns, refs = run(True)
    for a, b in zip(plain.parameters(), model.parameters()):
        assert torch.equal(a, b)
    hist = list(gns.history)
    lost = [i for i, r in enumerate(hist) if r["status"] != "measured"]
    assert lost == [2, 6], [(r["status"], r.get("reason")) for r in hist]  # the first short step of 2 and of 3
    assert "clipping" in hist[2]["reason"] and "3 passes where 4" in hist[6]["reason"]
    clipped = 0
    for i, (r, (k, sq, sq_total)) in enumerate(zip(hist, refs)):
        clipped += sq_total > 0.05**2
        if i in lost:
            continue
        g2, ts = estimate(sum(sq) / k, 3.0, sq_total, 3.0 * k)  # 3 sequences (the inferred size) per micro-batch
        assert r["g2_step"] == pytest.approx(g2, rel=1e-5, abs=1e-9) and r["trace_sigma_step"] == pytest.approx(
            ts, rel=1e-5
        ), i
    assert clipped == len(counts)  # the clip acted on every step: a clipped |V|^2 would be far off
    gns.close()


def test_device_path_of_the_sums_equals_the_host_path(digits, monkeypatch):
    """On accelerators the per-pass sums and the step norm stay device tensors (no host read per pass);
    on the CPU they are Python floats until the record is built. The tensor path, forced on the CPU,
    gives the same records as the float path, with a GradScaler's 0-d tensor factor and steps of
    varying length (a shorter step read at step())."""
    from noisescale.probes import base

    X, y = digits

    def run(host):
        model = digits_mlp(hidden=32, seed=6)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        gns = ns.GradientNoiseScale(model, method="microbatch", beta=1.0, scaler=scaler, groups="layers")
        if not host:
            monkeypatch.setattr(base, "host_group_sums", lambda *a: None)  # (pass_sums: the device branch)
            gns.probe._total.host = False
        at = 0
        for k in [3, 3, 2, 4, 2]:
            for _ in range(k):
                xb, yb = X[at : at + 16], y[at : at + 16]
                at += 16
                scaler.scale(F.cross_entropy(model(xb), yb) / k).backward()
            gns.step()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        monkeypatch.undo()
        out = [(r["status"], r["sq_small"], r["sq_big"], r["g2_step"]) for r in gns.history]
        gns.close()
        return out

    host, device = run(True), run(False)
    assert [r[0] for r in host] == ["measured"] * 5
    for a, b in zip(host, device):
        assert a[0] == b[0] and all(u == pytest.approx(v, rel=1e-12) for u, v in zip(a[1:], b[1:])), (a, b)


@pytest.mark.parametrize("case", ["plain", "preconditioned", "unscaled"])
def test_one_read_per_step_equals_reading_after_every_pass(digits, case):
    """Reading the step gradient once per step (at the predicted last pass, or at step() in a shorter
    step) gives the records of reading it after every pass, bit for bit, over steps of 3, 2, 4 and 1
    passes: with AdamW and its preconditioner (whose weights must stay those of the step: v_hat before
    its update), and with a GradScaler whose unscale_ runs before gns.step() (a shorter step's read at
    step() sees unscaled gradients and must not divide by S^2 again)."""
    X, y = digits

    def run(every_pass):
        model = digits_mlp(hidden=32, seed=7)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=case == "unscaled")
        gns = ns.GradientNoiseScale(
            model,
            method="microbatch",
            beta=1.0,
            groups="layers",
            preconditioner=opt if case == "preconditioned" else None,
            scaler=scaler if case == "unscaled" else None,
        )
        at = 0
        for k in [3, 3, 2, 3, 4, 2, 1, 3, 2]:
            for _ in range(k):
                scaler.scale(F.cross_entropy(model(X[at : at + 16]), y[at : at + 16]) / k).backward()
                at += 16
            scaler.unscale_(opt)
            gns.step()
            if every_pass:
                gns.probe._expect = None  # (unknown: read after every pass, as the first step does)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        out = [(r["status"], r["sq_small"], r["sq_big"]) for r in gns.history]
        gns.close()
        return out

    once, every = run(False), run(True)
    assert [r[0] for r in once] == ["measured"] * 6 + ["unmeasurable"] + ["measured"] * 2
    assert once == every


def test_expect_passes_reads_a_short_clipped_step_at_its_last_pass(digits, count_reads):
    """gns.expect_passes(n) before a step of n passes: a step shorter than the previous one, clipped
    before gns.step(), is read at the end of its n-th pass and measured exactly (no step lost), with one
    read; bad values are one clear line; other methods ignore it."""
    X, y = digits
    model = digits_mlp(hidden=32, seed=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gns = ns.GradientNoiseScale(model, method="microbatch", beta=1.0)
    at = 0
    for k in [4, 4, 2, 4, 3]:
        parts = [(X[at + 16 * j : at + 16 * j + 16], y[at + 16 * j : at + 16 * j + 16]) for j in range(k)]
        at += 16 * k
        twin = copy.deepcopy(model)
        _, sq_total = _reference_parts(twin, parts, lambda j, xb, yb, m=twin, k=k: F.cross_entropy(m(xb), yb) / k)
        gns.expect_passes(k)
        count_reads.clear()
        for xb, yb in parts:
            (F.cross_entropy(model(xb), yb) / k).backward()
        assert len(count_reads) == 1  # (the first step too: told, it need not read every pass)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        gns.step()
        r = gns.history[-1]
        assert r["status"] == "measured" and r["sq_big"] == pytest.approx(sq_total, rel=1e-6), r
        opt.step()
        opt.zero_grad()
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(ValueError, match=f"expect_passes\\(n\\): n must be a positive integer .* got {bad!r}"):
            gns.expect_passes(bad)
    gns.close()
    other = ns.GradientNoiseScale(digits_mlp(hidden=8), method="per_example")
    other.expect_passes(3)  # (nothing to do)
    other.close()
