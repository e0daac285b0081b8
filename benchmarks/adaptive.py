"""The adaptive-batch study (issue #12): fixed batches, open-loop ramps, Seesaw and the controller.

On two tasks -- the digits MLP with SGD + momentum 0.9, and a small tinyshakespeare character
transformer with AdamW -- every arm is trained to two target losses with a small learning-rate
grid and 3 seeds, and its optimizer steps S and examples E to each target are placed on the
fixed-batch (E, S) frontier that the library measures from the fixed-batch sweep
(``noisescale.sweep`` -> ``noisescale.critical.frontier`` / ``fit_sweep``: McCandlish et al.
2018, Eqs. 2.11-2.12, App. A.2-A.3). The arms:

- ``fixed``: a constant batch at each batch size of the sweep (the frontier; its smallest and
  largest batch are the "fixed small" and "fixed large" arms);
- ``fixed-bcrit``: a constant batch at the sweep's fitted ``b_crit`` of each target;
- ``ramp-*``: an open-loop doubling ramp at fixed example counts (OLMo-core's batch-size
  schedule, Merrill et al. 2025), the learning rate following the sweep's own rule
  ``eps_central(B)`` (App. A.2: sqrt for AdamW in the small-batch regime -- OLMo-core's
  ``lr x sqrt(2)`` per doubling -- and the saturating ``B/(B + B*)`` for SGD, the paper's Eq. 2.6
  form, linear in B for small batches);
- ``seesaw-*``: Seesaw (Meterez et al. 2025) on a step-decay schedule that would halve the
  learning rate at the same example counts: each halving becomes ``lr x 1/sqrt(2)`` and
  ``batch x 2``;
- ``controller``: ``noisescale.controller.BatchSizeController`` with its defaults
  (``signal="b_simple"``, ``factor=1``, ``lr_rule="auto"``), starting at the ramps' first batch;
- ``controller-x4``: the same with ``factor=4``, a tuned variant reported beside it (not the
  acceptance arm).

Every arm's learning rate at its starting batch ``B0`` is ``f x eps_central(B0)`` for ``f`` in
the task's grid (the fixed sweep uses the same grid at every batch). Steps and examples to a
target are counted at the first evaluation at or below it: the digits task evaluates the
full-training-set loss (the paper's model is about the training loss), the character model a
fixed held-out set of windows from the last 10% of the text; both are deterministic functions
of the parameters, so no smoothing is needed, and an evaluation happens at least every
``eval_examples`` examples (every step at large batches). Seeds fix the initialisation and the
batches drawn (with replacement), the same for every arm (common random numbers).

Per (arm, learning rate) the steps and examples are the geometric mean over the seeds (a seed
that does not reach a target makes the point censored at its budget). The best learning rate of a
fixed batch is the fastest (as in the frontier); that of an adaptive arm the one with the lowest
``S / S_frontier(E)``, its steps against the fitted fixed-batch frontier at the same examples. The fixed sweep's seed means are fitted by
``noisescale.critical.fit_sweep`` and written to ``frontier.csv`` (``noisescale fit
DIR/TASK/frontier.csv`` reproduces the fit).

Writes, under ``--out`` (default ``runs/adaptive``, ignored by git): ``TASK/<arm>.csv`` (one results file per
arm in the format of ``noisescale.sweep``: appended run by run, fsynced, so a crash loses at most
the run in progress, and the same command resumes), ``TASK/traces/`` (batch, learning rate,
loss and B_simple along each adaptive run), ``TASK/frontier.csv``, ``report.md``,
``report.json`` and ``adaptive-TASK.png`` (copied to ``docs/img/`` with ``--docs``).

    python benchmarks/adaptive.py --workers 2 --docs   # the full study (see docs/adaptive-batch.md)
    python benchmarks/adaptive.py --quick           # a CI dry run: seconds, every code path
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt"
DOCS_IMG = HERE.parent / "docs" / "img"


# ---------------------------------------------------------------------------------------
# Tasks.


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of the study: model, optimizer, data, learning-rate rule, targets and budgets."""

    name: str
    unit: str  # what one example is
    optimizer: str  # "sgd" (momentum 0.9) or "adamw"
    batch_sizes: tuple[int, ...]  # the fixed-batch sweep
    lr_factors: tuple[float, ...]  # multiples of eps_central(B)
    eps_star: float  # eps_central(B) = eps*/(1 + B*/B)^alpha (App. A.2)
    b_star: float
    alpha: float  # 1 for SGD, 0.5 for Adam
    targets: tuple[float, ...]
    max_steps: int
    max_examples: float
    b0: int  # first batch of the ramps, Seesaw and the controller
    b_max: int  # largest batch they may reach
    micro: int  # the controller's micro-batch size
    ramps: dict[str, tuple[float, ...]]  # ramp/Seesaw name -> example counts of the doublings
    eval_examples: int  # evaluate at least every this many examples
    seeds: tuple[int, ...] = (0, 1, 2)
    model: dict[str, int] = dataclasses.field(default_factory=dict)


