"""sweeps.py: the sweep runner (observation protocol, budgets, censoring, resume, workers, lr grid)
and the branched local critical batch on a noisy quadratic whose answer is known in closed form."""

from __future__ import annotations

import csv
import math
import time

import numpy as np
import pytest

import noisescale as ns
from noisescale.estimators import eps_central
from noisescale.sweeps import RESULT_FIELDS, RunSpec, local_critical_batch, lr_grid, lr_scaling, read_results, run_one

# ---------------------------------------------------------------------------------------
# Toy training functions (module level: picklable for worker processes).

B_NOISE = 200.0


def model_train(batch_size: int, lr: float, seed: int):
    """Loss exp(-s) where progress per step follows the paper's model (Eq. 2.7 with D.1):
    ds = q(lr) / (1 + B_NOISE/B), q peaking at the best lr for this B. Deterministic.
    The fastest run at each B then takes S(B) = S_min (1 + B_NOISE/B) steps, so b_crit = B_NOISE."""
    best = eps_central(batch_size, 1.0, B_NOISE)
    q = math.exp(-0.5 * math.log(lr / best) ** 2)  # 1 at the best lr, less around it
    s = 0.0
    step = 0
    while True:
        step += 1
        s += 0.01 * q / (1.0 + B_NOISE / batch_size)
        yield math.exp(-s)


CALLS: list[tuple[int, float, int]] = []


def _csv_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def counting_train(batch_size: int, lr: float, seed: int):
    CALLS.append((batch_size, lr, seed))
    yield from model_train(batch_size, lr, seed)


# ---------------------------------------------------------------------------------------
# run_one: the observation protocol.


def test_run_one_records_first_crossing_and_stops():
    seen = []

    def train(b, lr, seed):
        for i, loss in enumerate([1.0, 0.8, 0.55, 0.6, 0.45, 0.3, 0.2, 0.1, 0.05]):
            seen.append(i)
            yield loss

    res = run_one(train, RunSpec(4, 0.1), [0.5, 0.3], max_steps=100)
    assert res.steps == {0.5: 5, 0.3: 6}
    assert res.examples == {0.5: 20.0, 0.3: 24.0}
    assert len(seen) == 6  # the generator is not advanced after the last target
    assert not res.diverged


def test_run_one_dict_and_tuple_observations():
    def train(b, lr, seed):
        yield {"step": 10, "loss": 2.0, "examples": 300, "b_simple": 40.0}
        yield {"step": 20, "loss": 0.4, "examples": 650, "b_simple": 55.0, "tag": "ignored"}

    res = run_one(train, RunSpec(32, 0.1), [0.5], max_steps=1000)
    assert res.steps == {0.5: 20} and res.examples == {0.5: 650.0}
    assert res.metrics == {"b_simple": 55.0}

    res = run_one(lambda b, lr, s: iter([(5, 1.0), (15, 0.2)]), RunSpec(8, 0.1), [0.5], max_steps=1000)
    assert res.steps == {0.5: 15} and res.examples == {0.5: 120.0}


def test_run_one_budget_and_divergence_are_censored():
    res = run_one(model_train, RunSpec(8, 1e-3), [0.01], max_steps=50)
    assert res.steps == {0.01: None} and res.budget_steps == 50
    (rec,) = res.records()
    assert not rec.reached and rec.steps == 50

    def diverging(b, lr, seed):
        yield 1.0
        yield 5.0
        yield float("nan")

    res = run_one(diverging, RunSpec(8, 10.0), [0.5], max_steps=400)
    assert res.diverged and res.budget_steps == 400  # it would never have arrived: censored at the budget
    assert res.records()[0].steps == 400 and not res.records()[0].reached

    res = run_one(model_train, RunSpec(8, 1e-3), [0.01], max_examples=800)
    assert res.budget_steps == 100 and res.budget_examples == 800


def test_run_one_refuses_a_silent_training_function():
    with pytest.raises(ValueError, match="yielded nothing"):
        run_one(lambda b, lr, s: iter([]), RunSpec(8, 0.1), [0.5], max_steps=10)


def test_higher_is_better_targets():
    res = run_one(
        lambda b, lr, s: iter([0.1, 0.5, 0.9]), RunSpec(8, 0.1), [0.8, 0.4], max_steps=10, higher_is_better=True
    )
    assert res.steps == {0.8: 3, 0.4: 2}


# ---------------------------------------------------------------------------------------
# The grid and the sweep.


def test_lr_grid_is_centred_on_eps_central():
    grid = lr_grid([8, 64, 4096], 0.5, 128, alpha=0.5, factors=(0.5, 1, 2))
    for b, lrs in grid.items():
        c = 0.5 / (1 + 128 / b) ** 0.5
        assert lrs == pytest.approx([c / 2, c, 2 * c])
    with pytest.raises(ValueError):
        lr_grid([8], -1, 128)


