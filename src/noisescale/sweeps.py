"""Measuring the critical batch size by training: a batch-size sweep and the branched local method.

- :func:`sweep` runs a training function over a batch-size x learning-rate grid the way
  McCandlish et al. 2018 measured ``b_crit`` (App. A.2): the learning rates at each batch size
  are centred on ``eps_central(B) = eps* / (1 + B*/B)^alpha`` (``alpha = 1`` for SGD and
  momentum, ``0.5..1`` for Adam), every run records the steps and examples it took to reach
  each target, and :mod:`noisescale.critical` fits the fastest run per batch size
  (``SweepResult.fit()``). Runs can go to worker processes or to any ``concurrent.futures``
  executor (a Dask cluster, SLURM through submitit), each finished run is appended to a results
  file, and a resumed sweep skips the runs already in it.
- :func:`local_critical_batch` is the branched method of Merrill et al. 2025 ("Critical Batch
  Size Revisited", Sec. 3): from a checkpoint trained at batch ``B`` and learning rate ``eta``,
  train branches at ``k B`` with learning rate ``f(k) eta`` (``f(k) = k`` for SGD, ``sqrt(k)``
  for Adam) for the same number of examples, and take the largest ``k`` whose loss stays within
  ``epsilon`` of every smaller ``k``: the local critical batch at that point of training.

The training function is the user's; these functions only decide what to run and read what
comes back. No SciPy is needed except to fit. (The module is ``sweeps`` so that
``noisescale.sweep`` can be the function.)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib
import io
import itertools
import json
import math
import os
import pickle
import signal
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .critical import CriticalBatchFit, RunRecord, fit_sweep
from .lr_rules import eps_central, lr_scaling  # lr_scaling re-exported from here

__all__ = [
    "lr_grid",
    "sweep",
    "RunSpec",
    "RunResult",
    "SweepResult",
    "read_results",
    "RESULT_FIELDS",
    "TaskExecutor",
    "lr_scaling",
    "local_critical_batch",
    "BranchResult",
]

# Columns of the results file (one row per run and target). `noisescale fit` reads it directly.
RESULT_FIELDS = (
    "batch_size",
    "lr",
    "seed",
    "target",
    "steps",
    "examples",
    "reached",
    "diverged",
    "final_loss",
    "wall_s",
    "metrics",
)


# ---------------------------------------------------------------------------------------
# The grid.


def lr_grid(
    batch_sizes: Sequence[float],
    eps_star: float,
    b_star: float,
    *,
    alpha: float = 1.0,
    factors: Sequence[float] = (0.5, 1.0, 2.0),
) -> dict[float, list[float]]:
    """Learning rates per batch size: ``eps_central(B) * factor`` for each factor (App. A.2).

    ``eps_central(B) = eps* / (1 + B*/B)^alpha``: linear in ``B`` for ``B << B*`` and flat at
    ``eps*`` for ``B >> B*``. ``alpha = 1`` for SGD and momentum, ``0.5 <= alpha <= 1`` for Adam
    and RMSProp. A factor grid of powers of 2 around 1 is what the paper searched.
    """
    if not (eps_star > 0 and b_star > 0):
        raise ValueError(f"eps_star and b_star must be positive, got eps_star={eps_star!r}, b_star={b_star!r}")
    if not factors or any(not (f > 0) for f in factors):
        raise ValueError(f"factors must be positive numbers, got {factors!r}")
    return {b: [float(eps_central(float(b), eps_star, b_star, alpha)) * f for f in factors] for b in batch_sizes}


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: what :func:`sweep` passes to the training function."""

    batch_size: int
    lr: float
    seed: int = 0

    @property
    def key(self) -> tuple[str, str, str]:
        return (_num(self.batch_size), _num(self.lr), str(int(self.seed)))


def _num(x: float) -> str:
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else f"{x:.10g}"


@dataclass
class RunResult:
    """What one run did: steps and examples at which it first reached each target.

    ``steps[t]`` is ``None`` for a target not reached; ``budget_steps`` is then the number of
    steps the run was allowed (for a run stopped by ``max_steps`` or whose training function
    ended) — a censored observation ``S > budget_steps``. A run whose loss became non-finite is
    ``diverged``; its budget is ``max_steps`` when one was set (it would never have arrived).
    ``metrics``: the last value of every extra number the training function reported.
    """

    spec: RunSpec
    targets: tuple[float, ...]
    steps: dict[float, int | None]
    examples: dict[float, float | None]
    budget_steps: int
    budget_examples: float
    diverged: bool = False
    final_loss: float = math.nan
    wall_s: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """One results-file row per target (a target not reached carries the budget in ``steps``)."""
        out = []
        for t in self.targets:
            s = self.steps.get(t)
            reached = s is not None
            ex = self.examples[t] if s is not None else self.budget_examples
            assert ex is not None, "steps and examples are recorded together"
            out.append(
                {
                    "batch_size": _num(self.spec.batch_size),
                    "lr": _num(self.spec.lr),
                    "seed": int(self.spec.seed),
                    "target": _num(t),
                    "steps": int(s) if s is not None else int(self.budget_steps),
                    "examples": _num(ex),
                    "reached": int(reached),
                    "diverged": int(self.diverged),
                    "final_loss": f"{self.final_loss:.6g}",
                    "wall_s": f"{self.wall_s:.3f}",
                    "metrics": json.dumps(
                        {k: (v if math.isfinite(v) else None) for k, v in self.metrics.items()}, sort_keys=True
                    ),
                }
            )
        return out

    def records(self) -> list[RunRecord]:
        """The run as :class:`~noisescale.critical.RunRecord` s, one per target."""
        out = []
        for t in self.targets:
            s = self.steps.get(t)
            steps = s if s is not None else self.budget_steps
            ex = self.examples[t] if s is not None else self.budget_examples
            if steps is None or steps <= 0:
                continue  # a run that diverged before its first step says nothing
            out.append(
                RunRecord(
                    self.spec.batch_size,
                    steps,
                    target=t,
                    lr=self.spec.lr,
                    examples=ex,
                    reached=s is not None,
                    seed=self.spec.seed,
                )
            )
        return out

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, str]]) -> RunResult:
        r0 = rows[0]
        spec = RunSpec(int(float(r0["batch_size"])), float(r0["lr"]), int(float(r0["seed"])))
        targets = tuple(float(r["target"]) for r in rows)
        steps: dict[float, int | None] = {}
        examples: dict[float, float | None] = {}
        budget_s, budget_e = 0, 0.0
        for t, r in zip(targets, rows):
            if int(float(r["reached"])):
                steps[t], examples[t] = int(float(r["steps"])), float(r["examples"])
            else:
                steps[t], examples[t] = None, None
                budget_s, budget_e = int(float(r["steps"])), float(r["examples"])
        metrics = json.loads(r0.get("metrics") or "{}")
        return cls(
            spec,
            targets,
            steps,
            examples,
            budget_s,
            budget_e,
            bool(int(float(r0["diverged"]))),
            float(r0["final_loss"]),
            float(r0["wall_s"]),
            {k: (float(v) if v is not None else math.nan) for k, v in metrics.items()},
        )


