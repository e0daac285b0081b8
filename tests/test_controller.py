"""BatchSizeController: the decision logic, the learning-rate rescale, resume, and every rank alike."""

from __future__ import annotations

import math
import os
import random
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import noisescale as ns
from noisescale.controller import decide_accumulation
from noisescale.lr_rules import LRRule, adam_sqrt_hyperparameters, saturating_scale

sys.path.insert(0, os.path.dirname(__file__))
import controller_workers as W

# -- the pure decision -------------------------------------------------------------------


def reference_decision(acc, est, low, high, q, lo_acc, hi_acc, factor, growth, min_change, hyst):
    """The rule spelled out over every candidate accumulation (slow, obviously what the docs say)."""
    if est is None:
        return acc
    B, target = acc * q, factor * est
    low = target if low is None else factor * low
    high = target if high is None else factor * high
    if low > B and target > B:  # grow: the largest candidate within the target and the limits
        ok = [a for a in range(acc + 1, hi_acc + 1) if a * q <= target + 1e-9 and a <= max(acc + 1, acc * growth)]
        ok = [a for a in ok if a * q >= min_change * B or a == hi_acc]
        return max(ok) if ok else acc
    if high * hyst < B:  # shrink: the smallest candidate that still covers the target
        ok = [a for a in range(max(lo_acc, 1), acc) if a * q >= target - 1e-9 and a >= acc / growth - 1e-9]
        return min(ok) if ok else acc
    return acc


def test_decision_matches_the_spelled_out_rule():
    rng = random.Random(0)
    for _ in range(4000):
        q = rng.choice([8, 16, 24])
        lo_acc, hi_acc = rng.randint(1, 3), rng.randint(4, 64)
        acc = rng.randint(lo_acc, hi_acc)
        est = rng.choice([None, rng.uniform(0, 2000), 10 ** rng.uniform(0, 4)])
        w = rng.choice([0.0, 0.1, 0.5, 0.9])
        low, high = (None, None) if est is None or rng.random() < 0.2 else (est * (1 - w), est / (1 - w))
        kw = {"factor": rng.choice([0.5, 1.0, 2.0]), "max_growth": rng.choice([1.5, 2.0, 4.0])}
        kw["min_change"] = rng.choice([1.01, 1.25, min(1.5, kw["max_growth"])])
        kw["hysteresis"] = rng.choice([1.5, 2.0, math.inf])
        got = decide_accumulation(
            acc, est, low, high, quantum=q, min_accumulation=lo_acc, max_accumulation=hi_acc, **kw
        )
        ref = reference_decision(acc, est, low, high, q, lo_acc, hi_acc, *kw.values())
        assert got == ref, (acc, est, low, high, q, lo_acc, hi_acc, kw)


def test_decision_cases():
    d = lambda acc, est, lo=None, hi=None, **kw: decide_accumulation(
        acc, est, lo, hi, quantum=32, min_accumulation=kw.pop("mn", 1), max_accumulation=kw.pop("mx", 64), **kw
    )
    assert d(2, None) == 2  # nothing measured: wait
    assert d(2, 1000.0, 800.0, 1300.0) == 4  # supported: grow, at most x2
    assert (
        d(2, 1000.0, 800.0, 1300.0, max_growth=8.0) == 16
    )  # to the target, whole micro-batches (1000 // 32 = 31 -> 16 cap)
    assert d(2, 1000.0, 800.0, 1300.0, max_growth=100.0) == 31
    assert d(2, 1000.0, 60.0, 1e9) == 2  # the interval reaches below the batch (64): not supported
    assert d(2, 1000.0, 800.0, math.inf) == 4  # an unbounded upper end does not stop growth
    assert d(2, 75.0, 70.0, 80.0) == 2  # 75 < 1.25 x 64: not worth a change
    assert d(2, 1000.0, 800.0, 1300.0, mx=3) == 3  # capped at the largest batch, even below min_change
    assert d(10, 200.0, 100.0, 300.0) == 10  # 300 x 2 >= 320: within the hysteresis band, keep
    assert d(10, 100.0, 80.0, 150.0) == 5  # 150 x 2 < 320: shrink, at most / 2
    assert d(10, 100.0, 80.0, 150.0, max_growth=4.0) == 4  # ceil(100 / 32): the target, rounded up
    assert d(10, 100.0, 80.0, 150.0, mn=8) == 8  # not below the smallest batch
    assert d(10, 1.0, 0.5, 2.0, hysteresis=math.inf) == 10  # never shrink
    assert d(2, 1000.0, factor=0.25) == 4  # a point estimate gates on itself (factor: 250 > 64)


