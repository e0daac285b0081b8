"""Fit the critical batch size (and B_noise) to a sweep (McCandlish et al. 2018, Eqs. 2.6-2.12, App. A.3).

Input: a CSV file with one row per run and target. Columns:

    batch_size   examples (or tokens) per optimizer step          required
    steps        optimizer steps to reach the target               required
    target       the target the row refers to (rows fitted per target; default: one target)
    lr           learning rate of the run (see "B_noise" below)
    seed         the run's seed: runs at one batch size, lr and target with different seeds are
                 averaged (in log steps) for the B_noise fit; without it every row is one more run
    examples     examples to reach the target (default: batch_size * steps)
    reached      1/0: whether the run reached the target; for 0, `steps` is the run's budget
                 and the run counts as censored (S > steps), not dropped (default: 1)

For every target, the fastest run per batch size (the Pareto frontier) is fitted in log space to
(S/S_min - 1)(E/E_min - 1) = 1, giving S_min, E_min and b_crit = E_min/S_min with bootstrap
intervals. `noisescale sweep` writes files in this format.

B_noise (the paper's other route, Eqs. 2.4-2.8): when a target has an lr column with three or
more learning rates at each of three or more batch sizes, the best learning rate per batch size
(the fastest one, refined between its neighbours with the quadratic model's 1/S = a lr - b lr^2)
is fitted to eps_opt(B) = eps_max/(1 + B_noise/B), and B_noise and eps_max are reported with
bootstrap intervals (seeds resampled within cells when every cell has two or more, else
residuals). A batch size whose fastest lr is at an end of its grid is left out with a note; a
B_noise the sweep cannot resolve (best lr linear or flat in B) is shown as its one-sided bound
(">x" or "<x", or "-") with the reason in a note, never as an extrapolated number.

The file is streamed (only the fastest run and the smallest unreached budget per target and
batch size are kept, and for the B_noise fit the first 64 runs of each (target, batch size, lr)
cell, in at most 20,000 cells, so any size fits in memory); a UTF-8 byte-order mark is accepted; a bad
value, a duplicated column or a non-finite target is an error naming the line.

Examples:
    noisescale fit sweep.csv
    noisescale fit sweep.csv --json
    noisescale fit sweep.csv --plot frontier.png
    noisescale fit sweep.csv --lr-refine parabola
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import warnings
from pathlib import Path
from typing import Any

from ..cli import CLIError

HELP = "fit S_min, E_min and the critical batch size (and B_noise, eps_max from lr sweeps) to a sweep (.csv)"

REQUIRED = ("batch_size", "steps")
OPTIONAL = ("target", "lr", "examples", "reached", "seed")
# The B_noise fit keeps every run of a (target, batch size, lr) cell, up to this many (a sweep has a
# few seeds per cell), in at most this many cells: memory stays bounded whatever the file's size.
MAX_RUNS_PER_CELL = 64
MAX_LR_CELLS = 20_000
_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", type=Path, help="CSV file, one row per run and target")
    p.add_argument("--json", action="store_true", help="print one JSON object per target (JSON lines)")
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="PNG",
        help="write the frontier, fitted hyperbola and b_crit to this PNG (a directory: DIR/critical-frontier.png)",
    )
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals (default: 0.95)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: 0)")
    p.add_argument("--unit", default="examples", help="what a batch size counts (default: examples)")
    p.add_argument(
        "--lr-refine",
        choices=("model", "parabola", "none"),
        default="model",
        help="how the best lr per batch size is refined for the B_noise fit: model (1/S = a lr - b lr^2, "
        "the quadratic model's rate, default), parabola (in log lr, log steps) or none (the grid value)",
    )


# Larger magnitudes are refused: no sweep comes near, and the fit and its figure overflow on them.
MAX_VALUE = 1e100


def _number(raw: str | None, col: str, line: int, path: Path) -> float:
    try:
        v = float(raw)  # type: ignore[arg-type]  # None: the message below
    except (TypeError, ValueError):
        pass
    else:
        if 0.0 < v <= MAX_VALUE:  # the common case, fast (nan and inf fail the comparison)
            return v
    s = (raw or "").strip()
    try:
        v = float(s)
    except ValueError:
        raise CLIError(f"{path}, line {line}: {col} = {s!r} is not a number") from None
    if not math.isfinite(v):
        raise CLIError(f"{path}, line {line}: {col} = {s!r} is not a finite number")
    if v <= 0:
        raise CLIError(f"{path}, line {line}: {col} = {s} must be positive")
    if v > MAX_VALUE:
        raise CLIError(f"{path}, line {line}: {col} = {s} is out of range (at most {MAX_VALUE:.0e})")
    return v


def _opt_number(raw: str, col: str, line: int, path: Path) -> float | None:
    """An optional positive number: ``None`` for an empty field."""
    try:
        v = float(raw)
    except ValueError:
        if not raw.strip():
            return None
    else:
        if 0.0 < v <= MAX_VALUE:
            return v
    return _number(raw, col, line, path)


def _reached(raw: str, line: int, path: Path) -> bool:
    r = raw.strip().lower()
    if not r or r in _TRUE:
        return True
    if r in _FALSE:
        return False
    raise CLIError(f"{path}, line {line}: reached = {raw!r} is not 1/0 (or true/false)")


def _target(raw: str, line: int, path: Path) -> Any:
    t = raw.strip()
    if not t:
        raise CLIError(f"{path}, line {line}: the target is empty")
    try:
        target = float(t)
    except ValueError:
        return t  # a label
    if not math.isfinite(target):
        raise CLIError(
            f"{path}, line {line}: target = {t!r} is not a finite number (a target is a loss value or a label)"
        )
    return target


def _fit_width(row: list[str], n_cols: int, path: Path, line: int) -> list[str] | None:
    """A row with as many fields as the header: ``None`` for a blank line; trailing empty fields
    (``32,100,``) dropped, missing ones empty; ``CLIError`` for extra fields with values."""
    if not "".join(row).strip():
        return None
    if len(row) > n_cols:
        if "".join(row[n_cols:]).strip():
            raise CLIError(f"{path}, line {line}: more fields than the header has columns")
        return row[:n_cols]
    return row + [""] * (n_cols - len(row))


class _Best:
    """What the fit needs from the rows of one (target, batch size): the fastest run that reached
    the target (the first of equals), the smallest budget of a run that did not, and counts."""

    __slots__ = ("reached", "budget", "n_runs", "n_reached")

    def __init__(self) -> None:
        # (steps, examples, row, lr, examples given) of the fastest reached run
        self.reached: tuple[float, float, int, float | None, bool] | None = None
        self.budget: tuple[float, int] | None = None  # (steps, row) of the smallest unreached budget
        self.n_runs = 0
        self.n_reached = 0


class _Cells:
    """The runs of each (target, batch size, lr) cell for the B_noise fit: ``(seed, steps, reached,
    line)`` per run, at most :data:`MAX_RUNS_PER_CELL` per cell and :data:`MAX_LR_CELLS` cells."""

    def __init__(self) -> None:
        self.runs: dict[tuple[Any, float, float], list[tuple[str | None, float, bool, int]]] = {}
        self.dropped_runs: dict[Any, int] = {}  # per target: runs beyond MAX_RUNS_PER_CELL
        self.overflow = False


def _scan_sweep_csv(path: Path) -> tuple[list[Any], dict[tuple[Any, float], _Best], _Cells]:
    """Stream the CSV once; keep only a :class:`_Best` per (target, batch size), and the runs of
    each (target, batch size, lr) cell when there is an lr column (:class:`_Cells`, capped).

    Memory is bounded by the number of targets x batch sizes (x learning rates, capped), not by
    the file's size. Returns the targets in order of first appearance, the per-(target, batch
    size) minima and the cells.
    """
    if not path.exists():
        raise CLIError(f"{path}: no such file")
    if path.is_dir():
        raise CLIError(f"{path} is a directory; give the sweep's CSV file")
    expected = f"a CSV header with columns {', '.join(REQUIRED)} (optional {', '.join(OPTIONAL)}) and one row per run"
    targets: dict[Any, None] = {}
    best: dict[tuple[Any, float], _Best] = {}
    cells = _Cells()
    reader: Any = None
    try:
        # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the first column's name
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            header: list[str] | None = None
            for row in reader:
                if not any(v.strip() for v in row):
                    continue  # blank line
                header = [c.strip() for c in row]
                break
            if header is None:
                raise CLIError(f"{path} is empty; expected {expected}")
            line = reader.line_num
            index: dict[str, int] = {}
            for j, c in enumerate(header):
                if c in REQUIRED + OPTIONAL and c in index:
                    raise CLIError(
                        f"{path}, line {line}: column {c} appears twice (columns {index[c] + 1} and {j + 1}); "
                        "remove one (which one to use is ambiguous)"
                    )
                index.setdefault(c, j)
            missing = [c for c in REQUIRED if c not in index]
            if missing:
                raise CLIError(
                    f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                    f"(found: {', '.join(header) or 'none'}); required: {', '.join(REQUIRED)}"
                )
            n_cols = len(header)
            i_b, i_s = index["batch_size"], index["steps"]
            i_lr, i_ex, i_re, i_t, i_seed = (index.get(c) for c in ("lr", "examples", "reached", "target", "seed"))
            n_rows = 0
            tcache: dict[str, Any] = {}  # raw target -> target (a file has few distinct targets)
            rcache: dict[str, bool] = {}  # raw reached -> bool
            for row in reader:
                if len(row) != n_cols:
                    fixed = _fit_width(row, n_cols, path, reader.line_num)
                    if fixed is None:
                        continue  # blank line
                    row = fixed
                # the fast path: two plain numbers in range (nan and inf fail the comparison)
                try:
                    b, steps = float(row[i_b]), float(row[i_s])
                    ok = 0.0 < b <= MAX_VALUE and 0.0 < steps <= MAX_VALUE
                except ValueError:
                    ok = False
                if not ok:
                    if not "".join(row).strip():
                        continue  # blank line
                    b = _number(row[i_b], "batch_size", reader.line_num, path)
                    steps = _number(row[i_s], "steps", reader.line_num, path)
                n_rows += 1
                lr = _opt_number(row[i_lr], "lr", reader.line_num, path) if i_lr is not None else None
                ex = _opt_number(row[i_ex], "examples", reader.line_num, path) if i_ex is not None else None
                reached = True
                if i_re is not None:
                    raw = row[i_re]
                    got = rcache.get(raw)
                    if got is None:
                        got = rcache[raw] = _reached(raw, reader.line_num, path)
                    reached = got
                target: Any = None
                if i_t is not None:
                    raw = row[i_t]
                    if raw in tcache:
                        target = tcache[raw]
                    else:
                        target = tcache[raw] = _target(raw, reader.line_num, path)
                        targets.setdefault(target, None)
                acc = best.get((target, b))
                if acc is None:
                    acc = best[(target, b)] = _Best()
                    targets.setdefault(target, None)
                acc.n_runs += 1
                n_ex = ex if ex is not None else b * steps
                if reached:
                    acc.n_reached += 1
                    r0 = acc.reached
                    if r0 is None or steps < r0[0] or (steps == r0[0] and n_ex < r0[1]):
                        acc.reached = (steps, n_ex, reader.line_num, lr, ex is not None)
                elif acc.budget is None or steps < acc.budget[0]:
                    acc.budget = (steps, reader.line_num)
                if lr is not None and not cells.overflow:
                    runs = cells.runs.get((target, b, lr))
                    if runs is None and len(cells.runs) >= MAX_LR_CELLS:
                        cells.overflow = True  # a random-search sweep: every lr its own cell
                    else:
                        if runs is None:
                            runs = cells.runs[(target, b, lr)] = []
                        if len(runs) < MAX_RUNS_PER_CELL:
                            seed = (row[i_seed].strip() or None) if i_seed is not None else None
                            runs.append((seed, steps, reached, reader.line_num))
                        else:
                            cells.dropped_runs[target] = cells.dropped_runs.get(target, 0) + 1
    except UnicodeDecodeError as e:
        where = f" after line {reader.line_num}" if reader is not None and reader.line_num else ""
        raise CLIError(f"{path} is not a text (CSV) file: not UTF-8 ({e.reason}){where}") from None
    except csv.Error as e:
        raise CLIError(
            f"{path}, line {reader.line_num if reader is not None else 1}: not a valid CSV row ({e})"
        ) from None
    if not n_rows:
        raise CLIError(f"{path} has a header but no rows; expected one row per run and target")
    return list(targets), best, cells


def read_sweep_frontiers(path: Path) -> dict[Any, list[Any]]:
    """The frontier of every target in a sweep CSV (:class:`~noisescale.critical.FrontierPoint` s).

    Streamed: the file is read once and only the fastest run and the smallest unreached budget
    per (target, batch size) are kept, so a CSV of any size fits in memory. The result equals
    :func:`~noisescale.critical.frontier` of all the rows. ``CLIError`` on bad input.
    """
    targets, best, _ = _scan_sweep_csv(path)
    return _frontiers(path, targets, best)


def _frontiers(path: Path, targets: list[Any], best: dict[tuple[Any, float], _Best]) -> dict[Any, list[Any]]:
    import dataclasses

    from ..critical import frontier

    out: dict[Any, list[Any]] = {}
    for target in targets:
        recs = sorted(
            (row, r) for (t, b), acc in best.items() if t == target for row, r in _records(path, target, b, acc)
        )
        points = frontier(r for _, r in recs)
        out[target] = [
            dataclasses.replace(
                p, n_runs=best[(target, p.batch_size)].n_runs, n_reached=best[(target, p.batch_size)].n_reached
            )
            for p in points
        ]
    return out


def _records(path: Path, target: Any, b: float, acc: _Best) -> list[tuple[int, Any]]:
    from ..critical import RunRecord

    out = []
    try:
        if acc.reached is not None:
            steps, ex, row, lr, given = acc.reached
            out.append((row, RunRecord(b, steps, target=target, lr=lr, examples=ex if given else None)))
        if acc.budget is not None:
            steps, row = acc.budget
            out.append((row, RunRecord(b, steps, target=target, reached=False)))
    except ValueError as e:
        raise CLIError(f"{path}, line {row}: {e}") from None
    return out


def read_sweep_csv(path: Path) -> list[Any]:
    """The rows of a sweep CSV that the fit uses, as :class:`~noisescale.critical.RunRecord` s:
    per (target, batch size), the fastest run that reached the target and the run with the
    smallest budget that did not (streamed; see :func:`read_sweep_frontiers`)."""
    targets, best, _ = _scan_sweep_csv(path)
    order = {t: i for i, t in enumerate(targets)}
    recs = sorted(((order[t], row), r) for (t, b), acc in best.items() for row, r in _records(path, t, b, acc))
    return [r for _, r in recs]


def _lr_records(path: Path, cells: _Cells, target: Any) -> list[Any] | None:
    """The runs of one target for the B_noise fit, as :class:`~noisescale.critical.RunRecord` s;
    ``None`` unless three or more batch sizes have three or more learning rates."""
    from ..critical import RunRecord

    lrs: dict[float, int] = {}
    for t, b, _ in cells.runs:
        if t == target:
            lrs[b] = lrs.get(b, 0) + 1
    if sum(n >= 3 for n in lrs.values()) < 3:
        return None
    out = []
    for (t, b, lr), runs in cells.runs.items():
        if t != target:
            continue
        ids: dict[str, tuple[int, int]] = {}  # raw seed -> (id, line); ids are per cell
        for seed, steps, reached, line in runs:
            sid = None
            if seed is not None:
                if seed in ids:
                    where = "" if target is None else f", target {target}"
                    raise CLIError(
                        f"{path}, line {line}: batch size {b:g}, lr {lr:g}, seed {seed}{where} already appears "
                        f"on line {ids[seed][1]}; give each run one row per target"
                    )
                sid = ids[seed] = (len(ids), line)
            out.append(RunRecord(b, steps, target=target, lr=lr, reached=reached, seed=None if sid is None else sid[0]))
    return out


def _fmt_iv(iv: tuple[float, float]) -> str:
    lo, hi = iv
    if math.isnan(lo):
        return "[no interval]"
    return f"[{lo:.3g}, {hi:.3g}]"


def _table(fits: list[Any], unit: str) -> str:
    head = (
        "target",
        "b_crit",
        f"{fits[0].level:.0%} interval",
        "S_min",
        "interval",
        "E_min",
        "interval",
        "sizes",
        "cens.",
        "scatter",
    )
    rows = []
    for f in fits:
        rows.append(
            (
                "-" if f.target is None else f"{f.target:g}" if isinstance(f.target, float) else str(f.target),
                f"{f.b_crit:.4g}",
                _fmt_iv(f.b_crit_interval),
                f"{f.s_min:.4g}",
                _fmt_iv(f.s_min_interval),
                f"{f.e_min:.4g}",
                _fmt_iv(f.e_min_interval),
                str(f.n_points),
                str(f.n_censored),
                f"{f.sigma:.3f}",
            )
        )
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(head)]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))
    return "\n".join(
        [
            line(head),
            line(tuple("-" * w for w in widths)),
            *map(line, rows),
            f"(b_crit and E_min in {unit}, S_min in optimizer steps; scatter: s.d. of log S about the fit)",
        ]
    )


def _lr_table(fits: list[Any], unit: str) -> str:
    head = ("target", "B_noise", f"{fits[0].level:.0%} interval", "eps_max", "interval", "sizes", "excl.", "scatter")
    rows = []
    for f in fits:
        excluded = sum(not p.used for p in f.points)
        if f.b_noise is None:
            bn = "-"
            if f.b_noise_bound is not None:
                side, v = f.b_noise_bound
                bn = f"{'>' if side == 'lower' else '<'}{v:.3g}"
            biv = "[not resolved]"
        else:
            bn, biv = f"{f.b_noise:.4g}", _fmt_iv(f.b_noise_interval())
        eps, eiv = ("-", "") if f.eps_max is None else (f"{f.eps_max:.4g}", _fmt_iv(f.eps_max_interval()))
        rows.append(
            (
                "-" if f.target is None else f"{f.target:g}" if isinstance(f.target, float) else str(f.target),
                bn,
                biv,
                eps,
                eiv,
                str(f.n_used),
                str(excluded),
                "-" if math.isnan(f.sigma) else f"{f.sigma:.3f}",
            )
        )
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(head)]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))
    return "\n".join(
        [
            "B_noise and eps_max from the best learning rate per batch size, eps_opt(B) = eps_max/(1 + B_noise/B):",
            line(head),
            line(tuple("-" * w for w in widths)),
            *map(line, rows),
            f"(B_noise in {unit}, eps_max in learning-rate units; sizes: batch sizes fitted, excl.: left out, "
            "see notes; scatter: s.d. of log lr about the fit)",
        ]
    )


def run(args: argparse.Namespace) -> int:
    import sys

    from ..cli import CLIError

    if not 0 < args.level < 1:
        raise CLIError(f"--level must be between 0 and 1, got {args.level}")
    if args.n_boot < 0:
        raise CLIError(f"--n-boot must be >= 0, got {args.n_boot}")
    targets, best, cells = _scan_sweep_csv(args.sweep)
    frontiers = _frontiers(args.sweep, targets, best)
    from ..critical import fit_critical_batch
    from ..lr_sweep import fit_lr_sweep

    fits = []
    notes: list[str] = []
    for target, points in frontiers.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fits.append(fit_critical_batch(points, target=target, level=args.level, n_boot=args.n_boot, seed=args.seed))
        notes += [str(w.message) for w in caught]
    lr_fits: dict[Any, Any] = {}
    if cells.overflow:
        notes.append(f"more than {MAX_LR_CELLS} (target, batch size, lr) cells: no B_noise fit")
    else:
        for target in frontiers:
            recs = _lr_records(args.sweep, cells, target)
            if recs is None:
                continue
            if cells.dropped_runs.get(target):
                notes.append(
                    f"target {target}: {cells.dropped_runs[target]} runs beyond the first {MAX_RUNS_PER_CELL} of "
                    "their (batch size, lr) cell were left out of the B_noise fit"
                )
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    lr_fits[target] = fit_lr_sweep(
                        recs, target=target, level=args.level, n_boot=args.n_boot, seed=args.seed, refine=args.lr_refine
                    )
                except ValueError as e:
                    raise CLIError(f"{args.sweep}: {e}") from None
            notes += [str(w.message) for w in caught]
    if args.json:
        for f in fits:
            d = f.to_dict()
            d["unit"] = args.unit
            if f.target in lr_fits:
                d.update({k: v for k, v in lr_fits[f.target].to_dict().items() if k != "target"})
            print(json.dumps(d))
    else:
        print(_table(fits, args.unit))
        if lr_fits:
            print()
            print(_lr_table(list(lr_fits.values()), args.unit))
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    if args.plot is not None:
        from ..critical import plot_fit
        from ..plot import figure_path

        png = figure_path(args.plot, "critical-frontier.png")
        plot_fit(fits, png, unit=args.unit)
        print(f"wrote {png}", file=sys.stderr if args.json else sys.stdout)
    return 0
