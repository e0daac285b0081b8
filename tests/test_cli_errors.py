"""The command line's promise, in process: every error the user can cause (a file that cannot be
written, a full disk, --out naming a file, absurd numbers, a malformed CSV) is one line on stderr and
exit code 2; SIGTERM is one line and exit code 143; only a bug shows a traceback. And the sweep CSV
reader: duplicated columns, a byte-order mark, a NaN target, and a 20 MB file read in bounded memory."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
import tracemalloc
from pathlib import Path

import pytest

from noisescale.cli import main

LOG = (
    '{"type": "header", "format": "noisescale-run", "version": 1}\n'
    + "".join(
        json.dumps({"type": "step", "step": i, "examples": 8 * i, "status": "measured", "b_simple": 3.0 + i,
                    "g2": 1.0, "trace_sigma": 2.0}) + "\n"
        for i in range(1, 6)
    )
)  # fmt: skip
SWEEP = "batch_size,steps\n8,100\n16,60\n32,40\n64,35\n"


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"noisescale {command}: error: "), err
    return lines[0]


@pytest.fixture
def log(tmp_path) -> Path:
    p = tmp_path / "run.jsonl"
    p.write_text(LOG)
    return p


def _unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process may not write into (root ignores file modes: then /sys)."""
    d = tmp_path / "locked"
    d.mkdir()
    d.chmod(0o500)
    try:
        (d / "probe").write_text("x")
    except PermissionError:
        return d
    try:
        open("/sys/noisescale-probe", "w").close()
    except PermissionError:
        return Path("/sys")
    except OSError:
        pass
    pytest.skip("no directory here refuses writes")


def test_permission_denied(tmp_path, log, capsys):
    d = _unwritable_dir(tmp_path)
    try:
        assert main(["plot", str(log), "-o", str(d / "f.png")]) == 2
        line = _one_line_error(capsys, "plot")
        assert f"{d / 'f.png'}: permission denied" in line
    finally:
        if d != Path("/sys"):
            d.chmod(0o700)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
@pytest.mark.parametrize("argv", [["plot", "{log}", "-o", "/dev/full"], ["fit", "{sweep}", "--plot", "/dev/full"]])
def test_disk_full(tmp_path, log, capsys, argv):
    sweep = tmp_path / "s.csv"
    sweep.write_text(SWEEP)
    argv = [a.format(log=log, sweep=sweep) for a in argv]
    assert main([*argv, *(["--n-boot", "20"] if argv[0] == "fit" else [])]) == 2
    line = _one_line_error(capsys, argv[0])
    assert "/dev/full: no space left on device" in line
    assert not os.path.exists("/dev/full.png")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_disk_full_while_writing_the_sweep_results(tmp_path, capsys):
    out = tmp_path / "sw"
    out.mkdir()
    (out / "sweep.csv").symlink_to("/dev/full")
    assert main(["sweep", "--quick", "--out", str(out), "--no-progress"]) == 2
    assert f"{out / 'sweep.csv'}: no space left on device" in _one_line_error(capsys, "sweep")


@pytest.mark.parametrize("command", ["sweep", "demo"])
def test_out_naming_a_file(tmp_path, capsys, command):
    f = tmp_path / "afile"
    f.write_text("")
    assert main([command, "--out", str(f), "--no-progress"]) == 2
    assert f"--out {f} is a file; give a directory" in _one_line_error(capsys, command)


def test_output_paths_that_cannot_be_written(tmp_path, log, capsys):
    assert main(["plot", str(log), "-o", str(log / "x.png")]) == 2  # under a file
    assert "a part of this path is a file, not a directory" in _one_line_error(capsys, "plot")
    assert main(["plot", str(log), "-o", str(tmp_path / "nodir" / "x.png")]) == 2
    assert "No such file or directory" in _one_line_error(capsys, "plot")
    assert main(["plot", str(log), "-o", str(tmp_path / "x.xyz")]) == 2
    assert "Format 'xyz' is not supported" in _one_line_error(capsys, "plot")
    # a sweep whose results file is a directory
    (tmp_path / "sw" / "sweep.csv").mkdir(parents=True)
    assert main(["sweep", "--quick", "--out", str(tmp_path / "sw"), "--no-progress"]) == 2
    assert "sweep.csv: is a directory" in _one_line_error(capsys, "sweep")


@pytest.mark.parametrize("text, message", [
    ("batch_size,steps\n32,1e300\n64,1e300\n128,5e299\n", "line 2: steps = 1e300 is out of range"),
    ("batch_size,steps\n1e300,1e10\n1e301,5e9\n1e302,3e9\n", "line 2: batch_size = 1e300 is out of range"),
    ("batch_size,steps,examples\n32,100,1e300\n64,60,1e300\n", "line 2: examples = 1e300 is out of range"),
])  # fmt: skip
def test_huge_numbers_in_fit(tmp_path, capsys, text, message):
    p = tmp_path / "s.csv"
    p.write_text(text)
    assert main(["fit", str(p)]) == 2
    assert message in _one_line_error(capsys, "fit")


def test_huge_numbers_in_the_library_fit_overflow_nowhere():
    from noisescale.critical import RunRecord, fit_critical_batch

    with pytest.raises(ValueError, match="overflows; give examples= explicitly"):
        RunRecord(1e300, 1e300)
    recs = [RunRecord(b, s, examples=1e307) for b, s in ((1e300, 1e300), (1e301, 1e300), (1e302, 1e299))]
    with pytest.warns(UserWarning):
        fit = fit_critical_batch(recs, n_boot=50)  # was: OverflowError: math range error
    assert math.isfinite(fit.b_crit) or fit.b_crit == math.inf


