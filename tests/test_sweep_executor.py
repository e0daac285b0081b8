"""sweep(..., executor=...): runs on any concurrent.futures.Executor (a ProcessPoolExecutor, a real
dask.distributed LocalCluster, a submitit-like executor whose jobs are polled) give the same results
file as the in-process sweep, wall times aside; the sweep resumes through the executor after an
interrupt; a failed run cancels the runs not yet started; unpicklable training functions are refused
on one line before anything runs; worker processes get `threads_per_worker` torch threads while a
thread pool in this process leaves the caller's alone."""

from __future__ import annotations

import csv
import functools
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import noisescale as ns
from noisescale.cli import main as cli_main
from noisescale.sweeps import RESULT_FIELDS, read_results

# A grid small enough for seconds and large enough that runs finish out of order on 2 workers:
# 3 batch sizes x 2 learning rates x 2 seeds, two targets (the lower one is not always reached).
GRID = dict(batch_sizes=[4, 16, 64], learning_rates=[0.05, 0.2], targets=[0.6, 0.1], seeds=(0, 1), max_steps=150)


# ---------------------------------------------------------------------------------------
# Training functions (module level: the executors' worker processes import them by name).


def torch_train(batch_size: int, lr: float, seed: int):
    """Least squares on seeded data with SGD: a real torch run whose numbers depend on every step
    (loss, steps to each target, the last gradient norm as a metric)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    w_true = torch.randn(8, 1, generator=gen)
    X = torch.randn(256, 8, generator=gen)
    y = X @ w_true + 0.3 * torch.randn(256, 1, generator=gen)
    w = torch.zeros(8, 1, requires_grad=True)
    opt = torch.optim.SGD([w], lr=lr)
    step = 0
    while True:
        step += 1
        idx = torch.randint(256, (batch_size,), generator=gen)
        loss = ((X[idx] @ w - y[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        grad_norm = float(w.grad.norm())
        opt.step()
        with torch.no_grad():
            full = float(((X @ w - y) ** 2).mean())
        yield {"step": step, "loss": full, "grad_norm": grad_norm}


def interrupting_train(batch_size: int, lr: float, seed: int, *, stop_at: tuple[int, float, int]):
    """torch_train, except that the run ``stop_at`` raises KeyboardInterrupt (Ctrl-C in the middle of a
    sweep), as it would reach the sweep's process."""
    if (batch_size, lr, seed) == stop_at:
        raise KeyboardInterrupt
    yield from torch_train(batch_size, lr, seed)


def threads_train(batch_size: int, lr: float, seed: int):
    """Reports the torch threads and the process it ran in."""
    yield {"loss": 0.0, "threads": float(torch.get_num_threads()), "pid": float(os.getpid())}


CALLS: list[tuple[int, float, int]] = []
STARTED = threading.Event()
RELEASE = threading.Event()


def blocking_train(batch_size: int, lr: float, seed: int):
    """Records the call, then trains only once RELEASE is set (a long run, stopped by Ctrl-C)."""
    CALLS.append((batch_size, lr, seed))
    STARTED.set()
    RELEASE.wait(timeout=5)  # (bounded: a test that fails waits 12 x 5 s, not 12 x 30 s)
    yield 1.0


def failing_first_train(batch_size: int, lr: float, seed: int):
    CALLS.append((batch_size, lr, seed))
    if batch_size == 4:
        raise RuntimeError("this run failed")
    yield from torch_train(batch_size, lr, seed)


# ---------------------------------------------------------------------------------------
# Helpers.


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and list(rows[0]) == list(RESULT_FIELDS)
    return rows


def _without_wall(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    for r in rows:
        assert math.isfinite(float(r["wall_s"])) and float(r["wall_s"]) >= 0
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict[str, str]]:
    """The in-process sweep's file (one torch thread, as the workers), wall times left out."""
    path = tmp_path_factory.mktemp("reference") / "in-process.csv"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ns.sweep(torch_train, **GRID, results=path, progress=False)
    finally:
        torch.set_num_threads(before)
    rows = _without_wall(_rows(path))
    # the reference itself is a real sweep: every grid point and target, some reached, some not
    assert len(rows) == 3 * 2 * 2 * 2
    assert {r["reached"] for r in rows} == {"0", "1"}
    return rows


