"""Pure math of the gradient noise scale (McCandlish et al. 2018, arXiv:1812.06162).

Everything here is a function of numbers (Python floats, NumPy arrays or torch tensors where
stated); nothing touches a model. Names follow the paper:

- ``G``: the true gradient, ``g2 = |G|^2``; ``Sigma``: the per-example gradient covariance,
  ``trace_sigma = tr(Sigma)``; ``H``: the Hessian.
- A mean gradient over ``B`` i.i.d. examples has ``E|G_B|^2 = |G|^2 + tr(Sigma)/B`` (Eq. A.1).
- ``b_simple = tr(Sigma)/|G|^2`` (Eq. 2.9), ``b_noise = tr(H Sigma)/(G^T H G)`` (Eq. 2.8).

Batch sizes are in whatever unit the caller counts (examples, tokens, frames); the results
carry the same unit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, TypeVar

import numpy as np
import torch

from .lr_rules import eps_central  # re-exported: learning-rate rules live in lr_rules

Number = TypeVar("Number", float, "torch.Tensor", Any)  # elementwise: floats, arrays, tensors
Scalar = float | torch.Tensor

__all__ = [
    "StepStats",
    "make_step_stats",
    "step_estimates",
    "estimate",
    "pooling_moments",
    "part_weights",
    "b_simple",
    "eps_opt",
    "dL_opt",
    "S",
    "E",
    "steps_to_target",
    "examples_to_target",
    "b_crit",
    "eps_central",
    "optimal_batch_for_exchange_rate",
    "t_quantile",
    "fieller_interval",
]


def _check_sizes(b_small: float, b_big: float) -> None:
    for name, b in (("b_small", b_small), ("b_big", b_big)):
        if not (isinstance(b, (int, float)) and math.isfinite(b) and b > 0):
            raise ValueError(f"{name} must be a finite positive batch size, got {b!r}")
    if not b_small < b_big:
        raise ValueError(
            f"the two batch sizes must differ with b_small < b_big, got b_small={b_small!r}, "
            f"b_big={b_big!r}; pass the norm of the smaller batch first"
        )


def estimate(sq_norm_small: Number, b_small: float, sq_norm_big: Number, b_big: float) -> tuple[Number, Number]:
    """Unbiased estimates ``(g2, trace_sigma)`` from squared norms at two batch sizes.

    McCandlish et al. App. A.1 (Eq. A.2)::

        g2          = (b_big |G_big|^2 - b_small |G_small|^2) / (b_big - b_small)
        trace_sigma = (|G_small|^2 - |G_big|^2) / (1/b_small - 1/b_big)

    Valid for any pair ``0 < b_small < b_big`` (also non-integer effective sizes). Both
    outputs are unbiased, so they may be negative on a single draw: average them (separately)
    before forming a ratio, and never clamp before averaging.
    Works elementwise on floats, NumPy arrays and torch tensors.
    """
    _check_sizes(float(b_small), float(b_big))
    g2 = (b_big * sq_norm_big - b_small * sq_norm_small) / (b_big - b_small)
    trace_sigma = (sq_norm_small - sq_norm_big) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace_sigma


# ---------------------------------------------------------------------------------------
# The one contract between probes and the math: additive step statistics.

# Layout of a step-statistics vector (float64). A head of scalars shared by every group, then
# per group ``g``: ``sq_parts[g] = sum_j |u_j|_g^2`` and ``sq_total[g] = |V|_g^2``, where ``u_j`` is
# part ``j``'s contribution to the step's gradient ``V = sum_j u_j`` and ``|.|_g`` is the norm
# restricted to the group's elements (after any elementwise weighting by a preconditioner).
SUM_A2, SUM_A2_OVER_B, EXAMPLES, PARTS, RANKS, ERRORS = range(6)
HEAD = 6
HEAD_NAMES = ("sum_a2", "sum_a2_over_b", "examples", "parts", "ranks", "errors")


@dataclass
class StepStats:
    """Sufficient statistics of one optimizer step, as sums: they add across micro-batches, ranks
    and merges (torchmetrics' ``dist_reduce_fx="sum"`` state), and ratios are formed only in
    :func:`step_estimates`.

    ``vec`` is a float64 tensor (possibly still on the device, possibly the buffer of an
    all-reduce in flight: ``work``) with the layout ``[HEAD scalars, sq_parts[G], sq_total[G]]``:

    - ``sum_a2 = sum_j a_j^2`` and ``sum_a2_over_b = sum_j a_j^2 / b_j`` over the step's parts
      (micro-batches, examples, (rank, micro-batch) pairs) of sizes ``b_j`` with weights ``a_j``
      in ``V = sum_j a_j G_j`` (normalised over the whole step: ``sum_j a_j = 1``);
    - ``examples``: the step's size in the tracker's unit; ``parts``: how many parts;
    - ``ranks``: how many ranks contributed (1 on one process); ``errors``: ranks that failed.

    ``reason`` says why the step cannot be measured when the probe knows it locally.
    ``ready`` is False while ``vec`` still holds only this rank's numbers, waiting for a reduction
    across ranks that the distributed probe issues every ``reduce_every`` steps (it then points
    ``vec`` at the reduced row and sets ``ready``); the tracker folds only ready steps.
    """

    vec: torch.Tensor
    n_groups: int
    reason: str | None = None
    work: Any = None
    ready: bool = True

    def __post_init__(self) -> None:
        if self.vec.shape != (HEAD + 2 * self.n_groups,):
            raise ValueError(
                f"a StepStats vector for {self.n_groups} groups has {HEAD + 2 * self.n_groups} "
                f"entries, got shape {tuple(self.vec.shape)}"
            )

    def __add__(self, other: StepStats) -> StepStats:
        """The statistics of the union of two disjoint sets of parts (e.g. two ranks)."""
        if other.n_groups != self.n_groups:
            raise ValueError(f"cannot add step statistics of {self.n_groups} and {other.n_groups} groups")
        return StepStats(self.vec + other.vec.to(self.vec.device), self.n_groups, self.reason or other.reason)

    def read(self) -> np.ndarray:
        """The numbers as a host float64 array (waits for a reduction in flight: a host sync)."""
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.vec.detach().to("cpu", torch.float64).numpy()


def pooling_moments(
    sizes: Sequence[float], weights: Sequence[float], counts: Sequence[int] | None = None
) -> tuple[float, float]:
    """``(sum_j a_j^2, sum_j a_j^2 / b_j)`` for parts of sizes ``b_j`` weighted by ``w_j``.

    ``a = w / sum(w)`` are the normalised weights of the parts in the step's gradient
    ``V = sum_j a_j G_j``; ``counts[j]`` repeats part ``j`` that many times (e.g. every example
    of a micro-batch). See :func:`step_estimates` for how they enter the estimator.
    """
    c = counts if counts is not None else [1] * len(sizes)
    total_w = sum(n * wj for n, wj in zip(c, weights))
    sum_a2 = sum_a2_over_b = 0.0
    for n, wj, bj in zip(c, weights, sizes):
        a = wj / total_w
        sum_a2 += n * a * a
        sum_a2_over_b += n * a * a / bj
    return sum_a2, sum_a2_over_b


def part_weights(sizes: Sequence[float], reduction: str) -> list[float]:
    """Unnormalised weight of each part in the step's gradient under a loss convention.

    ``"mean"``: each part's loss is a mean over its examples and parts weigh equally
    (``v_j = c G_j``); ``"sum"``: every example weighs equally (``v_j = c b_j G_j``).
    """
    if reduction == "mean":
        return [1.0] * len(sizes)
    if reduction == "sum":
        return [float(b) for b in sizes]
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def make_step_stats(
    sq_parts: Any,
    sq_total: Any,
    sizes: Sequence[float],
    *,
    reduction: str = "mean",
    counts: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
    parts: int | None = None,
    examples: float | None = None,
    device: torch.device | str = "cpu",
    a2_scale: float = 1.0,
) -> StepStats:
    """Build the :class:`StepStats` of one process from per-group sums.

    ``sq_parts``/``sq_total``: per group (a sequence, a 1-d tensor, or a number for one group)
    ``sum_j |u_j|^2`` and ``|V|^2``; ``sizes`` (with ``counts`` repeating entries) the parts'
    sizes; ``weights`` their weights (default: from ``reduction``). ``a2_scale`` multiplies
    ``sum a^2`` and ``sum a^2/b``: a rank's parts weigh ``alpha / n`` in a step averaged over ``n``
    ranks, so ``1/n^2`` there. Device tensors stay on the device (no host sync).
    """
    for j, bj in enumerate(sizes):
        if not (isinstance(bj, (int, float)) and math.isfinite(bj) and bj > 0):
            raise ValueError(f"part {j} has size {bj!r}; sizes must be finite and positive")
    w = list(weights) if weights is not None else part_weights(sizes, reduction)
    a2, a2b = pooling_moments(sizes, w, counts)
    n_parts = parts if parts is not None else (sum(counts) if counts is not None else len(sizes))
    ex = examples if examples is not None else float(sum(n * b for n, b in zip(counts or [1] * len(sizes), sizes)))
    values = [a2 * a2_scale, a2b * a2_scale, ex, float(n_parts), 1.0, 0.0]
    if isinstance(sq_parts, list) and isinstance(sq_total, list) and torch.device(device).type == "cpu":
        # host floats (the CPU probes): the record in one tensor op, not four (see probes.base.host_group_sums)
        if len(sq_parts) != len(sq_total):
            raise ValueError(f"sq_parts has {len(sq_parts)} groups but sq_total has {len(sq_total)}")
        return StepStats(torch.tensor(values + sq_parts + sq_total, dtype=torch.float64), len(sq_parts))
    head = torch.tensor(values, dtype=torch.float64, device=device)
    sp = torch.as_tensor(sq_parts, dtype=torch.float64, device=device).reshape(-1)
    st = torch.as_tensor(sq_total, dtype=torch.float64, device=device).reshape(-1)
    if sp.shape != st.shape:
        raise ValueError(f"sq_parts has {sp.numel()} groups but sq_total has {st.numel()}")
    return StepStats(torch.cat([head, sp, st]), sp.numel())


def step_estimates(v: np.ndarray, n_groups: int, ranks: int = 1) -> tuple[np.ndarray, np.ndarray, str, str | None]:
    """Per-group unbiased ``(g2, trace_sigma)`` of one step from its summed statistics.

    The only place the pooling is written (McCandlish App. A.1, generalised to weighted parts).
    With normalised weights ``a_j`` the step gradient is ``V = sum_j a_j G_j``, so
    ``E|V|^2 = |G|^2 + tr(Sigma) sum_j a_j^2/b_j`` and ``E sum_j |u_j|^2 = |G|^2 sum_j a_j^2 +
    tr(Sigma) sum_j a_j^2/b_j``. Solving the two moment equations is App. A.1 applied to the
    effective pair ``b_big = 1/sum(a^2/b)``, ``b_small = sum(a^2)/sum(a^2/b)``,
    ``|G_small|^2 = sum|u_j|^2/sum(a^2)``: for ``k`` equal micro-batches exactly the paper's
    recipe (mean micro-batch norm at ``b``, step norm at ``k b``); for ``b_j = 1`` the
    Bessel-corrected per-example variance. Linear in the norms, so groups add up to the total.

    ``ranks``: how many ranks must have contributed (a step some rank missed, e.g. under Join, is
    skipped). Returns ``(g2[G], trace_sigma[G], reason)``; when ``reason`` is not ``None`` the
    step is not measurable and the arrays are NaN.
    """
    nan = np.full(n_groups, np.nan)
    a2, a2b, parts, n, err = v[SUM_A2], v[SUM_A2_OVER_B], v[PARTS], v[RANKS], v[ERRORS]
    if err > 0:
        return (
            nan,
            nan,
            "skipped",
            (
                "a rank failed to compute its statistics for a step (it raised an error); the step "
                "is skipped on every rank"
            ),
        )
    if n < ranks:
        return (
            nan,
            nan,
            "skipped",
            (
                "steps where some ranks had already run out of data (Join) are skipped: the global "
                "norm is computed in shares across all ranks"
            ),
        )
    if not (a2b > 0 and a2 < 1.0 - 1e-12):
        return (
            nan,
            nan,
            "unmeasurable",
            (f"the step had fewer than 2 gradient parts ({parts:.0f}): there is no smaller batch to compare with"),
        )
    sq_small = v[HEAD : HEAD + n_groups] / a2
    sq_big = v[HEAD + n_groups : HEAD + 2 * n_groups]
    if not (np.isfinite(sq_small).all() and np.isfinite(sq_big).all()):
        return (
            nan,
            nan,
            "skipped",
            (
                f"a squared gradient norm was non-finite (small={float(sq_small.sum())!r}, "
                f"big={float(sq_big.sum())!r}): skipped, not averaged"
            ),
        )
    g2, trace_sigma = estimate(sq_small, a2 / a2b, sq_big, 1.0 / a2b)
    return g2, trace_sigma, "measured", None


def b_simple(g2: float, trace_sigma: float) -> float | None:
    """Simple noise scale ``B_simple = tr(Sigma)/|G|^2`` (McCandlish Eq. 2.9).

    ``None`` when ``g2 <= 0`` (the estimate of ``|G|^2`` is not yet positive: the ratio is
    undefined, not infinite) or ``trace_sigma < 0`` (the noise is not resolved: a noise scale
    cannot be negative). Feed it *averaged* ``g2`` and ``trace_sigma``.
    """
    if not (g2 > 0 and trace_sigma >= 0):
        return None
    return trace_sigma / g2


# ---------------------------------------------------------------------------------------
# The paper's model of large-batch training (Sec. 2).


def eps_opt(B: Number, eps_max: float, b_noise: float) -> Number:
    """Optimal SGD step size at batch ``B``: ``eps_max / (1 + b_noise/B)`` (Eq. 2.6)."""
    return eps_max / (1.0 + b_noise / B)


def dL_opt(B: Number, dL_max: float, b_noise: float) -> Number:
    """Best expected loss decrease per step at batch ``B``: ``dL_max / (1 + b_noise/B)`` (Eq. 2.7)."""
    return dL_max / (1.0 + b_noise / B)


def S(B: Number, s_min: float, b_crit_: float) -> Number:
    """Steps to a fixed target at batch ``B``: ``S_min (1 + B_crit/B)`` (from Eq. 2.11 with E = B S)."""
    return s_min * (1.0 + b_crit_ / B)


def E(B: Number, e_min: float, b_crit_: float) -> Number:
    """Examples to a fixed target at batch ``B``: ``E_min (1 + B/B_crit)`` (from Eq. 2.11)."""
    return e_min * (1.0 + B / b_crit_)


steps_to_target = S
examples_to_target = E


def b_crit(e_min: float, s_min: float) -> float:
    """Critical batch size ``B_crit = E_min / S_min`` (Eq. 2.12)."""
    if not (e_min > 0 and s_min > 0):
        raise ValueError(f"e_min and s_min must be positive, got e_min={e_min!r}, s_min={s_min!r}")
    return e_min / s_min


def optimal_batch_for_exchange_rate(r: float, b_noise: float) -> float:
    """Batch minimising ``S + E/r`` at noise scale ``b_noise``: ``sqrt(r b_noise)`` (App. D, Eq. D.3)."""
    if not (r > 0 and b_noise > 0):
        raise ValueError(f"r and b_noise must be positive, got r={r!r}, b_noise={b_noise!r}")
    return math.sqrt(r * b_noise)


# ---------------------------------------------------------------------------------------
# Uncertainty.


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t with ``df`` (possibly fractional) degrees of freedom.

    Cornish-Fisher expansion around the normal quantile (Abramowitz & Stegun 26.7.5): at the
    97.5% point the error is 4e-3 at ``df = 3``, 3e-4 at ``df = 5`` and below 1e-5 from
    ``df = 10`` (intervals here use ``df = n_eff - 1``, usually far larger). ``df = inf`` gives
    the normal quantile.
    Kept here so that the core needs no SciPy.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    z = NormalDist().inv_cdf(p)
    if not math.isfinite(df):
        return z
    if df <= 0:
        raise ValueError(f"df must be positive, got {df!r}")
    z2 = z * z
    g1 = (z2 + 1.0) * z / 4.0
    g2 = ((5.0 * z2 + 16.0) * z2 + 3.0) * z / 96.0
    g3 = (((3.0 * z2 + 19.0) * z2 + 17.0) * z2 - 15.0) * z / 384.0
    g4 = ((((79.0 * z2 + 776.0) * z2 + 1482.0) * z2 - 1920.0) * z2 - 945.0) * z / 92160.0
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def fieller_interval(
    mean_num: float, mean_den: float, var_num: float, var_den: float, cov: float, q: float
) -> tuple[float, float]:
    """Fieller's confidence set for the ratio ``num/den`` of two (jointly normal) means.

    The set of ``R`` with ``(num - R den)^2 <= q^2 Var(num - R den)``, i.e.
    ``(den^2 - q^2 v_d) R^2 - 2 (num den - q^2 c) R + (num^2 - q^2 v_n) <= 0``.
    Unlike the delta method it stays honest when ``den`` is barely resolved: the set is then
    unbounded and we return ``inf`` for the upper end (it is never silently narrow).
    Returns ``(low, high)``; ``(-inf, inf)`` when nothing can be said.
    """
    a = mean_den * mean_den - q * q * var_den
    b = mean_num * mean_den - q * q * cov
    c = mean_num * mean_num - q * q * var_num
    disc = b * b - a * c
    if a > 0 and disc >= 0:
        root = math.sqrt(disc)
        return (b - root) / a, (b + root) / a
    if a > 0:  # disc < 0 cannot happen for a valid covariance; be safe
        r = mean_num / mean_den
        return r, r
    if disc >= 0 and a < 0 and c > 0:
        # The denominator is not resolved but the numerator is: the set is both tails,
        # (-inf, r1] U [r2, inf) with r1 < 0 < r2 (their product c/a is negative). Only the
        # upper tail is compatible with a positive denominator.
        root = math.sqrt(disc)
        return max((b - root) / a, (b + root) / a), math.inf
    return -math.inf, math.inf