def test_deeply_nested_json_in_a_log(tmp_path, capsys):
    p = tmp_path / "run.jsonl"
    p.write_text(LOG + '{"type": "step", "x": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    assert main(["plot", str(p)]) == 2
    assert "run.jsonl:7: JSON nested too deeply" in _one_line_error(capsys, "plot")


def test_sigterm_is_one_line_and_exit_143(monkeypatch, capsys):
    import noisescale.commands.plot as plot_cmd

    def run(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the signal interrupts this
        raise AssertionError("not interrupted")

    monkeypatch.setattr(plot_cmd, "run", run)
    before = signal.getsignal(signal.SIGTERM)
    t0 = time.perf_counter()
    assert main(["plot", "x.jsonl"]) == 128 + signal.SIGTERM
    assert time.perf_counter() - t0 < 5
    assert capsys.readouterr().err.strip() == "noisescale plot: stopped by SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before  # restored


def test_a_bug_still_shows_its_traceback(monkeypatch):
    import noisescale.commands.plot as plot_cmd

    def run(args):
        raise KeyError("a bug")

    monkeypatch.setattr(plot_cmd, "run", run)
    with pytest.raises(KeyError):
        main(["plot", "x.jsonl"])


# ---------------------------------------------------------------------------------------
# The sweep CSV reader (`noisescale fit`).


@pytest.mark.parametrize("text, message", [
    ("batch_size,steps,batch_size\n8,100,16\n16,60,32\n32,40,64\n",
     "line 1: column batch_size appears twice (columns 1 and 3)"),
    ("batch_size,target,steps\n8,0.5,100\n16,nan,60\n32,0.5,40\n",
     "line 3: target = 'nan' is not a finite number (a target is a loss value or a label)"),
    ("batch_size,target,steps\n8,inf,100\n", "line 2: target = 'inf' is not a finite number"),
    ("batch_size,steps\n8,100\n16," + "9" * 200_000 + "\n", "line 3: not a valid CSV row (field larger than"),
    ("\ufeffbatch_size,lr\n8,0.1\n", "missing column steps (found: batch_size, lr)"),
])  # fmt: skip
def test_bad_sweep_csv(tmp_path, capsys, text, message):
    p = tmp_path / "s.csv"
    p.write_text(text, encoding="utf-8")
    assert main(["fit", str(p)]) == 2
    assert message in _one_line_error(capsys, "fit")


def test_sweep_csv_with_a_byte_order_mark_and_loose_columns(tmp_path, capsys):
    """Excel's "CSV UTF-8" starts with a byte-order mark; unused columns may repeat; trailing commas."""
    p = tmp_path / "s.csv"
    rows = ["batch_size,steps,note,note,"] + [f"{b},{800 * (1 + 128 / b):.1f},x,y," for b in (16, 64, 256, 1024)]
    p.write_bytes(b"\xef\xbb\xbf" + ("\r\n".join(rows) + "\r\n").encode())
    assert main(["fit", str(p), "--json", "--n-boot", "50"]) == 0
    (o,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert o["b_crit"] == pytest.approx(128, rel=1e-3)


def _big_sweep_csv(path: Path, size: int) -> None:
    """A results file as `noisescale sweep` writes it (metrics JSON included), ``size`` bytes."""
    rng = random.Random(0)
    metrics = json.dumps({f"b_simple_{k}@{t}": 100.0 + t for k in ("avg", "d1") for t in (0.5, 0.2, 0.1)})
    metrics = '"' + metrics.replace('"', '""') + '"'
    with open(path, "w") as fh:
        fh.write("batch_size,lr,seed,target,steps,examples,reached,diverged,final_loss,wall_s,metrics\n")
        seed = 0
        while fh.tell() < size:
            for b in (8, 16, 32, 64, 128, 256, 512, 1024):
                for t, scale in ((0.5, 1.0), (0.2, 2.5)):
                    s = round(scale * 800 * (1 + 128 / b) * math.exp(0.1 * rng.gauss(0, 1)))
                    fh.write(f"{b},0.1,{seed},{t},{s},{s * b},1,0,0.1,1.234,{metrics}\n")
            seed += 1


def test_a_20mb_sweep_csv_is_streamed(tmp_path, capsys):
    """The fit keeps the fastest run per (target, batch size), not every row: memory does not grow
    with the file (a 200 MB CSV took 8.5 minutes and 6 GB before)."""
    from noisescale.commands.fit import read_sweep_frontiers

    p = tmp_path / "big.csv"
    _big_sweep_csv(p, 20_000_000)
    size = p.stat().st_size
    tracemalloc.start()
    try:
        frontiers = read_sweep_frontiers(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < size / 20, f"peak {peak / 1e6:.1f} MB reading a {size / 1e6:.0f} MB file"
    assert list(frontiers) == [0.5, 0.2] and all(len(f) == 8 for f in frontiers.values())
    assert frontiers[0.5][0].n_runs > 1000
    t0 = time.perf_counter()
    assert main(["fit", str(p), "--json", "--n-boot", "50"]) == 0
    assert time.perf_counter() - t0 < 20
    objs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["target"] for o in objs] == [0.5, 0.2]
    assert all(o["b_crit"] == pytest.approx(128, rel=0.3) for o in objs)