def test_noise_around_the_batch_never_shrinks_it():
    """Hysteresis: readings scattered around the batch in use (30% per reading, with 95% intervals that
    cover the truth) never shrink it; growth on noise needs the whole interval above the batch (~2.5%)."""
    rng = random.Random(1)
    shrinks = grows = 0
    for _ in range(5000):
        est = 256 * math.exp(rng.gauss(0, 0.3))
        iv = (est * math.exp(-1.96 * 0.3), est * math.exp(1.96 * 0.3))
        new = decide_accumulation(8, est, *iv, quantum=32, min_accumulation=1, max_accumulation=64)
        shrinks += new < 8
        grows += new > 8
    assert shrinks == 0 and grows < 0.04 * 5000
    # without the hysteresis band (shrink as soon as the interval is below the batch) noise would shrink it
    loose = sum(
        decide_accumulation(
            8, e, e * 0.55, e * 1.8, quantum=32, min_accumulation=1, max_accumulation=64, hysteresis=1.0
        )
        < 8
        for e in (256 * math.exp(random.Random(i).gauss(0, 0.3)) for i in range(5000))
    )
    assert loose > 0


# -- the controller on a scripted tracker ----------------------------------------------


class ScriptedTracker:
    """Stands in for GradientNoiseScale: pushes the readings a test chooses."""

    def __init__(self, unit: str = "examples", b_noise: bool = False) -> None:
        self.unit, self.subs, self.steps = unit, [], 0
        if b_noise:
            self.b_noise = None

    def subscribe(self, fn, every=100):
        sub = SimpleNamespace(fn=fn, every=every, remove=lambda: self.subs.remove(sub))
        self.subs.append(sub)
        return sub

    def push(self, est, low=None, high=None, measured=1000):
        self.steps += 1
        iv = None if low is None else (low, high)
        upd = SimpleNamespace(
            step=self.steps,
            b_simple=est,
            interval=lambda level=0.95: iv,
            metrics={"gns/measured": float(measured)},
            final=False,
            total=SimpleNamespace(reason="scripted"),
        )
        for s in list(self.subs):
            s.fn(upd)


def _param_opt(lr=0.1, kind="sgd"):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=lr) if kind == "sgd" else torch.optim.Adam([p], lr=lr)
    return p, opt


def test_waits_for_patience_then_grows_and_rescales():
    gns = ScriptedTracker()
    _p, opt = _param_opt()
    ctl = ns.BatchSizeController(gns, opt, batch_size=64, micro_batch_size=32, max_batch_size=1024, patience=50)
    assert (ctl.accumulation, ctl.batch_size, ctl.lr_scale, ctl.lr_rule_name) == (2, 64, 1.0, "saturating")
    gns.push(900.0, 700.0, 1200.0, measured=49)
    assert not ctl.step() and "49 of 50" in ctl.reason
    assert not ctl.step()  # no new reading: no decision
    gns.push(None)
    assert not ctl.step() and "undefined" in ctl.reason
    gns.push(900.0, 700.0, 1200.0, measured=50)
    assert ctl.step()
    assert (ctl.accumulation, ctl.batch_size) == (4, 128)
    assert ctl.lr_scale == saturating_scale(128, 64, 900.0)  # Eq. 2.6 at the reading
    gns.push(900.0, 700.0, 1200.0, measured=60)  # 10 measured steps since the change: wait again
    assert not ctl.step() and ctl.batch_size == 128
    gns.push(900.0, 700.0, 1200.0, measured=100)
    assert ctl.step() and ctl.batch_size == 256
    assert [c["batch_size"] for c in ctl.changes] == [128.0, 256.0]
    assert ctl.examples == 64 * 4 + 128 * 2  # examples of the 6 steps taken, each at its own batch


