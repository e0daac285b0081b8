"""Debiased exponential moving averages of ``g2`` and ``trace_sigma``, and their uncertainty.

McCandlish et al. (App. A.1) average the unbiased per-step estimates of ``|G|^2`` and
``tr(Sigma)`` *separately* and divide last: ``B_simple ~ EMA(trace_sigma)/EMA(g2)``. A ratio of
averages, never an average of ratios, and no clamping before averaging (clamping a noisy
unbiased estimate biases it).

The average is a weighted mean with weights ``w_t = beta^(T-t)``, divided by their sum. This is
exactly the "debiased" EMA of Adam (dividing by ``1 - beta^T``), and ``beta = 1`` gives the plain
running mean used for one-shot measurements at fixed parameters.

Uncertainty (no peer reports any). The same weights give the weighted sample variances and
covariance of the per-step estimates (West 1979's stable incremental update, with the
reliability-weights correction ``W - W2/W``). With independent steps the variance of the weighted
mean is ``sigma^2 * sum(w^2)/sum(w)^2 = sigma^2 / n_eff``, where ``n_eff = W^2/W2`` is the
effective sample size (``(1+beta)/(1-beta)`` in steady state). The interval for the ratio is
Fieller's (exact for jointly normal means; honest — unbounded — when ``|G|^2`` is not resolved),
with a Student-t quantile on ``n_eff - 1`` degrees of freedom. While parameters move, the step-to-
step spread also contains the drift of the true values, which makes the interval conservative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .estimators import b_simple as _b_simple
from .estimators import fieller_interval, t_quantile

__all__ = [
    "EMAState",
    "Estimate",
    "NoiseScaleEMA",
    "RobustAverage",
    "TransientFilter",
    "ema_update",
    "state_b_simple",
    "state_interval",
    "state_reason",
]


@dataclass(frozen=True)
class EMAState:
    """Sufficient statistics of the weighted averages (all plain floats).

    ``weight = sum w``, ``weight_sq = sum w^2``; ``g2``/``trace_sigma`` are the weighted means;
    ``m2_g2``, ``m2_trace_sigma``, ``c_cross`` are weighted sums of squared deviations and of the
    cross product (West 1979).
    """

    count: int = 0
    weight: float = 0.0
    weight_sq: float = 0.0
    g2: float = 0.0
    trace_sigma: float = 0.0
    m2_g2: float = 0.0
    m2_trace_sigma: float = 0.0
    c_cross: float = 0.0

    @property
    def n_eff(self) -> float:
        """Effective number of independent measurements in the average, ``W^2 / W2``."""
        return self.weight * self.weight / self.weight_sq if self.weight_sq > 0 else 0.0


def ema_update(state: EMAState, g2: float, trace_sigma: float, beta: float) -> EMAState:
    """Fold one per-step estimate ``(g2, trace_sigma)`` into the averages.

    Old weights decay by ``beta`` (sums of squared deviations by ``beta`` too, being weighted
    sums), then the new point enters with weight 1. Inputs must be finite; callers skip others.
    """
    if not (math.isfinite(g2) and math.isfinite(trace_sigma)):
        raise ValueError(f"non-finite estimate (g2={g2!r}, trace_sigma={trace_sigma!r}); skip it instead")
    w_old = state.weight * beta
    w_new = w_old + 1.0
    d_g = g2 - state.g2
    d_s = trace_sigma - state.trace_sigma
    mean_g = state.g2 + d_g / w_new
    mean_s = state.trace_sigma + d_s / w_new
    return EMAState(
        count=state.count + 1,
        weight=w_new,
        weight_sq=state.weight_sq * beta * beta + 1.0,
        g2=mean_g,
        trace_sigma=mean_s,
        m2_g2=state.m2_g2 * beta + d_g * (g2 - mean_g),
        m2_trace_sigma=state.m2_trace_sigma * beta + d_s * (trace_sigma - mean_s),
        c_cross=state.c_cross * beta + d_g * (trace_sigma - mean_s),
    )


def state_b_simple(st: EMAState) -> float | None:
    """``b_simple`` of one averaged series (``None`` before any measurement or while ``g2 <= 0``)."""
    return _b_simple(st.g2, st.trace_sigma) if st.count else None


def state_reason(st: EMAState) -> str | None:
    """Why :func:`state_b_simple` is ``None``, or ``None`` when it is defined."""
    if not st.count:
        return "no measurement has been averaged yet"
    if st.g2 == 0 and st.trace_sigma == 0:
        return (
            "every measured gradient was exactly zero (|G|^2 = tr(Sigma) = 0): the loss does not "
            "depend on the measured parameters; check that loss.backward() reaches them"
        )
    if not st.g2 > 0:
        return (
            f"the averaged estimate of |G|^2 is {st.g2:.3g} <= 0: the gradient is not "
            "yet resolved above its noise (B_simple is then beyond what these batch sizes can "
            "measure); measure with larger batches, or at fixed parameters over more batches (ns.measure)"
        )
    if st.trace_sigma < 0:
        return (
            f"the averaged estimate of tr(Sigma) is {st.trace_sigma:.3g} < 0: the gradient noise is not resolved "
            "(B_simple is below what these batch sizes can measure); compare smaller batches, e.g. per-example "
            "norms"
        )
    return None


def state_variances(st: EMAState) -> tuple[float, float, float] | None:
    """Estimated ``(Var(mean g2), Var(mean trace_sigma), Cov)`` of one series' averages."""
    if st.count < 3 or st.weight_sq <= 0:
        return None
    denom = st.weight - st.weight_sq / st.weight  # reliability-weights correction
    if denom <= 0:
        return None
    n_eff = st.n_eff
    return st.m2_g2 / denom / n_eff, st.m2_trace_sigma / denom / n_eff, st.c_cross / denom / n_eff


