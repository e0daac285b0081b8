"""The ``noisescale`` command: a parser, then one module per command in :mod:`noisescale.commands`.

Each command module defines ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``, and
is callable in-process: ``main(["plot", "run.jsonl"])`` returns the exit code. Bad input raises
:class:`CLIError` (or a ``ValueError`` from the library), printed as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser", "CLIError", "COMMANDS"]

# Command name -> module in noisescale.commands. Add a command by adding a module and a line here.
COMMANDS = {
    "demo": "demo",
    "plot": "plot",
    "fit": "fit",
    "sweep": "sweep",
}


class CLIError(Exception):
    """A user error: printed as ``noisescale CMD: error: MESSAGE`` with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noisescale",
        description="Measure the gradient noise scale of PyTorch training (McCandlish et al. 2018).",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"noisescale {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        mod = importlib.import_module(f"noisescale.commands.{module}")
        p = sub.add_parser(
            name, help=mod.HELP, description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (CLIError, ValueError, FileNotFoundError) as e:
        print(f"noisescale {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover
        print(f"noisescale {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
