"""The examples in examples/ run as a user would run them."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("extra", [[], ["--amp"]])
def test_quickstart_runs(tmp_path, extra):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--steps", "30", *extra],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "gns/b_simple" in out.stdout and (tmp_path / "quickstart.jsonl").exists()


def test_gpt_warmup_example_runs(tmp_path, shakespeare_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "gpt_warmup.py"),
            "--steps",
            "8",
            "--warmup",
            "3",
            "--batch",
            "2",
            "--data",
            shakespeare_path,
            "--out",
            str(tmp_path / "gpt"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "final B_simple" in out.stdout and (tmp_path / "gpt" / "run.jsonl").exists()


@pytest.mark.parametrize(
    "script,extra,expect",
    [
        ("lightning_example.py", ["--steps", "12", "--controller"], "after 12 steps: B_simple"),
        ("accelerate_example.py", ["--steps", "12", "--controller"], "after 12 steps: B_simple"),
        ("hf_trainer.py", ["--steps", "4"], "gradient_accumulation_steps="),
    ],
)
def test_trainer_examples_run(tmp_path, script, extra, expect):
    pytest.importorskip(
        {"lightning_example.py": "lightning", "hf_trainer.py": "transformers"}.get(script, "accelerate")
    )
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *extra],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert expect in out.stdout, out.stdout[-3000:]
