"""Fit the critical batch size to a batch-size sweep (McCandlish et al. 2018, Eqs. 2.11-2.12, App. A.3).

Input: a CSV file with one row per run and target. Columns:

    batch_size   examples (or tokens) per optimizer step          required
    steps        optimizer steps to reach the target               required
    target       the target the row refers to (rows fitted per target; default: one target)
    lr           learning rate of the run (only reported)
    examples     examples to reach the target (default: batch_size * steps)
    reached      1/0: whether the run reached the target; for 0, `steps` is the run's budget
                 and the run counts as censored (S > steps), not dropped (default: 1)

For every target, the fastest run per batch size (the Pareto frontier) is fitted in log space to
(S/S_min - 1)(E/E_min - 1) = 1, giving S_min, E_min and b_crit = E_min/S_min with bootstrap
intervals. `noisescale sweep` writes files in this format.

Examples:
    noisescale fit sweep.csv
    noisescale fit sweep.csv --json
    noisescale fit sweep.csv --plot frontier.png
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import warnings
from pathlib import Path
from typing import Any

HELP = "fit S_min, E_min and the critical batch size to a batch-size sweep (.csv)"

REQUIRED = ("batch_size", "steps")
OPTIONAL = ("target", "lr", "examples", "reached")
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
        help="write the frontier, fitted hyperbola and b_crit to this PNG",
    )
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals (default: 0.95)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: 0)")
    p.add_argument("--unit", default="examples", help="what a batch size counts (default: examples)")


def _number(raw: str | None, col: str, line: int, path: Path) -> float:
    from ..cli import CLIError

    s = (raw or "").strip()
    try:
        v = float(s)
    except ValueError:
        raise CLIError(f"{path}, line {line}: {col} = {s!r} is not a number") from None
    if not math.isfinite(v):
        raise CLIError(f"{path}, line {line}: {col} = {s!r} is not a finite number")
    if v <= 0:
        raise CLIError(f"{path}, line {line}: {col} = {s} must be positive")
    return v


def read_sweep_csv(path: Path) -> list[Any]:
    """Rows of a sweep CSV as :class:`~noisescale.critical.RunRecord` s; ``CLIError`` on bad input."""
    from ..cli import CLIError
    from ..critical import RunRecord

    if not path.exists():
        raise CLIError(f"{path}: no such file")
    if path.is_dir():
        raise CLIError(f"{path} is a directory; give the sweep's CSV file")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise CLIError(f"{path} is not a text (CSV) file") from None
    if not text.strip():
        raise CLIError(
            f"{path} is empty; expected a CSV header with columns {', '.join(REQUIRED)} "
            f"(optional {', '.join(OPTIONAL)}) and one row per run"
        )
    reader = csv.DictReader(text.splitlines())
    cols = [c.strip() for c in (reader.fieldnames or [])]
    reader.fieldnames = cols
    missing = [c for c in REQUIRED if c not in cols]
    if missing:
        raise CLIError(
            f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(found: {', '.join(cols) or 'none'}); required: {', '.join(REQUIRED)}"
        )
    records = []
    for i, row in enumerate(reader, start=2):
        if all(not (v or "").strip() for k, v in row.items() if k is not None):
            continue  # blank line
        if None in row:
            raise CLIError(f"{path}, line {i}: more fields than the header has columns")
        b = _number(row["batch_size"], "batch_size", i, path)
        s = _number(row["steps"], "steps", i, path)
        lr = _number(row["lr"], "lr", i, path) if "lr" in cols and (row.get("lr") or "").strip() else None
        ex = (
            _number(row["examples"], "examples", i, path)
            if "examples" in cols and (row.get("examples") or "").strip()
            else None
        )
        reached = True
        if "reached" in cols and (row.get("reached") or "").strip():
            r = row["reached"].strip().lower()
            if r in _TRUE:
                reached = True
            elif r in _FALSE:
                reached = False
            else:
                raise CLIError(f"{path}, line {i}: reached = {row['reached']!r} is not 1/0 (or true/false)")
        target: Any = None
        if "target" in cols:
            t = (row.get("target") or "").strip()
            if not t:
                raise CLIError(f"{path}, line {i}: the target is empty")
            try:
                target = float(t)
            except ValueError:
                target = t
        records.append(RunRecord(b, s, target=target, lr=lr, examples=ex, reached=reached))
    if not records:
        raise CLIError(f"{path} has a header but no rows; expected one row per run and target")
    return records


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


def run(args: argparse.Namespace) -> int:
    import sys

    from ..cli import CLIError

    if not 0 < args.level < 1:
        raise CLIError(f"--level must be between 0 and 1, got {args.level}")
    if args.n_boot < 0:
        raise CLIError(f"--n-boot must be >= 0, got {args.n_boot}")
    records = read_sweep_csv(args.sweep)
    from ..critical import fit_critical_batch, group_by_target

    fits = []
    notes: list[str] = []
    for target, recs in group_by_target(records).items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fits.append(fit_critical_batch(recs, target=target, level=args.level, n_boot=args.n_boot, seed=args.seed))
        notes += [str(w.message) for w in caught]
    if args.json:
        for f in fits:
            d = f.to_dict()
            d["unit"] = args.unit
            print(json.dumps(d))
    else:
        print(_table(fits, args.unit))
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    if args.plot is not None:
        from ..critical import plot_fit

        plot_fit(fits, args.plot, unit=args.unit)
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0
