"""The command line, called in-process: demo (shortened), plot, and bad input with exit code 2."""

import json

import pytest

from noisescale.cli import main


def test_demo_short_run_writes_log_and_figure(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(
        ["demo", "--steps", "60", "--batch-size", "64", "--print-every", "20", "--no-progress", "--out", str(out)]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "B_simple" in text and "examples" in text
    assert "as the loss fell from" in text  # the growth statement
    assert (out / "run.jsonl").exists() and (out / "noise_scale.png").stat().st_size > 10_000
    lines = (out / "run.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["type"] == "header" and len(lines) == 61


def test_plot_redraws_a_log(tmp_path, capsys):
    assert (
        main(["demo", "--steps", "20", "--batch-size", "32", "--no-progress", "--no-plot", "--out", str(tmp_path)]) == 0
    )
    capsys.readouterr()
    png = tmp_path / "again.png"
    assert main(["plot", str(tmp_path / "run.jsonl"), "-o", str(png), "--x", "examples"]) == 0
    assert png.stat().st_size > 10_000 and "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "empty file"),
        ("not json\n", "not valid JSON"),
        ('{"type": "step", "step": 1}\n', "not a noisescale run-log header"),
        ('{"type": "header", "format": "noisescale-run", "version": 99}\n', "version 99 is not supported"),
        ('{"type": "header", "format": "noisescale-run", "version": 1}\n{"type": "step", "step": 1}\n', "lacks"),
        (
            '{"type": "header", "format": "noisescale-run", "version": 1}\n'
            '{"type": "step", "step": 1, "examples": 8, "status": "measured", "b_simple": "big"}\n',
            "should be a number",
        ),
        ('{"type": "header", "format": "noisescale-run", "version": 1}\n', "no step records"),
        ("[1, 2]\n", "expected a JSON object"),
    ],
)
def test_plot_corrupt_log_is_one_line_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    assert main(["plot", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("noisescale plot: error:")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_plot_missing_file_and_binary(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    assert main(["plot", str(binary)]) == 2
    assert "not a text file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["demo", "--micro-batches", "1"], "--micro-batches must be at least 2"),
        (["demo", "--steps", "3"], "--steps must be at least 10"),
        (["demo", "--lr", "-1"], "--lr must be a positive"),
        (["demo", "--batch-size", "2", "--micro-batches", "4"], "--batch-size (2) must be at least"),
    ],
)
def test_demo_bad_arguments(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
