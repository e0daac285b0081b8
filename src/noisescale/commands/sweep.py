"""Measure the critical batch size by training, and compare it with the noise scale of the same runs.

`--task digits`: a two-hidden-layer MLP on the UCI handwritten digits that ship with
scikit-learn (1,437 training images, no download), trained with SGD + momentum 0.9 on batches
drawn with replacement, over a grid of batch sizes x learning rates centred on the paper's rule
eps_central(B) = eps*/(1 + B*/B) (App. A.2, alpha = 1 for SGD and momentum). Each run records
the optimizer steps at which the full training loss first reaches each target; the fastest run
per batch size is fitted to (S/S_min - 1)(E/E_min - 1) = 1 (App. A.3) to give the measured
b_crit = E_min/S_min. The same runs track B_simple (two micro-batches per step), averaged over
the run to each target, for the paper's central comparison (Table 1: B_simple/b_crit).

Writes DIR/sweep.csv (one row per run and target; resumable, readable by `noisescale fit`),
DIR/report.md, DIR/report.json and DIR/critical-frontier.png. SIGTERM or Ctrl-C stops the sweep
and its workers (exit 143 / 130) with every finished run kept; the same command resumes it, and
changed --targets rerun only what is missing. Workers die with the sweep even on SIGKILL.

On a cluster, `--dask-scheduler tcp://HOST:8786` (or the scheduler file of `dask scheduler
--scheduler-file FILE`) sends one task per run to the Dask workers (noisescale installed there);
this process alone writes the CSV, so resuming works the same way.

Examples:
    noisescale sweep --task digits                 # the full sweep (a few minutes on 2 cores)
    noisescale sweep --task digits --quick         # a shortened sweep (< 1 minute)
    noisescale sweep --task digits --dask-scheduler tcp://10.0.0.5:8786   # on a Dask cluster
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, TypedDict

HELP = "measure b_crit by a batch-size sweep on a built-in task and compare it with B_simple"


class _Preset(TypedDict):
    batch_sizes: tuple[float, ...]
    targets: tuple[float, ...]
    lr_factors: tuple[float, ...]
    max_steps: int


FULL: _Preset = {
    "batch_sizes": (8, 16, 32, 64, 128, 256, 512, 1024, 2048),
    "targets": (0.2, 0.1, 0.05),
    "lr_factors": (0.25, 0.5, 1.0, 2.0),
    "max_steps": 4000,
}
QUICK: _Preset = {"batch_sizes": (8, 32, 128, 512), "targets": (0.3, 0.15), "lr_factors": (1.0, 2.0), "max_steps": 1500}


def _floats(s: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one number")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=("digits",), default="digits", help="built-in task (default: digits)")
    p.add_argument(
        "--out", type=Path, default=Path("noisescale-sweep"), help="output folder (default: noisescale-sweep)"
    )
    p.add_argument(
        "--quick", action="store_true", help="a shortened sweep (4 batch sizes, 2 learning rates, 2 targets)"
    )
    p.add_argument("--batch-sizes", type=_floats, default=None, help="comma-separated batch sizes")
    p.add_argument("--targets", type=_floats, default=None, help="comma-separated training-loss targets")
    p.add_argument(
        "--lr-factors", type=_floats, default=None, help="learning rates per batch size, as multiples of eps_central(B)"
    )
    p.add_argument("--eps-star", type=float, default=1.0, help="eps* of eps_central (default: 1.0)")
    p.add_argument("--b-star", type=float, default=256.0, help="B* of eps_central (default: 256)")
    p.add_argument("--max-steps", type=int, default=None, help="step budget of a run (default: 4000; quick: 1500)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run (default: 0)")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: 0, in this process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    p.add_argument(
        "--dask-scheduler",
        metavar="ADDRESS",
        default=None,
        help="run the runs on a Dask cluster: its scheduler's address (tcp://HOST:8786) or scheduler file (.json)",
    )
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates of the fit (default: 1000)")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming DIR/sweep.csv")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")


# ---------------------------------------------------------------------------------------
# The digits task (module level: picklable for worker processes).


@lru_cache(maxsize=1)
def _digits() -> tuple[Any, Any]:
    from ..data import load_digits

    X, y, _, _ = load_digits(seed=0)
    return X, y


def digits_train(
    batch_size: int,
    lr: float,
    seed: int,
    *,
    targets: Sequence[float] = (),
    momentum: float = 0.9,
    beta: float = 0.99,
    micro_batches: int = 2,
    warmup_measured: int = 10,
) -> Iterator[dict[str, float]]:
    """Train the digits MLP at ``batch_size`` and ``lr``; yield the full training loss as it goes.

    Every step draws ``batch_size`` examples with replacement (i.i.d., as the noise-scale
    estimators assume) and splits them into ``micro_batches`` for the tracker. The loss is
    evaluated on the whole training set every ``max(1, 64 // batch_size)`` steps. For each
    target, B_simple is averaged over the evaluations before the target is reached, two ways:

    - ``b_simple_avg@t``: plain average over optimizer steps;
    - ``b_simple_d1@t``: weighted by progress ``ds = dS / (1 + B_simple/B)`` — App. D.1's
      ``E_min/S_min = int B_noise ds / int ds``, with B_simple standing in for B_noise.
    """
    import torch
    import torch.nn.functional as F

    from ..data import digits_mlp
    from ..tracker import GradientNoiseScale

    X, y = _digits()
    model = digits_mlp(seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(10_000 + seed)
    every = max(1, 64 // batch_size)
    k = max(1, min(micro_batches, batch_size))
    sums = {float(t): [0.0, 0.0, 0.0, 0.0] for t in targets}  # sum b dS, sum dS, sum b ds, sum ds

    def full_loss() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(X), y))

    L0 = full_loss()
    # method pinned (not "auto"): the documented numbers come from the two-micro-batch estimator
    with GradientNoiseScale(model, method="microbatch", beta=beta) as gns:
        step = 0
        while True:
            step += 1
            idx = torch.randint(len(y), (batch_size,), generator=gen)
            for xb, yb in zip(X[idx].tensor_split(k), y[idx].tensor_split(k)):
                (F.cross_entropy(model(xb), yb) / k).backward()
            gns.step()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % every:
                continue
            L = full_loss()
            if not math.isfinite(L) or L > 2.0 * L0:
                yield {"step": step, "loss": math.nan}  # diverged
                return
            b = gns.b_simple if gns.measured >= warmup_measured else None
            out: dict[str, float] = {"step": step, "loss": L, "b_simple": b if b is not None else math.nan}
            for t, acc in sums.items():
                if t < L and b is not None and b > 0:
                    ds = every / (1.0 + b / batch_size)
                    acc[0] += b * every
                    acc[1] += every
                    acc[2] += b * ds
                    acc[3] += ds
                out[f"b_simple_avg@{t:g}"] = acc[0] / acc[1] if acc[1] else math.nan
                out[f"b_simple_d1@{t:g}"] = acc[2] / acc[3] if acc[3] else math.nan
            yield out


# ---------------------------------------------------------------------------------------
# Report.


def _nearest_frontier_run(fit: Any, res: Any, target: float) -> Any:
    """The fastest run at the frontier batch size closest (in log) to the measured b_crit."""
    fastest = res.fastest(target)
    if not fastest:
        return None
    b = min(fastest, key=lambda bb: abs(math.log(bb / fit.b_crit)))
    return fastest[b]


def _report(
    fits: dict[float, Any],
    res: Any,
    args: argparse.Namespace,
    settings: dict[str, Any],
    elapsed: float,
    png: Path | None,
) -> tuple[str, dict[str, Any]]:
    rows, js, edges = [], [], []
    grid: dict[int, list[float]] = {}
    for r in res.runs:
        grid.setdefault(r.spec.batch_size, []).append(r.spec.lr)
    for t, f in fits.items():
        # a fastest run at the edge of its lr grid may not be the fastest possible: S is an upper bound
        edge = [
            int(p.batch_size)
            for p in f.points
            if p.lr is not None and p.lr in (min(grid[int(p.batch_size)]), max(grid[int(p.batch_size)]))
        ]
        if edge:
            edges.append(
                f"target {t:g}: the fastest learning rate is at the edge of the grid at B = "
                f"{', '.join(map(str, edge))} (steps there are upper bounds; widen --lr-factors)"
            )
        run = _nearest_frontier_run(f, res, t)
        avg = run.metrics.get(f"b_simple_avg@{t:g}", math.nan) if run else math.nan
        d1 = run.metrics.get(f"b_simple_d1@{t:g}", math.nan) if run else math.nan
        all_d1 = [r.metrics.get(f"b_simple_d1@{t:g}", math.nan) for r in res.fastest(t).values()]
        all_d1 = sorted(v for v in all_d1 if math.isfinite(v))
        med = all_d1[len(all_d1) // 2] if all_d1 else math.nan
        # every run that reached the target, fastest or not: B_simple depends on the temperature
        # lr/B (App. C), so the slower, cooler runs measure larger values
        every = sorted(
            v
            for r in res.runs
            if r.steps.get(t) is not None
            for v in [r.metrics.get(f"b_simple_d1@{t:g}", math.nan)]
            if math.isfinite(v)
        )
        rng = f"{every[0]:.0f}-{every[-1]:.0f}" if every else "-"
        lo, hi = f.b_crit_interval
        rows.append(
            f"| {t:g} | {f.b_crit:.0f} [{lo:.0f}, {hi:.0f}] | {f.s_min:.1f} | {f.e_min:.0f} | "
            f"{run.spec.batch_size if run else '-'} (lr {run.spec.lr:.3g}) | {d1:.0f} | {avg:.0f} | "
            f"{med:.0f} | {rng} | {d1 / f.b_crit:.2f} |"
        )
        d = f.to_dict()
        d.update(
            b_simple_run_batch=run.spec.batch_size if run else None,
            b_simple_run_lr=run.spec.lr if run else None,
            b_simple_d1=d1 if math.isfinite(d1) else None,
            b_simple_avg=avg if math.isfinite(avg) else None,
            b_simple_d1_median_over_frontier=med if math.isfinite(med) else None,
            b_simple_d1_range_all_runs=[every[0], every[-1]] if every else None,
            ratio_b_simple_over_b_crit=d1 / f.b_crit if math.isfinite(d1) else None,
            lr_at_grid_edge=edge,
            frontier=[
                {"batch_size": p.batch_size, "steps": p.steps, "examples": p.examples, "status": p.status, "lr": p.lr}
                for p in f.points
            ],
        )
        js.append(d)
    cmd = _command(args)
    train_s = sum(r.wall_s for r in res.runs)
    md = "\n".join(
        [
            f"# Critical batch size on {args.task}: measured b_crit vs run-averaged B_simple",
            "",
            f"Command: `{cmd}` ({len(res.runs)} runs, {train_s:.0f} s of training summed over runs, one thread each; "
            f"{elapsed:.0f} s in this call; settings {json.dumps(settings)})",
            "",
            "| target loss | b_crit [95%] | S_min | E_min | run for B_simple (fastest at B nearest b_crit) | "
            "B_simple (D.1 avg) | B_simple (step avg) | D.1 median over frontier | D.1 range, all runs reaching it | "
            "B_simple/b_crit |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "b_crit, E_min and B_simple in examples; S_min in optimizer steps. B_simple is averaged over the run "
            "up to the target; 'D.1 avg' weights it by progress ds = dS/(1 + B_simple/B) (App. D.1).",
            "Paper (Table 1): B_simple/b_crit = 4.5 (MNIST), 8 (SVHN), 2.2 (CIFAR10), 2 (ImageNet), 0.05 (generative).",
            *([""] + [f"- {e}" for e in edges] if edges else []),
            *(["", f"![frontier]({png.name})"] if png else []),
            "",
        ]
    )
    return md, {
        "task": args.task,
        "command": cmd,
        "settings": settings,
        "elapsed_s": elapsed,
        "train_s": train_s,
        "n_runs": len(res.runs),
        "targets": js,
    }


def run(args: argparse.Namespace) -> int:
    from ..cli import CLIError, Interrupted

    preset = QUICK if args.quick else FULL
    batch_sizes = args.batch_sizes or preset["batch_sizes"]
    targets = args.targets or preset["targets"]
    factors = args.lr_factors or preset["lr_factors"]
    max_steps = args.max_steps or preset["max_steps"]
    n_boot = args.n_boot if not args.quick or args.n_boot != 1000 else 200
    if any(b < 2 or not float(b).is_integer() for b in batch_sizes):
        raise CLIError(f"--batch-sizes must be integers >= 2 (B_simple needs two micro-batches), got {batch_sizes}")
    if len(set(batch_sizes)) < 3:
        raise CLIError(f"give at least 3 different batch sizes to fit b_crit, got {batch_sizes}")
    if any(not (t > 0) for t in targets):
        raise CLIError(f"--targets must be positive losses, got {targets}")
    if any(not (f > 0) for f in factors):
        raise CLIError(f"--lr-factors must be positive, got {factors}")
    if max_steps < 10:
        raise CLIError(f"--max-steps must be at least 10, got {max_steps}")
    if not (args.eps_star > 0 and args.b_star > 0):
        raise CLIError("--eps-star and --b-star must be positive")
    if args.workers < 0 or args.threads < 1:
        raise CLIError("--workers must be >= 0 and --threads >= 1")
    if args.dask_scheduler is not None and args.workers:
        raise CLIError(
            f"--workers {args.workers} and --dask-scheduler both say where runs go; give one (the Dask workers run every run)"
        )

    import torch

    from ..critical import fit_critical_batch, plot_fit
    from ..sweeps import read_results, sweep

    torch.set_num_threads(args.threads)
    if args.out.exists() and not args.out.is_dir():
        raise CLIError(f"--out {args.out} is a file; give a directory (the sweep writes several files into it)")
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "sweep.csv"
    if args.fresh and csv_path.exists():
        csv_path.unlink()
    settings = dict(
        batch_sizes=[int(b) for b in batch_sizes],
        targets=list(targets),
        lr_factors=list(factors),
        eps_star=args.eps_star,
        b_star=args.b_star,
        alpha=1.0,
        optimizer="SGD momentum 0.9",
        max_steps=max_steps,
        seed=args.seed,
        n_boot=n_boot,
    )
    print(
        f"noisescale sweep: {args.task} MLP, {len(batch_sizes)} batch sizes x {len(factors)} learning rates "
        f"(eps_central(B) = {args.eps_star:g}/(1 + {args.b_star:g}/B) x {', '.join(f'{f:g}' for f in factors)}), "
        f"targets {', '.join(f'{t:g}' for t in targets)}; results in {csv_path}"
    )
    t0 = time.perf_counter()
    try:
        with _dask_executor(args.dask_scheduler) as executor:
            res = sweep(
                partial(digits_train, targets=tuple(targets)),
                [int(b) for b in batch_sizes],
                None,
                targets,
                eps_star=args.eps_star,
                b_star=args.b_star,
                alpha=1.0,
                lr_factors=factors,
                seeds=(args.seed,),
                max_steps=max_steps,
                results=csv_path,
                workers=args.workers,
                threads_per_worker=args.threads,
                executor=executor,
                progress=not args.no_progress,
            )
    except (KeyboardInterrupt, Interrupted) as e:
        # the workers are already stopped; every finished run is in the CSV
        signum = e.signum if isinstance(e, Interrupted) else int(signal.SIGINT)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            n = len({r.spec.key for r in read_results(csv_path)})
        raise Interrupted(
            signum,
            f"stopped by {signal.Signals(signum).name}; the {n} finished runs are kept in {csv_path}: "
            "run the same command again to resume",
        ) from None
    elapsed = time.perf_counter() - t0
    if res.skipped or res.partial:
        print(
            f"resumed: {res.skipped} runs were already in {csv_path}"
            + (f"; {res.partial} were run again for the targets they lacked" if res.partial else "")
        )
    fits = {}
    for t, recs in _by_target(res.records()).items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                fits[t] = fit_critical_batch(recs, target=t, n_boot=n_boot, seed=args.seed)
            except ValueError as e:
                print(f"target {t:g}: no fit: {e}")
        for w in caught:
            print(f"note: {w.message}")
    if not fits:
        raise CLIError("no target could be fitted; use higher --targets or a larger --max-steps")
    for f in fits.values():
        print(f.summary())
    png = None
    if not args.no_plot:
        try:
            png = args.out / "critical-frontier.png"
            plot_fit(list(fits.values()), png)
        except ImportError as e:
            print(f"(no figure: {e})")
            png = None
    md, js = _report(fits, res, args, settings, elapsed, png)
    (args.out / "report.md").write_text(md)
    (args.out / "report.json").write_text(json.dumps(js, indent=1))
    print()
    print(md)
    print(f"wrote {args.out / 'report.md'}, {args.out / 'report.json'}" + (f", {png}" if png else ""))
    return 0


@contextmanager
def _dask_executor(address: str | None) -> Iterator[Any]:
    """A ``concurrent.futures`` executor on the Dask cluster at ``address`` (``None``: no executor).

    Dask is imported only here. The client is closed on the way out, which also releases any
    run still queued on the cluster (a stopped sweep leaves nothing to do there)."""
    if address is None:
        yield None
        return
    from ..cli import CLIError

    try:
        from dask.distributed import Client
    except ImportError:
        raise CLIError(
            "--dask-scheduler needs dask.distributed: pip install 'dask[distributed]' (with torch==2.13.0 pinned)"
        ) from None
    kw: dict[str, Any] = {"address": address}
    if address.endswith(".json"):
        if not Path(address).is_file():
            raise CLIError(
                f"--dask-scheduler {address}: no such scheduler file; give the file that "
                "`dask scheduler --scheduler-file FILE` writes, or tcp://HOST:PORT"
            )
        kw = {"scheduler_file": address}
    try:
        # not the default scheduler of this process: the sweep's client is used by the sweep only
        client = Client(**kw, set_as_default=False)
    except (OSError, TimeoutError) as e:
        raise CLIError(f"--dask-scheduler {address}: could not connect ({e}); is the scheduler running?") from None
    with client:
        # nthreads() lists every worker (scheduler_info() lists only the first few in some versions)
        n = len(client.nthreads())
        print(
            f"on the Dask cluster at {client.scheduler_info().get('address', address)} ({n} workers now"
            + ("; the runs wait until workers join)" if n == 0 else ")")
        )
        yield client.get_executor(pure=False)  # every run trains, even one with the same arguments


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this sweep (the options that differ from the defaults)."""
    parts = ["noisescale", "sweep", "--task", args.task]
    if args.quick:
        parts.append("--quick")
    for flag, val, default in (
        ("--batch-sizes", args.batch_sizes, None),
        ("--targets", args.targets, None),
        ("--lr-factors", args.lr_factors, None),
    ):
        if val != default:
            parts += [flag, ",".join(f"{v:g}" for v in val)]
    for flag, val, default in (
        ("--eps-star", args.eps_star, 1.0),
        ("--b-star", args.b_star, 256.0),
        ("--max-steps", args.max_steps, None),
        ("--seed", args.seed, 0),
        ("--n-boot", args.n_boot, 1000),
        ("--workers", args.workers, 0),
        ("--threads", args.threads, 1),
        ("--dask-scheduler", args.dask_scheduler, None),
    ):
        if val != default:
            parts += [flag, f"{val:g}" if isinstance(val, float) else str(val)]
    parts += ["--out", str(args.out)]
    return " ".join(parts)


def _by_target(records: Sequence[Any]) -> dict[float, list[Any]]:
    out: dict[float, list[Any]] = {}
    for r in records:
        out.setdefault(r.target, []).append(r)
    return out