def _geometric(first: float, ratio: float, n: int) -> tuple[float, ...]:
    return tuple(first * ratio**j for j in range(n))


TASKS: dict[str, Task] = {
    "digits": Task(
        name="digits",
        unit="examples",
        optimizer="sgd",
        batch_sizes=(16, 32, 64, 128, 256, 512, 1024),
        lr_factors=(0.5, 1.0, 2.0),
        eps_star=0.5,
        b_star=128.0,
        alpha=1.0,
        targets=(0.1, 0.03),
        max_steps=3000,
        max_examples=400_000,
        b0=16,
        b_max=1024,
        micro=16,
        ramps={"a": _geometric(500, 2.0, 6), "b": _geometric(2_000, 2.0, 6)},
        eval_examples=64,
        model={"hidden": 128},
    ),
    "char": Task(
        name="char",
        unit="sequences of 32 characters",
        optimizer="adamw",
        batch_sizes=(16, 32, 64, 128, 256, 512),
        lr_factors=(0.5, 1.0, 2.0),
        eps_star=0.12,
        b_star=1024.0,
        alpha=0.5,
        targets=(2.5, 2.3),
        max_steps=1200,
        max_examples=60_000,
        b0=16,
        b_max=512,
        micro=16,
        ramps={"a": _geometric(1_000, 2.0, 5), "b": _geometric(3_000, 2.0, 5)},
        eval_examples=256,
        model={"d": 32, "heads": 4, "layers": 1, "seq": 32, "n_eval": 128},
    ),
}

# --quick: every code path in seconds (tiny budgets, one seed, one learning rate)
QUICK: dict[str, Task] = {
    "digits": dataclasses.replace(
        TASKS["digits"],
        batch_sizes=(16, 64, 256),
        lr_factors=(1.0,),
        targets=(1.0, 0.5),
        max_steps=60,
        max_examples=6_000,
        b_max=64,
        ramps={"a": _geometric(200, 2.0, 2)},
        seeds=(0,),
    ),
    "char": dataclasses.replace(
        TASKS["char"],
        batch_sizes=(8, 16, 32),
        lr_factors=(1.0,),
        targets=(3.6, 3.4),
        max_steps=40,
        max_examples=1_000,
        b0=8,
        b_max=32,
        micro=4,
        ramps={"a": _geometric(100, 2.0, 2)},
        eval_examples=32,
        seeds=(0,),
        model={"d": 16, "heads": 2, "layers": 1, "seq": 16, "n_eval": 16},
    ),
}

ARMS = ("fixed", "fixed-bcrit", "ramp", "seesaw", "controller", "controller-x4")
# controller-x4: the controller with factor=4 -- a tuned variant, not the acceptance arm: B_simple
# lies at 0.2-0.4 x b_crit on these tasks (docs/critical-batch.md), and factor ~ b_crit/B_simple
# aims the batch at b_crit instead of at B_simple


def lr_at(task: Task, factor: float, batch: float) -> float:
    """``factor x eps_central(B)``: the learning rate the sweep uses at batch ``B`` (App. A.2)."""
    from noisescale.estimators import eps_central

    return float(factor * eps_central(float(batch), task.eps_star, task.b_star, task.alpha))


# ---------------------------------------------------------------------------------------
# Data and models (cached per process; module level so that spawn workers can pickle them).


@lru_cache(maxsize=2)
def _digits() -> tuple[Any, Any]:
    from noisescale.data import load_digits

    X, y, _, _ = load_digits(seed=0)
    return X, y


@lru_cache(maxsize=2)
def _text(seq: int, n_eval: int) -> tuple[Any, Any, Any, int]:
    """Training ids (the first 90% of tinyshakespeare), a fixed held-out set of windows (inputs,
    next-character targets) and the vocabulary size."""
    import torch

    if not DATA.exists():
        raise FileNotFoundError(f"{DATA}: tinyshakespeare not found (it lives in ../shared/data beside the repository)")
    text = DATA.read_text(encoding="utf-8")
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(0.9 * len(ids))
    train, held = ids[:cut], ids[cut:]
    g = torch.Generator().manual_seed(1234)
    start = torch.randint(0, len(held) - seq - 1, (n_eval,), generator=g)
    w = held[start[:, None] + torch.arange(seq + 1)]
    return train, w[:, :-1].contiguous(), w[:, 1:].contiguous(), len(vocab)


