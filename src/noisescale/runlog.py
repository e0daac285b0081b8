"""The JSON-lines run log: one header line, then one line per ``step()``.

Strict JSON (no NaN/Infinity): an undefined or unbounded value is written as ``null``; the
header says what every field means, so a log is self-describing::

    {"type": "header", "format": "noisescale-run", "version": 1, "unit": "examples", ...}
    {"type": "step", "step": 1, "examples": 64, "status": "measured", "b_simple": 812.3, ...}

``status`` is ``"measured"``, ``"skipped"`` (a non-finite norm: not averaged) or
``"unmeasurable"`` (nothing to compare on this step, see ``reason``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = ["RunLogError", "RunLogWriter", "RunLog", "read_run_log", "FORMAT", "VERSION"]

FORMAT = "noisescale-run"
VERSION = 1
STEP_FIELDS = ("step", "examples", "status")


class RunLogError(ValueError):
    """A run log that cannot be read; the message names the file, line and problem."""


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


class RunLogWriter:
    """Writes a run log: a header, then one record per line, each flushed as it is written.

    The file is opened at the first write. What is already there is never silently lost:

    - after :meth:`resume` (the tracker was restored from a checkpoint at step ``S``), the existing
      log keeps its header and its records of steps ``<= S`` (those the restored state has seen;
      later ones will be measured again) and new records are appended: a resumed run's log holds
      every measured step once, in order. The rewrite goes through a temporary file and an atomic
      rename, and a torn last line (a crash mid-write) is dropped;
    - a new run writing to a path that holds a log moves that log aside to ``<name>.old`` first
      (one generation), with a warning.
    """

    def __init__(self, path: str | os.PathLike, header: dict[str, Any]) -> None:
        self.path = Path(path)
        self.header = {"type": "header", "format": FORMAT, "version": VERSION, **header}
        self.resume_from: int | None = None
        self._f: IO[str] | None = None
        self._closed = False
        if self.path.is_dir():
            raise ValueError(f"log={str(self.path)!r} is a directory; give a file path such as run.jsonl")

    def resume(self, step: int) -> None:
        """Continue the existing log after step ``step`` instead of starting a new one."""
        if self._f is not None:
            raise RuntimeError("resume() must come before the first record is written (load the state first)")
        self.resume_from = int(step)

    def _open(self) -> IO[str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            if self.resume_from is not None:
                kept = self._kept_lines(self.resume_from)
                tmp = self.path.with_name(self.path.name + ".tmp")
                with open(tmp, "w", encoding="utf-8") as f:
                    f.writelines(kept)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
                if kept:
                    return open(self.path, "a", encoding="utf-8")
            else:
                old = self.path.with_name(self.path.name + ".old")
                os.replace(self.path, old)
                warnings.warn(
                    f"noisescale: {self.path} held a run log; moved it to {old} (a new run starts here; "
                    "load the tracker's state_dict before the first step to continue it instead)",
                    stacklevel=4,
                )
        f = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 (held open; closed by close())
        f.write(json.dumps(self.header, allow_nan=False) + "\n")
        return f

    def _kept_lines(self, last_step: int) -> list[str]:
        """The header and step records up to ``last_step`` of the existing log (complete lines only)."""
        kept: list[str] = []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # a torn last line
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(obj, dict):
                    continue
                if obj.get("type") == "step" and not (isinstance(obj.get("step"), int) and obj["step"] <= last_step):
                    continue
                kept.append(line)
        return kept if kept and json.loads(kept[0]).get("type") == "header" else []

    def write(self, record: dict[str, Any]) -> None:
        if self._closed:
            raise RuntimeError(f"run log {self.path} is closed")
        if self._f is None:
            self._f = self._open()
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}, allow_nan=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._closed = True
        if self._f is not None:
            self._f.close()
            self._f = None


@dataclass
class RunLog:
    """A parsed run log: the header and the step records, in order.

    ``path`` and ``lines`` (the line number of each record) are set by :func:`read_run_log`, so
    that a problem found later (a value too large to draw) can name the line it came from.
    """

    header: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None
    lines: list[int] = field(default_factory=list)

    @property
    def unit(self) -> str:
        return str(self.header.get("unit", "examples"))

    def where(self, index: int) -> str:
        """``FILE:LINE`` of record ``index`` (``record N`` for a log built in memory)."""
        if self.path is not None and len(self.lines) == len(self.records):
            return f"{self.path}:{self.lines[index]}"
        return f"record {index + 1}"

    def column(self, name: str) -> list[float]:
        """Values of ``name`` over step records (``nan`` where missing or null)."""
        out = []
        for r in self.records:
            v = r.get(name)
            out.append(float(v) if isinstance(v, (int, float)) else math.nan)
        return out


# Fields of a step record that are text, not numbers.
_TEXT_FIELDS = ("type", "status", "reason", "source")


def _check_number(p: Path, lineno: int, k: str, v: Any) -> None:
    if v is None or isinstance(v, bool):
        return
    if not isinstance(v, (int, float)):
        raise RunLogError(f"{p}:{lineno}: field {k!r} should be a number or null, got {v!r}")
    try:
        finite = math.isfinite(v)
    except OverflowError:  # an integer beyond the float range
        finite = False
    if not finite:
        shown = v if isinstance(v, float) else f"an integer of {len(str(abs(v)))} digits"
        raise RunLogError(
            f"{p}:{lineno}: field {k!r} = {shown} is not a finite number (a run log writes null for an undefined value)"
        )


def read_run_log(path: str | os.PathLike) -> RunLog:
    """Parse and validate a run log; raise :class:`RunLogError` naming the first bad line.

    A last line without its newline that is not valid JSON was cut (a crash, a full disk, a copy
    of a file still being written): it is left out with a warning naming the line, and the
    complete records before it are returned.
    """
    p = Path(path)
    if not p.exists():
        raise RunLogError(f"{p}: no such file")
    if p.is_dir():
        raise RunLogError(f"{p}: is a directory, expected a .jsonl run log written by noisescale")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise RunLogError(
            f"{p}: not a text file ({e.reason} at byte {e.start}); expected a JSON-lines run log"
        ) from None
    all_lines = [ln.removesuffix("\r") for ln in text.split("\n")]
    # the last line lacks its newline: it may have been cut in the middle of a write
    torn_at = len(all_lines) if not text.endswith("\n") else None
    lines = [(i + 1, ln) for i, ln in enumerate(all_lines) if ln.strip()]
    if not lines:
        raise RunLogError(f"{p}: empty file; expected a header line and step records")
    log: RunLog | None = None
    for lineno, ln in lines:
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            if lineno == torn_at:
                if log is None:
                    raise RunLogError(
                        f"{p}:{lineno}: the header line is incomplete (the file was cut while being written)"
                    ) from None
                warnings.warn(
                    f"{p}:{lineno}: the last line is incomplete (the file was cut while being written); "
                    f"left out, {len(log.records)} complete step records read",
                    stacklevel=2,
                )
                break
            raise RunLogError(f"{p}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise RunLogError(f"{p}:{lineno}: JSON nested too deeply (not a run-log record)") from None
        except ValueError as e:  # e.g. an integer literal with more digits than Python converts
            raise RunLogError(f"{p}:{lineno}: not a valid run-log record ({e})") from None
        if not isinstance(obj, dict):
            raise RunLogError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        if log is None:
            if obj.get("type") != "header" or obj.get("format") != FORMAT:
                raise RunLogError(
                    f"{p}:{lineno}: first line is not a noisescale run-log header "
                    f"(expected type='header', format='{FORMAT}')"
                )
            if obj.get("version") != VERSION:
                raise RunLogError(
                    f"{p}:{lineno}: run-log version {obj.get('version')!r} is not supported "
                    f"(this noisescale reads version {VERSION})"
                )
            log = RunLog(header=obj, path=p)
            continue
        if obj.get("type") != "step":
            continue  # forward compatible: ignore record types we do not know
        missing = [k for k in STEP_FIELDS if k not in obj]
        if missing:
            raise RunLogError(f"{p}:{lineno}: step record lacks {missing}")
        for k, v in obj.items():
            if k not in _TEXT_FIELDS:
                _check_number(p, lineno, k, v)
        log.records.append(obj)
        log.lines.append(lineno)
    assert log is not None
    return log