@pytest.fixture(scope="module")
def pool():
    """Two spawned worker processes for the whole module: each start imports torch (seconds on a
    loaded 2-core machine), so the tests share them."""
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


# ---------------------------------------------------------------------------------------
# Same file as in this process.


def test_process_pool_executor_gives_the_in_process_file(tmp_path, reference, pool):
    path = tmp_path / "pool.csv"
    res = ns.sweep(torch_train, **GRID, results=path, executor=pool, progress=False)
    assert _without_wall(_rows(path)) == reference
    assert len(res.runs) == 12 and res.skipped == 0
    # the returned runs are those of the file, in grid order
    assert [r.spec for r in res.runs] == [r.spec for r in read_results(path)]


def test_resume_through_an_executor_after_an_interrupt(tmp_path, reference, pool):
    """Ctrl-C in the 5th run (one worker thread: runs finish in grid order): the 4 finished runs are in
    the file, nothing else; the same sweep again, on worker processes, runs only the other 8 and leaves
    the uninterrupted file."""
    path = tmp_path / "resumed.csv"
    stop = functools.partial(interrupting_train, stop_at=(16, 0.05, 0))  # grid order: 4/0.05/0, 4/0.05/1, ...
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the thread runs in this process: one torch thread, as the reference
    try:
        with ThreadPoolExecutor(max_workers=1) as one, pytest.raises(KeyboardInterrupt) as info:
            ns.sweep(stop, **GRID, results=path, executor=one, progress=False)
    finally:
        torch.set_num_threads(before)
    if sys.version_info >= (3, 11):
        assert f"the 4 finished runs are in {path}: run the sweep again to resume" in info.value.__notes__[-1]
    rows = _rows(path)
    done = [(r["batch_size"], r["lr"], r["seed"]) for r in rows[::2]]
    assert len(rows) == 2 * len(done)  # both targets of every finished run, nothing torn
    assert done == [("4", "0.05", "0"), ("4", "0.05", "1"), ("4", "0.2", "0"), ("4", "0.2", "1")]
    res = ns.sweep(torch_train, **GRID, results=path, executor=pool, progress=False)
    assert res.skipped == 4 and len(res.runs) == 12
    assert _without_wall(_rows(path)) == reference


# ---------------------------------------------------------------------------------------
# A real Dask cluster.