def test_lr_applied_inside_the_optimizer_step_only():
    gns = ScriptedTracker()
    p, opt = _param_opt(lr=0.1)
    ctl = ns.BatchSizeController(
        gns, opt, batch_size=32, micro_batch_size=32, max_batch_size=256, lr_rule="linear", patience=0
    )
    gns.push(1000.0, 900.0, 1100.0)
    assert ctl.step() and ctl.lr_scale == 2.0
    p.grad = torch.ones(3)
    opt.step()
    assert torch.equal(p.detach(), torch.full((3,), -0.2))  # the step used 0.1 x 2
    assert opt.param_groups[0]["lr"] == 0.1  # the schedule's value, back after the step
    assert ctl.lrs() == [0.2] and ctl.metrics()["controller/lr"] == 0.2

    # an optimizer step that raises (after the pre-hook) does not leave the scale to compound
    def fail(*_):
        raise RuntimeError("a user's hook fails")

    handle = opt.register_step_pre_hook(fail)  # runs after the controller's pre-hook
    with pytest.raises(RuntimeError, match="a user's hook fails"):
        opt.step()
    handle.remove()
    opt.step()
    assert torch.equal(p.detach(), torch.full((3,), -0.4)) and opt.param_groups[0]["lr"] == 0.1


def test_composes_with_a_chainable_scheduler_in_either_order():
    """param_groups hold the scheduler's learning rate; each step uses it times lr_scale."""
    for order in ("scheduler first", "controller first"):
        gns = ScriptedTracker()
        p, opt = _param_opt(lr=1.0)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
        ctl = ns.BatchSizeController(
            gns, opt, batch_size=32, micro_batch_size=32, max_batch_size=128, lr_rule="linear", patience=0
        )
        used = []
        for t in range(6):
            before = p.detach().clone()
            p.grad = torch.ones(3)
            opt.step()
            used.append(float(before[0] - p.detach()[0]))
            if t == 1:
                gns.push(1000.0, 900.0, 1100.0)
            if order == "scheduler first":
                sched.step()
                ctl.step()
            else:
                ctl.step()
                sched.step()
        # steps 0-1 at scale 1, then x2 (batch 64) from step 2, then x4 never (one push only)
        expected = [0.5**t * (1.0 if t < 2 else 2.0) for t in range(6)]
        assert used == pytest.approx(expected, rel=1e-12), order


def test_sqrt_rule_and_adam_hyperparameters():
    gns = ScriptedTracker()
    p, opt = _param_opt(lr=1e-3, kind="adam")
    seen = {}
    opt.register_step_pre_hook(lambda o, a, k: None)  # a user's own hook does not disturb the controller
    ctl = ns.BatchSizeController(
        gns, opt, batch_size=16, micro_batch_size=16, max_batch_size=64, patience=0, adjust_adam=True, max_growth=4.0
    )
    assert ctl.lr_rule_name == "sqrt"
    gns.push(5000.0, 4000.0, 6000.0)
    assert ctl.step() and ctl.batch_size == 64 and ctl.lr_scale == 2.0
    opt.register_step_pre_hook(lambda o, a, k: seen.update(dict(o.param_groups[0])))
    p.grad = torch.ones(3)
    opt.step()
    h = adam_sqrt_hyperparameters(4.0, (0.9, 0.999), 1e-8)
    assert seen["lr"] == 2e-3 and seen["betas"] == h.betas and seen["eps"] == h.eps
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"]) == (1e-3, (0.9, 0.999), 1e-8)
    with pytest.raises(ValueError, match=r"kappa \(1 - beta\) < 1"):  # 16 x (1 - 0.9) >= 1: refused up front
        ns.BatchSizeController(gns, opt, batch_size=16, micro_batch_size=16, max_batch_size=256, adjust_adam=True)


