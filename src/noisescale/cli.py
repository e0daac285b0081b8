"""The ``noisescale`` command: a parser, then one module per command in :mod:`noisescale.commands`.

Each command module defines ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``, and
is callable in-process: ``main(["plot", "run.jsonl"])`` returns the exit code.

The one-line promise: every error the user can cause (a bad argument, a corrupt or missing file,
a file that cannot be written: permissions, a full disk, ``--out`` naming a file) is printed as
one line, ``noisescale CMD: error: MESSAGE``, with exit code 2. Warnings are one line each,
``noisescale CMD: warning: MESSAGE``. SIGINT and SIGTERM stop a command with one line and exit
code 128 + the signal number (130, 143). Only a bug in noisescale shows a traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["main", "build_parser", "CLIError", "Interrupted", "COMMANDS", "describe_os_error"]

# Command name -> module in noisescale.commands. Add a command by adding a module and a line here.
COMMANDS = {
    "demo": "demo",
    "plot": "plot",
    "fit": "fit",
    "sweep": "sweep",
}


class CLIError(Exception):
    """A user error: printed as ``noisescale CMD: error: MESSAGE`` with exit code 2."""


class Interrupted(BaseException):
    """A command stopped by a signal (SIGTERM, or SIGINT re-raised with a note).

    A ``BaseException``, like ``KeyboardInterrupt``, so that ``except Exception`` does not swallow
    it. Printed as ``noisescale CMD: MESSAGE`` with exit code ``128 + signum``.
    """

    def __init__(self, signum: int, message: str = "") -> None:
        self.signum = int(signum)
        try:
            name = signal.Signals(self.signum).name
        except ValueError:
            name = f"signal {self.signum}"
        self.message = message or f"stopped by {name}"
        super().__init__(self.message)


def describe_os_error(e: OSError) -> str:
    """An ``OSError`` as one readable line: ``PATH: reason`` (``No space left on device``, ...)."""
    reason = e.strerror or str(e) or type(e).__name__
    if e.errno == errno.ENOSPC:
        reason = "no space left on device (the disk is full)"
    elif e.errno in (errno.EACCES, errno.EPERM):
        reason = "permission denied"
    elif e.errno == errno.EEXIST:
        reason = "already exists (and is not a directory)" if e.filename else reason
    elif e.errno == errno.ENOTDIR:
        reason = "a part of this path is a file, not a directory"
    elif e.errno == errno.EISDIR:
        reason = "is a directory"
    elif e.errno == errno.EROFS:
        reason = "read-only file system"
    if e.filename is not None:
        where = os.fsdecode(e.filename)
        if getattr(e, "filename2", None) is not None:
            where += f" -> {os.fsdecode(e.filename2)}"
        return f"{where}: {reason}"
    return reason


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


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@contextmanager
def _signals() -> Iterator[None]:
    """SIGTERM (``timeout``, SLURM, Kubernetes) raises :class:`Interrupted` in the main thread, so
    that the command's ``finally`` blocks run (a sweep stops its workers and keeps its results).
    Only where SIGTERM still has its default action, and only in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except (AttributeError, ValueError):  # pragma: no cover - no SIGTERM on this platform
        yield
        return
    if previous is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """Warnings raised while a command runs are printed as one line each on stderr."""

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        text = " ".join(str(message).split())
        print(f"noisescale {command}: warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _error(command: str, message: str) -> int:
    text = " ".join(str(message).split()) or "unknown error"
    print(f"noisescale {command}: error: {text}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cmd = args.command
    try:
        with _signals(), _one_line_warnings(cmd):
            return int(args._run(args) or 0)
    except CLIError as e:
        return _error(cmd, str(e))
    except BrokenPipeError:
        # `noisescale fit x.csv | head -1`: the reader went away; nothing to report
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # pragma: no cover - stdout replaced or closed
            pass
        return 2
    except OSError as e:
        # FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, a full disk
        # (ENOSPC), a read-only file system: the environment the user gave, not a bug
        return _error(cmd, describe_os_error(e))
    except ValueError as e:  # includes RunLogError and UnicodeDecodeError
        return _error(cmd, str(e))
    except Interrupted as e:
        print(f"noisescale {cmd}: {e.message}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"noisescale {cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    # `python -m noisescale.cli`: run the imported module's main, so that the exception classes
    # the commands raise (noisescale.cli.Interrupted, ...) are the ones caught here
    from noisescale.cli import main as _main

    sys.exit(_main())