def state_interval(st: EMAState, level: float = 0.95) -> tuple[float, float] | None:
    """Fieller interval for one series' ``b_simple`` at confidence ``level`` (``None`` below 3 steps)."""
    if not (isinstance(level, (int, float)) and 0.0 < level < 1.0):
        raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level!r}")
    v = state_variances(st)
    if v is None:
        return None
    var_g, var_s, cov = v
    q = t_quantile(0.5 + level / 2.0, max(st.n_eff - 1.0, 1.0))
    low, high = fieller_interval(st.trace_sigma, st.g2, var_s, var_g, cov, q)
    return max(low, 0.0), max(high, 0.0)  # a noise scale is not negative; the ends stay ordered


_SERIES = ("g2", "trace_sigma", "m2_g2", "m2_trace_sigma", "c_cross")


class NoiseScaleEMA:
    """Debiased EMAs of ``size`` series of ``(g2, trace_sigma)`` that share their weights.

    Series 0 is what the scalar properties report; a tracker keeps the total in series 0 and
    one series per group after it. The update is linear with the same weights for every series,
    so series that add up per step (groups to the total) add up in the average too.

    Args:
        beta: decay per measurement, in ``(0, 1]``; ``1`` is the plain mean. The average spans
            about ``(1 + beta)/(1 - beta)`` measurements in steady state.
        size: number of series.
    """

    def __init__(self, beta: float = 0.99, size: int = 1) -> None:
        if not (isinstance(beta, (int, float)) and 0.0 < beta <= 1.0):
            raise ValueError(f"beta must be in (0, 1], got {beta!r} (use 1.0 for a plain mean)")
        if not (isinstance(size, int) and size >= 1):
            raise ValueError(f"size must be a positive integer, got {size!r}")
        self.beta = float(beta)
        self.size = size
        self.count = 0
        self.weight = 0.0
        self.weight_sq = 0.0
        self._arrays = {k: np.zeros(size) for k in _SERIES}

    def update(self, g2: Any, trace_sigma: Any) -> None:
        """Fold one step's estimates (numbers, or arrays of ``size``) into every series."""
        g = np.broadcast_to(np.asarray(g2, dtype=np.float64), (self.size,))
        s = np.broadcast_to(np.asarray(trace_sigma, dtype=np.float64), (self.size,))
        if not (np.isfinite(g).all() and np.isfinite(s).all()):
            raise ValueError(f"non-finite estimate (g2={g2!r}, trace_sigma={trace_sigma!r}); skip it instead")
        beta, a = self.beta, self._arrays
        w_new = self.weight * beta + 1.0
        d_g, d_s = g - a["g2"], s - a["trace_sigma"]
        a["g2"] = a["g2"] + d_g / w_new
        a["trace_sigma"] = a["trace_sigma"] + d_s / w_new
        a["m2_g2"] = a["m2_g2"] * beta + d_g * (g - a["g2"])
        a["m2_trace_sigma"] = a["m2_trace_sigma"] * beta + d_s * (s - a["trace_sigma"])
        a["c_cross"] = a["c_cross"] * beta + d_g * (s - a["trace_sigma"])
        self.count += 1
        self.weight = w_new
        self.weight_sq = self.weight_sq * beta * beta + 1.0

    def series(self, i: int = 0) -> EMAState:
        """The averages of series ``i`` as an :class:`EMAState`."""
        return EMAState(self.count, self.weight, self.weight_sq, *(float(self._arrays[k][i]) for k in _SERIES))

    @property
    def state(self) -> EMAState:
        return self.series(0)

    @property
    def g2(self) -> float | None:
        """Averaged estimate of ``|G|^2`` (``None`` before any measurement)."""
        return float(self._arrays["g2"][0]) if self.count else None

    @property
    def trace_sigma(self) -> float | None:
        """Averaged estimate of ``tr(Sigma)`` (``None`` before any measurement)."""
        return float(self._arrays["trace_sigma"][0]) if self.count else None

    @property
    def b_simple(self) -> float | None:
        return state_b_simple(self.state)

    def reason(self) -> str | None:
        """Why :attr:`b_simple` is ``None``, or ``None`` when it is defined."""
        return state_reason(self.state)

    def variances(self) -> tuple[float, float, float] | None:
        """Estimated ``(Var(mean g2), Var(mean trace_sigma), Cov)`` of the averages."""
        return state_variances(self.state)

    def interval(self, level: float = 0.95) -> tuple[float, float] | None:
        """Fieller interval for ``b_simple`` at confidence ``level``.

        Returns ``(low, high)`` with ``low >= 0``; ``high`` is ``inf`` when ``|G|^2`` is not
        resolved at this level. ``None`` with fewer than 3 measurements.
        """
        return state_interval(self.state, level)

    def state_dict(self) -> dict[str, Any]:
        """Numbers only: scalars for one series, lists of ``size`` numbers otherwise."""
        out: dict[str, Any] = {
            "beta": self.beta,
            "count": self.count,
            "weight": self.weight,
            "weight_sq": self.weight_sq,
        }
        for k in _SERIES:
            out[k] = float(self._arrays[k][0]) if self.size == 1 else self._arrays[k].tolist()
        return out

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        names = {f.name for f in fields(EMAState)} | {"beta"}
        missing = names - set(sd)
        if missing:
            raise ValueError(f"not a NoiseScaleEMA state_dict: missing keys {sorted(missing)}")
        arrays = {k: np.atleast_1d(np.asarray(sd[k], dtype=np.float64)) for k in _SERIES}
        for k, arr in arrays.items():
            if arr.shape != (self.size,):
                raise ValueError(f"state_dict entry {k!r} has {arr.size} series but this average has {self.size}")
        self.beta = float(sd["beta"])
        self.count, self.weight, self.weight_sq = int(sd["count"]), float(sd["weight"]), float(sd["weight_sq"])
        self._arrays = {k: arr.copy() for k, arr in arrays.items()}