def test_units_signals_and_rules():
    # a tracker counting tokens: the signal is converted to examples
    gns = ScriptedTracker(unit="tokens")
    with pytest.raises(ValueError, match="pass tokens_per_example="):
        ns.BatchSizeController(gns, None, batch_size=8, micro_batch_size=8, max_batch_size=64)
    ctl = ns.BatchSizeController(
        gns, None, batch_size=8, micro_batch_size=8, max_batch_size=64, tokens_per_example=128, patience=0
    )
    gns.push(128 * 40.0, 128 * 30.0, 128 * 50.0)  # 40 examples' worth of tokens
    assert ctl.step() and ctl.batch_size == 16 and ctl.last.estimate == 40.0
    assert ctl.lr_rule_name == "none" and ctl.lr_scale == 1.0  # no optimizer: nothing to scale
    # b_noise: missing -> error; None -> wait
    with pytest.raises(ValueError, match="has no b_noise"):
        ns.BatchSizeController(
            ScriptedTracker(), None, batch_size=8, micro_batch_size=8, max_batch_size=64, signal="b_noise"
        )
    gb = ScriptedTracker(b_noise=True)
    ctl = ns.BatchSizeController(
        gb, None, batch_size=8, micro_batch_size=8, max_batch_size=64, signal="b_noise", patience=0
    )
    gb.push(1000.0, 900.0, 1100.0)
    assert not ctl.step() and "undefined" in ctl.reason
    gb.b_noise = 100.0
    gb.push(1000.0, 900.0, 1100.0)
    assert ctl.step() and ctl.batch_size == 16 and ctl.last.estimate == 100.0
    # a callable signal and a callable rule
    gc = ScriptedTracker()
    _p, opt = _param_opt()
    ctl = ns.BatchSizeController(
        gc, opt, batch_size=8, micro_batch_size=8, max_batch_size=64, patience=0,
        signal=lambda u: (u.b_simple / 2, u.b_simple / 4, u.b_simple), lr_rule=lambda b, b0, n: (b / b0) ** 0.75,
    )  # fmt: skip
    gc.push(200.0, 1.0, 2.0)
    assert ctl.step() and ctl.batch_size == 16 and ctl.lr_scale == 2**0.75
    ctl.close()
    assert gc.subs == [] and ctl.lrs() == [0.1]
    # a fixed noise scale for the saturating rule
    gd = ScriptedTracker()
    ctl = ns.BatchSizeController(
        gd,
        opt,
        batch_size=8,
        micro_batch_size=8,
        max_batch_size=64,
        patience=0,
        lr_rule=LRRule("saturating", b_noise=32.0),
    )
    gd.push(500.0, 400.0, 600.0)
    assert ctl.step() and ctl.lr_scale == saturating_scale(16, 8, 32.0)


def test_bad_settings_are_one_clear_error():
    gns = ScriptedTracker()
    mk = lambda **kw: ns.BatchSizeController(
        gns, None, **{"batch_size": 64, "micro_batch_size": 32, "max_batch_size": 1024, **kw}
    )
    with pytest.raises(ValueError, match=r"batch_size=48 is not a whole number of micro-batches.*2 x 32 = 64"):
        mk(batch_size=48, world_size=2, max_batch_size=1024)
    with pytest.raises(ValueError, match="max_batch_size=32 is below batch_size=64"):
        mk(max_batch_size=32)
    with pytest.raises(ValueError, match="min_batch_size=128 is above batch_size=64"):
        mk(min_batch_size=128)
    with pytest.raises(ValueError, match="micro_batch_size must be a positive integer, got 0"):
        mk(micro_batch_size=0)
    with pytest.raises(ValueError, match="factor must be a finite number > 0, got -1"):
        mk(factor=-1)
    with pytest.raises(ValueError, match="signal must be"):
        mk(signal="b_big")
    with pytest.raises(ValueError, match="min_change=3 is above max_growth=2"):
        mk(min_change=3)
    with pytest.raises(TypeError, match="gns must be a GradientNoiseScale"):
        ns.BatchSizeController(object(), None, batch_size=64, micro_batch_size=32, max_batch_size=64)
    ctl = mk()
    with pytest.raises(ValueError, match="not a BatchSizeController state_dict"):
        ctl.load_state_dict({})
    sd = ctl.state_dict()
    with pytest.raises(ValueError, match="saved with micro_batch_size=32 but this controller has micro_batch_size=16"):
        mk(micro_batch_size=16).load_state_dict(sd)
    with pytest.raises(ValueError, match="accumulation=99 is not a whole number in"):
        ctl.load_state_dict({**sd, "accumulation": 99})


