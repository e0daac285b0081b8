"""Critical batch size from a batch-size sweep: McCandlish et al. 2018, Eqs. 2.11-2.12, App. A.2-A.3, D.

The paper's steps-versus-examples model: at a fixed target loss, a run at batch ``B`` needs
``S`` optimizer steps and ``E = B S`` examples, with (Eq. 2.11)::

    (S/S_min - 1)(E/E_min - 1) = 1,   b_crit = E_min/S_min                     (Eq. 2.12)
    S(B) = S_min (1 + b_crit/B),       E(B) = E_min (1 + B/b_crit)

How it is measured (App. A.2-A.3): train at many batch sizes with the learning rate tuned per
batch size, keep the fastest run at each batch size for each target (the Pareto frontier), and
fit the hyperbola in log space. This module does that, from plain records of runs:

- :func:`frontier`: fastest run per batch size, with runs that never reached the target kept as
  *censored* observations (``S > budget``), never dropped silently;
- :func:`fit_critical_batch`: maximum-likelihood fit of ``log S = log S_min + log(1 + b_crit/B)``
  with log-normal scatter (least squares in log space when nothing is censored; a Tobit
  likelihood when something is), a residual bootstrap interval, and a goodness-of-fit figure
  (:func:`plot_fit`);
- the forward model: :func:`speed_efficiency`, :func:`batch_for_speed`,
  :meth:`CriticalBatchFit.optimal_batch` (the batch minimising ``S + E/r``, App. D).

Pure NumPy; the fit uses SciPy (``pip install 'noisescale[fit]'``), imported when called.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any, cast

import numpy as np

from .estimators import E as _E
from .estimators import S as _S
from .estimators import optimal_batch_for_exchange_rate, t_quantile

__all__ = [
    "RunRecord",
    "FrontierPoint",
    "CriticalBatchFit",
    "frontier",
    "fit_critical_batch",
    "fit_sweep",
    "group_by_target",
    "speed_efficiency",
    "batch_for_speed",
    "plot_fit",
]

# A fitted b_crit may lie at most this factor outside the swept batch sizes; beyond it the sweep
# carries no information (all B >> b_crit: S is flat; all B << b_crit: E is flat).
_BOUND_FACTOR = 1e3


def _scipy() -> tuple[Any, Any]:
    try:
        from scipy import optimize, special
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ImportError("fitting the critical batch size needs SciPy: pip install 'noisescale[fit]'") from None
    return optimize, special


# ---------------------------------------------------------------------------------------
# Records and the frontier.


@dataclass(frozen=True)
class RunRecord:
    """One training run taken to one target.

    Args:
        batch_size: examples (or tokens, frames) per optimizer step.
        steps: optimizer steps to reach the target; for a run that did not reach it
            (``reached=False``) the number of steps it was allowed (its budget): then all we know
            is ``S > steps``.
        target: the target (e.g. a training loss); records with equal targets are fitted together.
        lr: learning rate of the run (kept for reporting which run was fastest).
        examples: examples to reach the target; default ``batch_size * steps``.
        reached: whether the run reached the target.
        seed: the run's seed, if any.
    """

    batch_size: float
    steps: float
    target: Any = None
    lr: float | None = None
    examples: float | None = None
    reached: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "steps"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite positive number, got {v!r}")
        if self.examples is not None and not (math.isfinite(self.examples) and self.examples > 0):
            raise ValueError(f"examples must be a finite positive number, got {self.examples!r}")
        if self.examples is None and not math.isfinite(float(self.batch_size) * float(self.steps)):
            raise ValueError(
                f"batch_size x steps = {self.batch_size!r} x {self.steps!r} overflows; give examples= explicitly"
            )
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite positive number, got {self.lr!r}")

    @property
    def n_examples(self) -> float:
        """Examples processed to the target (or to the budget when not reached)."""
        return float(self.examples) if self.examples is not None else float(self.batch_size) * float(self.steps)


@dataclass(frozen=True)
class FrontierPoint:
    """The fastest run at one batch size for one target (one point of the Pareto frontier).

    ``status``:

    - ``"exact"``: ``S* = steps`` (the fastest run reached the target; every run that did not
      was allowed at least that many steps, so none of them could have been faster);
    - ``"interval"``: ``lower < S* <= steps`` (a run stopped before ``steps`` without reaching
      the target might have been faster);
    - ``"censored"``: no run reached the target, ``S* > lower`` (``steps == lower``).

    ``dominated``: another frontier point needs no more steps *and* no more examples (reported,
    kept in the fit: with noise, points near the flat ends of the hyperbola are often dominated).
    """

    batch_size: float
    steps: float
    examples: float
    lower: float
    status: str
    n_runs: int
    n_reached: int
    lr: float | None = None
    dominated: bool = False

    @property
    def censored(self) -> bool:
        return self.status != "exact"


def _target_key(t: Any) -> Any:
    if isinstance(t, (float, np.floating)) and float(t).is_integer():
        return float(t)
    return t


def group_by_target(records: Iterable[RunRecord]) -> dict[Any, list[RunRecord]]:
    """Records split by target, in order of first appearance (``None`` when no target is given)."""
    out: dict[Any, list[RunRecord]] = {}
    for r in records:
        out.setdefault(_target_key(r.target), []).append(r)
    return out


def one_target(records: Iterable[RunRecord]) -> list[RunRecord]:
    """``records`` as a list, checked to be non-empty and of one target (``ValueError`` otherwise)."""
    recs = list(records)
    if not recs:
        raise ValueError("no runs given")
    targets = {_target_key(r.target) for r in recs}
    if len(targets) > 1:
        raise ValueError(
            f"records mix {len(targets)} targets {sorted(map(str, targets))}; "
            "split them with group_by_target() and fit each"
        )
    return recs


def frontier(records: Iterable[RunRecord]) -> list[FrontierPoint]:
    """The fastest run at each batch size (App. A.3), for records of one target, sorted by batch size.

    Runs that did not reach the target are censored observations ``S > budget`` and enter as
    described in :class:`FrontierPoint`; a batch size at which no run reached the target is
    kept as a censored point. Raises ``ValueError`` if the records mix targets.
    """
    recs = one_target(records)
    by_b: dict[float, list[RunRecord]] = {}
    for r in recs:
        by_b.setdefault(float(r.batch_size), []).append(r)
    points = []
    for b in sorted(by_b):
        runs = by_b[b]
        reached = [r for r in runs if r.reached]
        budgets = [float(r.steps) for r in runs if not r.reached]
        if reached:
            best = min(reached, key=lambda r: (float(r.steps), r.n_examples))
            s = float(best.steps)
            low = min(budgets) if budgets else s
            if low < s:
                status = "interval"
            else:
                status, low = "exact", s
            points.append(FrontierPoint(b, s, best.n_examples, low, status, len(runs), len(reached), best.lr))
        else:
            low = min(budgets)
            points.append(FrontierPoint(b, low, b * low, low, "censored", len(runs), 0, None))
    # Pareto dominance among points with a known value (a censored point's value is a bound).
    known = [p for p in points if p.status != "censored"]
    out = []
    for p in points:
        dom = p.status != "censored" and any(
            q is not p
            and q.steps <= p.steps
            and q.examples <= p.examples
            and (q.steps < p.steps or q.examples < p.examples)
            for q in known
        )
        out.append(FrontierPoint(**{**asdict(p), "dominated": dom}))
    return out


# ---------------------------------------------------------------------------------------
# The forward model (Eqs. 2.11-2.12, App. D).


def speed_efficiency(B: Any, b_crit: float) -> tuple[Any, Any]:
    """``(S_min/S(B), E_min/E(B))``: the fraction of the largest possible speed-up and of the best
    data efficiency a fixed batch ``B`` achieves (from Eq. 2.11).

    ``speed = 1/(1 + b_crit/B)`` and ``efficiency = 1/(1 + B/b_crit)``; they always sum to 1, the
    trade-off in one line. At ``B = b_crit`` both are 1/2.
    """
    B = np.asarray(B, dtype=float) if not isinstance(B, (int, float)) else float(B)
    return 1.0 / (1.0 + b_crit / B), 1.0 / (1.0 + B / b_crit)


def batch_for_speed(fraction: float, b_crit: float) -> float:
    """The batch reaching ``fraction`` of the largest possible speed-up: ``b_crit f/(1 - f)``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    return b_crit * fraction / (1.0 - fraction)


