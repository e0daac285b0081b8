"""Lightning: NoiseScaleCallback equals a hand-written loop, changes nothing, logs, checkpoints and runs DDP."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch

pytest.importorskip("lightning")

import integration_workers as W
from integration_workers import rel, run_workers
from noisescale import GradientNoiseScale
from noisescale.integrations.lightning import NoiseScaleCallback

K, M, STEPS, CLIP = 4, 8, 10, 0.5


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|LeafSpec).*")
        yield


def _data(steps: int = STEPS, seed: int = 0):
    return W.problem(K * M * steps, seed=seed)


def _fit(cb, X, y, steps=STEPS, k=K, call_forward=False, **kw):
    module = W.lightning_module(call_forward=call_forward)
    trainer = W.lightning_trainer([cb] if cb else [], max_steps=steps, accumulate_grad_batches=k, **kw)
    trainer.fit(module, W.loader(X, y, M))
    return module, trainer


def _plain(X, y, steps=STEPS, clip=CLIP, k=K, **opts):
    net = W.mlp()
    gns = GradientNoiseScale(net, **opts)
    batches = [(X[i : i + M], y[i : i + M]) for i in range(0, k * M * steps, M)]
    W.plain_loop(net, batches, k, clip=clip, gns=gns)
    return net, gns


# (callback's method, the loop's, micro-batches per step, training_step calls self(x)): "auto" on one
# device with accumulation measures the trainer's micro-batches; without accumulation, per-example norms
CASES = [("auto", "microbatch", K, False), ("auto", "per_example", 1, True)]


@pytest.mark.parametrize("method,ref_method,k,call_forward", CASES)
def test_equals_plain_loop_with_clipping_and_accumulation_and_is_inert(method, ref_method, k, call_forward, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    X, y = _data()
    cb = NoiseScaleCallback(method=method)  # logs at the trainer's log_every_n_steps
    with_cb, _ = _fit(
        cb,
        X,
        y,
        k=k,
        call_forward=call_forward,
        gradient_clip_val=CLIP,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=3,
    )
    without, _ = _fit(None, X, y, k=k, call_forward=call_forward, gradient_clip_val=CLIP)
    net, ref = _plain(X, y, k=k, method=ref_method)
    # inert: the trained parameters are bit-identical with and without the callback, and equal the loop's
    for a, b, c in zip(with_cb.net.parameters(), without.net.parameters(), net.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert cb.gns is not None and cb.gns.method == ref.method
    assert cb.gns.steps == STEPS and cb.gns.measured == ref.measured == STEPS
    assert ref.b_simple is not None and rel(cb.gns.b_simple, ref.b_simple) < 1e-6
    for r1, r2 in zip(cb.gns.history, ref.history):
        assert rel(r1["g2_step"], r2["g2_step"]) < 1e-6 and rel(r1["trace_sigma_step"], r2["trace_sigma_step"]) < 1e-6
    _check_csv_log(tmp_path, cb)


def _check_csv_log(tmp_path, cb):
    """gns/* reached the trainer's CSV logger at steps 3, 6, 9 of 10 (the trainer's cadence), each the
    tracker's value after that step."""
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("gns/b_simple")]
    assert [int(float(r["gns/steps"])) for r in logged] == [3, 6, 9]
    hist = list(cb.gns.history)
    for r in logged:
        want = hist[int(float(r["gns/steps"])) - 1]["b_simple"]
        got = float(r["gns/b_simple"])
        assert (want is None and got != got) or rel(got, want) < 1e-6
    assert {"gns/g2", "gns/trace_sigma", "gns/b_simple_low", "gns/examples"} <= set(rows[0])


def test_clipping_is_active_so_the_equality_tests_it():
    # the clipped run differs from the unclipped one: the test above compares runs where clipping acted
    X, y = _data()
    clipped, _ = _plain(X, y, clip=CLIP, method="microbatch")
    free, _ = _plain(X, y, clip=None, method="microbatch")
    assert not all(torch.equal(a, b) for a, b in zip(clipped.parameters(), free.parameters()))


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    # an epoch is 5 steps (the loader restarts at an epoch boundary, so resumed data equals uninterrupted)
    X, y = _data(steps=5)
    full = NoiseScaleCallback(method="microbatch", log_every_n_steps=0)
    _fit(full, X, y, steps=-1, max_epochs=2, gradient_clip_val=CLIP)

    first = NoiseScaleCallback(method="microbatch", log_every_n_steps=0)
    _, trainer = _fit(first, X, y, steps=-1, max_epochs=1, gradient_clip_val=CLIP)
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)  # numbers only
    assert any("NoiseScaleCallback" in k for k in saved["callbacks"])

    second = NoiseScaleCallback(method="microbatch", log_every_n_steps=0)
    module = W.lightning_module()
    t2 = W.lightning_trainer([second], max_epochs=2, accumulate_grad_batches=K, gradient_clip_val=CLIP)
    t2.fit(module, W.loader(X, y, M), ckpt_path=ckpt)
    assert second.gns.steps == full.gns.steps == 10
    assert rel(second.gns.b_simple, full.gns.b_simple) < 1e-9
    assert second.gns.state_dict() == full.gns.state_dict()


def test_per_example_without_the_module_forward_says_so():
    X, y = _data()
    cb = NoiseScaleCallback(log_every_n_steps=0)  # auto, no accumulation: per-example norms
    with pytest.warns(UserWarning, match="training_step did not call"):
        _fit(cb, X, y, steps=2, k=1)


def test_bad_options_are_one_clear_error():
    with pytest.raises(ValueError, match="log_every_n_steps"):
        NoiseScaleCallback(log_every_n_steps=-2)
    with pytest.raises(TypeError, match="size_fn"):
        NoiseScaleCallback(size_fn=3)
    with pytest.raises(ValueError, match="not a state saved by this callback"):
        NoiseScaleCallback().load_state_dict({"format": "other"})


def test_size_fn_in_tokens_is_used():
    X, y = _data()
    cb = NoiseScaleCallback(method="microbatch", unit="tokens", size_fn=lambda b: 3 * len(b[0]), log_every_n_steps=0)
    _fit(cb, X, y)
    assert cb.gns.examples == 3 * K * M * STEPS and cb.gns.unit == "tokens"


# -- DDP: two gloo processes created by the test, Lightning's DDP strategy inside them --------------


def test_ddp_two_processes_equals_plain_ddp_loop(tmp_path):
    cfg = dict(k=3, m=6, steps=6, seed=3, clip=CLIP)
    per_rank = run_workers(tmp_path, "lightning_ddp", cfg)
    for r in per_rank:
        assert r["method"] == "ddp"
        assert all(torch.equal(a, b) for a, b in zip(r["params"], r["params_cb"]))  # inert under DDP
        assert all(torch.equal(a, b) for a, b in zip(r["params"], r["plain_params"]))
        assert r["plain_b_simple"] is not None and rel(r["b_simple"], r["plain_b_simple"]) < 1e-6
        assert all(rel(a, b) < 1e-6 for a, b in zip(r["history"], r["plain_history"]))
    assert per_rank[0]["b_simple"] == per_rank[1]["b_simple"]


# -- the batch-size controller through accumulate_grad_batches ------------------------------------


class _LRSpy:
    """Records the learning rate each optimizer step really uses (its pre-hook runs after the controller's)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def attach(self, optimizer) -> None:
        optimizer.register_step_pre_hook(lambda opt, a, k: self.lrs.append(opt.param_groups[0]["lr"]))


def test_controller_changes_accumulation_on_whole_steps():
    from lightning.pytorch.callbacks import Callback

    spy = _LRSpy()

    class Spy(Callback):
        def on_train_start(self, trainer, pl_module):
            spy.attach(trainer.optimizers[0])

    steps = 24
    X, y = W.problem(M * 8 * steps, seed=1)
    cb = NoiseScaleCallback(
        method="microbatch",
        log_every_n_steps=0,
        controller=dict(max_batch_size=8 * M, patience=2, every=1, lr_rule="linear"),
    )
    module = W.lightning_module()
    trainer = W.lightning_trainer([cb, Spy()], max_steps=steps, accumulate_grad_batches=2, gradient_clip_val=CLIP)
    trainer.fit(module, W.loader(X, y, M))
    parts = [int(r["parts"]) for r in cb.gns.history]
    assert len(parts) == steps == len(spy.lrs)
    assert cb.controller.changes and trainer.accumulate_grad_batches > 2 and max(parts) > 2  # the batch grew
    # each step used the learning rate of the batch it really had (linear rule: lr x batch / first batch)
    for a, lr in zip(parts, spy.lrs):
        assert lr == pytest.approx(0.1 * a / 2, rel=1e-12)
    # every step had a whole accumulation of fresh micro-batches: a loop that replays the accumulations
    # and learning rates seen ends at the same parameters and the same estimate
    net = W.mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ref = GradientNoiseScale(net, method="microbatch")
    i = 0
    for a, lr in zip(parts, spy.lrs):
        for _ in range(a):
            (torch.nn.functional.cross_entropy(net(X[i : i + M]), y[i : i + M]) / a).backward()
            i += M
        torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)
        ref.step()
        opt.param_groups[0]["lr"] = lr
        opt.step()
        opt.zero_grad()
    for p, q in zip(module.net.parameters(), net.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)
    assert rel(cb.gns.b_simple, ref.b_simple) < 1e-6
    # the accumulation only changes at a multiple of itself within the epoch (Lightning zeroes and steps there)
    done = 0
    for a in parts:
        assert done % a == 0
        done += a


def test_controller_resumes_from_checkpoint(tmp_path):
    # epochs of 48 micro-batches; the controller grows the batch during the first; resuming at the epoch
    # boundary restores its accumulation (and learning-rate scale) and continues as the uninterrupted run
    X, y = W.problem(M * 48, seed=2)
    ctl = dict(max_batch_size=8 * M, patience=2, every=1, lr_rule="linear")

    def fit(epochs, ckpt=None, save=None):
        cb = NoiseScaleCallback(method="microbatch", log_every_n_steps=0, controller=ctl)
        module = W.lightning_module()
        trainer = W.lightning_trainer([cb], max_epochs=epochs, accumulate_grad_batches=2, gradient_clip_val=CLIP)
        trainer.fit(module, W.loader(X, y, M), ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return cb, module, trainer

    full, full_module, full_trainer = fit(2)
    first, _, _ = fit(1, save=tmp_path / "e1.ckpt")
    assert first.controller.changes  # the batch grew in the first epoch
    torch.load(tmp_path / "e1.ckpt", weights_only=True)  # numbers only
    second, module, trainer = fit(2, ckpt=tmp_path / "e1.ckpt")
    assert trainer.accumulate_grad_batches == full_trainer.accumulate_grad_batches > 2
    assert second.controller.changes == full.controller.changes
    # (the history in memory holds the steps run since the resume)
    resumed = [r["parts"] for r in second.gns.history]
    assert resumed == [r["parts"] for r in full.gns.history][-len(resumed) :]
    assert second.gns.steps == full.gns.steps
    for p, q in zip(module.parameters(), full_module.parameters()):
        assert torch.equal(p, q)
    assert rel(second.gns.b_simple, full.gns.b_simple) < 1e-9