class _Problem:
    """Model, optimizer, batch sampler, loss and evaluation of one run of a task."""

    def __init__(self, task: Task, lr: float, seed: int) -> None:
        import torch
        import torch.nn.functional as F

        self.task = task
        self.gen = torch.Generator().manual_seed(10_000 + seed)
        if task.name == "digits":
            from noisescale.data import digits_mlp

            self.X, self.y = _digits()
            self.model = digits_mlp(task.model["hidden"], seed=seed)
            self.opt: Any = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9)
            self.loss_fn = lambda out, tgt: F.cross_entropy(out, tgt)
        else:
            tests = str(HERE.parent / "tests")
            if tests not in sys.path:
                sys.path.insert(0, tests)
            from models import CharTransformer  # the tests' reference char transformer

            m = task.model
            self.train_ids, self.vx, self.vy, vocab = _text(m["seq"], m["n_eval"])
            self.model = CharTransformer(
                vocab, d=m["d"], heads=m["heads"], layers=m["layers"], block=m["seq"], seed=seed
            )
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
            self.loss_fn = CharTransformer.loss
            self.offsets = torch.arange(m["seq"] + 1)

    def batch(self, n: int) -> tuple[Any, Any]:
        """``n`` examples drawn with replacement (i.i.d., as the noise-scale estimators assume)."""
        import torch

        if self.task.name == "digits":
            idx = torch.randint(len(self.y), (n,), generator=self.gen)
            return self.X[idx], self.y[idx]
        start = torch.randint(0, len(self.train_ids) - len(self.offsets), (n,), generator=self.gen)
        w = self.train_ids[start[:, None] + self.offsets]
        return w[:, :-1], w[:, 1:]

    def evaluate(self) -> float:
        """The target loss: full training set (digits) or the fixed held-out windows (char)."""
        import torch

        with torch.no_grad():
            if self.task.name == "digits":
                return float(self.loss_fn(self.model(self.X), self.y))
            return float(self.loss_fn(self.model(self.vx), self.vy))

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr


# ---------------------------------------------------------------------------------------
# One run of one arm (a generator of observations for noisescale.sweep).


def train(
    batch_size: int,
    lr: float,
    seed: int,
    *,
    task: Task,
    arm: str,
    ramp: tuple[float, ...] = (),
    factor: float = 1.0,
    trace: str | None = None,
) -> Iterator[dict[str, float]]:
    """Train one arm from batch ``batch_size`` and learning rate ``lr``; yield the target loss as it goes.

    ``arm``: ``"fixed"`` (constant batch and lr), ``"ramp"`` (batch x 2 at each example count
    in ``ramp``, lr = lr x eps_central(B)/eps_central(B0)), ``"seesaw"`` (batch x 2 and
    lr x 1/sqrt(2) at each count) or ``"controller"`` (BatchSizeController decides). Each
    observation carries ``step``, ``examples`` (seen so far), ``loss``, ``batch`` and ``lr``.
    ``trace``: a CSV path; the observations are written there when the run ends (or stops).
    """
    import torch

    torch.manual_seed(seed)
    p = _Problem(task, lr, seed)
    f0 = lr / lr_at(task, 1.0, batch_size)  # the run's learning-rate factor
    B, cur_lr = int(batch_size), float(lr)
    gns = ctl = None
    if arm == "controller":
        from noisescale import GradientNoiseScale
        from noisescale.controller import BatchSizeController

        # the defaults throughout: method "auto" (exact per-example norms on these models),
        # signal B_simple, factor 1, lr_rule "auto" (saturating Eq. 2.6 for SGD, sqrt for AdamW)
        gns = GradientNoiseScale(p.model)
        ctl = BatchSizeController(
            gns, p.opt, batch_size=B, micro_batch_size=task.micro, max_batch_size=task.b_max, factor=factor
        )
    elif arm not in ("fixed", "ramp", "seesaw"):
        raise ValueError(f"unknown arm {arm!r}; expected one of fixed, ramp, seesaw, controller")
    rows: list[dict[str, float]] = []
    step, seen, next_eval, next_change = 0, 0.0, 0.0, 0
    L0 = p.evaluate()
    try:
        while True:
            if ctl is not None:
                B, k = int(ctl.batch_size), int(ctl.accumulation)
            else:
                k = 1
            x, y = p.batch(B)
            if k == 1:
                p.loss_fn(p.model(x), y).backward()
            else:
                for xb, yb in zip(x.tensor_split(k), y.tensor_split(k)):
                    (p.loss_fn(p.model(xb), yb) / k).backward()
            if gns is not None:
                gns.step()
            p.opt.step()
            p.opt.zero_grad(set_to_none=True)
            step += 1
            seen += B
            if ctl is not None:
                ctl.step()
                # the controller applies its scale inside optimizer.step(); param_groups keep the base lr
                cur_lr = ctl.lrs()[0]
            else:
                # open-loop schedules: the batch of the next step, after `seen` examples
                while next_change < len(ramp) and seen >= ramp[next_change] and task.b_max >= 2 * B:
                    next_change += 1
                    B *= 2
                    cur_lr = lr_at(task, f0, B) if arm == "ramp" else cur_lr / math.sqrt(2.0)
                    p.set_lr(cur_lr)
            if seen < next_eval:
                continue
            next_eval = seen + task.eval_examples
            L = p.evaluate()
            obs = {"step": step, "examples": seen, "loss": L, "batch": B, "lr": cur_lr}
            if gns is not None and ctl is not None:
                b = gns.b_simple
                obs["b_simple"] = b if b is not None else math.nan
                obs["lr_scale"] = ctl.lr_scale
                obs["changes"] = len(ctl.changes)
            if arm != "fixed":
                rows.append(obs)
            if not math.isfinite(L) or L > 3.0 * L0:
                obs["loss"] = math.nan  # diverged
                yield obs
                return
            yield obs
    finally:
        if ctl is not None:
            ctl.close()
        if gns is not None:
            gns.close()
        if trace is not None and rows:
            Path(trace).parent.mkdir(parents=True, exist_ok=True)
            with open(trace, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)


