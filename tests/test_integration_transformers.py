"""Hugging Face Trainer: NoiseScaleCallback is right despite clipping before the callback, changes nothing,
logs through trainer.log and checkpoints with the trainer's state."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

import integration_workers as W
from noisescale import GradientNoiseScale, estimate
from noisescale.integrations.transformers import NoiseScaleCallback

K = 3  # gradient_accumulation_steps of W.hf_trainer


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("transformers").setLevel(logging.ERROR)
    yield


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _record(model):
    """Every forward call with gradients enabled: the exact keyword inputs the trainer gave the model."""
    calls = []

    def hook(module, args, kwargs):
        if torch.is_grad_enabled():
            calls.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def _train(tmp_path, with_cb: bool, **args):
    model = W.tiny_gpt2()
    init = copy.deepcopy(model)
    calls, h = _record(model)
    trainer = W.hf_trainer(model, str(tmp_path / ("cb" if with_cb else "plain")), W.TokenData(256), **args)
    cb = NoiseScaleCallback(trainer, method="microbatch") if with_cb else None
    trainer.train()
    h.remove()
    return model, init, calls, trainer, cb


def _replay(init, calls, k, clip, gns=None):
    """The trainer's step by hand: its exact inputs, its loss scaling, clip_grad_norm_, SGD. ``k``: the
    micro-batches per step, or a list of each step's count."""
    model = init
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker = GradientNoiseScale(model, method="microbatch", reduction="sum") if gns else None
    per_step = []  # (per-micro-batch gradients, step gradient before clipping)
    counts = k if isinstance(k, list) else [k] * (len(calls) // k)
    starts = [sum(counts[:s]) for s in range(len(counts))]
    for start, k in zip(starts, counts):
        parts = []
        for kw in calls[start : start + k]:
            loss = model(**kw).loss
            if kw.get("num_items_in_batch") is None:
                loss = loss / k
            before = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
            loss.backward()
            parts.append(torch.cat([(p.grad - b).reshape(-1) for p, b in zip(model.parameters(), before)]))
        total = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if tracker is not None:
            tracker.step()
        per_step.append((parts, total))
        opt.step()
        model.zero_grad()
    return model, tracker, per_step


@pytest.fixture(scope="module")
def cb_run(tmp_path_factory):
    """One training run with the callback (max_grad_norm=1.0, gradient_accumulation_steps=3), shared."""
    return _train(tmp_path_factory.mktemp("hf"), True)


def test_equals_plain_loop_with_clipping_and_accumulation_and_is_inert(cb_run, tmp_path):
    model_cb, init, calls, _, cb = cb_run
    model_plain, _, calls_plain, _, _ = _train(tmp_path, False)
    assert len(calls) == 8 * K and all(c["input_ids"].shape == (4, W.SEQ) for c in calls)
    # inert: same inputs, bit-identical parameters with and without the callback
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(calls, calls_plain))
    for a, b in zip(model_cb.parameters(), model_plain.parameters()):
        assert torch.equal(a, b)
    replayed, ref, _ = _replay(copy.deepcopy(init), calls, K, clip=1.0, gns=True)
    for a, b in zip(model_cb.parameters(), replayed.parameters()):  # the replay is the trainer's run
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert cb.gns.steps == 8 and cb.gns.measured == 8 and ref.measured == 8
    assert ref.b_simple is not None and rel(cb.gns.b_simple, ref.b_simple) < 1e-6


def test_max_grad_norm_clipping_is_not_measured(cb_run):
    """The callback's per-step |G|^2 and tr(Sigma) are those of the unclipped gradients; a tracker that read
    the clipped .grad in on_pre_optimizer_step (where the trainer calls back after clipping) is far off."""
    _, init, calls, _, cb = cb_run
    _, _, per_step = _replay(copy.deepcopy(init), calls, K, clip=1.0)
    b_small, b_big = 4.0, 4.0 * K
    clipped_steps = 0
    for rec, (parts, total) in zip(cb.gns.history, per_step):
        # "sum" convention: micro-batch j's gradient is its token sum over the step's count, so its own
        # mean gradient is K times it (equal micro-batches)
        sq_small = float(torch.stack([(K * g).double().square().sum() for g in parts]).mean())
        sq_big = float(total.double().square().sum())
        g2, ts = estimate(sq_small, b_small, sq_big, b_big)
        # (the parts here are differences of float32 sums: g2, itself a difference, agrees to ~1e-6)
        assert rel(rec["g2_step"], g2) < 1e-4 and rel(rec["trace_sigma_step"], ts) < 1e-4
        norm = math.sqrt(sq_big)
        if norm > 1.0:  # max_grad_norm=1.0 acted on this step: the clipped norm would give another g2
            clipped_steps += 1
            g2_clipped, _ = estimate(sq_small, b_small, 1.0, b_big)
            assert rel(g2_clipped, g2) > 0.1
    assert clipped_steps >= 4  # the clipping was active on most steps


