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
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .estimators import b_simple as _b_simple
from .estimators import fieller_interval, t_quantile

__all__ = ["EMAState", "ema_update", "NoiseScaleEMA"]


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


class NoiseScaleEMA:
    """Keeps the :class:`EMAState` and answers for ``b_simple`` and its interval.

    Args:
        beta: decay per measurement, in ``(0, 1]``; ``1`` is the plain mean. The average spans
            about ``(1 + beta)/(1 - beta)`` measurements in steady state.
    """

    def __init__(self, beta: float = 0.99) -> None:
        if not (isinstance(beta, (int, float)) and 0.0 < beta <= 1.0):
            raise ValueError(f"beta must be in (0, 1], got {beta!r} (use 1.0 for a plain mean)")
        self.beta = float(beta)
        self.state = EMAState()

    def update(self, g2: float, trace_sigma: float) -> None:
        self.state = ema_update(self.state, g2, trace_sigma, self.beta)

    @property
    def count(self) -> int:
        return self.state.count

    @property
    def g2(self) -> float | None:
        """Averaged estimate of ``|G|^2`` (``None`` before any measurement)."""
        return self.state.g2 if self.state.count else None

    @property
    def trace_sigma(self) -> float | None:
        """Averaged estimate of ``tr(Sigma)`` (``None`` before any measurement)."""
        return self.state.trace_sigma if self.state.count else None

    @property
    def b_simple(self) -> float | None:
        if not self.state.count:
            return None
        return _b_simple(self.state.g2, self.state.trace_sigma)

    def reason(self) -> str | None:
        """Why :attr:`b_simple` is ``None``, or ``None`` when it is defined."""
        if not self.state.count:
            return "no measurement has been averaged yet"
        if self.state.g2 == 0 and self.state.trace_sigma == 0:
            return ("every measured gradient was exactly zero (|G|^2 = tr(Sigma) = 0): the loss does not "
                    "depend on the measured parameters; check that loss.backward() reaches them")
        if not self.state.g2 > 0:
            return (f"the averaged estimate of |G|^2 is {self.state.g2:.3g} <= 0: the gradient is not "
                    "yet resolved above its noise (B_simple is then beyond what these batch sizes can "
                    "measure); average more steps (beta closer to 1) or measure with larger batches")
        return None

    def variances(self) -> tuple[float, float, float] | None:
        """Estimated ``(Var(mean g2), Var(mean trace_sigma), Cov)`` of the averages."""
        st = self.state
        if st.count < 3 or st.weight_sq <= 0:
            return None
        denom = st.weight - st.weight_sq / st.weight  # reliability-weights correction
        if denom <= 0:
            return None
        var_g, var_s, cov = st.m2_g2 / denom, st.m2_trace_sigma / denom, st.c_cross / denom
        n_eff = st.n_eff
        return var_g / n_eff, var_s / n_eff, cov / n_eff

    def interval(self, level: float = 0.95) -> tuple[float, float] | None:
        """Fieller interval for ``b_simple`` at confidence ``level``.

        Returns ``(low, high)`` with ``low >= 0``; ``high`` is ``inf`` when ``|G|^2`` is not
        resolved at this level. ``None`` with fewer than 3 measurements.
        """
        if not (isinstance(level, (int, float)) and 0.0 < level < 1.0):
            raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level!r}")
        v = self.variances()
        if v is None:
            return None
        var_g, var_s, cov = v
        df = max(self.state.n_eff - 1.0, 1.0)
        q = t_quantile(0.5 + level / 2.0, df)
        low, high = fieller_interval(self.state.trace_sigma, self.state.g2, var_s, var_g, cov, q)
        return max(low, 0.0), high

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, **asdict(self.state)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        names = {f.name for f in fields(EMAState)}
        missing = names - set(sd)
        if missing or "beta" not in sd:
            raise ValueError(f"not a NoiseScaleEMA state_dict: missing keys {sorted(missing | ({'beta'} - set(sd)))}")
        self.beta = float(sd["beta"])
        self.state = replace(EMAState(), **{k: (int(sd[k]) if k == "count" else float(sd[k])) for k in names})
