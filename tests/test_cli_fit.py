"""`noisescale fit SWEEP.csv`, in process: table, --json, --plot, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from noisescale.cli import main

S_MIN, B_CRIT = 800.0, 128.0


def _write_sweep(path, *, targets=(0.5, 0.2), seed=0, censored=True):
    rng = np.random.default_rng(seed)
    lines = ["batch_size,lr,target,steps,examples,reached"]
    for t in targets:
        scale = 1.0 if t == targets[0] else 2.5
        for B in (8, 16, 32, 64, 128, 256, 512, 1024, 2048):
            s = scale * S_MIN * (1 + B_CRIT / B) * math.exp(0.08 * rng.standard_normal())
            for f, lr in ((1.0, 0.1), (1.5, 0.05)):
                steps = round(s * f)
                if censored and steps > 20_000:
                    lines.append(f"{B},{lr},{t},20000,{20000 * B},0")
                else:
                    lines.append(f"{B},{lr},{t},{steps},{steps * B},1")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_fit_prints_a_table(tmp_path, capsys):
    p = _write_sweep(tmp_path / "s.csv")
    assert main(["fit", str(p), "--n-boot", "200"]) == 0
    out = capsys.readouterr().out
    assert "b_crit" in out and "S_min" in out and "E_min" in out
    lines = [ln for ln in out.splitlines() if ln.strip().startswith(("0.5", "0.2"))]
    assert len(lines) == 2
    b_crit = float(lines[0].split()[1])
    assert b_crit == pytest.approx(B_CRIT, rel=0.15)


def test_fit_json_one_object_per_target(tmp_path, capsys):
    p = _write_sweep(tmp_path / "s.csv")
    assert main(["fit", str(p), "--json", "--n-boot", "300", "--seed", "1"]) == 0
    objs = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [o["target"] for o in objs] == [0.5, 0.2]
    for o in objs:
        for k in ("s_min", "e_min", "b_crit"):
            lo, hi = o[f"{k}_interval"]
            assert lo < o[k] < hi
        assert o["b_crit"] == pytest.approx(B_CRIT, rel=0.15)
        assert o["e_min"] == pytest.approx(o["s_min"] * o["b_crit"])
        assert o["unit"] == "examples" and o["level"] == 0.95
    assert objs[1]["s_min"] == pytest.approx(2.5 * S_MIN, rel=0.15)
    # target 0.5: the slow B=8 run is censored but the fast one finished (an exact point);
    # target 0.2: no B=8 run finished within 20,000 steps (a censored point, kept in the fit)
    assert objs[0]["n_censored"] == 0 and objs[1]["n_censored"] == 1
    assert objs[0]["n_points"] == objs[1]["n_points"] == 9


def test_fit_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    p = _write_sweep(tmp_path / "s.csv")
    png = tmp_path / "f.png"
    assert main(["fit", str(p), "--plot", str(png), "--n-boot", "50"]) == 0
    assert png.stat().st_size > 10_000
    assert f"wrote {png}" in capsys.readouterr().out


def test_fit_minimal_columns_and_no_target(tmp_path, capsys):
    p = tmp_path / "m.csv"
    rows = ["batch_size,steps"] + [f"{B},{S_MIN * (1 + B_CRIT / B):.3f}" for B in (16, 64, 256, 1024)]
    p.write_text("\n".join(rows) + "\n")
    assert main(["fit", str(p), "--json", "--n-boot", "100"]) == 0
    (o,) = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert o["target"] is None and o["b_crit"] == pytest.approx(B_CRIT, rel=1e-4)


def test_fit_reads_the_sweep_runner_output(tmp_path, capsys):
    """`noisescale fit` reads the results file `noisescale.sweep` writes."""
    import noisescale as ns
    from test_sweep import B_NOISE, model_train

    path = tmp_path / "sweep.csv"
    ns.sweep(
        model_train,
        [32, 128, 512, 2048],
        targets=[0.5],
        eps_star=1.0,
        b_star=B_NOISE,
        lr_factors=(1.0,),
        max_steps=20_000,
        results=path,
        progress=False,
    )
    assert main(["fit", str(path), "--json", "--n-boot", "100"]) == 0
    (o,) = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert o["b_crit"] == pytest.approx(B_NOISE, rel=0.02)


BAD = {
    "empty": ("", "is empty"),
    "blank": ("\n  \n", "is empty"),
    "header only": ("batch_size,steps\n", "no rows"),
    "missing column": ("batch_size,lr\n32,0.1\n64,0.1\n", "missing column steps"),
    "missing both": ("bs,s\n32,100\n", "missing columns batch_size, steps"),
    "non-numeric": ("batch_size,steps\n32,100\n64,abc\n", "line 3: steps = 'abc' is not a number"),
    "negative": ("batch_size,steps\n32,100\n-64,50\n", "line 3: batch_size = -64 must be positive"),
    "zero steps": ("batch_size,steps\n32,0\n64,50\n", "steps = 0 must be positive"),
    "nan": ("batch_size,steps\n32,nan\n64,50\n", "not a finite number"),
    "negative lr": ("batch_size,steps,lr\n32,100,-0.1\n64,50,0.1\n", "lr = -0.1 must be positive"),
    "single batch size": ("batch_size,steps\n32,100\n32,120\n32,90\n", "only one batch size (32)"),
    "none reached": (
        "batch_size,steps,target,reached\n32,100,0.1,0\n64,100,0.1,0\n",
        "no run reached the target for target 0.1",
    ),
    "bad reached": ("batch_size,steps,reached\n32,100,maybe\n64,50,1\n", "reached = 'maybe' is not 1/0"),
    "ragged": ("batch_size,steps\n32,100,7\n64,50\n", "more fields than the header"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_fit_bad_input_is_one_line_exit_2(name, tmp_path, capsys):
    text, message = BAD[name]
    p = tmp_path / "bad.csv"
    p.write_text(text)
    assert main(["fit", str(p)]) == 2
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert cap.out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("noisescale fit: error: ")
    assert message in err
    assert "Traceback" not in err


def test_fit_missing_file_and_bad_options(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "nope.csv")]) == 2
    assert "no such file" in capsys.readouterr().err
    p = _write_sweep(tmp_path / "s.csv")
    assert main(["fit", str(p), "--level", "1.5"]) == 2
    assert "--level" in capsys.readouterr().err
    assert main(["fit", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    b = tmp_path / "bin.csv"
    b.write_bytes(b"\xff\xfe\x00\x81")
    assert main(["fit", str(b)]) == 2
    assert "not a text" in capsys.readouterr().err