class _Traced:
    """``train`` with a trace file named after the run (picklable for spawn workers)."""

    def __init__(self, out: Path, name: str, **kw: Any) -> None:
        self.out, self.name, self.kw = out, name, kw

    def __call__(self, batch_size: int, lr: float, seed: int) -> Iterator[dict[str, float]]:
        f = lr / lr_at(self.kw["task"], 1.0, batch_size)
        path = self.out / "traces" / f"{self.name}-f{f:g}-s{seed}.csv"
        return train(batch_size, lr, seed, trace=str(path), **self.kw)


# ---------------------------------------------------------------------------------------
# Bookkeeping: seed means, the frontier, the comparison.


@dataclasses.dataclass
class Point:
    """One (arm, learning rate) to one target, over the seeds."""

    arm: str
    batch: int  # starting batch (the batch, for fixed arms)
    factor: float
    target: float
    steps: float  # geometric mean over seeds (the budget when censored)
    examples: float
    reached: bool
    seed_steps: list[float]
    seed_examples: list[float]
    final_batch: float = math.nan

    @property
    def spread(self) -> tuple[float, float]:
        return (min(self.seed_steps), max(self.seed_steps)) if self.seed_steps else (math.nan, math.nan)


def _gmean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def _batch_at(trace: Path, step: int) -> float:
    """The batch of the step at which a target was reached, from an adaptive run's trace."""
    if not trace.exists():
        return math.nan
    with open(trace, newline="") as fh:
        for row in csv.DictReader(fh):
            if int(float(row["step"])) == step:
                return float(row["batch"])
    return math.nan


def seed_means(task: Task, arm: str, runs: Sequence[Any], traces: Path | None = None) -> list[Point]:
    """Per (starting batch, lr) and target: the geometric mean of steps and examples over the seeds.

    ``final_batch``: the batch in use when the target was reached (geometric mean over the seeds;
    read from the runs' traces in ``traces`` for the adaptive arms)."""
    groups: dict[tuple[int, float], list[Any]] = {}
    for r in runs:
        groups.setdefault((r.spec.batch_size, r.spec.lr), []).append(r)
    out = []
    for (b, lr), rs in sorted(groups.items()):
        for t in task.targets:
            ok = [r for r in rs if r.steps.get(t) is not None]
            reached = len(ok) == len(rs) == len(task.seeds)
            if reached:
                ss = [float(r.steps[t]) for r in ok]
                es = [float(r.examples[t]) for r in ok]
                s, e = _gmean(ss), _gmean(es)
            else:
                ss = [float(r.steps[t]) for r in ok]
                es = [float(r.examples[t]) for r in ok]
                s = float(min(r.budget_steps for r in rs if r.steps.get(t) is None) if len(ok) < len(rs) else 0)
                e = float(min(r.budget_examples for r in rs if r.steps.get(t) is None) if len(ok) < len(rs) else 0)
                s, e = max(s, 1.0), max(e, 1.0)
            if traces is None:
                fb = [float(b)]
            else:
                f = lr / lr_at(task, 1.0, b)
                fb = [_batch_at(traces / f"{arm}-f{f:g}-s{r.spec.seed}.csv", int(r.steps[t])) for r in ok]
            out.append(
                Point(arm, int(b), lr / lr_at(task, 1.0, b), t, s, e, reached, ss, es, _gmean(fb) if fb else math.nan)
            )
    return out


def best(points: Sequence[Point], target: float, fit: Any = None) -> Point | None:
    """The best point among those that reached ``target`` (None if none did).

    Without ``fit``: the fewest steps (the fastest run, as the frontier takes it at a fixed batch).
    With ``fit`` (the adaptive arms, whose examples differ from one learning rate to the next): the
    lowest :func:`ratio`, the steps relative to the fixed-batch frontier at the same examples."""
    ok = [p for p in points if p.target == target and p.reached]
    if not ok:
        return None
    if fit is None:
        return min(ok, key=lambda p: (p.steps, p.examples))
    return min(ok, key=lambda p: (ratio(fit, p.steps, p.examples), p.steps))