# -- on real training ------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """A tiny model on shared cores: one torch thread (two wait for each other), restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train(steps, ctl_kw, split=None, attach=True):
    """Digits MLP, SGD, the controller's batch; returns per-step (batch, lr used) and the final weights.

    With ``split``, everything is saved after that many steps and rebuilt from the saved state."""
    X, y = W.data()
    torch.manual_seed(0)
    model = W.Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    gns = ns.GradientNoiseScale(model, method="microbatch")
    ctl = ns.BatchSizeController(gns, opt, **ctl_kw) if attach else None
    gen = torch.Generator().manual_seed(1)
    out = []
    for t in range(steps):
        if t == split:
            saved = {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "gns": gns.state_dict(),
                "ctl": ctl.state_dict(),
                "gen": gen.get_state(),
            }
            path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"ctl_resume_{os.getpid()}.pt")
            torch.save(saved, path)
            saved = torch.load(path, weights_only=True)
            os.remove(path)
            gns.close()
            ctl.close()
            model = W.Net(seed=5)  # other initial weights: everything must come from the checkpoint
            model.load_state_dict(saved["model"])
            opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
            opt.load_state_dict(saved["opt"])
            gns = ns.GradientNoiseScale(model, method="microbatch")
            gns.load_state_dict(saved["gns"])
            ctl = ns.BatchSizeController(gns, opt, **ctl_kw)
            ctl.load_state_dict(saved["ctl"])
            gen.set_state(saved["gen"])
        acc = ctl.accumulation if ctl else 2
        for _ in range(acc):
            idx = torch.randint(0, len(y), (ctl_kw["micro_batch_size"],), generator=gen)
            (F.cross_entropy(model(X[idx]), y[idx]) / acc).backward()
        gns.step()
        lr_used = ctl.lrs()[0] if ctl else opt.param_groups[0]["lr"]
        opt.step()
        opt.zero_grad()
        if ctl:
            ctl.step()
        out.append((acc * ctl_kw["micro_batch_size"], lr_used))
    gns.close()
    return out, [p.detach().clone() for p in model.parameters()]


CTL = {"batch_size": 16, "micro_batch_size": 8, "max_batch_size": 64, "patience": 10, "every": 5}


def test_resume_gives_the_same_batches_and_learning_rates(one_thread):
    straight, w1 = _train(100, CTL)
    resumed, w2 = _train(100, CTL, split=45)
    batches = [b for b, _ in straight]
    assert len(set(batches)) >= 3, f"the run must change its batch to test anything: {sorted(set(batches))}"
    assert 16 < batches[45] < batches[-1], "a change before and one after the checkpoint"
    assert resumed == straight  # identical batch sizes and learning rates, step by step
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))


def test_inert_until_it_changes_something(one_thread):
    """Attached with no change yet (patience not reached), training is bit-identical to without it."""
    kw = {**CTL, "patience": 10_000}
    a, wa = _train(30, kw)
    b, wb = _train(30, kw, attach=False)
    assert a == b and all(torch.equal(x, y) for x, y in zip(wa, wb))