# ---------------------------------------------------------------------------------------
# The fit.


@dataclass
class CriticalBatchFit:
    """Fitted ``S_min``, ``E_min`` and ``b_crit`` for one target, with bootstrap intervals.

    Intervals are ``(low, high)`` percentile intervals at ``level`` from a residual bootstrap; an
    end is ``0`` or ``inf`` where bootstrap fits ran to the edge of what the sweep can tell
    (``b_crit`` far outside the swept batch sizes). ``nan`` when there are too few points.
    ``sigma`` is the fitted scatter of ``log S`` about the model (0.1 = about 10%).
    """

    target: Any
    s_min: float
    e_min: float
    b_crit: float
    s_min_interval: tuple[float, float]
    e_min_interval: tuple[float, float]
    b_crit_interval: tuple[float, float]
    level: float
    sigma: float
    points: list[FrontierPoint]
    residuals: list[float]
    n_boot: int
    identified: bool = True
    messages: list[str] = field(default_factory=list)

    # -- forward model -------------------------------------------------------------------

    def steps(self, B: Any) -> Any:
        """Predicted steps to the target at batch ``B``: ``S_min (1 + b_crit/B)``."""
        return _S(np.asarray(B, dtype=float), self.s_min, self.b_crit)

    def examples(self, B: Any) -> Any:
        """Predicted examples to the target at batch ``B``: ``E_min (1 + B/b_crit)``."""
        return _E(np.asarray(B, dtype=float), self.e_min, self.b_crit)

    def speed_efficiency(self, B: Any) -> tuple[Any, Any]:
        """See :func:`speed_efficiency`."""
        return speed_efficiency(B, self.b_crit)

    def optimal_batch(self, r: float) -> float:
        """The fixed batch minimising ``S + E/r`` for an exchange rate ``r`` (examples per step):
        ``sqrt(r b_crit)`` (App. D, Eq. D.3, with the run-averaged noise scale ``b_crit``)."""
        return optimal_batch_for_exchange_rate(r, self.b_crit)

    # -- reporting -----------------------------------------------------------------------

    @property
    def n_points(self) -> int:
        return len(self.points)

    @property
    def n_censored(self) -> int:
        return sum(p.censored for p in self.points)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready numbers (``inf``/``nan`` become ``None``)."""

        def c(x: float) -> float | None:
            return float(x) if math.isfinite(x) else None

        return {
            "target": self.target,
            "s_min": c(self.s_min),
            "s_min_interval": [c(v) for v in self.s_min_interval],
            "e_min": c(self.e_min),
            "e_min_interval": [c(v) for v in self.e_min_interval],
            "b_crit": c(self.b_crit),
            "b_crit_interval": [c(v) for v in self.b_crit_interval],
            "level": self.level,
            "sigma_log": c(self.sigma),
            "n_points": self.n_points,
            "n_censored": self.n_censored,
            "identified": self.identified,
            "n_boot": self.n_boot,
            "messages": list(self.messages),
        }

    def summary(self) -> str:
        lo, hi = self.b_crit_interval
        t = "" if self.target is None else f"target {self.target}: "
        return (
            f"{t}b_crit = {self.b_crit:.4g} [{self.level:.0%}: {lo:.3g}, {hi:.3g}], "
            f"S_min = {self.s_min:.4g} steps, E_min = {self.e_min:.4g} examples "
            f"({self.n_points} batch sizes, {self.n_censored} censored, scatter {self.sigma:.2f} in log S)"
        )


class _Data:
    """Frontier in the arrays the likelihood needs (log space, App. A.3)."""

    def __init__(self, points: Sequence[FrontierPoint]) -> None:
        self.logb = np.log([p.batch_size for p in points])
        self.exact = np.array([p.status == "exact" for p in points])
        self.interval = np.array([p.status == "interval" for p in points])
        self.cens = np.array([p.status == "censored" for p in points])
        self.y = np.log([p.steps for p in points])  # log S (upper end for intervals)
        self.ylow = np.log([p.lower for p in points])  # log of the lower bound
        lo, hi = self.logb.min(), self.logb.max()
        self.c_bounds = (lo - math.log(_BOUND_FACTOR), hi + math.log(_BOUND_FACTOR))


def _mu(a: float, c: float, logb: np.ndarray) -> np.ndarray:
    # log S(B) = log S_min + log(1 + b_crit/B)   (Eq. 2.11 with E = B S)
    return a + np.logaddexp(0.0, c - logb)


def _profile_ls(y: np.ndarray, logb: np.ndarray, cgrid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares in log S, profiled over ``a = log S_min``, on a grid of ``c = log b_crit``.

    ``y``: (R, n) replicate data; returns (R,) best ``c`` (parabola-refined) and its ``a``.
    """
    F = np.logaddexp(0.0, cgrid[:, None] - logb[None, :])  # (G, n)
    Fc = F - F.mean(1, keepdims=True)
    yc = y - y.mean(1, keepdims=True)  # (R, n)
    # SSE(c) = |yc - Fc|^2 = |yc|^2 - 2 yc.Fc + |Fc|^2
    sse = (yc**2).sum(1)[:, None] - 2.0 * yc @ Fc.T + (Fc**2).sum(1)[None, :]  # (R, G)
    j = np.clip(sse.argmin(1), 1, len(cgrid) - 2)
    r = np.arange(len(y))
    s0, s1, s2 = sse[r, j - 1], sse[r, j], sse[r, j + 1]
    den = s0 - 2 * s1 + s2
    step = cgrid[1] - cgrid[0]
    shift = np.where(den > 0, 0.5 * (s0 - s2) / np.where(den > 0, den, 1.0), 0.0)
    c = cgrid[j] + np.clip(shift, -1, 1) * step
    c = np.where(sse.argmin(1) == 0, cgrid[0], np.where(sse.argmin(1) == len(cgrid) - 1, cgrid[-1], c))
    a = (y - np.logaddexp(0.0, c[:, None] - logb[None, :])).mean(1)
    return c, a


