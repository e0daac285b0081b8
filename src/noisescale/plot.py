"""Matplotlib figures of a run log. Imported lazily: ``import noisescale`` never imports matplotlib.

Every function takes ``ax=None`` and returns ``(fig, ax)``; pass an axis to draw into your own
figure. ``run`` is a :class:`~noisescale.runlog.RunLog` or a path to a ``.jsonl`` run log.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .runlog import RunLog, read_run_log

__all__ = [
    "plot_b_simple",
    "batch_used",
    "plot_groups",
    "plot_components",
    "plot_loss",
    "plot_run",
    "figure_path",
    "save_figure",
]

_X_LABEL = {"step": "optimizer step", "examples": "{unit} seen"}

# Larger magnitudes are refused (a corrupt log; matplotlib would fail on them without naming the
# line). No real noise-scale quantity comes near: float32 gradients square to at most ~1e77.
PLOT_LIMIT = 1e100


def figure_path(output: str | os.PathLike, name: str) -> Path:
    """Where a figure asked for as ``output`` is written (what the command line prints).

    - a directory (an existing one, or a name ending in ``/``, created): ``output/name``;
    - an existing file (or a device such as ``/dev/full``): ``output`` itself;
    - a new name without a suffix: ``output.png`` (what matplotlib would write);
    - otherwise ``output``; its suffix picks the format (``.png``, ``.pdf``, ``.svg``, ...).
    """
    raw = os.fspath(output)
    out = Path(raw)
    if out.is_dir() or raw.endswith(("/", os.sep)):
        out.mkdir(parents=True, exist_ok=True)
        return out / name
    if not out.exists() and not out.suffix:
        return out.with_name(out.name + ".png")
    return out


def save_figure(fig: Any, path: str | os.PathLike, *, dpi: int = 120) -> None:
    """``fig.savefig`` to exactly ``path`` (never ``path.png``): the format from the suffix, else PNG."""
    fmt = Path(path).suffix[1:].lower() or "png"
    try:
        fig.savefig(path, dpi=dpi, format=fmt)
    except OSError as e:
        if e.filename is not None:
            raise
        # an error while writing (a full disk) names no file: name it
        raise OSError(e.errno, e.strerror or str(e), os.fspath(path)) from e


def _plt() -> Any:
    try:
        import matplotlib

        if not os.environ.get("DISPLAY") and matplotlib.get_backend().lower() not in ("agg", "pdf", "svg"):
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        raise ImportError("plotting needs matplotlib: pip install 'noisescale[plot]'") from None
    return plt


def _run(run: RunLog | str | os.PathLike) -> RunLog:
    return run if isinstance(run, RunLog) else read_run_log(run)


def _axes(ax: Any) -> tuple[Any, Any]:
    if ax is None:
        fig, ax = _plt().subplots(figsize=(7, 4))
        return fig, ax
    return ax.figure, ax


def _col(log: RunLog, name: str) -> list[float]:
    """``log.column(name)``; ``ValueError`` naming file, line and field for a value too large to draw."""
    values = log.column(name)
    for i, v in enumerate(values):
        if abs(v) > PLOT_LIMIT:  # False for nan
            raise ValueError(
                f"{log.where(i)}: field {name!r} = {v:.6g} is too large to plot (|value| > {PLOT_LIMIT:.0e}); "
                "the run log is corrupt or the run diverged"
            )
    return values


def _xs(log: RunLog, x: str) -> tuple[list[float], str]:
    if x not in _X_LABEL:
        raise ValueError(f"x must be 'step' or 'examples', got {x!r}")
    return _col(log, x), _X_LABEL[x].format(unit=log.unit)


def _positive_log_scale(ax: Any, *series: list[float]) -> None:
    if any(v > 0 for s in series for v in s if math.isfinite(v)):
        ax.set_yscale("log")


def batch_used(log: RunLog) -> list[float]:
    """The batch of each step, in the log's unit: the step's increase in examples seen (``nan`` where a
    step is missing before it, e.g. the first step of a log continued after a resume)."""
    xs, steps = _col(log, "examples"), _col(log, "step")
    out = []
    for i, (e, s) in enumerate(zip(xs, steps)):
        if i == 0:
            out.append(e if s == 1 else math.nan)
        else:
            out.append(e - xs[i - 1] if s - steps[i - 1] == 1 else math.nan)
    return out


def plot_b_simple(
    run: RunLog | str | os.PathLike, ax: Any = None, *, x: str = "step", dataset_size: float | None = None
) -> tuple[Any, Any]:
    """``B_simple`` against steps or examples, with its 95% interval as a band, and the batch used at
    each step (a stepped line: it moves when a ``BatchSizeController`` changes it).

    ``dataset_size`` (in the log's unit) draws that size and marks the estimates beyond it: there the
    ``1/B`` law behind the estimator holds only for sampling with replacement (McCandlish et al.,
    footnote 6), and no batch of distinct examples is that large."""
    if dataset_size is not None and not (
        isinstance(dataset_size, (int, float)) and math.isfinite(dataset_size) and dataset_size > 0
    ):
        raise ValueError(f"dataset_size must be a finite positive number (in the log's unit), got {dataset_size!r}")
    log = _run(run)
    fig, ax = _axes(ax)
    xs, xlabel = _xs(log, x)
    b, lo, hi = _col(log, "b_simple"), _col(log, "b_simple_low"), _col(log, "b_simple_high")
    # An unbounded upper end (|G|^2 not resolved) is drawn to the top of the axis, which is
    # set from B_simple itself so that one wild interval does not flatten the curve.
    finite_top = max([v for v in b if math.isfinite(v) and v > 0], default=1.0)
    hi_drawn = [
        v if math.isfinite(v) else (finite_top * 100 if math.isfinite(v_lo) else math.nan) for v, v_lo in zip(hi, lo)
    ]
    ax.fill_between(xs, lo, hi_drawn, alpha=0.25, color="C0", linewidth=0, label="95% interval")
    # each step's own estimate, faint: what the average is made of (held-out transients in red)
    raw = _col(log, "b_simple_step")
    held = [r.get("status") == "outlier" for r in log.records]
    pts = [(xv, v) for xv, v, h in zip(xs, raw, held) if math.isfinite(v) and v > 0 and not h]
    out = [(xv, v) for xv, v, h in zip(xs, raw, held) if math.isfinite(v) and v > 0 and h]
    if pts:
        ax.scatter(*zip(*pts), s=4, color="C0", alpha=0.2, linewidths=0, label="per step")
    if out:
        ax.scatter(*zip(*out), s=12, color="C3", alpha=0.7, marker="x", label="held out (transient)")
    ax.plot(xs, b, color="C0", label="$B_{simple}$")
    # B_noise (hessian_every=): drawn on the same axis, with its interval, where the log has it
    bn = _col(log, "b_noise") if any("b_noise" in r for r in log.records) else []
    if any(math.isfinite(v) and v > 0 for v in bn):
        bn_lo, bn_hi = _col(log, "b_noise_low"), _col(log, "b_noise_high")
        bn_hi = [
            v if math.isfinite(v) else (finite_top * 100 if math.isfinite(lo_) else math.nan)
            for v, lo_ in zip(bn_hi, bn_lo)
        ]
        ax.fill_between(xs, bn_lo, bn_hi, alpha=0.15, color="C2", linewidth=0)
        ax.plot(xs, bn, color="C2", label="$B_{noise}$ (Hessian)")
    used = batch_used(log)
    if any(math.isfinite(v) and v > 0 for v in used):
        ax.plot(xs, used, color="k", linewidth=1, drawstyle="steps-post", label="batch used")
    if dataset_size is not None:
        ax.axhline(dataset_size, color="C3", linestyle=":", linewidth=1, label="dataset size")
        beyond = [(xv, v) for xv, v in zip(xs, b) if math.isfinite(v) and v > dataset_size]
        if beyond:
            ax.scatter(*zip(*beyond), s=10, color="C3", marker="^", label="beyond the dataset size")
    _positive_log_scale(ax, b)
    if math.isfinite(finite_top) and finite_top > 0:
        ax.set_ylim(top=finite_top * 10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"$B_{{simple}}$ [{log.unit}]")
    ax.set_title("Simple noise scale $tr(\\Sigma)/|G|^2$")
    ax.legend(loc="best")
    return fig, ax


def _groups(log: RunLog) -> list[str]:
    names = log.header.get("groups") or []
    return [str(n) for n in names if any(f"group/{n}/b_simple" in r for r in log.records)]


def plot_groups(run: RunLog | str | os.PathLike, ax: Any = None, *, x: str = "step") -> tuple[Any, Any]:
    """``B_simple`` of each group (a log written with ``groups=``) and of the total (dashed)."""
    log = _run(run)
    names = _groups(log)
    if not names:
        raise ValueError("the run log has no groups; create the tracker with groups=... to record them")
    fig, ax = _axes(ax)
    xs, xlabel = _xs(log, x)
    series = [_col(log, f"group/{n}/b_simple") for n in names]
    for i, (n, b) in enumerate(zip(names, series)):
        ax.plot(xs, b, color=f"C{i % 10}", label=n, linewidth=1.2)
    total = _col(log, "b_simple")
    ax.plot(xs, total, color="k", linestyle="--", linewidth=1, label="total")
    _positive_log_scale(ax, total, *series)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"$B_{{simple}}$ [{log.unit}]")
    ax.set_title("Per-group simple noise scale")
    ax.legend(loc="best", fontsize="small", ncol=2 if len(names) > 6 else 1)
    return fig, ax


def plot_components(run: RunLog | str | os.PathLike, ax: Any = None, *, x: str = "step") -> tuple[Any, Any]:
    """The smoothed ``|G|^2`` and ``tr(Sigma)`` (log scale; non-positive values are not drawn)."""
    log = _run(run)
    fig, ax = _axes(ax)
    xs, xlabel = _xs(log, x)
    g2, ts = _col(log, "g2"), _col(log, "trace_sigma")
    ax.plot(xs, [v if v > 0 else math.nan for v in g2], color="C1", label="$|G|^2$")
    ax.plot(xs, [v if v > 0 else math.nan for v in ts], color="C2", label="$tr(\\Sigma)$")
    _positive_log_scale(ax, g2, ts)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("squared gradient norm")
    ax.legend(loc="best")
    return fig, ax


def plot_loss(run: RunLog | str | os.PathLike, ax: Any = None, *, x: str = "step") -> tuple[Any, Any]:
    """The training loss recorded with ``step(loss=...)``."""
    log = _run(run)
    fig, ax = _axes(ax)
    xs, xlabel = _xs(log, x)
    loss = _col(log, "loss")
    if not any(math.isfinite(v) for v in loss):
        raise ValueError("the run log has no loss values; pass loss= to GradientNoiseScale.step()")
    ax.plot(xs, loss, color="C3", label="training loss")
    _positive_log_scale(ax, loss)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.legend(loc="best")
    return fig, ax


def plot_run(
    run: RunLog | str | os.PathLike,
    path: str | os.PathLike | None = None,
    *,
    x: str = "step",
    dataset_size: float | None = None,
) -> Any:
    """Panels: ``B_simple`` (with the batch used, and ``dataset_size`` if given); per-group ``B_simple``
    if the log has groups; ``|G|^2`` and ``tr(Sigma)``; the loss if logged. Saves a PNG if ``path``."""
    log = _run(run)
    if x not in _X_LABEL:
        raise ValueError(f"x must be 'step' or 'examples', got {x!r}")
    # every value drawn is checked before a figure exists (an error leaves no figure open)
    for name in (x, "b_simple", "b_simple_low", "b_simple_high", "g2", "trace_sigma"):
        _col(log, name)
    has_loss = any(math.isfinite(v) for v in _col(log, "loss"))
    has_groups = bool(_groups(log))
    for g in _groups(log):
        _col(log, f"group/{g}/b_simple")
    plt = _plt()
    n = 2 + has_loss + has_groups
    fig, axes = plt.subplots(n, 1, figsize=(7, 3.2 * n), sharex=True)
    try:
        plot_b_simple(log, axes[0], x=x, dataset_size=dataset_size)
        if has_groups:
            plot_groups(log, axes[1], x=x)
        plot_components(log, axes[1 + has_groups], x=x)
        if has_loss:
            plot_loss(log, axes[-1], x=x)
        for a in axes[:-1]:
            a.set_xlabel("")
        fig.tight_layout()
        if path is not None:
            save_figure(fig, path, dpi=120)
    except BaseException:
        plt.close(fig)
        raise
    return fig