@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed")
    psutil = pytest.importorskip("psutil")
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, worker_dashboard_address=None
    )
    client = distributed.Client(cluster, set_as_default=False)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
    # no orphan: every process the cluster started has exited
    deadline = time.monotonic() + 20
    while True:
        left = [p for p in me.children(recursive=True) if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left, f"processes of the Dask cluster outlived it: {left}"


def test_dask_local_cluster_gives_the_in_process_file(tmp_path, reference, dask_client):
    path = tmp_path / "dask.csv"
    res = ns.sweep(torch_train, **GRID, results=path, executor=dask_client.get_executor(), progress=False)
    assert _without_wall(_rows(path)) == reference
    assert len(res.runs) == 12
    # the runs went to the two worker processes, not this one
    pids = ns.sweep(
        threads_train,
        [1, 2, 3, 4],
        [0.1],
        targets=[0.5],
        max_steps=1,
        executor=dask_client.get_executor(),
        progress=False,
    )
    seen = {r.metrics["pid"] for r in pids.runs}
    assert os.getpid() not in seen and 1 <= len(seen) <= 2
    assert {r.metrics["threads"] for r in pids.runs} == {1.0}


def test_dask_closures_travel_by_value(dask_client):
    """Dask sends functions with cloudpickle: a closure is accepted (plain pickle would refuse it)."""
    offset = 0.25

    def closure(batch_size, lr, seed):
        yield offset + batch_size

    res = ns.sweep(
        closure, [1, 2], [0.1], targets=[10.0], max_steps=1, executor=dask_client.get_executor(), progress=False
    )
    assert [r.final_loss for r in res.runs] == [1.25, 2.25]


def test_cli_sweep_on_a_dask_scheduler_gives_the_in_process_file(tmp_path, dask_client, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("scipy")
    args = ["sweep", "--task", "digits", "--batch-sizes", "8,16,32", "--lr-factors", "1", "--targets", "0.5",
            "--max-steps", "60", "--n-boot", "20", "--no-plot", "--no-progress"]  # fmt: skip
    before = torch.get_num_threads()
    try:
        assert cli_main([*args, "--out", str(tmp_path / "local")]) == 0
        assert (
            cli_main([*args, "--out", str(tmp_path / "dask"), "--dask-scheduler", dask_client.scheduler.address]) == 0
        )
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert f"on the Dask cluster at {dask_client.scheduler.address} (2 workers now)" in out
    assert f"--dask-scheduler {dask_client.scheduler.address}" in (tmp_path / "dask" / "report.md").read_text()
    local, dask = (_without_wall(_rows(tmp_path / d / "sweep.csv")) for d in ("local", "dask"))
    assert dask == local and len(local) == 3
    assert all(r["metrics"] != "{}" for r in dask)  # the B_simple averages came back too


# ---------------------------------------------------------------------------------------
# Failures, cancellation, refusals.


def test_a_failed_run_cancels_the_runs_not_yet_started():
    """One worker thread: the first run fails; the 11 queued behind it are cancelled, never run."""
    CALLS.clear()
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        with pytest.raises(RuntimeError, match="this run failed") as info:
            ns.sweep(failing_first_train, **GRID, executor=pool, progress=False)
    finally:
        pool.shutdown(wait=True)
    assert CALLS == [(4, 0.05, 0)]
    if sys.version_info >= (3, 11):
        assert "11 of 11 unfinished runs cancelled" in " ".join(info.value.__notes__)


def test_ctrl_c_while_waiting_cancels_the_runs_not_yet_started(tmp_path):
    """KeyboardInterrupt in this (the main) thread while the sweep waits on a running run: the sweep
    stops within its 1 s wait, the 11 queued runs are cancelled and never run."""
    CALLS.clear()
    STARTED.clear()
    RELEASE.clear()
    sent: list[float] = []
    stopped = threading.Event()

    def ctrl_c() -> None:  # as Ctrl-C would: KeyboardInterrupt in the main thread, once the first run runs
        if STARTED.wait(timeout=30):
            time.sleep(0.1)
            sent.append(time.monotonic())
            # A real SIGINT to this process, as the terminal sends (the main thread runs the handler);
            # pressed again if the sweep has not stopped 1.5 s later, as a user would
            while not stopped.is_set() and time.monotonic() - sent[0] < 10:
                os.kill(os.getpid(), signal.SIGINT)
                stopped.wait(1.5)

    # A process started in the background by a non-interactive shell (`cmd &`, some CI runners) inherits
    # SIGINT ignored (POSIX), and Python then installs no KeyboardInterrupt handler: be the interactive
    # process whose Ctrl-C this test is about, for its duration.
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    pool = ThreadPoolExecutor(max_workers=1)
    interrupter = threading.Thread(target=ctrl_c)
    try:
        interrupter.start()
        with pytest.raises(KeyboardInterrupt) as info:
            try:
                ns.sweep(blocking_train, **GRID, results=tmp_path / "s.csv", executor=pool, progress=False)
            finally:
                stopped.set()
        stopped_after = time.monotonic() - sent[0]
    finally:
        RELEASE.set()  # the run that had started ends (a thread cannot be killed)
        stopped.set()
        interrupter.join()
        pool.shutdown(wait=True)
        signal.signal(signal.SIGINT, previous_handler)
    assert stopped_after < 3  # within the sweep's 1 s wait, not at the end of the run
    assert CALLS == [(4, 0.05, 0)]
    if sys.version_info >= (3, 11):
        note = info.value.__notes__[-1]
        assert "11 of 12 unfinished runs cancelled" in note and "the 0 finished runs are in" in note


class _Job:
    """A submitit job's interface (done/result/cancel): not a concurrent.futures.Future."""

    def __init__(self, fn, args):
        self._out = self._error = None
        self._thread = threading.Thread(target=self._run, args=(fn, args))
        self._thread.start()

    def _run(self, fn, args):
        time.sleep(0.05)
        try:
            self._out = fn(*args)
        except BaseException as e:  # as a job does: the failure comes back with result()
            self._error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._out

    def cancel(self) -> None:  # submitit's answers nothing
        return None


class _SubmititLike:
    def __init__(self):
        self.jobs: list[_Job] = []

    def submit(self, fn, *args):
        self.jobs.append(_Job(fn, args))
        return self.jobs[-1]


def test_an_executor_whose_jobs_are_polled(tmp_path):
    ex = _SubmititLike()
    path = tmp_path / "polled.csv"
    res = ns.sweep(torch_train, [4, 16], [0.1], targets=[0.6], max_steps=50, results=path, executor=ex, progress=False)
    assert len(ex.jobs) == 2 and all(j.done() for j in ex.jobs)
    serial = ns.sweep(torch_train, [4, 16], [0.1], targets=[0.6], max_steps=50, progress=False)
    assert [(r.spec, r.steps, r.metrics) for r in res.runs] == [(r.spec, r.steps, r.metrics) for r in serial.runs]
    assert len(_rows(path)) == 2
    CALLS.clear()
    with pytest.raises(RuntimeError, match="this run failed") as info:
        ns.sweep(failing_first_train, [4, 16], [0.1], targets=[0.6], max_steps=50, executor=ex, progress=False)
    if sys.version_info >= (3, 11):
        assert "cancel requested for the 1 unfinished runs" in info.value.__notes__[-1]
    for job in ex.jobs:
        job._thread.join()  # every job has ended before the next test


def test_unpicklable_training_functions_are_refused_before_anything_runs(tmp_path, pool):
    def local_train(batch_size, lr, seed):
        yield 1.0

    path = tmp_path / "never.csv"
    kw = dict(targets=[0.5], max_steps=5, results=path, progress=False)
    lam = r"train_fn test_sweep_executor\..*<lambda> cannot be sent .* module level"
    with pytest.raises(TypeError, match=lam):
        ns.sweep(lambda b, lr, s: iter([1.0]), [4], [0.1], executor=pool, **kw)
    with pytest.raises(TypeError, match=r"local_train cannot be sent to worker processes"):
        ns.sweep(local_train, [4], [0.1], workers=2, **kw)
    with pytest.raises(TypeError, match=r"functools.partial\(.*local_train, \.\.\.\) cannot be sent"):
        ns.sweep(functools.partial(local_train), [4], [0.1], workers=1, **kw)
    assert not path.exists()
    # a thread pool shares this process: a lambda is fine there
    with ThreadPoolExecutor(max_workers=2) as pool:
        res = ns.sweep(lambda b, lr, s: iter([0.4]), [4, 8], [0.1], executor=pool, **kw)
    assert [r.steps for r in res.runs] == [{0.5: 1}, {0.5: 1}]


def test_worker_processes_get_threads_per_worker_and_a_thread_pool_leaves_ours_alone(pool):
    kw = dict(targets=[0.5], max_steps=1, progress=False)
    one = ns.sweep(threads_train, [1], [0.1], executor=pool, threads_per_worker=1, **kw)
    three = ns.sweep(threads_train, [2], [0.1], executor=pool, threads_per_worker=3, **kw)
    assert one.runs[0].metrics["threads"] == 1.0 and three.runs[0].metrics["threads"] == 3.0
    assert one.runs[0].metrics["pid"] != os.getpid()
    ours = torch.get_num_threads()
    with ThreadPoolExecutor(max_workers=1) as pool:
        res = ns.sweep(threads_train, [1], [0.1], executor=pool, threads_per_worker=ours + 1, **kw)
    assert res.runs[0].metrics["threads"] == ours and torch.get_num_threads() == ours


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(workers=2, executor=_SubmititLike()), ValueError, "give workers=2 or an executor, not both"),
        (dict(executor=object()), TypeError, "executor must have a submit"),
        (dict(threads_per_worker=0), ValueError, "threads_per_worker must be a positive integer or None, got 0"),
    ],
)
def test_executor_argument_errors(kw, err, match):
    with pytest.raises(err, match=match):
        ns.sweep(torch_train, [4], [0.1], targets=[0.5], max_steps=5, progress=False, **kw)


def test_cli_refuses_workers_with_a_dask_scheduler_and_a_missing_scheduler_file(tmp_path, capsys):
    base = ["sweep", "--batch-sizes", "8,16,32", "--no-progress", "--out", str(tmp_path / "o")]
    before = torch.get_num_threads()
    try:
        assert cli_main([*base, "--workers", "2", "--dask-scheduler", "tcp://127.0.0.1:8786"]) == 2
        assert "--workers 2 and --dask-scheduler both say where runs go" in capsys.readouterr().err
        pytest.importorskip("distributed")
        assert cli_main([*base, "--dask-scheduler", str(tmp_path / "nope.json")]) == 2
        assert "no such scheduler file" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