def _nll(theta: np.ndarray, d: _Data, y: np.ndarray, ylow: np.ndarray, special: Any) -> float:
    """Negative log-likelihood: log S ~ Normal(mu, sigma) (Tobit for censored/interval points)."""
    a, c, ls = theta
    s = math.exp(ls)
    mu = _mu(a, c, d.logb)
    z_hi = (y - mu) / s
    z_lo = (ylow - mu) / s
    nll = 0.5 * float((z_hi[d.exact] ** 2).sum()) + ls * int(d.exact.sum())
    if d.cens.any():  # P(log S > log budget)
        nll -= float(special.log_ndtr(-z_lo[d.cens]).sum())
    if d.interval.any():  # P(lower < S <= steps)
        p = special.ndtr(z_hi[d.interval]) - special.ndtr(z_lo[d.interval])
        nll -= float(np.log(np.maximum(p, 1e-300)).sum())
    return nll


def _fit_one(
    d: _Data, y: np.ndarray, ylow: np.ndarray, optimize: Any, special: Any, start: tuple[float, float] | None = None
) -> tuple[float, float, float]:
    """MLE ``(a, c, sigma)`` for one data set."""
    cgrid = np.linspace(*d.c_bounds, 801)
    ex = d.exact | d.interval
    if start is None:
        # Start: least squares on the points with a value (the censored ones left out).
        c0, a0 = _profile_ls(y[ex][None, :], d.logb[ex], cgrid)
        start = (float(a0[0]), float(c0[0]))
    if not (d.cens.any() or d.interval.any()):
        c = float(_profile_ls(y[None, :], d.logb, cgrid)[0][0])
        if d.c_bounds[0] < c < d.c_bounds[1]:  # polish the grid value
            res = optimize.minimize_scalar(
                lambda cc: float(((y - _mu(0.0, cc, d.logb)) - (y - _mu(0.0, cc, d.logb)).mean()).var()),
                bounds=(max(d.c_bounds[0], c - 0.05), min(d.c_bounds[1], c + 0.05)),
                method="bounded",
                options={"xatol": 1e-7},
            )
            c = float(res.x)
        a = float((y - _mu(0.0, c, d.logb)).mean())
        sigma = float(np.sqrt(((y - _mu(a, c, d.logb)) ** 2).mean()))
        return a, c, sigma
    r0 = y[ex] - _mu(start[0], start[1], d.logb[ex])
    s0 = max(float(np.sqrt((r0**2).mean())) if len(r0) else 0.1, 1e-3)
    bounds = [(None, None), d.c_bounds, (math.log(1e-6), math.log(10.0))]
    # Two starts: the least-squares one and the EM solution (the likelihood is not convex in c).
    starts = [(start[0], start[1], math.log(s0))]
    if not d.interval.any():
        em_c, em_a = _em_censored(
            y[None, :],
            d.cens[None, :],
            ylow[None, :],
            d.logb,
            cgrid,
            special,
            start=(start[0], start[1], s0),
            iters=200,
        )
        if np.isfinite(em_c[0]):
            starts.append((float(em_a[0]), float(em_c[0]), math.log(s0)))
    fits = [
        optimize.minimize(
            _nll,
            np.array(x0),
            args=(d, y, ylow, special),
            method="L-BFGS-B",
            bounds=bounds,
            options={"ftol": 1e-14, "gtol": 1e-10, "maxiter": 2000},
        )
        for x0 in starts
    ]
    best = min(fits, key=lambda r: r.fun)  # the first of equals, as before; a NaN first one is kept
    a, c, ls = best.x
    return float(a), float(c), float(math.exp(ls))