# -- every rank decides the same (2-process gloo) ----------------------------------------


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_every_rank_decides_the_same(tmp_path):
    world, out = 2, tmp_path / "out"
    out.mkdir()
    digits = tmp_path / "digits.pt"
    torch.save(W.data(), digits)
    os.environ["NOISESCALE_TEST_DIGITS"] = str(digits)
    ctx = mp.start_processes(
        W.entry, args=(world, str(tmp_path / "init"), str(out)), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 150
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail("the gloo controller run did not finish in 150 s (hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    res = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, x in enumerate(res):
        assert "error" not in x, f"rank {r} raised:\n{x.get('error')}"
    assert res[0]["batch"] == res[1]["batch"] and res[0]["lr"] == res[1]["lr"]
    assert res[0]["changes"] == res[1]["changes"]
    assert len(set(res[0]["batch"])) >= 2, "the run must change its batch to test anything"
    assert res[0]["batch"][0] == 2 * 1 * 8  # global batch = world x accumulation x micro-batch
    # the ranks saw different data: agreement is not a coincidence of identical inputs
    assert res[0]["first_loss"] != res[1]["first_loss"]


# -- the example and the benchmark run -------------------------------------------------

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_overhead_benchmark_dry_run(capsys, one_thread):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "controller_overhead", os.path.join(ROOT, "benchmarks", "controller_overhead.py")
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "controller.step():" in out and "bit-identical (lr 0.05 x lr_scale 2 vs lr 0.1): PASS" in out


def test_adaptive_example_runs(tmp_path):
    import subprocess

    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "adaptive.py"), "--steps", "40"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert "controller: BatchSizeController(" in out.stdout and (tmp_path / "adaptive.jsonl").exists()


def test_a_loop_that_ignores_the_accumulation_is_told(one_thread):
    """The learning-rate scale assumes the batch grew: a loop that keeps its own batch gets a warning."""
    X, y = W.data()
    torch.manual_seed(0)
    model = W.Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    gns = ns.GradientNoiseScale(model, method="microbatch")
    ctl = ns.BatchSizeController(gns, opt, **CTL)
    gen = torch.Generator().manual_seed(1)
    with pytest.warns(UserWarning, match=r"saw steps of 16 examples but the controller's batch is (24|32)"):
        for _ in range(100):
            for _ in range(2):  # always 2 micro-batches of 8, whatever ctl.accumulation says
                idx = torch.randint(0, len(y), (8,), generator=gen)
                (F.cross_entropy(model(X[idx]), y[idx]) / 2).backward()
            gns.step()
            opt.step()
            opt.zero_grad()
            ctl.step()
    assert ctl.changes and ctl._warned_batch
    gns.close()


def test_b_noise_signal_from_the_tracker(one_thread):
    """signal="b_noise": the controller reads the tracker's B_noise and its interval at each reading."""
    X, y = W.data()
    torch.manual_seed(0)
    model = W.Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    gns = ns.GradientNoiseScale(model, method="microbatch", hessian_every=2)
    ctl = ns.BatchSizeController(gns, opt, **{**CTL, "patience": 4}, signal="b_noise", lr_rule="saturating")
    gen, hgen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)

    def closure():
        i = torch.randint(0, len(y), (16,), generator=hgen)
        return F.cross_entropy(model(X[i]), y[i])

    readings = []
    for _ in range(60):
        for _ in range(ctl.accumulation):
            idx = torch.randint(0, len(y), (8,), generator=gen)
            (F.cross_entropy(model(X[idx]), y[idx]) / ctl.accumulation).backward()
        gns.step(closure=closure)
        if gns.steps % CTL["every"] == 0:
            readings.append((gns.b_noise, gns.b_noise_interval(0.95)))
        opt.step()
        opt.zero_grad()
        ctl.step()
        if gns.steps % CTL["every"] == 0 and ctl.last is not None and ctl.last.estimate is not None:
            b, iv = readings[-1]
            assert (ctl.last.estimate, ctl.last.low, ctl.last.high) == (b, *iv)
    assert any(b is not None for b, _ in readings), "B_noise must be measured for this test to mean anything"
    assert ctl.changes, "the batch must change on B_noise for this test to mean anything"
    for c in ctl.changes:
        assert c["lr_scale"] == saturating_scale(c["batch_size"], 16, c["estimate"])  # Eq. 2.6 at the B_noise read
    gns.close()


def test_examples_schedule_and_lr_scale_compose():
    """Each step uses schedule(examples seen before it) x lr_scale; the controller advances the schedule."""
    gns = ScriptedTracker()
    p, opt = _param_opt(lr=1.0)
    fn = lambda x: min(1.0, (x + 16) / 160)  # a warm-up over 160 examples
    sched = ns.ExamplesSchedule(opt, fn)
    ctl = ns.BatchSizeController(
        gns, opt, batch_size=16, micro_batch_size=16, max_batch_size=64, lr_rule="linear", patience=0, schedule=sched
    )
    seen = 0.0
    for t in range(12):
        before = p.detach().clone()
        p.grad = torch.ones(3)
        opt.step()
        used = float(before[0] - p.detach()[0])
        assert used == pytest.approx(fn(seen) * ctl.lr_scale, rel=1e-6), t  # float32 parameters
        seen += ctl.batch_size
        if t in (2, 5):
            gns.push(1000.0, 900.0, 1100.0)
        ctl.step()
        assert ctl.examples == sched.examples == seen
    assert [c["batch_size"] for c in ctl.changes] == [32.0, 64.0] and ctl.lr_scale == 4.0
