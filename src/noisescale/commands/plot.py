"""Redraw the figure of a run log written by GradientNoiseScale(log=...) or `noisescale demo`.

Example:
    noisescale plot noisescale-demo/run.jsonl -o figure.png --x examples
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "redraw a figure from a run log (.jsonl)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run log (.jsonl)")
    p.add_argument("-o", "--output", type=Path, default=None, help="PNG to write (default: the log's name with .png)")
    p.add_argument("--x", choices=("step", "examples"), default="step", help="x axis (default: step)")


def run(args: argparse.Namespace) -> int:
    from ..plot import plot_run
    from ..runlog import read_run_log

    log = read_run_log(args.run)  # RunLogError (a ValueError) -> one-line error, exit 2
    if not log.records:
        raise ValueError(f"{args.run}: the run log has a header but no step records; nothing to plot")
    out = args.output or args.run.with_suffix(".png")
    plot_run(log, out, x=args.x)
    print(f"wrote {out}")
    return 0