def _em_censored(
    y: np.ndarray,
    miss: np.ndarray,
    cap: np.ndarray,
    logb: np.ndarray,
    cgrid: np.ndarray,
    special: Any,
    start: tuple[float, float, float],
    iters: int = 60,
) -> tuple[np.ndarray, np.ndarray]:
    """Tobit MLE for many replicates at once by EM (Dempster, Laird & Rubin 1977).

    E-step: a censored ``log S > cap`` is replaced by its conditional mean under the current
    fit, ``mu + sigma lambda`` with the inverse Mills ratio ``lambda``; M-step: the profiled
    least squares of :func:`_profile_ls` on the completed data, and ``sigma^2`` from the completed
    squared residuals plus the conditional variances. ``y``, ``miss``, ``cap``: (R, n).
    """
    R = y.shape[0]
    a = np.full(R, start[0])
    c = np.full(R, start[1])
    s = np.full(R, max(start[2], 1e-6))
    for _ in range(iters):
        mu = a[:, None] + np.logaddexp(0.0, c[:, None] - logb[None, :])
        z0 = np.where(miss, (cap - mu) / s[:, None], 0.0)
        lam = np.exp(-0.5 * z0**2 - 0.5 * math.log(2 * math.pi) - special.log_ndtr(-z0))
        yc = np.where(miss, mu + s[:, None] * lam, y)
        var = np.where(miss, s[:, None] ** 2 * np.maximum(1.0 + z0 * lam - lam**2, 0.0), 0.0)
        c_new, a = _profile_ls(yc, logb, cgrid)
        mu = a[:, None] + np.logaddexp(0.0, c_new[:, None] - logb[None, :])
        s = np.sqrt(np.maximum((((yc - mu) ** 2) + var).mean(1), 1e-12))
        if np.max(np.abs(c_new - c)) < 1e-6:
            c = c_new
            break
        c = c_new
    return c, a