@dataclass(frozen=True)
class Estimate:
    """The averaged noise scale of one series (the total, or one group): a snapshot."""

    state: EMAState

    @property
    def b_simple(self) -> float | None:
        """``tr(Sigma)/|G|^2`` of the averages; ``None`` while undefined (see :attr:`reason`)."""
        return state_b_simple(self.state)

    @property
    def g2(self) -> float | None:
        return self.state.g2 if self.state.count else None

    @property
    def trace_sigma(self) -> float | None:
        return self.state.trace_sigma if self.state.count else None

    @property
    def n_eff(self) -> float:
        return self.state.n_eff

    @property
    def reason(self) -> str | None:
        return state_reason(self.state)

    def interval(self, level: float = 0.95) -> tuple[float, float] | None:
        """Fieller interval for :attr:`b_simple` (``None`` below 3 measurements)."""
        return state_interval(self.state, level)

    def __repr__(self) -> str:
        b = self.b_simple
        return f"Estimate(b_simple={b:.4g})" if b is not None else f"Estimate(b_simple=None: {self.reason})"


def _first(x: Any) -> float:
    """Series 0 (the total) of a step's estimate: a number, or an array with one entry per series."""
    return x if type(x) is float else float(np.asarray(x).reshape(-1)[0])


def _median0(arr: np.ndarray) -> np.ndarray:
    """``np.median(arr, axis=0)`` by one sort (np.median's overhead is most of its cost on the
    32 x 2 windows here, and it runs every step)."""
    s = np.sort(arr, axis=0)
    n = len(s)
    return (s[(n - 1) // 2] + s[n // 2]) / 2


class TransientFilter:
    """Holds out per-step estimates that a transient made absurd, and restarts on a lasting change.

    A weighted mean has no defence against one wild step: a warm-up spike with ``|G|^2`` 10^4 times
    its usual value still dominates an EMA with ``beta = 0.99`` hundreds of steps later. This filter
    compares each step's ``(g2, trace_sigma)`` with the median of the last ``window`` accepted steps,
    in units of their median absolute deviation (a robust scale that the spike itself cannot
    inflate). A step more than ``k`` such units away in either quantity is *held out*:

    - if it is followed by an ordinary step, it was a transient: it is dropped (counted as an
      outlier, shown in the run log), never averaged;
    - if ``persist`` steps in a row are held out, the run itself has moved (a learning-rate change,
      the end of warm-up): the average restarts from those held steps.

    ``k = 50`` keeps the estimator unbiased on stationary data for any per-step distribution seen
    in practice (a chi-square with one degree of freedom, heavier than the per-step estimates here,
    exceeds its median by 50 MADs with probability ~4e-8), while a 10^2-fold spike is caught. It
    acts only once ``min_steps`` steps have been accepted (before that there is no scale to judge by).
    """

    def __init__(self, k: float = 50.0, window: int = 32, persist: int = 5, min_steps: int = 5) -> None:
        if not (k > 0 and window >= 3 and persist >= 1 and min_steps >= 3):
            raise ValueError(
                f"bad transient filter settings k={k!r}, window={window!r}, persist={persist!r}, "
                f"min_steps={min_steps!r}"
            )
        self.k, self.window, self.persist, self.min_steps = float(k), int(window), int(persist), int(min_steps)
        self.recent: list[tuple[float, float]] = []  # accepted (g2, trace_sigma) of the total, newest last
        self.held: list[tuple[Any, Any]] = []  # held-out steps' full estimates (all series)
        self.outliers = 0
        self.restarts = 0

    def _far(self, g2: float, ts: float) -> bool:
        if len(self.recent) < self.min_steps:
            return False
        arr = np.array(self.recent[-self.window :])
        med = _median0(arr)
        mad = _median0(np.abs(arr - med)) * 1.4826
        scale = np.maximum(mad, 1e-12 * np.maximum(np.abs(med), 1e-300))
        return bool(np.any(np.abs(np.array([g2, ts]) - med) > self.k * scale))

    def decide(self, g2: Any, ts: Any) -> str:
        """``"accept"``, ``"hold"`` or ``"restart"`` for a step with these estimates (series 0 is the
        total). On ``"restart"`` the caller re-averages :attr:`held` (this step included) from scratch."""
        total = (_first(g2), _first(ts))
        if not self._far(*total):
            self.outliers += len(self.held)  # the held steps were a transient: dropped
            self.held = []
            self.recent = (self.recent + [total])[-self.window :]
            return "accept"
        self.held.append((g2, ts))
        if len(self.held) < self.persist:
            return "hold"
        self.restarts += 1
        self.recent = [(_first(a), _first(b)) for a, b in self.held]
        return "restart"

    def reset(self) -> None:
        self.recent, self.held = [], []

    def state_dict(self) -> dict[str, Any]:
        return {
            "recent": [list(r) for r in self.recent],
            "outliers": self.outliers,
            "restarts": self.restarts,
            "held": [[np.atleast_1d(a).tolist(), np.atleast_1d(b).tolist()] for a, b in self.held],
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.recent = [(float(a), float(b)) for a, b in sd["recent"]]
        self.held = [(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)) for a, b in sd["held"]]
        self.outliers, self.restarts = int(sd["outliers"]), int(sd["restarts"])


class RobustAverage:
    """What the tracker averages with: separate debiased EMAs (:class:`NoiseScaleEMA`) behind a
    :class:`TransientFilter`, with a window that follows the run.

    ``fold`` returns the step's status: ``"measured"`` (averaged), ``"outlier"`` (held out,
    possibly dropped later), ``"restart"`` (the average restarted from the held steps, this one
    included) or ``"drift"`` (averaged, and the average restarted from the last ``window`` steps).

    **Drift.** An EMA of ``|G|^2`` lags a run whose ``|G|^2`` falls by orders of magnitude (early
    training, a warm-up): with ``beta = 0.99`` the steps of 250 steps ago still weigh 8%, and when
    their ``|G|^2`` was 100 times today's they are most of the average (a char GPT's plain EMA said
    1,163 tokens where the steps after its warm-up alone said ~6,900: docs/method.md). After each step the average is
    compared with the mean of the last ``window`` accepted steps; when they differ by more than
    ``z`` (6) standard errors of that mean (in ``g2`` or ``trace_sigma``), the run has moved away from
    its own average, and the average restarts from the window. On stationary data the two agree
    and nothing happens (tested: the interval keeps its coverage); while the run moves, the average
    spans the last ``window`` steps or more, and the interval widens accordingly.
    """

    def __init__(
        self, beta: float = 0.99, size: int = 1, robust: bool = True, window: int = 128, z: float = 6.0
    ) -> None:
        self.ema = NoiseScaleEMA(beta, size)
        self.filter = TransientFilter() if robust else None
        self.window, self.z = int(window), float(z)
        self.recent = []  # the last `window` accepted steps (every series)
        self.since_restart = 0
        self.drifts = 0

    @property
    def recent(self) -> list[tuple[Any, Any]]:
        return self._recent

    @recent.setter
    def recent(self, steps: list[tuple[Any, Any]]) -> None:
        self._recent = list(steps)[-self.window :]
        # the totals (series 0) as floats, kept beside: the drift check reads them every step
        self._totals = [(_first(a), _first(b)) for a, b in self._recent]

    def _accept(self, g2: Any, ts: Any) -> str:
        self.ema.update(g2, ts)
        self._recent.append((g2, ts))
        self._totals.append((_first(g2), _first(ts)))
        if len(self._recent) > self.window:
            del self._recent[0], self._totals[0]
        self.since_restart += 1
        if self.since_restart < self.window // 2 or len(self._recent) < self.window // 2:
            return "measured"
        tot = np.array(self._totals)
        mean, se = tot.mean(0), tot.std(0, ddof=1) / np.sqrt(len(tot))
        cur = np.array([self.ema.series(0).g2, self.ema.series(0).trace_sigma])
        if not np.any(np.abs(cur - mean) > self.z * np.maximum(se, 1e-300)):
            return "measured"
        self.drifts += 1
        self._restart_from(self.recent)
        return "drift"

    def _restart_from(self, steps: list[tuple[Any, Any]]) -> None:
        self.ema = NoiseScaleEMA(self.ema.beta, self.ema.size)
        for a, b in steps:
            self.ema.update(a, b)
        self.since_restart = 0

    def fold(self, g2: Any, ts: Any) -> str:
        if self.filter is None:
            self.ema.update(g2, ts)
            return "measured"
        decision = self.filter.decide(g2, ts)
        if decision == "accept":
            return self._accept(g2, ts)
        if decision == "hold":
            return "outlier"
        held, self.filter.held = self.filter.held, []
        self._restart_from(held)
        self.recent = held[-self.window :]
        return "restart"

    def reset(self) -> None:
        self.ema = NoiseScaleEMA(self.ema.beta, self.ema.size)
        self.recent, self.since_restart = [], 0
        if self.filter is not None:
            self.filter.reset()

    def state_dict(self) -> dict[str, Any]:
        out = self.ema.state_dict()
        if self.filter is not None:
            out["filter"] = self.filter.state_dict()
            out["window"] = {
                "recent": [[np.atleast_1d(a).tolist(), np.atleast_1d(b).tolist()] for a, b in self.recent],
                "since_restart": self.since_restart,
                "drifts": self.drifts,
            }
        return out

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.ema.load_state_dict(sd)
        if self.filter is not None and "filter" in sd:
            self.filter.load_state_dict(sd["filter"])
        w = sd.get("window")
        if self.filter is not None and isinstance(w, dict):
            size = self.ema.size

            def arr(x: Any) -> Any:
                a = np.asarray(x, dtype=np.float64)
                return float(a[0]) if size == 1 else a

            self.recent = [(arr(a), arr(b)) for a, b in w["recent"]]
            self.since_restart, self.drifts = int(w["since_restart"]), int(w["drifts"])