def test_sweep_recovers_b_crit_of_the_model():
    """End to end on the model training function: grid centred on eps_central, fastest run per B,
    fit in log space. The fastest lr is exactly the centre, so b_crit = B_NOISE up to the
    resolution of integer steps."""
    res = ns.sweep(
        model_train,
        [16, 32, 64, 128, 256, 512, 1024, 2048],
        targets=[0.5, 0.05],
        eps_star=1.0,
        b_star=B_NOISE,
        lr_factors=(0.5, 1.0, 2.0),
        max_steps=20_000,
        progress=False,
    )
    assert len(res.runs) == 24 and res.skipped == 0
    fits = res.fit(n_boot=200)
    for t, f in fits.items():
        assert f.b_crit == pytest.approx(B_NOISE, rel=0.02), t
        # the only noise is integer steps: a narrow interval about the truth
        assert 0.95 * B_NOISE < f.b_crit_interval[0] <= f.b_crit_interval[1] < 1.05 * B_NOISE
        assert all(p.lr == pytest.approx(eps_central(p.batch_size, 1.0, B_NOISE)) for p in f.points)
    # steps to 0.05 are log(20)/log(2) times those to 0.5: S_min scales, b_crit does not
    assert fits[0.05].s_min / fits[0.5].s_min == pytest.approx(math.log(20) / math.log(2), rel=0.02)


def test_sweep_results_file_and_resume(tmp_path):
    path = tmp_path / "sweep.csv"
    CALLS.clear()
    kw = dict(targets=[0.5, 0.2], max_steps=5000, results=path, progress=False)
    r1 = ns.sweep(counting_train, [32, 128], [0.1, 0.2], **kw)
    assert len(CALLS) == 4 and r1.skipped == 0
    rows = _csv_rows(path)
    assert len(rows) == 8 and list(rows[0]) == list(RESULT_FIELDS)
    # the same sweep again: nothing runs, the results come from the file
    CALLS.clear()
    r2 = ns.sweep(counting_train, [32, 128], [0.1, 0.2], **kw)
    assert CALLS == [] and r2.skipped == 4
    assert [(r.spec, r.steps) for r in r2.runs] == [(r.spec, r.steps) for r in r1.runs]
    # a larger grid: only the new runs
    CALLS.clear()
    r3 = ns.sweep(counting_train, [32, 128, 512], [0.1, 0.2, 0.4], **kw)
    assert sorted(CALLS) == sorted([(32, 0.4, 0), (128, 0.4, 0), (512, 0.1, 0), (512, 0.2, 0), (512, 0.4, 0)])
    assert r3.skipped == 4 and len(r3.runs) == 9
    assert len(_csv_rows(path)) == 18


def test_resume_after_a_torn_write(tmp_path):
    """A crash in the middle of writing a run leaves a partial last line: that run is redone and the
    file stays parseable."""
    path = tmp_path / "sweep.csv"
    kw = dict(targets=[0.5], max_steps=5000, results=path, progress=False)
    ns.sweep(counting_train, [32, 64], [0.1], **kw)
    text = path.read_text()
    path.write_text(text[: len(text) - 12])  # tear the last row (B=64)
    with pytest.warns(UserWarning, match=r"sweep.csv:3: the last row is incomplete"):
        assert [r.spec.batch_size for r in read_results(path)] == [32]
    CALLS.clear()
    with pytest.warns(UserWarning, match="the last row is incomplete"):
        res = ns.sweep(counting_train, [32, 64], [0.1], **kw)
    assert CALLS == [(64, 0.1, 0)]
    assert [r.spec.batch_size for r in read_results(path)] == [32, 64]
    assert len(res.runs) == 2