def _exp(x: float) -> float:
    """``exp(x)``, ``inf`` instead of an ``OverflowError`` (a fit to sweeps of absurd sizes)."""
    return math.exp(x) if x < 709.0 else math.inf


def _percentile(x: np.ndarray, level: float) -> tuple[float, float]:
    q = 100 * (1 - level) / 2
    lo, hi = np.percentile(x, [q, 100 - q])
    return float(lo), float(hi)


def fit_critical_batch(
    data: Iterable[RunRecord] | Sequence[FrontierPoint],
    *,
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    target: Any = None,
) -> CriticalBatchFit:
    """Fit ``S_min``, ``E_min`` and ``b_crit = E_min/S_min`` to the frontier of one target.

    Model (Eq. 2.11 at fixed ``B``, fitted in log space as in App. A.3)::

        log S_i = log S_min + log(1 + b_crit/B_i) + noise_i,    noise_i ~ Normal(0, sigma)

    At fixed ``B`` a change in ``S`` moves ``E = B S`` by the same factor, so this residual is
    the distance along the diagonal of the log-log ``(E, S)`` plane and fitting ``log E``
    instead gives the same estimate. With nothing censored this is least squares in
    ``log S``; censored points (``S > budget``) and interval points enter through their
    probabilities (a Tobit likelihood), so a sweep whose small batches ran out of budget still
    constrains ``b_crit`` in the right direction instead of being dropped.

    Interval: parametric residual bootstrap (``n_boot`` replicates, ``seed``): new data = fit +
    residuals drawn from the fitted normal with the small-sample-corrected scatter
    ``sigma sqrt(n/(n-2))``, censored again at the same budgets, refitted (censored replicates
    by EM); percentile interval about the estimate, widened by ``t_{n-2}/z`` for the
    uncertainty of the scatter itself.

    Args:
        data: run records of one target (see :func:`frontier`) or frontier points.
        level: confidence level of the intervals.
        n_boot: bootstrap replicates (0: no interval).
        seed: seed of the bootstrap.
        target: label stored in the result (default: the records' target).

    Raises:
        ValueError: fewer than two batch sizes, or fewer than two batch sizes where any run
            reached the target.
    """
    optimize, special = _scipy()
    items: list[RunRecord | FrontierPoint] = list(data)
    if not items:
        raise ValueError("no runs given")
    first = items[0]
    points: list[FrontierPoint]
    if isinstance(first, FrontierPoint):
        points = cast("list[FrontierPoint]", items)  # the data is all one kind, as the signature says
    else:
        if target is None:
            target = _target_key(first.target)
        points = frontier(cast("list[RunRecord]", items))
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    tlabel = "" if target is None else f" for target {target}"
    if len(points) < 2:
        raise ValueError(
            f"only one batch size ({points[0].batch_size:g}){tlabel}: the fit needs runs at "
            "two or more batch sizes (three or more for an interval)"
        )
    n_val = sum(p.status != "censored" for p in points)
    if n_val == 0:
        raise ValueError(
            f"no run reached the target{tlabel} at any batch size; lower the target or give the runs more steps"
        )
    if n_val < 2:
        raise ValueError(
            f"runs reached the target{tlabel} at only one batch size "
            f"({next(p.batch_size for p in points if p.status != 'censored'):g}); "
            "the fit needs two or more"
        )
    d = _Data(points)
    a, c, sigma = _fit_one(d, d.y, d.ylow, optimize, special)
    messages: list[str] = []
    span = (_exp(d.logb.min()), _exp(d.logb.max()))
    at_edge = not (d.c_bounds[0] + 1e-6 < c < d.c_bounds[1] - 1e-6)
    if at_edge:
        side = "far below the smallest" if c <= d.c_bounds[0] + 1e-6 else "far above the largest"
        messages.append(
            f"b_crit is {side} batch size swept ({span[0]:g}..{span[1]:g}): the sweep cannot "
            "measure it; sweep batch sizes on both sides of it"
        )
    elif not (span[0] / 4 <= _exp(c) <= span[1] * 4):
        messages.append(
            f"b_crit = {_exp(c):.3g} lies outside the swept batch sizes ({span[0]:g}..{span[1]:g}): an extrapolation"
        )
    n = len(points)
    nan2 = (math.nan, math.nan)
    s_iv = e_iv = b_iv = nan2
    if n_boot > 0 and n >= 3:
        rng = np.random.default_rng(seed)
        sig_b = max(sigma, 1e-9) * math.sqrt(n / max(n - 2, 1))
        mu = _mu(a, c, d.logb)
        ystar = mu[None, :] + sig_b * rng.standard_normal((n_boot, n))
        cgrid = np.linspace(*d.c_bounds, 801)
        if not (d.cens.any() or d.interval.any()):
            cb, ab = _profile_ls(ystar, d.logb, cgrid)
        else:
            # A censored point's draw stays censored at the same budget if it lies above it
            # (the run would again not have finished), and is observed if it lies below. An
            # interval point is treated the same way at its lower bound (its upper bound is
            # dropped in the replicates: conservative, the interval can only widen).
            cap = np.where(d.cens | d.interval, d.ylow, np.inf)
            miss = ystar > cap[None, :]
            cb, ab = _em_censored(
                ystar, miss, np.broadcast_to(cap, ystar.shape), d.logb, cgrid, special, start=(a, c, sig_b)
            )
            cb[(~miss).sum(1) < 2] = np.nan
        ok = np.isfinite(cb)
        if ok.sum() < 0.9 * n_boot:
            messages.append(f"{n_boot - int(ok.sum())} of {n_boot} bootstrap fits had too few points")
        cb, ab = cb[ok], ab[ok]
        # Percentile interval of the replicates, widened by t_{n-2}/z: the bootstrap treats the
        # fitted scatter as known, but with n points it is itself uncertain (Student's t).
        k = t_quantile(0.5 + level / 2, n - 2) / NormalDist().inv_cdf(0.5 + level / 2)
        lo_c, hi_c = (c + k * (v - c) for v in _percentile(cb, level))
        cb_edge = (lo_c <= d.c_bounds[0] + 1e-6, hi_c >= d.c_bounds[1] - 1e-6)
        b_iv = (0.0 if cb_edge[0] else _exp(lo_c), math.inf if cb_edge[1] else _exp(hi_c))
        s_lo, s_hi = (a + k * (v - a) for v in _percentile(ab, level))
        s_iv = (_exp(s_lo), _exp(s_hi))
        e_lo, e_hi = (a + c + k * (v - a - c) for v in _percentile(ab + cb, level))
        e_iv = (0.0 if cb_edge[0] else _exp(e_lo), math.inf if cb_edge[1] else _exp(e_hi))
        if not at_edge and (b_iv[0] == 0.0 or b_iv[1] == math.inf):
            at_edge = True
            messages.append(
                f"the {level:.0%} interval of b_crit reaches {'0' if b_iv[0] == 0.0 else 'infinity'}: "
                f"the sweep ({span[0]:g}..{span[1]:g}) bounds it from one side only"
            )
    elif n_boot > 0:
        messages.append(
            "only two batch sizes: the fit passes through both points and has no interval; "
            "sweep three or more batch sizes"
        )
    ex = d.exact | d.interval
    resid = [float(v) if e else math.nan for v, e in zip(d.y - _mu(a, c, d.logb), ex)]
    s_min = _exp(a)
    b = _exp(c)
    for m in messages:
        warnings.warn(f"noisescale.fit_critical_batch{tlabel}: {m}", stacklevel=2)
    return CriticalBatchFit(
        target=target,
        s_min=s_min,
        e_min=s_min * b,
        b_crit=b,
        s_min_interval=s_iv,
        e_min_interval=e_iv,
        b_crit_interval=b_iv,
        level=level,
        sigma=sigma,
        points=points,
        residuals=resid,
        n_boot=n_boot,
        identified=not at_edge,
        messages=messages,
    )


