"""Readers of what a run leaves on disk: the run log (a torn last line, values that cannot be drawn,
deeply nested or non-finite JSON) and checkpoints (the tracker state loads with weights_only=True)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import noisescale as ns
from noisescale.cli import main
from noisescale.runlog import RunLogError, read_run_log

HEADER = {"type": "header", "format": "noisescale-run", "version": 1, "unit": "examples"}


def _step(i: int, **extra) -> dict:
    r = {
        "type": "step",
        "step": i,
        "examples": 64 * i,
        "status": "measured",
        "b_simple": 10.0 + i,
        "b_simple_low": 5.0 + i,
        "b_simple_high": 20.0 + i,
        "g2": 1.0 / i,
        "trace_sigma": 10.0,
        "loss": 2.0 / i,
    }
    r.update(extra)
    return r


def _write(path, records, *, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in [HEADER, *records]) + tail)


def test_a_torn_last_line_is_left_out_with_a_warning(tmp_path):
    path = tmp_path / "run.jsonl"
    _write(path, [_step(i) for i in range(1, 21)], tail='{"type": "step", "step": 21, "examples": 13')
    with pytest.warns(UserWarning, match=r"run.jsonl:22: the last line is incomplete .* 20 complete step records"):
        log = read_run_log(path)
    assert len(log.records) == 20 and log.lines == list(range(2, 22))
    # a complete last line without its newline is a complete record
    path.write_text(path.read_text().rsplit("\n", 1)[0] + "\n" + json.dumps(_step(21)))
    assert len(read_run_log(path).records) == 21
    # an invalid line that is not the last one is an error, as before
    path.write_text(path.read_text().replace(json.dumps(_step(5)), '{"type": "st'))
    with pytest.raises(RunLogError, match=r"run.jsonl:6: not valid JSON"):
        read_run_log(path)


def test_plot_draws_the_complete_records_of_a_torn_log(tmp_path, capsys):
    path = tmp_path / "run.jsonl"
    _write(path, [_step(i) for i in range(1, 31)], tail='{"type": "step", "st')
    assert main(["plot", str(path), "-o", str(tmp_path / "f.png")]) == 0
    cap = capsys.readouterr()
    assert (tmp_path / "f.png").stat().st_size > 10_000
    (warning,) = cap.err.strip().splitlines()
    assert warning.startswith("noisescale plot: warning: ") and "run.jsonl:32: the last line is incomplete" in warning
    assert f"wrote {tmp_path / 'f.png'}" in cap.out


def test_a_torn_header_is_an_error(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text('{"type": "header", "form')
    with pytest.raises(RunLogError, match=r"run.jsonl:1: the header line is incomplete"):
        read_run_log(path)


@pytest.mark.parametrize("field", ["b_simple", "g2", "loss", "step", "examples", "b_simple_high"])
def test_a_value_too_large_to_draw_names_file_line_and_field(tmp_path, capsys, field):
    path = tmp_path / "run.jsonl"
    _write(path, [_step(i, **({field: 1e308} if i == 7 else {})) for i in range(1, 21)])
    x = ["--x", "examples"] if field == "examples" else []
    assert main(["plot", str(path), *x]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("noisescale plot: error: ")
    assert f"run.jsonl:8: field '{field}' = 1e+308 is too large to plot" in err
    assert not (tmp_path / "run.png").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '{"type": "step", "step": 1, "examples": 8, "status": "measured", "b_simple": 1e400}',
            "'b_simple' = inf is not a finite",
        ),
        ('{"type": "step", "step": 1, "examples": 8, "status": "measured", "g2": NaN}', "'g2' = nan is not a finite"),
        ('{"type": "step", "step": 1, "examples": 8, "status": "measured", "loss": -Infinity}', "'loss' = -inf"),
        (
            '{"type": "step", "step": 1, "examples": 8, "status": "measured", "loss": 1' + "0" * 400 + "}",
            "'loss' = an integer of 401 digits is not a finite number",
        ),
        (
            '{"type": "step", "step": 1, "examples": 8, "status": "measured", "loss": 1' + "0" * 5000 + "}",
            "not a valid run-log record",
        ),
        ('{"type": "step", "a": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON nested too deeply"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_line(tmp_path, capsys, text, message):
    path = tmp_path / "run.jsonl"
    path.write_text(json.dumps(HEADER) + "\n" + json.dumps(_step(1)) + "\n" + text + "\n")
    assert main(["plot", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and len(err) < 400
    assert "run.jsonl:3: " in err and message in err


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "run.jsonl"
    _write(path, [_step(1), _step(2)])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert len(read_run_log(path).records) == 2


def test_plot_into_a_directory_writes_the_log_name_and_prints_the_real_path(tmp_path, capsys):
    path = tmp_path / "myrun.jsonl"
    _write(path, [_step(i) for i in range(1, 11)])
    figs = tmp_path / "figs"
    figs.mkdir()
    assert main(["plot", str(path), "-o", str(figs)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {figs / 'myrun.png'}"
    assert (figs / "myrun.png").stat().st_size > 10_000 and not (tmp_path / "figs.png").exists()
    # a name without a suffix: matplotlib writes NAME.png, and that is what is printed
    assert main(["plot", str(path), "-o", str(tmp_path / "fig")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'fig.png'}"
    assert (tmp_path / "fig.png").exists()
    # a new directory named with a trailing slash
    assert main(["plot", str(path), "-o", str(tmp_path / "new") + "/"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'new' / 'myrun.png'}"


# ---------------------------------------------------------------------------------------
# Checkpoints: nothing in them needs pickle.


def _trained_tracker(**kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gns = ns.GradientNoiseScale(model, method="microbatch", **kw)
    for _ in range(12):
        x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
        for xb, yb in zip(x.chunk(4), y.chunk(4)):
            (F.cross_entropy(model(xb), yb) / 4).backward()
        gns.step()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt, gns


@pytest.mark.parametrize("kw", [{}, {"groups": "layers"}])
def test_tracker_state_dict_round_trips_with_weights_only(tmp_path, kw):
    model, opt, gns = _trained_tracker(**kw)
    path = tmp_path / "ckpt.pt"
    # what examples/train_ddp.py saves: model, optimizer, tracker
    torch.save(
        {"step": 12, "model": model.state_dict(), "optimizer": opt.state_dict(), "noisescale": gns.state_dict()}, path
    )
    state = torch.load(path, weights_only=True)  # no pickle: a planted file cannot run code
    assert state["noisescale"] == gns.state_dict()
    model2, opt2, fresh = _trained_tracker(**kw)
    fresh.load_state_dict(state["noisescale"])
    assert fresh.metrics() == gns.metrics() or all(
        (math.isnan(a) and math.isnan(b)) or a == b for a, b in zip(fresh.metrics().values(), gns.metrics().values())
    )
    opt2.load_state_dict(state["optimizer"])
    model2.load_state_dict(state["model"])
    gns.close()
    fresh.close()


def test_no_module_unpickles_a_user_file():
    """The library, the command line and the examples load user files without pickle."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    for sub in ("src", "examples"):
        for f in (root / sub).rglob("*.py"):
            text = f.read_text()
            assert "weights_only=False" not in text and "pickle.load" not in text, f