@pytest.mark.parametrize("told", [True, False])
def test_epoch_tail_with_clipping(tmp_path, monkeypatch, told):
    """An epoch of 8 micro-batches with gradient_accumulation_steps=3 ends with a step of 2, which the
    trainer clips before the callback. The callback tells the tracker each step's count at on_step_begin
    (trainer.current_gradient_accumulation_steps), so the short steps are read at their last pass and
    every step is measured. Without that (told=False), the first short step is skipped with the reason
    and the next is read at its last pass. Every measured step equals the unclipped gradients' estimate."""
    if not told:
        monkeypatch.setattr(NoiseScaleCallback, "on_step_begin", lambda self, *a, **k: None)
    model = W.tiny_gpt2()
    init = copy.deepcopy(model)
    calls, h = _record(model)
    trainer = W.hf_trainer(model, str(tmp_path / "tail"), W.TokenData(32), max_steps=-1, num_train_epochs=2)
    cb = NoiseScaleCallback(trainer, method="microbatch")
    if told:
        trainer.train()
    else:
        with pytest.warns(UserWarning, match="step 3 not measured: a .grad was changed .* 2 passes where 3"):
            trainer.train()
    h.remove()
    counts = [3, 3, 2, 3, 3, 2]
    assert len(calls) == sum(counts) and cb.gns.steps == len(counts)
    _, _, per_step = _replay(copy.deepcopy(init), calls, counts, clip=1.0)
    hist = list(cb.gns.history)
    lost = [] if told else [2]
    assert [i for i, r in enumerate(hist) if r["status"] != "measured"] == lost
    if not told:
        assert "clipping" in hist[2]["reason"]
    for rec, k, (parts, total) in zip(hist, counts, per_step):
        if rec["status"] != "measured":
            continue
        sq_small = float(torch.stack([(k * g).double().square().sum() for g in parts]).mean())
        g2, ts = estimate(sq_small, 4.0, float(total.double().square().sum()), 4.0 * k)
        assert rel(rec["g2_step"], g2) < 1e-4 and rel(rec["trace_sigma_step"], ts) < 1e-4


def test_logs_through_trainer_log(cb_run):
    *_, trainer, cb = cb_run
    logged = [r for r in trainer.state.log_history if "gns/b_simple" in r]
    assert [r["step"] for r in logged] == [2, 4, 6, 8]  # logging_steps=2
    hist = list(cb.gns.history)
    for r in logged:
        want = hist[r["step"] - 1]["b_simple"]
        assert (want is None and math.isnan(r["gns/b_simple"])) or rel(r["gns/b_simple"], want) < 1e-9


def test_resume_from_checkpoint_continues_exactly(cb_run, tmp_path):
    *_, full = cb_run  # 8 steps uninterrupted (saving changes nothing in the training)

    def run(max_steps, resume=None):
        trainer = W.hf_trainer(
            W.tiny_gpt2(),
            str(tmp_path / "part"),
            W.TokenData(256),
            max_steps=max_steps,
            save_strategy="steps",
            save_steps=4,
        )
        cb = NoiseScaleCallback(trainer, method="microbatch")
        trainer.train(resume_from_checkpoint=resume)
        return cb

    run(4)
    ckpt = tmp_path / "part" / "checkpoint-4"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["noisescale"]
    assert saved["tracker"]["counters"]["steps"] == 4
    resumed = run(8, resume=str(ckpt))
    assert resumed.gns.steps == full.gns.steps == 8
    assert rel(resumed.gns.b_simple, full.gns.b_simple) < 1e-9


def test_advice_and_errors(cb_run):
    *_, cb = cb_run
    line = cb.advice()
    assert "gradient_accumulation_steps=" in line and "B_simple" in line and cb.batch_size() == 12
    with pytest.raises(TypeError, match="transformers.Trainer"):
        NoiseScaleCallback(object())
    with pytest.raises(ValueError, match="not a state saved by this callback"):
        cb.load_state_dict({"format": "x"})


def test_ddp_two_processes_equals_plain_ddp_replay(tmp_path):
    from integration_workers import run_workers

    per_rank = run_workers(tmp_path, "hf_ddp", {"steps": 4})
    for r in per_rank:
        assert r["method"] == "ddp"  # the callback attached to the trainer's DDP wrapper
        assert all(torch.equal(a, b) for a, b in zip(r["params"], r["params_cb"]))  # inert under DDP
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(r["params"], r["plain_params"]))
        assert r["plain_b_simple"] is not None and rel(r["b_simple"], r["plain_b_simple"]) < 1e-6
    assert per_rank[0]["b_simple"] == per_rank[1]["b_simple"]
