"""Accelerate: AcceleratedNoiseScale equals a hand-written loop, changes nothing, checkpoints, runs DDP and
drives the batch-size controller through gradient_accumulation_steps."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("accelerate")

from accelerate import Accelerator

import integration_workers as W
from integration_workers import rel, run_workers
from noisescale import GradientNoiseScale
from noisescale.integrations.accelerate import AcceleratedNoiseScale

K, M, STEPS, CLIP = 4, 8, 10, 0.5


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="accelerate")
        yield


def _batches(steps: int = STEPS, k: int = K, seed: int = 0):
    X, y = W.problem(k * M * steps, seed=seed)
    return [(X[i : i + M], y[i : i + M]) for i in range(0, k * M * steps, M)]


def test_equals_plain_loop_with_clipping_and_accumulation_and_is_inert():
    batches = _batches()
    with_helper, without = W.mlp(), W.mlp()
    ns_acc = W.accelerate_loop(
        Accelerator(gradient_accumulation_steps=K, cpu=True),
        with_helper,
        batches,
        clip=CLIP,
        helper_opts={"method": "microbatch"},
    )
    W.accelerate_loop(Accelerator(gradient_accumulation_steps=K, cpu=True), without, batches, clip=CLIP)
    net = W.mlp()
    ref = GradientNoiseScale(net, method="microbatch")
    W.plain_loop(net, batches, K, clip=CLIP, gns=ref)
    for a, b, c in zip(with_helper.parameters(), without.parameters(), net.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)  # inert, and the loop is the accelerator's
    assert ns_acc.gns.steps == ref.steps == STEPS and ns_acc.gns.measured == STEPS
    assert ref.b_simple is not None and rel(ns_acc.gns.b_simple, ref.b_simple) < 1e-6
    for r1, r2 in zip(ns_acc.gns.history, ref.history):
        assert rel(r1["g2_step"], r2["g2_step"]) < 1e-6 and rel(r1["trace_sigma_step"], r2["trace_sigma_step"]) < 1e-6
    ns_acc.close()


def test_logs_through_accelerator_log():
    logged = []

    class Spy(Accelerator):
        def log(self, values, step=None, log_kwargs=None):
            logged.append((step, dict(values)))

    acc = Spy(gradient_accumulation_steps=K, cpu=True)
    ns_acc = W.accelerate_loop(acc, W.mlp(), _batches(), helper_opts={"method": "microbatch", "log_every": 5})
    assert [s for s, _ in logged] == [5, 10]
    assert rel(logged[-1][1]["gns/b_simple"], ns_acc.gns.b_simple) < 1e-12
    ns_acc.close()


def test_resume_with_save_state_continues_exactly(tmp_path):
    batches = _batches()
    full = W.accelerate_loop(
        Accelerator(gradient_accumulation_steps=K, cpu=True), W.mlp(), batches, helper_opts={"method": "microbatch"}
    )

    acc1 = Accelerator(gradient_accumulation_steps=K, cpu=True)
    net = W.mlp()
    first = W.accelerate_loop(acc1, net, batches[: K * 5], helper_opts={"method": "microbatch"})
    acc1.save_state(str(tmp_path / "ckpt"))
    first.close()

    acc2 = Accelerator(gradient_accumulation_steps=K, cpu=True)
    net2 = W.mlp()
    opt = torch.optim.SGD(net2.parameters(), lr=0.1)
    net2, opt = acc2.prepare(net2, opt)
    second = AcceleratedNoiseScale(acc2, net2, opt, method="microbatch")
    acc2.load_state(str(tmp_path / "ckpt"))
    assert second.gns.steps == 5
    for x, y in batches[K * 5 :]:
        with acc2.accumulate(net2):
            acc2.backward(torch.nn.functional.cross_entropy(net2(x), y))
            second.step()
            opt.step()
            opt.zero_grad()
    assert second.gns.steps == full.gns.steps == STEPS
    assert rel(second.gns.b_simple, full.gns.b_simple) < 1e-9
    full.close()
    second.close()


def test_bad_input_is_one_clear_error():
    with pytest.raises(TypeError, match="Accelerator"):
        AcceleratedNoiseScale(object(), W.mlp())
    acc = Accelerator(gradient_accumulation_steps=2, cpu=True)
    with pytest.raises(ValueError, match="needs the optimizer"):
        AcceleratedNoiseScale(acc, W.mlp(), controller={"micro_batch_size": 8, "max_batch_size": 64})
    ns_acc = AcceleratedNoiseScale(acc, W.mlp(), checkpoint=False)
    with pytest.raises(ValueError, match="not a state saved"):
        ns_acc.load_state_dict({"format": "x"})
    ns_acc.close()


def test_ddp_two_processes_equals_plain_ddp_loop(tmp_path):
    cfg = dict(k=3, m=6, steps=6, seed=5, clip=CLIP)
    per_rank = run_workers(tmp_path, "accelerate_ddp", cfg)
    for r in per_rank:
        assert r["method"] == "ddp"
        assert all(torch.equal(a, b) for a, b in zip(r["params"], r["params_helper"]))  # inert under DDP
        assert all(torch.equal(a, b) for a, b in zip(r["params"], r["plain_params"]))
        assert r["plain_b_simple"] is not None and rel(r["b_simple"], r["plain_b_simple"]) < 1e-6
        assert all(rel(a, b) < 1e-6 for a, b in zip(r["history"], r["plain_history"]))
    assert per_rank[0]["b_simple"] == per_rank[1]["b_simple"]


def test_controller_sets_gradient_accumulation_steps():
    """The helper's controller changes the accelerator's accumulation between steps; the run equals a plain
    loop driven by its own BatchSizeController on the same micro-batch stream (same decisions, same rates)."""
    from noisescale.controller import BatchSizeController

    X, y = W.problem(M * 8 * 24, seed=1)
    stream = [(X[i : i + M], y[i : i + M]) for i in range(0, len(y), M)]
    ctl_opts = dict(micro_batch_size=M, max_batch_size=8 * M, patience=2, every=1, lr_rule="linear")
    acc = Accelerator(gradient_accumulation_steps=2, cpu=True)
    net = W.mlp()
    ns_acc = W.accelerate_loop(
        acc, net, stream, clip=CLIP, helper_opts={"method": "microbatch", "controller": ctl_opts}
    )
    parts = [int(r["parts"]) for r in ns_acc.gns.history]
    assert (
        ns_acc.controller.changes
        and max(parts) > 2
        and acc.gradient_accumulation_steps == ns_acc.controller.accumulation
    )

    ref_net = W.mlp()
    opt = torch.optim.SGD(ref_net.parameters(), lr=0.1)
    ref = GradientNoiseScale(ref_net, method="microbatch")
    ctl = BatchSizeController(ref, opt, batch_size=2 * M, world_size=1, **ctl_opts)
    i, ref_parts = 0, []
    while i + ctl.accumulation <= len(stream):
        a = ctl.accumulation
        for x, t in stream[i : i + a]:
            (torch.nn.functional.cross_entropy(ref_net(x), t) / a).backward()
        i += a
        ref_parts.append(a)
        torch.nn.utils.clip_grad_norm_(ref_net.parameters(), CLIP)
        ref.step()
        opt.step()
        opt.zero_grad()
        ctl.step()
    assert parts == ref_parts
    assert [c["batch_size"] for c in ns_acc.controller.changes] == [c["batch_size"] for c in ctl.changes]
    for p, q in zip(net.parameters(), ref_net.parameters()):
        assert torch.equal(p, q)
    assert rel(ns_acc.gns.b_simple, ref.b_simple) < 1e-6
    ns_acc.close()


def test_controller_resumes_with_load_state(tmp_path):
    X, y = W.problem(M * 8 * 24, seed=1)
    stream = [(X[i : i + M], y[i : i + M]) for i in range(0, len(y), M)]
    opts = {"method": "microbatch", "controller": dict(micro_batch_size=M, max_batch_size=8 * M, patience=2, every=1)}
    full = W.accelerate_loop(Accelerator(gradient_accumulation_steps=2, cpu=True), W.mlp(), stream, helper_opts=opts)

    acc1 = Accelerator(gradient_accumulation_steps=2, cpu=True)
    first = W.accelerate_loop(acc1, W.mlp(), stream[:60], helper_opts=opts)
    done = sum(int(r["parts"]) for r in first.gns.history)  # micro-batches of the completed steps
    assert first.controller.changes and done <= 60
    acc1.save_state(str(tmp_path / "ckpt"))
    first.close()

    acc2 = Accelerator(gradient_accumulation_steps=2, cpu=True)
    net = W.mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net, opt = acc2.prepare(net, opt)
    second = AcceleratedNoiseScale(acc2, net, opt, **opts)
    acc2.load_state(str(tmp_path / "ckpt"))  # the model, optimizer and the helper (tracker + controller)
    assert acc2.gradient_accumulation_steps == first.controller.accumulation > 2
    W.accelerate_loop(acc2, net, stream[done:], ns_acc=second, prepared=opt)
    assert second.gns.steps == full.gns.steps
    assert second.controller.changes == full.controller.changes
    assert rel(second.gns.b_simple, full.gns.b_simple) < 1e-9
    full.close()
    second.close()
