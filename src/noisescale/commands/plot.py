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
    p.add_argument(
        "-o",
        "--output",
        default=None,
        help="PNG to write, or a directory to write LOGNAME.png into (default: the log's name with .png)",
    )
    p.add_argument("--x", choices=("step", "examples"), default="step", help="x axis (default: step)")
    p.add_argument(
        "--dataset-size",
        type=float,
        default=None,
        help="training-set size in the log's unit: drawn on the B_simple panel, estimates beyond it flagged",
    )


def run(args: argparse.Namespace) -> int:
    from ..plot import figure_path, plot_run
    from ..runlog import read_run_log

    log = read_run_log(args.run)  # RunLogError (a ValueError) -> one-line error, exit 2
    if not log.records:
        raise ValueError(f"{args.run}: the run log has a header but no step records; nothing to plot")
    default = args.run.with_suffix(".png")
    out = figure_path(args.output, default.name) if args.output is not None else default
    if args.dataset_size is not None and not (args.dataset_size > 0 and args.dataset_size < float("inf")):
        raise ValueError(f"--dataset-size must be a finite positive number, got {args.dataset_size}")
    fig = plot_run(log, out, x=args.x, dataset_size=args.dataset_size)
    try:
        import matplotlib.pyplot as plt

        plt.close(fig)
    except ImportError:  # pragma: no cover - plot_run needed it
        pass
    print(f"wrote {out}")
    return 0
