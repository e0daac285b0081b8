"""The signal study (benchmarks/signal_study.py): its --quick run and its pure helpers.

The quick run checks the machinery end to end on both tasks (tiny sizes, so the numbers are not
the study's); the helpers are checked against slow references (SciPy's Spearman, enumeration by
hand, per-layer App. A.1 estimates from explicit per-micro-batch gradients).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

import noisescale as ns
from noisescale.measure import split_batch

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def study():
    path = os.path.join(HERE, "..", "benchmarks", "signal_study.py")
    spec = importlib.util.spec_from_file_location("signal_study", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their annotations through the module
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def _load(path):
    with open(path) as f:
        return json.loads(f.read(), parse_constant=float)


def _num(v):
    return float(v) if isinstance(v, str) else v


def test_quick_study_output(study, tmp_path, shakespeare_path, monkeypatch):
    monkeypatch.setattr(study, "SHAKESPEARE", study.Path(shakespeare_path))
    fig = tmp_path / "fig.png"
    assert study.main(["--quick", "--out", str(tmp_path), "--figure", str(fig), "--quiet"]) == 0
    summary = _load(tmp_path / "summary.json")
    rows = summary["rows"]
    quick = study.configs(True)
    for task in ("digits", "char"):
        steps = sorted(r["step"] for r in rows if r["task"] == task)
        assert steps == list(quick[task].checkpoints)
    defined = 0
    for r in rows:
        for col in (*study.SIGNALS, "b_branch"):
            e = r[col]
            assert set(e) >= {"value", "low", "high"}, (r["task"], r["step"], col)
            if e["value"] is None:  # undefined: it says why
                assert e.get("reason"), (r["task"], r["step"], col)
                continue
            defined += 1
            lo, v, hi = _num(e["low"]), e["value"], _num(e["high"])
            if lo is not None and hi is not None:
                assert lo <= v * (1 + 1e-12) and v <= hi * (1 + 1e-12), (r["task"], r["step"], col, lo, v, hi)
        # the same reasons every time: SGD has no preconditioner, the MLP no normalisation layer
        if r["task"] == "digits":
            assert r["b_simple_pre"]["value"] is None and "SGD" in r["b_simple_pre"]["reason"]
            assert r["b_simple_norm"]["value"] is None and "normalisation" in r["b_simple_norm"]["reason"]
        else:
            assert r["b_simple_norm"]["value"] is not None
        # branch losses: one per k, and the branched value is Merrill's geometric mean of b* and the next batch
        b = r["b_branch"]
        assert len(b["losses"]) == len(quick[r["task"]].ks)
        for mean, seeds in zip(b["losses"], b["seed_losses"]):  # the mean over seeds, or inf if one diverged
            seeds = [_num(v) for v in seeds]
            assert len(seeds) == len(quick[r["task"]].seeds)
            if all(map(math.isfinite, seeds)):
                assert math.isclose(_num(mean), sum(seeds) / len(seeds))
            else:
                assert _num(mean) == math.inf
        if b["value"] is not None:
            i = b["batch_sizes"].index(b["b_star"])
            assert math.isclose(b["value"], math.sqrt(b["b_star"] * b["batch_sizes"][i + 1]))
        # the layer spread is max/min of the per-layer values (layers with a positive estimate)
        layer = [v for v in r["layers"].values() if v is not None and v > 0]
        if r["layer_spread"]["value"] is not None:
            assert math.isclose(r["layer_spread"]["value"], max(layer) / min(layer), rel_tol=1e-9)
            assert math.isclose(r["b_layer_max"]["value"], max(layer), rel_tol=1e-9)
    assert defined >= 20
    n_rho = 0
    for a in summary["analysis"].values():
        for c in a["correlations"].values():
            if c["rho"] is not None:
                n_rho += 1
                assert -1.0 <= c["rho"] <= 1.0 and 0.0 < c["p_exact"] <= 1.0
                assert c["n"] >= 3 and len(c["points"]) == c["n"]
        for tr in a["table1"].values():
            fit = tr["b_crit"]
            for v in tr["signals"].values():
                if v["ratio"] is not None:
                    assert math.isclose(v["ratio"], v["average"] / fit["b_crit"])
                    # the ratio's interval is b_crit's, inverted (the fit's own interval is reported as is)
                    lo, hi = fit["low"], _num(fit["high"])
                    assert math.isclose(v["ratio_low"], v["average"] / hi if hi else 0.0)
                    assert math.isclose(_num(v["ratio_high"]), v["average"] / lo if lo else math.inf)
    assert n_rho >= 3  # digits has 4 checkpoints with a defined branched value and B_simple
    table = (tmp_path / "table.md").read_text()
    assert "Spearman" in table and "b_crit" in table and "runtime" in table
    assert fig.stat().st_size > 10_000 and (tmp_path / "signal-study.png").exists()

    # a rerun finds every checkpoint in the results and measures nothing again
    lines = (tmp_path / "checkpoints.jsonl").read_text().splitlines()
    assert study.main(["--quick", "--tasks", "digits", "--no-sweep", "--out", str(tmp_path), "--quiet"]) == 0
    assert (tmp_path / "checkpoints.jsonl").read_text().splitlines() == lines


def test_spearman_against_scipy(study):
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (3, 5, 7):
        for _ in range(20):
            x, y = rng.normal(size=n), rng.normal(size=n)
            y[0] = y[-1]  # a tie
            assert math.isclose(study.spearman(x, y), stats.spearmanr(x, y).statistic, abs_tol=1e-12)
    assert study.spearman([1, 2, 3], [5, 5, 5]) is None


def test_spearman_exact_p_by_enumeration(study):
    # a perfectly monotone pair of 5: only the identity and the reversal reach |rho| = 1
    assert math.isclose(study.spearman_exact_p([1, 2, 3, 4, 5], [10, 20, 30, 40, 50]), 2 / 120)
    # rho = 0.9 for one adjacent swap; |rho| >= 0.9 also for the 8 orders within one adjacent swap of either end
    x, y = [1, 2, 3, 4, 5], [1, 2, 3, 5, 4]
    rho = study.spearman(x, y)
    assert math.isclose(rho, 0.9)
    import itertools

    count = sum(abs(study.spearman(x, p)) >= rho - 1e-12 for p in itertools.permutations(y))
    assert math.isclose(study.spearman_exact_p(x, y), count / 120) and count == 10


def test_step_average_and_percentiles(study):
    assert math.isclose(study.step_average([0, 10, 30], [1.0, 3.0, 3.0]), (20 + 60) / 30)
    lo, hi = study.percentile_interval([1.0] * 50 + [math.inf] * 50)
    assert lo == 1.0 and hi == math.inf


def test_per_draw_layer_statistics_match_explicit_gradients(study):
    """The per-draw, per-layer (g2, tr Sigma) recovered from a beta = 1 tracker's running means equal
    App. A.1's estimates from explicitly computed micro-batch gradients, layer by layer."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    X, y = torch.randn(40, 5), torch.randint(0, 3, (40,))

    def loss(m, b):
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(6):
        idx = torch.randint(0, 40, (16,), generator=gen)
        batches.append((X[idx], y[idx]))
    gns = ns.GradientNoiseScale(model, "microbatch", beta=1.0, robust=False, groups="layers")
    for b in batches:
        for part in split_batch(b, 4):
            (loss(model, part) / 4).backward()
        gns.step()
        model.zero_grad(set_to_none=True)
    names, g2, ts = study._draw_stats(gns)
    gns.close()
    assert names == ["0", "2"]
    for n, b in enumerate(batches):
        grads = [torch.autograd.grad(loss(model, part), list(model.parameters())) for part in split_batch(b, 4)]
        for j, layer in enumerate((slice(0, 2), slice(2, 4))):
            small = [sum(float(t.square().sum()) for t in g[layer]) for g in grads]
            big = sum(float((sum(g[i] for g in grads) / 4).square().sum()) for i in range(layer.start, layer.stop))
            ref_g2, ref_ts = ns.estimate(sum(small) / 4, 4.0, big, 16.0)
            assert math.isclose(g2[n, j], ref_g2, rel_tol=1e-6, abs_tol=1e-12)
            assert math.isclose(ts[n, j], ref_ts, rel_tol=1e-6, abs_tol=1e-12)