def fit_sweep(records: Iterable[RunRecord], **kwargs: Any) -> dict[Any, CriticalBatchFit]:
    """:func:`fit_critical_batch` for every target in ``records`` (keyword arguments passed on)."""
    return {t: fit_critical_batch(rs, target=t, **kwargs) for t, rs in group_by_target(records).items()}


# ---------------------------------------------------------------------------------------
# Figure.


def plot_fit(
    fits: CriticalBatchFit | Sequence[CriticalBatchFit], path: Any = None, *, unit: str = "examples"
) -> tuple[Any, Any]:
    """Goodness-of-fit figure: the frontier in the (examples, steps) plane with the fitted
    hyperbola and ``b_crit`` marked (left), and the log residuals against batch size (right).

    Censored points are drawn as open triangles at their bound (the truth lies above).
    Returns ``(fig, axes)``; writes a PNG when ``path`` is given. Needs matplotlib.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover
        raise ImportError("plotting needs matplotlib: pip install 'noisescale[plot]'") from None
    fits = [fits] if isinstance(fits, CriticalBatchFit) else list(fits)
    # A bare Figure (no pyplot): no backend is switched or opened; it still shows in notebooks.
    fig = Figure(figsize=(11, 4.3))
    ax, axr = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
    for i, f in enumerate(fits):
        col = f"C{i % 10}"
        lab = "" if f.target is None else f"target {f.target}: "
        bs = np.array([p.batch_size for p in f.points])
        grid = np.geomspace(bs.min() / 2, bs.max() * 2, 200)
        ax.plot(f.examples(grid), f.steps(grid), color=col, lw=1.5, label=f"{lab}$B_{{crit}}$ = {f.b_crit:.3g}")
        for p in f.points:
            if p.status == "censored":
                ax.plot(p.examples, p.steps, marker="^", mfc="none", color=col, ls="none")
            else:
                ax.plot(
                    p.examples, p.steps, marker="o", color=col, ls="none", mfc=col if p.status == "exact" else "none"
                )
        ax.plot([f.examples(f.b_crit)], [f.steps(f.b_crit)], marker="*", ms=14, color=col, mec="k")
        ax.axhline(f.s_min, color=col, ls=":", lw=0.8)
        ax.axvline(f.e_min, color=col, ls=":", lw=0.8)
        ok = [j for j, r in enumerate(f.residuals) if math.isfinite(r)]
        axr.plot(bs[ok], np.array(f.residuals)[ok], marker="o", color=col, ls="-", lw=0.6)
        axr.axvline(f.b_crit, color=col, ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"{unit} to target  E")
    ax.set_ylabel("optimizer steps to target  S")
    ax.set_title(
        "Fastest run per batch size; fit $(S/S_{min}-1)(E/E_{min}-1)=1$\n"
        "(star: $B=B_{crit}$, dotted: $S_{min}$, $E_{min}$; open: censored)",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="best")
    axr.axhline(0, color="k", lw=0.6)
    axr.set_xscale("log")
    axr.set_xlabel(f"batch size [{unit}]")
    axr.set_ylabel("log S - fit")
    axr.set_title("Residuals (dashed: $B_{crit}$)", fontsize=9)
    fig.tight_layout()
    if path is not None:
        from .plot import save_figure

        save_figure(fig, path, dpi=110)
    return fig, (ax, axr)
