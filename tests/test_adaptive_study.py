"""The adaptive-batch study's dry run (`benchmarks/adaptive.py --quick`) and `noisescale demo --adaptive`.

The study's full run is a benchmark (docs/adaptive-batch.md); here its quick mode runs every arm
in seconds, and the checks are on what the arms did: the ramp doubles its batch at the example
counts it was given with the sweep's learning-rate rule, Seesaw divides the learning rate by
sqrt(2) at each doubling, a controller that never changes its batch trains exactly like the fixed
batch it started from, and the frontier file reads back through `noisescale fit`.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("scipy")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def _study():
    spec = importlib.util.spec_from_file_location("adaptive_study", ROOT / "benchmarks" / "adaptive.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["adaptive_study"] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} not found")
    study = _study()
    out = tmp_path_factory.mktemp("adaptive")
    assert study.main(["--quick", "--out", str(out)]) == 0
    return study, out


def test_quick_writes_every_arm_in_the_sweep_format(quick):
    study, out = quick
    from noisescale.sweeps import RESULT_FIELDS

    for name in ("digits", "char"):
        task = study.QUICK[name]
        for arm in ("fixed", "fixed-bcrit", "ramp-a", "seesaw-a", "controller", "controller-x4"):
            rows = _rows(out / name / f"{arm}.csv")
            assert rows, (name, arm)
            assert list(rows[0]) == list(RESULT_FIELDS)
            n_b = len(task.batch_sizes) if arm == "fixed" else len({r["batch_size"] for r in rows})
            # one row per run and target: batch sizes x learning rates x seeds x targets
            assert len(rows) == n_b * len(task.lr_factors) * len(task.seeds) * len(task.targets)
            assert {float(r["target"]) for r in rows} == set(task.targets)
    js = json.loads((out / "report.json").read_text())
    assert set(js["tasks"]) == {"digits", "char"}
    for t in js["tasks"]["digits"]["targets"].values():
        assert t["fit"]["b_crit"] > 0
        assert {a["arm"].split(" (")[0] for a in t["arms"]} >= {"fixed small", "fixed large", "controller"}
    assert (out / "adaptive-digits.png").stat().st_size > 10_000


def test_ramp_and_seesaw_follow_their_schedules(quick):
    study, out = quick
    for name in ("digits", "char"):
        task = study.QUICK[name]
        sched = task.ramps["a"]
        for kind in ("ramp", "seesaw"):
            rows = _rows(out / name / "traces" / f"{kind}-a-f1-s0.csv")
            lr0 = study.lr_at(task, 1.0, task.b0)
            prev_ex = 0.0
            for r in rows:
                ex, b, lr = float(r["examples"]), int(r["batch"]), float(r["lr"])
                # the batch in force after `ex` examples: one doubling per scheduled count reached
                k = sum(1 for e in sched if ex >= e)
                k = min(k, int(math.log2(task.b_max // task.b0)))
                assert b == task.b0 * 2**k, (kind, ex, b)
                want = study.lr_at(task, 1.0, b) if kind == "ramp" else lr0 / math.sqrt(2.0) ** k
                assert lr == pytest.approx(want, rel=1e-12), (kind, ex, lr, want)
                assert ex > prev_ex
                prev_ex = ex
            assert int(rows[-1]["batch"]) > task.b0  # the schedule did act within the run


def test_controller_without_a_change_trains_like_its_fixed_batch(quick):
    """The quick runs are shorter than the controller's patience: it never changes the batch, and
    the noise-scale measurement is inert, so it reaches every target at the same step as the fixed
    run at its first batch with the same learning rate and seed."""
    study, out = quick
    for name in ("digits", "char"):
        task = study.QUICK[name]
        ctl = _rows(out / name / "controller.csv")
        trace = _rows(out / name / "traces" / "controller-f1-s0.csv")
        assert {int(r["batch"]) for r in trace} == {task.b0}
        assert {float(r["lr_scale"]) for r in trace} == {1.0}
        fixed = {
            (r["lr"], r["seed"], r["target"]): r
            for r in _rows(out / name / "fixed.csv")
            if int(r["batch_size"]) == task.b0
        }
        for r in ctl:
            f = fixed[(r["lr"], r["seed"], r["target"])]
            assert (r["steps"], r["examples"], r["reached"]) == (f["steps"], f["examples"], f["reached"])


def test_frontier_file_reads_back_through_noisescale_fit(quick, capsys):
    _, out = quick
    from noisescale.cli import main

    assert main(["fit", str(out / "digits" / "frontier.csv"), "--json", "--n-boot", "50"]) == 0
    fits = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    js = json.loads((out / "report.json").read_text())["tasks"]["digits"]["targets"]
    assert len(fits) == 2
    for f in fits:
        mine = js[f"{float(f['target']):g}"]["fit"]
        assert f["b_crit"] == pytest.approx(mine["b_crit"], rel=1e-4)
        assert f["s_min"] == pytest.approx(mine["s_min"], rel=1e-4)


def test_quick_resumes_without_rerunning(quick, capsys):
    study, out = quick
    before = {p: p.read_bytes() for p in (out / "digits").glob("*.csv")}
    assert study.main(["--quick", "--out", str(out), "--tasks", "digits", "--no-plot"]) == 0
    printed = capsys.readouterr().out
    counts = re.findall(r": (\d+) runs \((\d+) from", printed)
    # every arm of the task (fixed, fixed-bcrit, ramp-a, seesaw-a, controller, controller-x4) resumed whole
    assert len(counts) == 6 and all(n == m != "0" for n, m in counts), printed
    assert {p: p.read_bytes() for p in (out / "digits").glob("*.csv")} == before


def test_demo_adaptive_grows_the_batch_and_rescales_the_lr(tmp_path, capsys):
    from noisescale.cli import main

    args = ["demo", "--adaptive", "--steps", "300", "--print-every", "50", "--no-progress", "--no-plot"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    changes = re.findall(r"batch (\d+) -> (\d+) \(B_simple (\d+)\), lr x([\d.]+)", out)
    assert changes, out
    batches = [128] + [int(b) for _, b, _, _ in changes]
    assert all(int(a) < int(b) for a, b, _, _ in changes)
    assert batches == sorted(batches) and [int(a) for a, _, _, _ in changes] == batches[:-1]
    for _, b, est, scale in changes:
        # lr_rule "auto" for SGD: the saturating rule eps(B)/eps(B0) = (1 + B_noise/B0)/(1 + B_noise/B)
        want = (1 + int(est) / 128) / (1 + int(est) / int(b))
        assert float(scale) == pytest.approx(want, abs=0.011)
    # the learning rate printed for a step is the base lr times the scale of the batch in use
    lines = re.findall(r"batch\s+(\d+)\s+lr ([\d.]+)", out)
    assert lines
    scale_of = {128: 1.0, **{int(b): float(s) for _, b, _, s in changes}}
    for b, lr in lines:
        assert float(lr) == pytest.approx(0.02 * scale_of[int(b)], abs=2e-4)
    assert f"the controller changed the batch {len(changes)} times: 128 -> {batches[-1]}" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "130"], "must be a multiple of --micro-batches (4)"),
        (["--max-batch-size", "64"], "--max-batch-size (64) must be at least --batch-size (128)"),
    ],
)
def test_demo_adaptive_bad_arguments(argv, message, capsys):
    from noisescale.cli import main

    assert main(["demo", "--adaptive", *argv, "--no-progress", "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
