"""Examples-indexed schedules: the same learning rate at the same examples seen, whatever the batches."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim import lr_scheduler as S

from noisescale.schedules import ExamplesSchedule


def _opt(lr: float = 0.1, groups: int = 1, kind: str = "sgd") -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr * (i + 1)} for i in range(groups)]
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def _lrs_along(sched: ExamplesSchedule, batches: list[int]) -> dict[float, list[float]]:
    """The schedule's learning rates after each step of the given batch sequence, by examples seen."""
    out = {0.0: sched.lrs()}
    for b in batches:
        sched.step(batch_size=b)
        out[sched.examples] = sched.lrs()
    return out


def warmup_cosine(x: float) -> float:
    """A warm-up of 10 reference steps then a cosine decay to 0 at 100 (Hugging Face's shape)."""
    if x < 10:
        return x / 10
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (x - 10) / 90)))


def test_function_schedule_same_lr_at_same_examples():
    a = _lrs_along(ExamplesSchedule(_opt(groups=2), warmup_cosine, reference_batch_size=32), [32] * 100)
    growing = [32] * 5 + [64] * 5 + [128] * 5 + [256] * 6
    b = _lrs_along(ExamplesSchedule(_opt(groups=2), warmup_cosine, reference_batch_size=32), growing)
    common = sorted(set(a) & set(b))
    assert len(common) == 22 and max(common) == 2656  # every step of the growing run
    for x in common:
        assert a[x] == b[x]  # bit-identical: a function of examples only
        ref = [0.1 * g * warmup_cosine(x / 32) for g in (1, 2)]
        assert a[x] == pytest.approx(ref, rel=1e-15)
    # the warm-up is counted in examples: 288 examples are 9 of its 10 reference steps at any batch
    assert b[288.0] == pytest.approx([0.09, 0.18], rel=1e-15)


def _warm_cos(opt: torch.optim.Optimizer) -> S.LRScheduler:
    return S.SequentialLR(
        opt, [S.LinearLR(opt, 0.1, 1.0, total_iters=10), S.CosineAnnealingLR(opt, T_max=60, eta_min=1e-3)], [10]
    )


@pytest.mark.parametrize(
    "make",
    [_warm_cos, lambda o: S.ExponentialLR(o, 0.97), lambda o: S.StepLR(o, 7, 0.5), lambda o: S.OneCycleLR(o, 1.0, 80)],
)
def test_any_torch_scheduler_indexed_by_examples(make):
    ref_opt = _opt()
    ref = make(ref_opt)
    expected = [ref_opt.param_groups[0]["lr"]]  # a plain scheduler stepped once per 32 examples
    for _ in range(70):
        ref_opt.step()
        ref.step()
        expected.append(ref_opt.param_groups[0]["lr"])
    for batches in ([32] * 70, [32] * 4 + [64] * 3 + [128] * 4 + [256] * 3 + [96] * 3):
        opt = _opt()
        sched = ExamplesSchedule.from_scheduler(opt, make, reference_batch_size=32)
        seen = _lrs_along(sched, batches)
        for x, lrs in seen.items():
            assert lrs[0] == expected[int(x // 32)], (batches[:3], x)


def test_one_cycle_momentum_is_mirrored_too():
    opt = _opt()
    sched = ExamplesSchedule.from_scheduler(opt, lambda o: S.OneCycleLR(o, 1.0, 50), reference_batch_size=10)
    m0 = opt.param_groups[0]["momentum"]
    sched.step(examples=200)
    assert opt.param_groups[0]["momentum"] == sched._shadow.param_groups[0]["momentum"] != m0


def test_state_dict_resumes_exactly():
    def run(split: int | None) -> list[float]:
        opt = _opt()
        sched = ExamplesSchedule.from_scheduler(opt, _warm_cos, reference_batch_size=32)
        lrs = []
        batches = [32, 64, 64, 128, 32, 256, 256, 64] * 4
        for i, b in enumerate(batches):
            if i == split:
                sd = sched.state_dict()
                torch.save(sd, "/dev/null")  # numbers only
                opt = _opt()
                sched = ExamplesSchedule.from_scheduler(opt, _warm_cos, reference_batch_size=32)
                sched.load_state_dict(sd)
            sched.step(batch_size=b)
            lrs.append(opt.param_groups[0]["lr"])
        return lrs

    assert run(None) == run(13)


def test_bad_input_is_one_clear_error():
    opt = _opt()
    sched = ExamplesSchedule(opt, lambda x: 1.0)
    sched.step(examples=100)
    with pytest.raises(ValueError, match="cannot go back"):
        sched.step(examples=50)
    with pytest.raises(ValueError, match="exactly one of"):
        sched.step()
    with pytest.raises(ValueError, match="reference_batch_size must be a finite positive"):
        ExamplesSchedule(opt, lambda x: 1.0, reference_batch_size=0)
    with pytest.raises(ValueError, match="one callable per param group"):
        ExamplesSchedule(opt, [lambda x: 1.0, lambda x: 1.0])
    with pytest.raises(ValueError, match="gave nan"):
        ExamplesSchedule(opt, lambda x: math.nan)
    with pytest.raises(ValueError, match="on the optimizer it is passed"):
        ExamplesSchedule.from_scheduler(opt, lambda o: S.StepLR(_opt(), 3), reference_batch_size=8)
    with pytest.raises(ValueError, match="not an ExamplesSchedule state_dict"):
        sched.load_state_dict({})
