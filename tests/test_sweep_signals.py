"""`noisescale sweep --workers 2` as a real process: SIGTERM stops it cleanly (no process of the sweep
survives, the finished runs stay in the CSV, and a resumed sweep gives the file an uninterrupted
one gives), and SIGKILL of the parent takes its workers with it (no orphan keeps training).

Each sweep runs in its own session, so that its process group holds exactly its processes (the
parent, the worker processes, multiprocessing's resource tracker)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("scipy")

if not sys.platform.startswith("linux"):
    pytest.skip("process checks read /proc (Linux)", allow_module_level=True)

# The smallest sweep that the command fits (3 batch sizes) with runs long enough to stop one in the
# middle: target 0.3 is reached (the fit), 0.01 is not (every run trains to --max-steps).
ARGS = [
    "--task", "digits", "--batch-sizes", "8,16,32", "--lr-factors", "1,2", "--targets", "0.3,0.01",
    "--max-steps", "300", "--n-boot", "20", "--no-plot", "--no-progress", "--workers", "2",
]  # fmt: skip


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, process group) of a process from /proc, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2])


def _group(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None and st[2] == pgid and st[0] not in ("Z", "X"):
                out.append(int(name))
    return out


def _children(pid: int) -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit() and (_stat(int(n)) or ("", 0, 0))[1] == pid]


def _start(out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "noisescale.cli", "sweep", *ARGS, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: pgid == pid
    )


def _wait_until(cond, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep exited ({proc.returncode}) before {what}: {proc.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _assert_group_dies(pgid: int, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while _group(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _group(pgid)
    if left:
        cmds = {p: Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:120] for p in left}
        for p in left:  # do not leave them behind for the rest of the test session
            os.kill(p, signal.SIGKILL)
        raise AssertionError(f"processes of the sweep still running {seconds:g} s later: {cmds}")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in csv.DictReader(fh)]


def _data_rows(path: Path) -> int:
    try:
        return max(0, len(path.read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


def test_sigterm_stops_the_sweep_and_its_workers_and_resume_gives_the_same_csv(tmp_path):
    reference = _start(tmp_path / "ref")  # uninterrupted, alongside
    out = tmp_path / "stopped"
    csv_path = out / "sweep.csv"
    proc = _start(out)
    try:
        # stop it as soon as a run is finished: the other worker is in the middle of one
        _wait_until(lambda: _data_rows(csv_path) >= 2, 90, "the first finished run", proc)
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)  # to the parent only, as `timeout` and Kubernetes do
        _, err = proc.communicate(timeout=30)
        _, ref_err = reference.communicate(timeout=120)
    finally:
        for p in (proc, reference):
            if p.poll() is None:  # pragma: no cover - a failure above
                os.killpg(p.pid, signal.SIGKILL)
    assert len(workers) >= 2  # two workers (and the resource tracker) were running
    assert proc.returncode == 128 + signal.SIGTERM
    err_lines = err.strip().splitlines()
    assert len(err_lines) == 1 and "stopped by SIGTERM" in err_lines[0] and "resume" in err_lines[0], err
    assert "Traceback" not in err
    _assert_group_dies(proc.pid)

    assert reference.returncode == 0, ref_err
    expected = _rows(tmp_path / "ref" / "sweep.csv")
    assert len(expected) == 12  # 3 batch sizes x 2 learning rates x 2 targets
    kept = _rows(csv_path)
    assert 2 <= len(kept) < 12 and len(kept) % 2 == 0  # whole runs only, not all of them
    assert all(r in expected for r in kept)  # what was kept is what the uninterrupted sweep found

    resumed = subprocess.run(
        [sys.executable, "-m", "noisescale.cli", "sweep", *ARGS, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed: {len(kept) // 2} runs were already in" in resumed.stdout
    assert _rows(csv_path) == expected  # the same file, row for row (wall times aside)


def test_sigkill_of_the_parent_kills_the_workers(tmp_path):
    proc = _start(tmp_path / "killed")
    try:
        # both workers started and training (the CSV header is written before they start)
        _wait_until(lambda: len(_children(proc.pid)) >= 3, 60, "the worker processes", proc)
        time.sleep(2.0)  # past their start-up: the parent-death signal is armed
        workers = [p for p in _children(proc.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(workers) == 2
        proc.kill()  # SIGKILL: the parent cannot clean up
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:  # pragma: no cover
            os.killpg(proc.pid, signal.SIGKILL)
    _assert_group_dies(proc.pid)