def test_resume_with_changed_targets_runs_only_what_is_missing(tmp_path):
    """Changing the targets of a resumed sweep: each run is redone for the targets it lacks only,
    the finished ones are kept, and no (run, target) row is ever written twice."""
    path = tmp_path / "sweep.csv"
    kw = dict(max_steps=5000, results=path, progress=False)
    first = ns.sweep(counting_train, [32, 64], [0.1], targets=[0.5], **kw)
    CALLS.clear()
    res = ns.sweep(counting_train, [32, 64], [0.1], targets=[0.5, 0.1], **kw)
    assert CALLS == [(32, 0.1, 0), (64, 0.1, 0)]  # the old runs lack target 0.1
    assert res.skipped == 0 and res.partial == 2
    rows = _csv_rows(path)
    keys = [(r["batch_size"], r["target"]) for r in rows]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 4  # no duplicated row
    assert keys == [("32", "0.5"), ("32", "0.1"), ("64", "0.5"), ("64", "0.1")]  # in grid order
    # target 0.5 comes from the first sweep, 0.1 from the second; both in the fit's records
    recs = {(r.batch_size, r.target): r.steps for r in res.records()}
    assert set(recs) == {(32, 0.5), (32, 0.1), (64, 0.5), (64, 0.1)}
    assert {b: recs[(b, 0.5)] for b in (32, 64)} == {r.spec.batch_size: r.steps[0.5] for r in first.runs}
    assert [sorted(f) for f in [res.fastest(0.1)]] == [[32, 64]]
    # the same again: nothing runs; fewer targets: nothing runs either
    CALLS.clear()
    again = ns.sweep(counting_train, [32, 64], [0.1], targets=[0.5, 0.1], **kw)
    fewer = ns.sweep(counting_train, [32, 64], [0.1], targets=[0.1], **kw)
    assert CALLS == [] and again.skipped == 2 and fewer.skipped == 2
    assert [r.target for r in fewer.records()] == [0.1, 0.1]
    assert len(_csv_rows(path)) == 4


def test_targets_with_many_digits_are_recognised_on_resume(tmp_path):
    """The file writes targets with 10 significant digits; a resumed sweep still finds them."""
    path = tmp_path / "sweep.csv"
    kw = dict(targets=[0.123456789012345], max_steps=5000, results=path, progress=False)
    ns.sweep(counting_train, [32], [0.1], **kw)
    CALLS.clear()
    res = ns.sweep(counting_train, [32], [0.1], **kw)
    assert CALLS == [] and res.skipped == 1
    assert [r.target for r in res.records()] == [0.123456789012345]


def test_duplicated_and_malformed_rows_are_left_out_with_a_warning(tmp_path):
    path = tmp_path / "sweep.csv"
    kw = dict(targets=[0.5], max_steps=5000, results=path, progress=False)
    ns.sweep(counting_train, [32, 64], [0.1], **kw)
    lines = path.read_text().splitlines()
    bad = lines[1].replace(",1,0,", ",maybe,0,", 1)
    path.write_text("\n".join([lines[0], lines[1], lines[1], bad, lines[2]]) + "\n")
    with pytest.warns(UserWarning) as caught:
        runs = read_results(path)
    text = " | ".join(str(w.message) for w in caught)
    assert "1 duplicated row (the same run and target again) left out: line 3" in text
    assert "1 malformed row left out (their runs are redone): line 4 (reached = 'maybe' is not 0 or 1)" in text
    assert sorted(r.spec.batch_size for r in runs) == [32, 64]
    CALLS.clear()
    with pytest.warns(UserWarning):
        ns.sweep(counting_train, [32, 64], [0.1], **kw)
    assert CALLS == []
    assert len(path.read_text().splitlines()) == 3  # rewritten: header and one row per run and target


def test_results_file_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "sweep.csv"
    kw = dict(targets=[0.5], max_steps=5000, results=path, progress=False)
    ns.sweep(counting_train, [32], [0.1], **kw)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # saved by a spreadsheet
    assert [r.spec.batch_size for r in read_results(path)] == [32]


def test_results_file_of_another_kind_is_refused(tmp_path):
    p = tmp_path / "other.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a noisescale sweep results file"):
        ns.sweep(model_train, [32], [0.1], targets=[0.5], max_steps=10, results=p, progress=False)


def test_sweep_in_worker_processes_matches_serial(tmp_path):
    kw = dict(targets=[0.5], max_steps=5000, progress=False)
    serial = ns.sweep(model_train, [16, 64, 256], [0.1, 0.3], **kw)
    par = ns.sweep(model_train, [16, 64, 256], [0.1, 0.3], workers=2, results=tmp_path / "p.csv", **kw)
    assert [(r.spec, r.steps) for r in par.runs] == [(r.spec, r.steps) for r in serial.runs]
    assert len(read_results(tmp_path / "p.csv")) == 6


def failing_or_endless_train(batch_size: int, lr: float, seed: int):
    """B = 16 fails at once; every other run would train forever."""
    if batch_size == 16:
        raise RuntimeError("this run failed")
    while True:
        time.sleep(0.01)
        yield 1.0


