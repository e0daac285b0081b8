"""`noisescale sweep --task digits --quick`: the built-in sweep end to end on real data (CI form, < 60 s)."""

from __future__ import annotations

import csv
import json
import math

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("scipy")

from noisescale.cli import main


def test_digits_quick_sweep_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "sw"
    assert main(["sweep", "--task", "digits", "--quick", "--out", str(out), "--no-progress", "--n-boot", "200"]) == 0
    text = capsys.readouterr().out
    assert "b_crit = " in text and "B_simple/b_crit" in text
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 2 * 2  # 4 batch sizes x 2 learning rates x 2 targets
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_runs"] == 8 and [t["target"] for t in rep["targets"]] == [0.3, 0.15]
    for t in rep["targets"]:
        lo, hi = t["b_crit_interval"]
        assert 0 < lo < t["b_crit"] < hi < math.inf
        assert 4 < t["b_crit"] < 2048  # a critical batch of a sensible size for 1,437 images
        assert t["b_simple_d1"] is not None and t["b_simple_d1"] > 0
        assert t["ratio_b_simple_over_b_crit"] == pytest.approx(t["b_simple_d1"] / t["b_crit"])
        assert len(t["frontier"]) == 4
    # lower loss targets need more examples at the best batch (E_min grows, Sec. 3.1)
    assert rep["targets"][1]["e_min"] > rep["targets"][0]["e_min"]
    assert (out / "report.md").read_text().startswith("# Critical batch size on digits")
    assert "noisescale sweep --task digits --quick" in (out / "report.md").read_text()
    assert (out / "critical-frontier.png").stat().st_size > 10_000
    # resumed: nothing is trained again, the same numbers come out
    assert (
        main(
            ["sweep", "--task", "digits", "--quick", "--out", str(out), "--no-progress", "--n-boot", "200", "--no-plot"]
        )
        == 0
    )
    assert "resumed: 8 runs" in capsys.readouterr().out
    rep2 = json.loads((out / "report.json").read_text())
    assert [t["b_crit"] for t in rep2["targets"]] == [t["b_crit"] for t in rep["targets"]]
    # and `noisescale fit` reads the same file
    assert main(["fit", str(out / "sweep.csv"), "--json", "--n-boot", "200"]) == 0
    objs = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [o["b_crit"] for o in objs] == pytest.approx([t["b_crit"] for t in rep["targets"]])


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--batch-sizes", "8,32"], "at least 3 different batch sizes"),
        (["--batch-sizes", "1,8,32"], "integers >= 2"),
        (["--targets", "0,0.1"], "positive losses"),
        (["--max-steps", "3"], "at least 10"),
    ],
)
def test_digits_sweep_bad_arguments(argv, match, tmp_path, capsys):
    assert main(["sweep", "--quick", "--out", str(tmp_path), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("noisescale sweep: error: ") and match in err and len(err.splitlines()) == 1