def ratio(fit: Any, steps: float, examples: float) -> float:
    """``S / S_frontier(E)``: below 1, fewer steps than the fixed-batch frontier at the same examples
    (below the frontier); 0 when ``E <= E_min``, where no fixed batch reaches the target at all."""
    sf = frontier_steps(fit, examples)
    return steps / sf if math.isfinite(sf) else 0.0


def frontier_steps(fit: Any, examples: float) -> float:
    """Steps the fitted fixed-batch frontier needs at ``examples``: ``S_min (1 + 1/(E/E_min - 1))``
    (Eq. 2.11 solved for S); infinite at or below ``E_min`` (no fixed batch is that frugal)."""
    if examples <= fit.e_min:
        return math.inf
    return float(fit.s_min * (1.0 + 1.0 / (examples / fit.e_min - 1.0)))


# ---------------------------------------------------------------------------------------
# Running the arms.


def _run_arm(
    task: Task,
    out: Path,
    name: str,
    arm: str,
    batch_sizes: Sequence[int],
    *,
    ramp: tuple[float, ...] = (),
    factor: float = 1.0,
    workers: int,
    threads: int,
) -> list[Any]:
    import noisescale as ns

    fn: Any
    if arm == "fixed":
        fn = partial(train, task=task, arm=arm)
    else:
        fn = _Traced(out, name, task=task, arm=arm, ramp=ramp, factor=factor)
    lrs = {int(b): [lr_at(task, f, b) for f in task.lr_factors] for b in batch_sizes}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a torn row is cut and redone: said in the docs
        res = ns.sweep(
            fn,
            [int(b) for b in batch_sizes],
            lrs,
            task.targets,
            seeds=task.seeds,
            max_steps=task.max_steps,
            max_examples=task.max_examples,
            results=out / f"{name}.csv",
            workers=workers,
            threads_per_worker=threads,
            progress=False,
        )
    print(
        f"  {task.name} {name}: {len(res.runs)} runs ({res.skipped} from {name}.csv), {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    return res.runs


def _write_frontier_csv(path: Path, task: Task, points: Sequence[Point]) -> None:
    """The fixed sweep's seed means in the format `noisescale fit` reads."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["batch_size", "steps", "examples", "target", "lr", "reached"])
        for p in points:
            w.writerow(
                [
                    p.batch,
                    f"{p.steps:.6g}",
                    f"{p.examples:.6g}",
                    f"{p.target:g}",
                    f"{lr_at(task, p.factor, p.batch):.6g}",
                    int(p.reached),
                ]
            )


def run_task(task: Task, out: Path, arms: Sequence[str], *, workers: int, threads: int, n_boot: int) -> dict[str, Any]:
    """Every arm of one task, then the fit and the comparison."""
    from noisescale.critical import RunRecord, fit_sweep

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    points: dict[str, list[Point]] = {}
    fixed = _run_arm(task, out, "fixed", "fixed", task.batch_sizes, workers=workers, threads=threads)
    points["fixed"] = seed_means(task, "fixed", fixed)
    _write_frontier_csv(out / "frontier.csv", task, points["fixed"])
    recs = [
        RunRecord(
            p.batch, p.steps, target=p.target, lr=lr_at(task, p.factor, p.batch), examples=p.examples, reached=p.reached
        )
        for p in points["fixed"]
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fits = fit_sweep(recs, n_boot=n_boot)
    fit_messages = sorted({str(w.message) for w in caught})
    if "fixed-bcrit" in arms:
        lo, hi = min(task.batch_sizes), max(task.batch_sizes)
        bc = sorted({round(min(max(f.b_crit, lo), hi)) for f in fits.values()})
        runs = _run_arm(task, out, "fixed-bcrit", "fixed", bc, workers=workers, threads=threads)
        pts = seed_means(task, "fixed-bcrit", runs)
        # each target is compared at its own b_crit
        want = {t: round(min(max(f.b_crit, lo), hi)) for t, f in fits.items()}
        points["fixed-bcrit"] = [p for p in pts if want.get(p.target) == p.batch]
    for kind in ("ramp", "seesaw"):
        if kind in arms:
            for rname, sched in task.ramps.items():
                name = f"{kind}-{rname}"
                runs = _run_arm(task, out, name, kind, [task.b0], ramp=sched, workers=workers, threads=threads)
                points[name] = seed_means(task, name, runs, out / "traces")
    if "controller" in arms or "controller-x4" in arms:
        try:
            import noisescale.controller  # noqa: F401
        except ImportError as e:
            print(f"  {task.name} controller: skipped ({e})")
        else:
            for name, factor in (("controller", 1.0), ("controller-x4", 4.0)):
                if name in arms:
                    runs = _run_arm(
                        task, out, name, "controller", [task.b0], factor=factor, workers=workers, threads=threads
                    )
                    points[name] = seed_means(task, name, runs, out / "traces")
    return {
        "task": task,
        "points": points,
        "fits": fits,
        "fit_messages": fit_messages,
        "wall_s": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------------
# Report: the table, the verdicts and the figure.


def _arm_rows(res: dict[str, Any], target: float) -> list[tuple[str, Point]]:
    """(label, best point) per arm for one target, in the study's order."""
    task: Task = res["task"]
    fit = res["fits"][target]
    pts: dict[str, list[Point]] = res["points"]
    rows: list[tuple[str, Point]] = []
    fixed = [p for p in pts["fixed"] if p.target == target]
    for b, label in ((min(task.batch_sizes), "fixed small"), (max(task.batch_sizes), "fixed large")):
        p = best([q for q in fixed if q.batch == b], target)
        if p is not None:
            rows.append((f"{label} (B = {b})", p))
    fb = best(pts.get("fixed-bcrit", []), target)
    if fb is not None:
        rows.append((f"fixed at b_crit (B = {fb.batch})", fb))
    for name in sorted(pts):
        if name.startswith(("ramp-", "seesaw-")):
            p = best(pts[name], target, fit)
            if p is not None:
                rows.append((name, p))
    for name in ("controller", "controller-x4"):
        c = best(pts.get(name, []), target, fit)
        if c is not None:
            rows.append((name, c))
    return rows


def _seed_ratios(fit: Any, p: Point) -> list[float]:
    return [ratio(fit, s, e) for s, e in zip(p.seed_steps, p.seed_examples)]


def verdicts(res: dict[str, Any], target: float, name: str = "controller") -> dict[str, Any]:
    """The acceptance checks for one target: the controller below the fixed-batch frontier, in fewer
    steps than every fixed batch (fastest learning rate) that uses no more examples, and against the
    best open-loop ramp and the best Seesaw (each the arm and learning rate with the lowest ratio)."""
    fit = res["fits"][target]
    pts: dict[str, list[Point]] = res["points"]
    c = best(pts.get(name, []), target, fit)
    if c is None:
        return {"controller": None}
    fixed_best: dict[int, Point] = {}
    for p in pts["fixed"]:
        if p.target == target and p.reached and (p.batch not in fixed_best or p.steps < fixed_best[p.batch].steps):
            fixed_best[p.batch] = p
    cheaper = [p for p in fixed_best.values() if p.examples <= c.examples]
    out: dict[str, Any] = {
        "controller": {"steps": c.steps, "examples": c.examples, "factor": c.factor},
        "ratio_to_frontier": ratio(fit, c.steps, c.examples),
        "ratio_seeds": _seed_ratios(fit, c),
        "below_fitted_frontier": ratio(fit, c.steps, c.examples) < 1.0,
        "fixed_with_no_more_examples": [{"batch": p.batch, "steps": p.steps, "examples": p.examples} for p in cheaper],
        "fewer_steps_than_every_cheaper_fixed": all(c.steps < p.steps for p in cheaper),
        # the empirical frontier: fixed batches with both fewer steps and fewer examples, and the reverse
        "dominated_by_fixed": sorted(
            p.batch for p in fixed_best.values() if p.steps < c.steps and p.examples < c.examples
        ),
        "dominates_fixed": sorted(
            p.batch for p in fixed_best.values() if c.steps < p.steps and c.examples < p.examples
        ),
    }
    for kind in ("ramp", "seesaw"):
        cands = [q for name, ps in pts.items() if name.startswith(kind + "-") for q in [best(ps, target, fit)] if q]
        r = min(cands, key=lambda q: (ratio(fit, q.steps, q.examples), q.steps)) if cands else None
        out[f"best_{kind}"] = (
            None
            if r is None
            else {
                "arm": r.arm,
                "factor": r.factor,
                "steps": r.steps,
                "examples": r.examples,
                "ratio_to_frontier": ratio(fit, r.steps, r.examples),
                "ratio_seeds": _seed_ratios(fit, r),
                # both fewer steps and fewer examples than the controller (seed means)
                "dominates_controller": r.steps < c.steps and r.examples < c.examples,
                "dominated_by_controller": c.steps < r.steps and c.examples < r.examples,
            }
        )
    return out


def _ratio_txt(r: float, seeds: Sequence[float]) -> str:
    """A ratio and its seed range; 0 (E <= E_min: beyond every fixed batch) is written out."""

    def one(x: float) -> str:
        return f"{x:.2f}" if x > 0 else "E<E_min"

    return f"{one(r)}, seeds {one(min(seeds))} to {one(max(seeds))}" if seeds else one(r)


def _fmt_point(p: Point) -> str:
    lo, hi = p.spread
    return f"{p.steps:.0f} [{lo:.0f}-{hi:.0f}]"


def report(results: Sequence[dict[str, Any]], command: str, elapsed: float) -> tuple[str, dict[str, Any]]:
    lines = [
        "# Adaptive-batch study",
        "",
        f"Command: `{command}`; {elapsed:.0f} s wall in this call.",
        "",
    ]
    js: dict[str, Any] = {"command": command, "elapsed_s": elapsed, "tasks": {}}
    for res in results:
        task: Task = res["task"]
        tj: dict[str, Any] = {"wall_s": res["wall_s"], "fit_messages": res["fit_messages"], "targets": {}}
        lines += [f"## {task.name} ({task.optimizer}; unit: {task.unit}; {res['wall_s']:.0f} s)", ""]
        for t, fit in res["fits"].items():
            lo, hi = fit.b_crit_interval
            lines += [
                f"### target {t:g}: fixed-batch fit b_crit = {fit.b_crit:.0f} [{lo:.0f}, {hi:.0f}], "
                f"S_min = {fit.s_min:.1f}, E_min = {fit.e_min:.0f}",
                "",
                "| arm | lr factor | steps S (seed range) | examples E | S / frontier S at E | batch at target |",
                "|---|---|---|---|---|---|",
            ]
            rows = []
            for label, p in _arm_rows(res, t):
                sf = frontier_steps(fit, p.examples)
                rtxt = f"{p.steps / sf:.2f}" if math.isfinite(sf) else "E < E_min"
                lines.append(
                    f"| {label} | {p.factor:g} | {_fmt_point(p)} | {p.examples:.0f} | {rtxt} | {p.final_batch:.0f} |"
                )
                rows.append(
                    {
                        "arm": label,
                        "factor": p.factor,
                        "steps": p.steps,
                        "steps_seeds": p.seed_steps,
                        "examples": p.examples,
                        "examples_seeds": p.seed_examples,
                        "frontier_steps_at_E": sf if math.isfinite(sf) else None,
                        "final_batch": p.final_batch,
                    }
                )
            all_v = {}
            for cname in ("controller", "controller-x4"):
                v = verdicts(res, t, cname)
                all_v[cname] = v
                if v.get("controller") is not None:
                    lines += [
                        "",
                        f"- {cname} below the fitted frontier: **{'yes' if v['below_fitted_frontier'] else 'no'}** "
                        f"(S/S_frontier(E) = {_ratio_txt(v['ratio_to_frontier'], v['ratio_seeds'])}); "
                        f"fewer steps than every fixed batch using no more examples "
                        f"({', '.join(str(q['batch']) for q in v['fixed_with_no_more_examples']) or 'none'}): "
                        f"**{'yes' if v['fewer_steps_than_every_cheaper_fixed'] else 'no'}**; "
                        f"fixed batches with fewer steps and fewer examples: {v['dominated_by_fixed'] or 'none'}; "
                        f"with more of both: {v['dominates_fixed'] or 'none'}",
                    ]
                    for kind in ("ramp", "seesaw"):
                        rr = v[f"best_{kind}"]
                        if rr is not None:
                            dom = (
                                f"dominates {cname}"
                                if rr["dominates_controller"]
                                else f"is dominated by {cname}"
                                if rr["dominated_by_controller"]
                                else "neither dominates"
                            )
                            lines.append(
                                f"- best {kind}: {rr['arm']} (lr factor {rr['factor']:g}), S/S_frontier(E) = "
                                f"{_ratio_txt(rr['ratio_to_frontier'], rr['ratio_seeds'])}; {cname}'s steps "
                                f"x{v['controller']['steps'] / rr['steps']:.2f}, examples "
                                f"x{v['controller']['examples'] / rr['examples']:.2f} of it; {dom}"
                            )
            lines.append("")
            tj["targets"][f"{t:g}"] = {"fit": fit.to_dict(), "arms": rows, "verdicts": all_v}
        if res["fit_messages"]:
            lines += ["Fit messages:", *[f"- {m}" for m in res["fit_messages"]], ""]
        js["tasks"][task.name] = tj
    return "\n".join(lines), js


def plot(res: dict[str, Any], path: Path, out: Path) -> None:
    """Left: each target's fixed-batch frontier (points and fitted hyperbola) with every arm's best
    point (seed range as bars). Right: the batch against examples seen along the adaptive runs."""
    import numpy as np
    from matplotlib.figure import Figure

    task: Task = res["task"]
    fits = res["fits"]
    fig = Figure(figsize=(12, 4.6))
    axes = fig.subplots(1, len(fits) + 1)
    from matplotlib.ticker import NullFormatter

    markers = {"fixed": "o", "ramp": "s", "seesaw": "D", "controller": "*"}
    colors = {
        "fixed": "C2",
        "ramp-a": "C3",
        "ramp-b": "C1",
        "seesaw-a": "C4",
        "seesaw-b": "C6",
        "controller": "C0",
        "controller-x4": "C9",
    }
    last = list(fits)[-1]
    for ax, (t, fit) in zip(axes, fits.items()):
        fixed = [p for p in res["points"]["fixed"] if p.target == t]
        fb: dict[int, Point] = {}
        for p in fixed:
            if p.reached and (p.batch not in fb or p.steps < fb[p.batch].steps):
                fb[p.batch] = p
        bs = np.geomspace(min(task.batch_sizes) / 2, max(task.batch_sizes) * 2, 200)
        ax.plot(
            fit.examples(bs),
            fit.steps(bs),
            color="0.5",
            lw=1.2,
            label=f"fixed-batch fit, $B_{{crit}}$={fit.b_crit:.0f}",
        )
        for b, p in sorted(fb.items()):
            ax.plot(p.examples, p.steps, "o", color="0.3", ms=5)
            ax.annotate(str(b), (p.examples, p.steps), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for label, p in _arm_rows(res, t):
            kind = "controller" if label.startswith("controller") else label.split("-")[0] if "-" in label else "fixed"
            if kind == "fixed" and not label.startswith("fixed at"):
                continue
            lo, hi = p.spread
            ax.errorbar(
                p.examples,
                p.steps,
                yerr=[[max(p.steps - lo, 0.0)], [max(hi - p.steps, 0.0)]],
                fmt=markers.get(kind, "o"),
                ms=12 if kind == "controller" else 7,
                color=colors.get(label, colors["fixed"]),
                mec="k",
                label=label,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"examples to target E [{task.unit}]")
        ax.set_ylabel("optimizer steps to target S")
        ax.set_title(f"{task.name}: loss {t:g}", fontsize=10)
        ax.legend(fontsize=7, loc="upper right")
    ax = axes[-1]
    # the arms' best runs for the last target (seed 0), until they reached it
    for label, bp in _arm_rows(res, last):
        if not label.startswith(("controller", "ramp-", "seesaw-")):
            continue
        name = label
        files = [out / "traces" / f"{name}-f{bp.factor:g}-s0.csv"]
        for f in files:
            if not f.exists():
                continue
            with open(f) as fh:
                rows = list(csv.DictReader(fh))
            ex = [float(r["examples"]) for r in rows]
            ax.step(
                ex,
                [float(r["batch"]) for r in rows],
                where="post",
                color=colors.get(name, "k"),
                lw=2.2 if name == "controller" else 1.2,
                label=name,
            )
            if name == "controller" and "b_simple" in rows[0]:
                ax.plot(
                    ex,
                    [float(r["b_simple"]) for r in rows],
                    color=colors["controller"],
                    lw=0.8,
                    ls=":",
                    label="controller's $B_{simple}$",
                )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"examples seen [{task.unit}]")
    ax.set_ylabel("batch size")
    ax.set_title(f"batch along the best runs to {last:g} (seed 0)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    from noisescale.plot import save_figure

    save_figure(fig, path, dpi=100)


# ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a CI dry run: tiny budgets, one seed, one learning rate")
    ap.add_argument("--tasks", default="digits,char", help="comma-separated: digits, char (default: both)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    ap.add_argument("--out", type=Path, default=Path("runs/adaptive"), help="output folder (default: runs/adaptive)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    ap.add_argument("--workers", type=int, default=0, help="worker processes per arm (default: 0, in this process)")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates of the frontier fit")
    ap.add_argument("--fresh", action="store_true", help="start over instead of resuming the results in --out")
    ap.add_argument("--docs", action="store_true", help="also copy the figures to docs/img/adaptive-TASK.png")
    ap.add_argument("--no-plot", action="store_true", help="no figures")
    args = ap.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [t for t in tasks if t not in TASKS] + [a for a in arms if a not in ARMS]
    if bad or not tasks:
        ap.error(f"unknown task or arm {bad}; tasks: {', '.join(TASKS)}; arms: {', '.join(ARMS)}")
    if args.threads < 1 or args.workers < 0:
        ap.error(f"--threads must be >= 1 and --workers >= 0, got {args.threads}, {args.workers}")
    import torch

    torch.set_num_threads(args.threads)
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    t0 = time.perf_counter()
    results = []
    for name in tasks:
        task = (QUICK if args.quick else TASKS)[name]
        results.append(
            run_task(
                task,
                args.out / name,
                arms,
                workers=args.workers,
                threads=args.threads,
                n_boot=50 if args.quick else args.n_boot,
            )
        )
    elapsed = time.perf_counter() - t0
    command = "python benchmarks/adaptive.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md, js = report(results, command.strip(), elapsed)
    for res in results:
        if not args.no_plot:
            png = args.out / f"adaptive-{res['task'].name}.png"
            plot(res, png, args.out / res["task"].name)
            md += f"\n![{res['task'].name}]({png.name})\n"
            if args.docs and not args.quick:
                DOCS_IMG.mkdir(parents=True, exist_ok=True)
                shutil.copy(png, DOCS_IMG / png.name)
    (args.out / "report.md").write_text(md)
    (args.out / "report.json").write_text(json.dumps(js, indent=1, default=float))
    print(md)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
