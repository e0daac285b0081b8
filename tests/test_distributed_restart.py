"""Checkpoint and restart under torchrun: a worker dies mid-training, the job restarts from its last
checkpoint (``--max-restarts 1``) and ends with the same tracker state as an uninterrupted run.

Runs ``examples/train_ddp.py`` (2 processes, gloo, loopback only) twice: uninterrupted, and with the
last rank calling ``os._exit(1)`` at step 25 on the first attempt (checkpoint every 10 steps, so 5
steps are replayed from the step-20 checkpoint).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "train_ddp.py")

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, name: str, *extra: str) -> dict:
    ckpt = tmp_path / name
    ckpt.mkdir()
    out = ckpt / "out.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        EXAMPLE,
        "--steps",
        "40",
        "--batch-size",
        "16",
        "--hidden",
        "32",
        "--ckpt",
        str(ckpt),
        "--ckpt-every",
        "10",
        "--log-every",
        "10",
        "--out",
        str(out),
        *extra,
    ]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as e:  # subprocess.run kills torchrun; its workers die with it
        pytest.fail(f"torchrun did not finish in 150 s:\n{(e.stdout or b'')[-3000:]!r}")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{log[-5000:]}"
    with open(out) as f:
        return {"result": json.load(f), "log": log}


def test_restart_resumes_tracker_state(tmp_path):
    plain = _torchrun(tmp_path, "uninterrupted")
    killed = _torchrun(tmp_path, "killed", "--die-at-step", "25")
    assert "rank 1 dies at step 25" in killed["log"]
    assert "[attempt 1] resumed from step 20" in killed["log"]
    a, b = plain["result"], killed["result"]
    assert a["attempt"] == 0 and b["attempt"] == 1
    assert b["params_sum"] == a["params_sum"]  # the training itself resumed exactly
    assert b["state"] == a["state"]  # EMA sufficient statistics and counters, bit for bit
    assert b["b_simple"] == a["b_simple"] and a["b_simple"] is not None
    assert a["state"]["counters"]["steps"] == 40 and a["state"]["method"] == "ddp"