# ---------------------------------------------------------------------------------------
# Running one training function.


def _observation(obs: Any, count: int) -> tuple[int, float, float | None, dict[str, float]]:
    """``(step, loss, examples or None, extra metrics)`` from what the training function yielded."""
    if isinstance(obs, Mapping):
        if "loss" not in obs:
            raise ValueError(f"a dict yielded by the training function needs a 'loss' key, got keys {sorted(obs)}")
        step = int(obs.get("step", count))
        ex = obs.get("examples")
        extra = {
            k: float(v)
            for k, v in obs.items()
            if k not in ("loss", "step", "examples") and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        return step, float(obs["loss"]), (float(ex) if ex is not None else None), extra
    if isinstance(obs, tuple) and len(obs) == 2:
        return int(obs[0]), float(obs[1]), None, {}
    return count, float(obs), None, {}


def run_one(
    train_fn: Callable[..., Iterable[Any]],
    spec: RunSpec,
    targets: Sequence[float],
    *,
    max_steps: int | None = None,
    max_examples: float | None = None,
    higher_is_better: bool = False,
) -> RunResult:
    """Run ``train_fn(batch_size, lr, seed)`` until every target is reached or a budget is spent.

    The training function returns an iterable (usually it is a generator that ``yield`` s). Each
    item is one observation: a loss (one per optimizer step), a ``(step, loss)`` pair, or a dict
    with ``"loss"`` and optionally ``"step"``, ``"examples"`` and other numbers to keep (the last
    value of each is stored in ``metrics``). A target is reached at the first observation with
    ``loss <= target`` (``>=`` with ``higher_is_better``). Evaluating the loss every few steps
    is fine: the step recorded is the step of the observation.
    """
    targets = tuple(float(t) for t in targets)
    steps: dict[float, int | None] = {t: None for t in targets}
    examples: dict[float, float | None] = {t: None for t in targets}
    metrics: dict[str, float] = {}
    t0 = time.perf_counter()
    step, ex_seen, loss, diverged = 0, 0.0, math.nan, False
    it = iter(train_fn(spec.batch_size, spec.lr, spec.seed))
    count = 0
    try:
        for obs in it:
            count += 1
            step, loss, ex, extra = _observation(obs, count)
            ex_seen = ex if ex is not None else float(step) * spec.batch_size
            metrics.update(extra)
            if not math.isfinite(loss):
                diverged = True
                break
            for t in targets:
                if steps[t] is None and (loss >= t if higher_is_better else loss <= t):
                    steps[t], examples[t] = step, ex_seen
            if all(v is not None for v in steps.values()):
                break
            if (max_steps is not None and step >= max_steps) or (max_examples is not None and ex_seen >= max_examples):
                break
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    if count == 0:
        raise ValueError(
            f"the training function yielded nothing for batch_size={spec.batch_size}, lr={spec.lr:g}; "
            "it must yield the loss as training goes (a generator with `yield loss`)"
        )
    budget_s, budget_e = step, ex_seen
    if diverged and max_steps is not None:
        budget_s, budget_e = max_steps, float(max_steps) * spec.batch_size
    return RunResult(
        spec, targets, steps, examples, budget_s, budget_e, diverged, loss, time.perf_counter() - t0, metrics
    )


# ---------------------------------------------------------------------------------------
# Worker processes: they die with the sweep.

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _set_parent_death_signal() -> bool:
    """Linux: ask the kernel to SIGKILL this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)) == 0
    except (OSError, AttributeError, TypeError):  # pragma: no cover - no libc prctl
        return False


def _parent_alive(sweep_pid: int, first_ppid: int) -> bool:
    if os.getppid() != first_ppid:
        return False  # re-parented: the process that started this one has died
    if os.name == "posix" and sweep_pid != first_ppid:
        try:
            os.kill(sweep_pid, 0)  # signal 0: only checks that the process exists
        except ProcessLookupError:
            return False
        except PermissionError:  # pragma: no cover - exists, owned by someone else (a reused pid)
            return False
    return True


def _watch_parent(sweep_pid: int, first_ppid: int, interval: float) -> None:  # pragma: no cover - in workers
    while True:
        time.sleep(interval)
        if not _parent_alive(sweep_pid, first_ppid):
            os._exit(1)


def _init_worker(
    threads: int | None, sweep_pid: int | None = None, watch_interval: float = 1.0
) -> None:  # pragma: no cover
    """Runs first in every worker process (measured in the tests by real processes).

    - The worker dies with the sweep: on Linux by the kernel (parent-death signal), everywhere by a
      watchdog thread that exits when the parent is gone. A sweep killed by SIGKILL (the OOM
      killer, a scheduler's hard kill) leaves no orphan training on.
    - SIGINT is ignored: Ctrl-C reaches the whole process group, and the parent stops the sweep
      (and these workers) itself, keeping every finished run.
    """
    first_ppid = os.getppid()
    if sweep_pid is not None:
        _set_parent_death_signal()
        if not _parent_alive(sweep_pid, first_ppid):
            os._exit(1)  # the parent died before the death signal was armed
        threading.Thread(
            target=_watch_parent, args=(sweep_pid, first_ppid, watch_interval), name="noisescale-watch", daemon=True
        ).start()
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_torch_threads(threads)


def _set_torch_threads(threads: int | None) -> None:
    """Give this (worker) process ``threads`` torch threads; ``None`` leaves them as they are."""
    if threads is None:
        return
    try:
        import torch
    except ImportError:  # pragma: no cover - a training function without torch
        return
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _kill_pool(pool: Any) -> None:
    """Stop a ``ProcessPoolExecutor`` now: cancel what has not started, kill what is running."""
    kill = getattr(pool, "kill_workers", None)  # Python >= 3.14
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    if kill is not None:
        with contextlib.suppress(Exception):  # already shut down
            kill()
    for proc in procs:
        with contextlib.suppress(OSError, ValueError, AttributeError):  # already gone or closed
            proc.kill()
    for proc in procs:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            proc.join(timeout=5)


# ---------------------------------------------------------------------------------------
# Any executor: a Dask cluster, Ray, SLURM through submitit, a ProcessPoolExecutor.


class TaskExecutor(Protocol):
    """What :func:`sweep` needs of an ``executor``: ``submit(fn, *args)`` returning a handle.

    The handle needs ``done()`` and ``result()``, and ``cancel()`` if pending runs are to be
    cancelled when the sweep stops. Every :class:`concurrent.futures.Executor` is one (a Dask
    ``Client.get_executor()``, a ``ProcessPoolExecutor``), and so is a submitit executor (its
    jobs have these three methods).
    """

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any: ...


# token of a running sweep -> the pid of its process. A task that finds its sweep's token here
# with its own pid runs inside the sweep's process (a thread pool), whose torch threads belong to
# the caller; a worker process (spawned, forked or on another machine) finds another pid or nothing.
_SWEEP_PROCESS: dict[str, int] = {}


def _run_task(
    train_fn: Callable[..., Iterable[Any]],
    spec: RunSpec,
    targets: tuple[float, ...],
    kwargs: dict[str, Any],
    threads: int | None,
    token: str,
) -> RunResult:
    """One run on an executor's worker: the unit of work that :func:`sweep` submits.

    Every argument is positional: a Dask ``ClientExecutor`` reads keyword arguments of ``submit``
    such as ``workers`` or ``retries`` as its own."""
    if _SWEEP_PROCESS.get(token) != os.getpid():
        _set_torch_threads(threads)
    return run_one(train_fn, spec, targets, **kwargs)


def _describe(fn: Any) -> str:
    func = getattr(fn, "func", fn)  # a functools.partial: name the function it wraps
    name = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"
    return f"functools.partial({name}, ...)" if func is not fn else name


def _check_picklable(fn: Callable[..., Any], pickler: str) -> None:
    """Refuse, on one line, a training function that worker processes cannot receive.

    ``pickler``: ``"pickle"`` (worker processes, ``ProcessPoolExecutor``), ``"cloudpickle"``
    (Dask, Ray, submitit: functions of ``__main__`` and closures travel by value; plain pickle if
    cloudpickle is not installed) or ``"none"`` (a thread pool shares this process)."""
    if pickler == "none":
        return
    dumps: Callable[[Any], bytes] = pickle.dumps
    if pickler == "cloudpickle":
        with contextlib.suppress(ImportError):  # by name: an optional dependency without type information
            dumps = importlib.import_module("cloudpickle").dumps
    try:
        dumps(fn)
    except Exception as e:
        why = " ".join(f"{type(e).__name__}: {e}".split())
        raise TypeError(
            f"train_fn {_describe(fn)} cannot be sent to worker processes ({why[:200]}); define it at module "
            "level in an importable module (not a lambda or a function defined inside another function) and "
            "bind extra arguments with functools.partial"
        ) from None


def _pickler_for(executor: Any) -> str:
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    if isinstance(executor, ThreadPoolExecutor):
        return "none"
    if isinstance(executor, ProcessPoolExecutor):
        return "pickle"
    return "cloudpickle"  # Dask, Ray and submitit serialise with cloudpickle


def _wait_some(handles: Mapping[int, Any], timeout: float) -> list[int]:
    """Indices of the finished ``handles``, waiting up to ``timeout`` seconds for one.

    ``concurrent.futures`` futures are waited on; other handles (submitit jobs) are polled once
    per call, then ``timeout`` is slept if none is done (a submitit ``done()`` touches the shared
    file system: once a second per job, not more). Either way the wait ends within ``timeout``, so
    that a signal handler (SIGTERM) runs within a second however long a run takes."""
    from concurrent.futures import FIRST_COMPLETED, Future, wait

    if all(isinstance(h, Future) for h in handles.values()):
        index = {h: i for i, h in handles.items()}
        done, _ = wait(list(index), timeout=timeout, return_when=FIRST_COMPLETED)
        return sorted(index[h] for h in done)
    done_idx = sorted(i for i, h in handles.items() if h.done())
    if not done_idx:
        time.sleep(timeout)
    return done_idx


def _run_on_executor(
    executor: TaskExecutor,
    train_fn: Callable[..., Iterable[Any]],
    todo: Sequence[tuple[RunSpec, tuple[float, ...]]],
    kwargs: dict[str, Any],
    finished: Callable[[RunResult], None],
    threads: int | None,
    path: Path | None,
    n_before: int,
) -> None:
    """Submit one task per run of ``todo``; this process alone writes each result as it arrives.

    On any exception (a failed run, Ctrl-C, SIGTERM turned into one by the caller) the runs not
    yet started are cancelled and the exception goes on: the finished runs are already written,
    and the sweep resumes from them. A generic executor cannot kill a run it has started (Dask
    lets it finish and drops the result; a submitit job is cancelled with ``scancel``)."""
    token = uuid.uuid4().hex
    _SWEEP_PROCESS[token] = os.getpid()
    handles: dict[int, Any] = {}
    n_done = 0
    try:
        for i, (sp, need) in enumerate(todo):
            handles[i] = executor.submit(_run_task, train_fn, sp, need, kwargs, threads, token)
        while handles:
            for i in _wait_some(handles, 1.0):
                res = handles.pop(i).result()
                if not isinstance(res, RunResult):
                    raise TypeError(
                        f"the executor returned {type(res).__name__!r} for run {todo[i][0]}, not a RunResult; "
                        "its submit(fn, *args) must return a future of fn(*args)"
                    )
                finished(res)
                n_done += 1
    except BaseException as e:
        answers = []
        for h in handles.values():
            cancel = getattr(h, "cancel", None)
            with contextlib.suppress(Exception):  # a handle that cannot cancel, or one already done
                answers.append(cancel() if cancel is not None else False)
        if hasattr(e, "add_note"):  # Python >= 3.11
            if all(isinstance(a, bool) for a in answers):  # concurrent.futures: True when cancelled
                what = f"{sum(answers)} of {len(handles)} unfinished runs cancelled"
            else:  # a submitit job's cancel() answers nothing
                what = f"cancel requested for the {len(handles)} unfinished runs"
            kept = (
                f"; the {n_before + n_done} finished runs are in {path}: run the sweep again to resume" if path else ""
            )
            e.add_note(
                f"noisescale.sweep stopped: {what} (a run already started may go on on the executor; "
                f"its result is not used){kept}"
            )
        raise
    finally:
        _SWEEP_PROCESS.pop(token, None)


# ---------------------------------------------------------------------------------------
# The results file.


def _same_target(a: float, b: float) -> bool:
    return _num(a) == _num(b)


def _bad_row(row: Mapping[str, str | None]) -> str | None:
    """Why a results row cannot be used, or ``None`` if it can."""
    for f in ("batch_size", "lr", "seed", "target", "steps", "examples", "final_loss", "wall_s"):
        v = row.get(f)
        try:
            x = float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return f"{f} = {v!r} is not a number"
        if f not in ("final_loss",) and not math.isfinite(x):
            return f"{f} = {v!r} is not a finite number"
    for f in ("reached", "diverged"):
        if row.get(f) not in ("0", "1"):
            return f"{f} = {row.get(f)!r} is not 0 or 1"
    try:
        m = json.loads(row.get("metrics") or "{}")
    except (ValueError, RecursionError):
        return "metrics is not valid JSON"
    if not isinstance(m, dict) or not all(v is None or isinstance(v, (int, float)) for v in m.values()):
        return "metrics is not a JSON object of numbers"
    return None


def _read_rows(path: Path, *, quiet: bool = False) -> list[tuple[int, dict[str, str]]]:
    """``(line, row)`` of every usable row of a results file, in file order (warnings for the rest).

    A torn last row (a stop in the middle of a write) and malformed or duplicated rows (the same
    run and target twice) are left out with a warning naming the line: their runs are redone or
    already present.
    """
    if not path.exists() or path.stat().st_size == 0:
        return []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a noisescale sweep results file (not UTF-8 text: {e.reason})") from None
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith(("\n", "\r")):
        if len(lines) > 1 and not quiet:
            warnings.warn(
                f"{path}:{len(lines)}: the last row is incomplete (the sweep stopped while writing it); "
                "left out, that run is redone",
                stacklevel=3,
            )
        lines = lines[:-1]
    if not lines:
        return []  # nothing but a torn header: a fresh file
    reader = csv.DictReader(io.StringIO("".join(lines)))
    names = [c.strip() for c in (reader.fieldnames or [])]
    missing = [f for f in RESULT_FIELDS if f not in names]
    dup = sorted({c for c in names if c in RESULT_FIELDS and names.count(c) > 1})
    if missing or dup:
        why = f"missing columns {missing}" if missing else f"column {dup[0]} appears twice"
        raise ValueError(f"{path}: not a noisescale sweep results file ({why}); give another --out/results path")
    reader.fieldnames = names
    out: list[tuple[int, dict[str, str]]] = []
    seen: set[tuple[str, str, str, str]] = set()
    bad: list[str] = []
    dups: list[int] = []
    for row in reader:
        line = reader.line_num
        if None in row or any(row.get(f) is None for f in RESULT_FIELDS):
            bad.append(f"{line} (wrong number of fields)")
            continue
        problem = _bad_row(row)
        if problem is not None:
            bad.append(f"{line} ({problem})")
            continue
        key = (
            _num(int(float(row["batch_size"]))),
            _num(float(row["lr"])),
            str(int(float(row["seed"]))),
            _num(float(row["target"])),
        )
        if key in seen:
            dups.append(line)
            continue
        seen.add(key)
        out.append((line, row))
    if bad and not quiet:
        warnings.warn(
            f"{path}: {len(bad)} malformed row{'s' if len(bad) > 1 else ''} left out (their runs are redone): "
            f"line {', line '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}",
            stacklevel=3,
        )
    if dups and not quiet:
        warnings.warn(
            f"{path}: {len(dups)} duplicated row{'s' if len(dups) > 1 else ''} (the same run and target again) "
            f"left out: line {', '.join(map(str, dups[:5]))}{', ...' if len(dups) > 5 else ''}",
            stacklevel=3,
        )
    return out


def read_results(path: str | os.PathLike) -> list[RunResult]:
    """Finished runs in a results file written by :func:`sweep`.

    One :class:`RunResult` per execution of a run (a resumed sweep whose targets changed runs a
    grid point again for the new targets only; its rows are a second execution of the same
    :class:`RunSpec`). A torn last line, malformed rows and duplicated (run, target) rows are
    left out with a warning naming the lines; the file may start with a UTF-8 byte-order mark.
    """
    groups: dict[tuple[Any, ...], list[dict[str, str]]] = {}
    for _, row in _read_rows(Path(path)):
        spec = RunSpec(int(float(row["batch_size"])), float(row["lr"]), int(float(row["seed"])))
        # the rows of one execution were written together and share these columns
        run_id = (row["diverged"], row["final_loss"], row["wall_s"], row["metrics"])
        groups.setdefault((spec.key, run_id), []).append(row)
    return [RunResult.from_rows(rows) for rows in groups.values()]


class _ResultsWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not path.exists() or path.stat().st_size == 0
        if not fresh:
            data = path.read_bytes()
            if not data.endswith(b"\n"):  # a torn last row (crash mid-write): cut it, the run is redone
                with open(path, "rb+") as fh:
                    fh.truncate(data.rfind(b"\n") + 1)
        self.fh = open(path, "a", newline="")  # noqa: SIM115 (held open; closed by close())
        self.writer = csv.DictWriter(self.fh, fieldnames=list(RESULT_FIELDS))
        if fresh:
            with _naming(path):
                self.writer.writeheader()
                self.fh.flush()

    def write(self, result: RunResult) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(RESULT_FIELDS))
        w.writerows(result.rows())
        with _naming(self.path):  # a full disk: a torn row left behind is cut on resume
            self.fh.write(buf.getvalue())  # all rows of a run in one write
            self.fh.flush()
            os.fsync(self.fh.fileno())

    def close(self) -> None:
        # after a failed write (a full disk) the buffer may still hold that run's rows: the write
        # already raised, and the run is redone on resume
        with contextlib.suppress(OSError):
            self.fh.close()


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An ``OSError`` raised while writing (``ENOSPC`` names no file) names ``path``."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e


def _canonical_order(path: Path, specs: Sequence[RunSpec], targets: Sequence[float]) -> None:
    """Rewrite a complete results file in grid order (runs as in ``specs``, then targets), so that a
    sweep gives the same file however it was interrupted, resumed or parallelised. Rows of runs
    outside the grid keep their order after them; duplicated rows are dropped. Atomic: the file is
    replaced only by a complete copy."""
    rows = _read_rows(path, quiet=True)
    spec_index = {sp.key: i for i, sp in enumerate(specs)}
    target_index = {_num(t): i for i, t in enumerate(targets)}
    n, m = len(spec_index), len(target_index)

    def order(item: tuple[int, tuple[int, dict[str, str]]]) -> tuple[int, int, int]:
        k, (_, row) = item
        key = (_num(int(float(row["batch_size"]))), _num(float(row["lr"])), str(int(float(row["seed"]))))
        return (spec_index.get(key, n), target_index.get(_num(float(row["target"])), m), k)

    ordered = [row for _, (_, row) in sorted(enumerate(rows), key=order)]
    with open(path, "rb") as raw:
        n_lines = sum(1 for _ in raw)
    if [r for _, r in rows] == ordered and n_lines == len(rows) + 1:
        return  # already in order, nothing left out
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(RESULT_FIELDS), extrasaction="ignore")
            w.writeheader()
            w.writerows(ordered)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------
# The sweep.


@dataclass
class SweepResult:
    """All runs of a sweep (resumed ones included) and where they were written.

    ``runs`` holds one :class:`RunResult` per execution: a run that a resumed sweep redid for
    targets the results file lacked appears twice, each with its own targets. ``skipped``: runs
    taken whole from the results file; ``partial``: runs redone for missing targets only.
    """

    runs: list[RunResult]
    targets: tuple[float, ...]
    path: Path | None = None
    skipped: int = 0
    partial: int = 0  # runs redone only for targets the results file lacked

    def records(self) -> list[RunRecord]:
        """Every run to every target, as :class:`~noisescale.critical.RunRecord` s."""
        return [r for run in self.runs for r in run.records() if r.target in self.targets]

    def fit(self, **kwargs: Any) -> dict[float, CriticalBatchFit]:
        """:func:`~noisescale.critical.fit_sweep` on :meth:`records` (needs SciPy)."""
        return fit_sweep(self.records(), **kwargs)

    def fastest(self, target: float) -> dict[int, RunResult]:
        """The fastest run reaching ``target`` at each batch size."""
        best: dict[int, RunResult] = {}
        best_steps: dict[int, int] = {}
        for run in self.runs:
            s = run.steps.get(target)
            if s is None:
                continue
            b = run.spec.batch_size
            if b not in best or s < best_steps[b]:
                best[b], best_steps[b] = run, s
        return dict(sorted(best.items()))


def sweep(
    train_fn: Callable[..., Iterable[Any]],
    batch_sizes: Sequence[int],
    learning_rates: Sequence[float] | Mapping[float, Sequence[float]] | Callable[[int], Sequence[float]] | None = None,
    targets: Sequence[float] = (),
    *,
    eps_star: float | None = None,
    b_star: float | None = None,
    alpha: float = 1.0,
    lr_factors: Sequence[float] = (0.5, 1.0, 2.0),
    seeds: Sequence[int] = (0,),
    max_steps: int | None = None,
    max_examples: float | None = None,
    higher_is_better: bool = False,
    results: str | os.PathLike | None = None,
    workers: int = 0,
    threads_per_worker: int | None = 1,
    mp_context: str = "spawn",
    executor: TaskExecutor | None = None,
    progress: bool = True,
) -> SweepResult:
    """Train at every batch size x learning rate (x seed) and record steps and examples to each target.

    Args:
        train_fn: ``train_fn(batch_size, lr, seed)`` returning an iterable of observations (see
            :func:`run_one`): write your training loop as a generator that ``yield`` s the
            loss. With ``workers > 0`` or a ``ProcessPoolExecutor`` it must be a module-level
            function (or a ``functools.partial`` of one); executors that send it with
            cloudpickle (Dask, Ray, submitit) also take closures. Checked before any run starts.
        batch_sizes: batch sizes to sweep (in examples, or tokens/frames consistently).
        learning_rates: the same list for every batch size, a mapping batch size -> list, a
            callable ``B -> list``, or ``None`` to centre a grid on the paper's rule
            ``eps_central(B) = eps_star/(1 + b_star/B)^alpha`` times ``lr_factors`` (App. A.2;
            ``alpha = 1`` for SGD, 0.5-1 for Adam).
        targets: loss values (lower is better unless ``higher_is_better``).
        seeds: one run per seed at every grid point.
        max_steps, max_examples: budget of a run; a target not reached within it is recorded as
            censored (``reached = 0``, ``steps`` = the budget). Give at least one.
        results: CSV file; every finished run is appended (one row per target, fsynced) and runs
            already in it are skipped, so an interrupted or killed sweep resumes where it
            stopped. A run in the file that lacks some of ``targets`` (the targets changed) is
            redone for those targets only; no (run, target) row is ever written twice. When the
            sweep completes, the file is rewritten in grid order (atomically), so that it does
            not depend on interruptions, resumption or the number of workers.
        workers: ``0`` runs in this process; ``n > 0`` uses ``n`` worker processes
            (``mp_context``, ``threads_per_worker`` torch threads each). Workers die with this
            process, even when it is killed with SIGKILL (Linux: a parent-death signal; elsewhere a
            watchdog thread), ignore SIGINT (this process stops them), and are killed at once
            when the sweep stops on an exception (Ctrl-C, a failed run): finished runs stay in
            ``results``. SIGTERM has its default action here; ``noisescale sweep`` turns it into
            a clean stop.
        threads_per_worker: torch threads of each worker process (workers or an executor's
            processes; a thread pool in this process is left alone); ``None`` leaves them as
            they are.
        executor: run the runs on any :class:`concurrent.futures.Executor` instead (a Dask
            ``Client.get_executor()``, a ``ProcessPoolExecutor``, an adaptor for Ray) or a
            submitit executor (SLURM): one task per run, whose :class:`RunResult` comes back to
            this process, which alone writes ``results`` as each run finishes (resume and the
            final grid order as above; the same rows as in this process, wall times aside). A
            run that raises stops the sweep and the exception goes on, as with ``workers``;
            on that or on Ctrl-C the runs not yet started are cancelled (one already started
            cannot be killed through a generic executor: stop its cluster to stop it). The
            executor stays yours: it is neither shut down nor closed. Not with ``workers``.
        progress: show a progress bar (tqdm) on stderr.

    Returns:
        :class:`SweepResult`; ``.fit()`` gives ``S_min``, ``E_min`` and ``b_crit`` per target.
    """
    targets = tuple(sorted({float(t) for t in targets}, reverse=not higher_is_better))
    if not targets:
        raise ValueError("give at least one target (e.g. targets=[0.5, 0.2]): the loss a run must reach")
    if any(not math.isfinite(t) for t in targets):
        raise ValueError(f"targets must be finite numbers, got {targets!r}")
    bs = [int(b) for b in batch_sizes]
    if not bs or any(b < 1 for b in bs) or any(float(b) != float(b0) for b, b0 in zip(bs, batch_sizes)):
        raise ValueError(f"batch_sizes must be positive integers, got {list(batch_sizes)!r}")
    if max_steps is None and max_examples is None:
        raise ValueError(
            "give max_steps or max_examples: a run that never reaches a target must stop "
            "somewhere (it is then recorded as censored)"
        )
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be positive, got {max_steps!r}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers!r}")
    if threads_per_worker is not None and not (isinstance(threads_per_worker, int) and threads_per_worker >= 1):
        raise ValueError(f"threads_per_worker must be a positive integer or None, got {threads_per_worker!r}")
    if executor is not None and workers:
        raise ValueError(
            f"give workers={workers} or an executor, not both: the executor runs every run (workers=0 with it)"
        )
    if executor is not None and not callable(getattr(executor, "submit", None)):
        raise TypeError(
            f"executor must have a submit(fn, *args) method (a concurrent.futures.Executor), got {type(executor).__name__}"
        )
    if executor is not None or workers:
        # before any run and before the results file is touched: one clear line, not a pickling
        # traceback from inside the first future
        _check_picklable(train_fn, _pickler_for(executor) if executor is not None else "pickle")
    if learning_rates is None:
        if eps_star is None or b_star is None:
            raise ValueError(
                "give learning_rates, or eps_star and b_star to centre the grid on "
                "eps_central(B) = eps_star/(1 + b_star/B)^alpha (App. A.2)"
            )
        grid = lr_grid(bs, eps_star, b_star, alpha=alpha, factors=lr_factors)
        lrs_for: Callable[[int], Sequence[float]] = lambda b: grid[b]
    elif callable(learning_rates):
        lrs_for = learning_rates
    elif isinstance(learning_rates, Mapping):
        lr_map = {int(k): v for k, v in learning_rates.items()}
        missing = [b for b in bs if b not in lr_map]
        if missing:
            raise ValueError(f"learning_rates has no entry for batch sizes {missing}")
        lrs_for = lambda b: lr_map[b]
    else:
        fixed = list(learning_rates)
        lrs_for = lambda b: fixed
    specs = [RunSpec(b, float(lr), int(s)) for b in bs for lr in lrs_for(b) for s in seeds]
    for sp in specs:
        if not (math.isfinite(sp.lr) and sp.lr > 0):
            raise ValueError(f"learning rate {sp.lr!r} at batch size {sp.batch_size} is not a positive number")

    # What the results file already has: every execution of every run, and per run the targets
    # it covers. A run is redone only for the targets it lacks (changed --targets), never twice.
    canon = {_num(t): t for t in targets}
    previous: dict[tuple[str, str, str], list[RunResult]] = {}
    path = Path(results) if results is not None else None
    if path is not None:
        for r in read_results(path):
            previous.setdefault(r.spec.key, []).append(_retarget(r, canon))
    runs: list[RunResult] = []
    todo: list[tuple[RunSpec, tuple[float, ...]]] = []
    skipped = partial = 0
    for sp in specs:
        old = [r for r in previous.get(sp.key, []) if any(_num(t) in canon for t in r.targets)]
        covered = {_num(t) for r in old for t in r.targets}
        need = tuple(t for t in targets if _num(t) not in covered)
        runs += old
        if not need:
            skipped += 1
        else:
            partial += bool(old)
            todo.append((sp, need))
    writer = _ResultsWriter(path) if path is not None else None
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(specs), initial=skipped, desc="sweep", unit="run", file=sys.stderr, dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            bar = None
    kwargs: dict[str, Any] = dict(max_steps=max_steps, max_examples=max_examples, higher_is_better=higher_is_better)

    def finished(res: RunResult) -> None:
        runs.append(res)
        if writer is not None:
            writer.write(res)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"B={res.spec.batch_size} lr={res.spec.lr:.3g}", refresh=False)

    try:
        if executor is not None:
            if todo:
                _run_on_executor(executor, train_fn, todo, kwargs, finished, threads_per_worker, path, len(runs))
        elif workers == 0:
            for sp, need in todo:
                finished(run_one(train_fn, sp, need, **kwargs))
        elif todo:
            _run_in_workers(train_fn, todo, kwargs, finished, workers, threads_per_worker, mp_context, path, len(runs))
    finally:
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()
    if path is not None:
        _canonical_order(path, specs, targets)
    order = {sp.key: i for i, sp in enumerate(specs)}
    runs.sort(key=lambda r: order.get(r.spec.key, len(order)))
    return SweepResult(runs, targets, path, skipped, partial)


def _retarget(run: RunResult, canon: Mapping[str, float]) -> RunResult:
    """``run`` with its targets replaced by the equal targets of this sweep (as the file writes them)."""
    if all(canon.get(_num(t), t) == t for t in run.targets):
        return run
    m = {t: canon.get(_num(t), t) for t in run.targets}
    return dataclasses.replace(
        run,
        targets=tuple(m[t] for t in run.targets),
        steps={m.get(t, t): v for t, v in run.steps.items()},
        examples={m.get(t, t): v for t, v in run.examples.items()},
    )


def _run_in_workers(
    train_fn: Callable[..., Iterable[Any]],
    todo: Sequence[tuple[RunSpec, tuple[float, ...]]],
    kwargs: dict[str, Any],
    finished: Callable[[RunResult], None],
    workers: int,
    threads: int | None,
    mp_context: str,
    path: Path | None,
    n_before: int,
) -> None:
    """Run ``todo`` in worker processes that die with this one; on any exception (SIGTERM turned
    into one by the caller, Ctrl-C, a failed run) the workers are killed at once and the runs
    finished so far stay written."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context(mp_context)
    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(threads, os.getpid())
    )
    n_done = 0
    try:
        futs = {pool.submit(run_one, train_fn, sp, need, **kwargs): i for i, (sp, need) in enumerate(todo)}
        pending = set(futs)
        while pending:
            # a timeout, so that a signal handler runs within a second however long a run takes
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for fut in sorted(done, key=futs.__getitem__):
                finished(fut.result())
                n_done += 1
    except BrokenProcessPool:
        _kill_pool(pool)
        kept = f"the {n_before + n_done} finished runs are in {path}: " if path is not None else ""
        raise ChildProcessError(
            "a sweep worker process died abruptly (killed by a signal, or out of memory?); "
            f"{kept}run the sweep again to resume (fewer workers need less memory)"
        ) from None
    except BaseException:
        _kill_pool(pool)
        raise
    pool.shutdown(wait=True)


# ---------------------------------------------------------------------------------------
# Branched local critical batch (Merrill et al. 2025).


@dataclass
class BranchResult:
    """The branches and the local critical batch they give.

    ``losses[i]`` is the loss of the branch at ``ks[i]`` after ``examples`` examples (mean over
    seeds). ``passed[i]``: ``losses[i] <= min(losses[:i]) + epsilon``. ``k_star`` is the largest
    ``k`` such that it and every smaller ``k`` passed; ``b_star = k_star * base_batch``.
    ``b_star_geo`` is Merrill et al.'s report, the geometric mean of ``b_star`` and the next batch
    tested; ``None`` when even the largest ``k`` passed (``at_limit``: then ``b_star`` is only a
    lower bound).
    """

    base_batch: int
    base_lr: float
    examples: int
    epsilon: float
    ks: list[int]
    batch_sizes: list[int]
    lrs: list[float]
    losses: list[float]
    passed: list[bool]
    k_star: int
    b_star: int
    b_star_geo: float | None
    at_limit: bool

    def summary(self) -> str:
        geo = f", Merrill's geometric mean {self.b_star_geo:.4g}" if self.b_star_geo is not None else ""
        lim = " (the largest k tested passed: a lower bound)" if self.at_limit else ""
        return f"local critical batch {self.b_star} (k* = {self.k_star}{geo}){lim}"


def local_critical_batch(
    branch_fn: Callable[[int, float, int, int], float],
    base_batch: int,
    base_lr: float,
    *,
    examples: int,
    epsilon: float,
    ks: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    optimizer: str = "adam",
    lr_scale: Callable[[float], float] | None = None,
    seeds: Sequence[int] = (0,),
) -> BranchResult:
    """The local critical batch at a checkpoint by branched training (Merrill et al. 2025, Sec. 3).

    For each ``k`` in ``ks`` calls ``branch_fn(batch_size=k*base_batch, lr=f(k)*base_lr,
    steps=examples // (k*base_batch), seed)``, which must restore the checkpoint, train that
    many steps and return the (smoothed) training loss at the end. Every branch sees the same
    number of examples, so below the critical batch (perfect scaling, McCandlish Sec. 2.2) the
    losses agree and above it they fall behind. ``k*`` is the largest ``k`` whose loss is within
    ``epsilon`` of every smaller ``k`` (Merrill et al.: ``L_{k*} <= L_k + epsilon`` for all
    ``k < k*``; here also every ``k`` below ``k*`` must pass, so one lucky branch past a failed
    one does not count).

    Args:
        examples: examples per branch (Merrill et al.'s ``Delta``); a multiple of every
            ``k * base_batch``.
        epsilon: loss tolerance (Merrill et al. use 0.01 nats for language models).
        ks: batch multipliers, increasing, starting at 1.
        optimizer: ``"adam"`` (``f(k) = sqrt(k)``) or ``"sgd"`` (``f(k) = k``), see :func:`lr_scaling`.
        lr_scale: a custom ``f(k)`` instead.
        seeds: branches are repeated per seed and their losses averaged.
    """
    ks = [int(k) for k in ks]
    if not ks or ks[0] != 1 or any(b <= a for a, b in itertools.pairwise(ks)):
        raise ValueError(f"ks must be increasing integers starting at 1, got {ks!r}")
    if not (isinstance(base_batch, int) and base_batch >= 1):
        raise ValueError(f"base_batch must be a positive integer, got {base_batch!r}")
    if not (base_lr > 0 and math.isfinite(base_lr)):
        raise ValueError(f"base_lr must be positive, got {base_lr!r}")
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a non-negative number, got {epsilon!r}")
    bad = [k for k in ks if examples % (k * base_batch) != 0]
    if examples < ks[-1] * base_batch or bad:
        raise ValueError(
            f"examples={examples} must be a positive multiple of every k*base_batch "
            f"(largest {ks[-1] * base_batch}); not a multiple for k in {bad}"
        )
    if not seeds:
        raise ValueError("give at least one seed")
    f = lr_scale if lr_scale is not None else lr_scaling(optimizer)
    batch_sizes = [k * base_batch for k in ks]
    lrs = [float(f(k)) * base_lr for k in ks]
    losses = []
    for b, lr in zip(batch_sizes, lrs):
        vals = [float(branch_fn(b, lr, examples // b, s)) for s in seeds]
        losses.append(sum(vals) / len(vals) if all(math.isfinite(v) for v in vals) else math.inf)
    passed = [True]
    for i in range(1, len(ks)):
        passed.append(math.isfinite(losses[i]) and losses[i] <= min(losses[:i]) + epsilon)
    i_star = 0
    while i_star + 1 < len(ks) and passed[i_star + 1]:
        i_star += 1
    at_limit = i_star == len(ks) - 1
    geo = None if at_limit else math.sqrt(batch_sizes[i_star] * batch_sizes[i_star + 1])
    if any(not math.isfinite(v) for v in losses[: i_star + 1]):  # pragma: no cover - excluded above
        warnings.warn("a branch below k* diverged", stacklevel=2)
    return BranchResult(
        base_batch,
        base_lr,
        examples,
        epsilon,
        ks,
        batch_sizes,
        lrs,
        losses,
        passed,
        ks[i_star],
        batch_sizes[i_star],
        geo,
        at_limit,
    )
