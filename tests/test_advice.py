"""Advice without control: the paper's cost ratios at the batch in use (noisescale.advice)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import noisescale as ns
from noisescale.advice import advice


def test_cost_ratios_are_the_papers_hyperbola():
    for B, bc in [(50.0, 100.0), (100.0, 100.0), (4096.0, 37.0), (1.0, 1e6)]:
        a = advice(bc, B)
        # S(B) = S_min (1 + B_crit/B), E(B) = E_min (1 + B/B_crit) (Eq. 2.11 solved at fixed B) ...
        assert a.steps_ratio == pytest.approx(1 + bc / B, rel=1e-15)
        assert a.examples_ratio == pytest.approx(1 + B / bc, rel=1e-15)
        # ... which lie on (S/S_min - 1)(E/E_min - 1) = 1, with E = B S
        assert (a.steps_ratio - 1) * (a.examples_ratio - 1) == pytest.approx(1.0, rel=1e-9)
        assert a.recommended == bc and not a.beyond_dataset
    at_crit = advice(100.0, 100.0)
    assert at_crit.steps_ratio == at_crit.examples_ratio == 2.0  # twice the minimum of both at B = B_crit
    assert advice(100.0, 100.0, factor=2.0).recommended == 200.0


def test_the_interval_carries_into_both_ratios():
    a = advice(100.0, 50.0, interval=(80.0, 130.0))
    assert a.steps_ratio_interval == pytest.approx((1 + 80 / 50, 1 + 130 / 50))
    assert a.examples_ratio_interval == pytest.approx((1 + 50 / 130, 1 + 50 / 80))
    lo, hi = a.steps_ratio_interval
    assert lo < a.steps_ratio < hi
    unbounded = advice(100.0, 50.0, interval=(0.0, math.inf))
    assert unbounded.steps_ratio_interval == (1.0, math.inf) and unbounded.examples_ratio_interval == (1.0, math.inf)
    assert "[1, inf]" in unbounded.line()


def test_dataset_size_and_undefined():
    a = advice(5000.0, 64.0, dataset_size=1797)
    assert a.beyond_dataset and "beyond the dataset size 1797" in a.line()
    assert not advice(500.0, 64.0, dataset_size=1797).beyond_dataset
    none = advice(None, 64.0, reason="no step measured yet")
    assert none.steps_ratio is None and none.line() == "advice: none yet (no step measured yet)"
    with pytest.raises(ValueError, match="batch_size must be a finite positive number, got 0"):
        advice(100.0, 0)
    with pytest.raises(ValueError, match="dataset_size must be a finite positive number"):
        advice(100.0, 10.0, dataset_size=-3)


def test_tracker_advice_and_summary_line():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    X = torch.randn(512, 8)
    y = (X @ torch.randn(8, 3)).argmax(1)  # a learnable task: |G|^2 is resolved
    gns = ns.GradientNoiseScale(model, method="microbatch")
    assert "no step() recorded yet" in gns.advice().reason
    assert "\n" not in gns.summary()  # no advice line while nothing is measured
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for t in range(40):
        k = 2 if t < 20 else 4  # the batch in use changes: the advice follows the last step's
        for _ in range(k):
            idx = torch.randint(0, 512, (8,), generator=gen)
            (F.cross_entropy(model(X[idx]), y[idx]) / k).backward()
        gns.step()
        opt.step()
        opt.zero_grad()
    a = gns.advice()
    b, iv = gns.b_simple, gns.interval(0.95)
    assert b is not None and a.batch_size == 32 and a.noise_scale == b and a.interval == iv
    assert a.steps_ratio == pytest.approx(1 + b / 32) and a.examples_ratio == pytest.approx(1 + 32 / b)
    assert gns.advice(batch_size=64).steps_ratio == pytest.approx(1 + b / 64)
    first, second = gns.summary().split("\n")
    assert first.startswith("B_simple = ") and second == a.line() and "at B = 32 examples" in second
    gns.close()


def test_plot_draws_the_batch_used_and_flags_the_dataset_size(tmp_path):
    """The run log's examples give each step's batch; the plot draws it on the B_simple panel."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from noisescale.cli import main
    from noisescale.plot import batch_used, plot_b_simple

    torch.manual_seed(0)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    X = torch.randn(512, 8)
    y = (X @ torch.randn(8, 3)).argmax(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    log = tmp_path / "run.jsonl"
    gns = ns.GradientNoiseScale(model, method="microbatch", log=log)
    ctl = ns.BatchSizeController(gns, opt, batch_size=16, micro_batch_size=8, max_batch_size=128, patience=10, every=5)
    gen = torch.Generator().manual_seed(0)
    used = []
    for _ in range(80):
        used.append(ctl.batch_size)
        for _ in range(ctl.accumulation):
            idx = torch.randint(0, 512, (8,), generator=gen)
            (F.cross_entropy(model(X[idx]), y[idx]) / ctl.accumulation).backward()
        gns.step()
        opt.step()
        opt.zero_grad()
        ctl.step()
    gns.close()
    torch.set_num_threads(n_threads)
    assert len(set(used)) >= 2, "the batch must change for this test to mean anything"
    run = ns.read_run_log(log)
    assert batch_used(run) == used
    small = min(r["b_simple"] for r in run.records if r.get("b_simple")) * 1.01  # some estimates lie above it
    fig, ax = plot_b_simple(run, dataset_size=small)
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines["batch used"].get_ydata()) == used
    assert "beyond the dataset size" in [c.get_label() for c in ax.collections]
    plt.close(fig)
    png = tmp_path / "f.png"
    assert main(["plot", str(log), "-o", str(png), "--dataset-size", f"{small}"]) == 0 and png.stat().st_size > 0
    assert main(["plot", str(log), "--dataset-size", "-1"]) == 2