def test_a_failed_run_stops_the_worker_sweep_at_once(tmp_path):
    """An exception in one run stops the sweep now: the other workers are killed, not waited for
    (before, the sweep waited for every running run to end, here forever)."""
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="this run failed"):
        ns.sweep(
            failing_or_endless_train,
            [64, 16, 32],
            [0.1],
            targets=[0.5],
            max_steps=10**9,
            workers=2,
            results=tmp_path / "s.csv",
            progress=False,
        )
    assert time.perf_counter() - t0 < 60


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(targets=[]), "at least one target"),
        (dict(targets=[0.5], max_steps=None), "max_steps or max_examples"),
        (dict(targets=[0.5], learning_rates=None), "eps_star and b_star"),
        (dict(targets=[0.5], learning_rates=[-0.1]), "not a positive number"),
        (dict(targets=[0.5], learning_rates={32: [0.1]}), "no entry for batch sizes"),
    ],
)
def test_sweep_argument_errors(kw, match):
    args = dict(learning_rates=[0.1], max_steps=10, progress=False)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        ns.sweep(model_train, [32, 64], **args)


# ---------------------------------------------------------------------------------------
# Branched local critical batch on a noisy quadratic.


def test_lr_scaling_rules():
    assert lr_scaling("sgd")(8) == 8 and lr_scaling("adam")(16) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        lr_scaling("lion")


def _nqm(d=50, h=1.0, sigma=1.0, B=4, eta_h=1.0 / 24, R=512):
    """Noisy quadratic: L = (h/2)|theta|^2, per-example gradient h theta + sigma xi (Sigma = sigma^2 I).

    The checkpoint is the stationary state of SGD at batch B and lr eta: theta_i ~ N(0, m) with
    m = eta sigma^2 / (B h (2 - eta h)). There ``b_noise = tr(H Sigma)/(G^T H G) = d sigma^2/(h^2 |theta|^2)
    = B (2 - eta h)/(eta h)`` (McCandlish Eq. 2.8). A branch at k B with lr k eta (SGD rule) relaxes
    to ``L_k = L_1 (2 - eta h)/(2 - k eta h)``, so the loss at most doubles (epsilon = L_1) iff
    ``k <= 1/(eta h) + 1/2`` — with eta h = 1/24: k <= 24.5, i.e. k* = 16 on the powers of two, and
    the critical batch 16 B = 64 is ~ b_noise/3 (b_noise = 188)."""
    eta = eta_h / h
    m = eta * sigma**2 / (B * h * (2 - eta * h))

    def branch(batch, lr, steps, seed):
        rng = np.random.default_rng(seed)
        th = rng.standard_normal((R, d)) * math.sqrt(m)
        for _ in range(steps):
            th = th - lr * (h * th + sigma / math.sqrt(batch) * rng.standard_normal((R, d)))
        return 0.5 * h * float((th**2).sum(1).mean())

    L1 = 0.5 * h * d * m
    b_noise = B * (2 - eta * h) / (eta * h)
    return branch, B, eta, L1, b_noise


def test_branched_critical_batch_on_noisy_quadratic():
    branch, B, eta, L1, b_noise = _nqm()
    ks = [1, 2, 4, 8, 16, 32, 64]
    r = local_critical_batch(branch, B, eta, examples=64 * B * 16, epsilon=L1, ks=ks, optimizer="sgd", seeds=(0, 1))
    assert r.k_star == 16 and r.b_star == 64
    assert r.b_star_geo == pytest.approx(math.sqrt(64 * 128))
    assert not r.at_limit
    assert r.passed[:5] == [True] * 5 and not r.passed[5]
    assert r.lrs == pytest.approx([k * eta for k in ks])
    # the losses follow the closed form (2 - eta h)/(2 - k eta h) below the transition (MC, 2% tolerance)
    for k, loss in zip(ks[:5], r.losses[:5]):
        assert loss == pytest.approx(L1 * (2 - eta) / (2 - k * eta), rel=0.03)
    assert b_noise / 4 < r.b_star < b_noise  # same order as the noise scale at the checkpoint


def test_branched_tight_epsilon_and_limits():
    branch, B, eta, L1, _ = _nqm(R=256)
    tight = local_critical_batch(
        branch, B, eta, examples=4096, epsilon=0.1 * L1, ks=[1, 2, 4, 8, 16, 32], optimizer="sgd"
    )
    assert tight.k_star in (2, 4)  # loss ratio (2-eta)/(2-k eta): 1.02, 1.06, 1.13 for k = 2, 4, 8
    easy = local_critical_batch(branch, B, eta, examples=4096, epsilon=10 * L1, ks=[1, 2, 4], optimizer="sgd")
    assert easy.at_limit and easy.b_star_geo is None and "lower bound" in easy.summary()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(ks=[2, 4]), "starting at 1"),
        (dict(examples=100), "multiple"),
        (dict(epsilon=-1.0), "epsilon"),
    ],
)
def test_branched_argument_errors(kw, match):
    args = dict(examples=64, epsilon=0.1, ks=[1, 2, 4])
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        local_critical_batch(lambda b, lr, n, s: 1.0, 8, 0.1, **args)
