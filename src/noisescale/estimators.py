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
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any, Sequence, TypeVar, Union

import torch

Number = TypeVar("Number", float, "torch.Tensor", Any)  # elementwise: floats, arrays, tensors
Scalar = Union[float, torch.Tensor]

__all__ = [
    "Measurement",
    "estimate",
    "pool_parts",
    "pooling_moments",
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


@dataclass(frozen=True)
class Measurement:
    """One paired observation of squared gradient norms at two batch sizes.

    The one contract between probes (where norms come from) and the math (what they mean):
    ``E[sq_norm_small] = |G|^2 + tr(Sigma)/b_small`` and
    ``E[sq_norm_big] = |G|^2 + tr(Sigma)/b_big`` with ``b_small < b_big`` (McCandlish Eq. A.1).

    ``b_small``/``b_big`` may be *effective* sizes (see :func:`pool_parts`) and need not be
    integers. The norm fields may be 0-d tensors still on the device; they are read
    (one host sync for many measurements) only when the tracker folds them into its averages.
    ``source`` names the probe that produced the record.
    """

    sq_norm_small: Scalar
    b_small: float
    sq_norm_big: Scalar
    b_big: float
    source: str = ""

    def as_floats(self) -> "Measurement":
        """The same record with the norms read into Python floats."""
        return Measurement(
            float(self.sq_norm_small), float(self.b_small), float(self.sq_norm_big),
            float(self.b_big), self.source,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self.as_floats())


def _check_sizes(b_small: float, b_big: float) -> None:
    for name, b in (("b_small", b_small), ("b_big", b_big)):
        if not (isinstance(b, (int, float)) and math.isfinite(b) and b > 0):
            raise ValueError(f"{name} must be a finite positive batch size, got {b!r}")
    if not b_small < b_big:
        raise ValueError(
            f"the two batch sizes must differ with b_small < b_big, got b_small={b_small!r}, "
            f"b_big={b_big!r}; pass the norm of the smaller batch first"
        )


def estimate(sq_norm_small: Number, b_small: float, sq_norm_big: Number, b_big: float
             ) -> tuple[Number, Number]:
    """Unbiased estimates ``(g2, trace_sigma)`` from squared norms at two batch sizes.

    McCandlish et al. App. A.1 (Eq. A.2)::

        g2          = (b_big |G_big|^2 - b_small |G_small|^2) / (b_big - b_small)
        trace_sigma = (|G_small|^2 - |G_big|^2) / (1/b_small - 1/b_big)

    Valid for any pair ``0 < b_small < b_big`` (also non-integer effective sizes). Both
    outputs are unbiased, so they may be negative on a single draw: average them (separately)
    before forming a ratio, and never clamp before averaging.
    Works elementwise on floats, NumPy arrays and torch tensors.
    """
    _check_sizes(b_small, b_big)
    g2 = (b_big * sq_norm_big - b_small * sq_norm_small) / (b_big - b_small)
    trace_sigma = (sq_norm_small - sq_norm_big) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace_sigma


def pool_parts(sq_norms: Sequence[Scalar] | torch.Tensor, sizes: Sequence[float],
               sq_norm_total: Scalar, *, reduction: str = "mean", source: str = "") -> Measurement:
    """Pool ``k >= 2`` disjoint parts of one step into a single :class:`Measurement`.

    Part ``j`` has ``sizes[j]`` examples and its own gradient ``v_j`` with squared norm
    ``sq_norms[j]``; the step's gradient is ``V = sum_j v_j`` with squared norm
    ``sq_norm_total``. ``reduction`` says how each ``v_j`` relates to that part's mean
    per-example gradient ``G_j``:

    - ``"mean"``: ``v_j = c G_j`` (every part weighted equally, e.g. mean loss per
      micro-batch divided by the number of micro-batches);
    - ``"sum"``: ``v_j = c b_j G_j`` (every example weighted equally, e.g. summed loss, or
      a token-sum divided by the step's token count).

    A common factor ``c`` cancels from ``b_simple``; ``g2`` and ``trace_sigma`` are expressed
    in the units of ``V`` taken as an average gradient (exact when the accumulated gradient
    is the mean over the step, the usual convention).

    Derivation. With normalised weights ``a_j`` (``sum a_j = 1``), ``V = sum a_j G_j``, so
    ``E|V|^2 = |G|^2 + tr(Sigma) sum a_j^2/b_j`` and the cross terms
    ``|V|^2 - sum |v_j|^2 = sum_{j != l} v_j . v_l`` have mean ``(1 - sum a_j^2)|G|^2``.
    Solving the two moment equations is the same as App. A.1 applied to the effective pair
    ``b_big = 1/sum(a_j^2/b_j)``, ``b_small = sum(a_j^2)/sum(a_j^2/b_j)``,
    ``|G_small|^2 = sum|v_j|^2 / sum a_j^2`` — for equal parts this is exactly the paper's
    recipe (mean of the micro-batch norms at ``b``, the step norm at ``k b``); for
    ``b_j = 1`` it is the per-example (Bessel-corrected) estimator.
    """
    k = len(sizes)
    if k < 2:
        raise ValueError(f"pooling needs at least 2 parts (micro-batches or examples), got {k}")
    if len(sq_norms) != k:
        raise ValueError(f"got {len(sq_norms)} squared norms for {k} sizes; they must pair up")
    b = [float(x) for x in sizes]
    for j, bj in enumerate(b):
        if not (math.isfinite(bj) and bj > 0):
            raise ValueError(f"part {j} has size {sizes[j]!r}; sizes must be finite and positive")
    if reduction == "mean":
        w = [1.0] * k
    elif reduction == "sum":
        w = b
    else:
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    sum_a2, sum_a2_over_b = pooling_moments(b, w)
    if isinstance(sq_norms, torch.Tensor):
        sum_parts = sq_norms.sum()
    elif sq_norms and isinstance(sq_norms[0], torch.Tensor):
        sum_parts = torch.stack(list(sq_norms)).sum()
    else:
        sum_parts = float(sum(sq_norms))  # type: ignore[arg-type]
    return Measurement(
        sq_norm_small=sum_parts / sum_a2,
        b_small=sum_a2 / sum_a2_over_b,
        sq_norm_big=sq_norm_total,
        b_big=1.0 / sum_a2_over_b,
        source=source,
    )


def pooling_moments(sizes: Sequence[float], weights: Sequence[float],
                    counts: Sequence[int] | None = None) -> tuple[float, float]:
    """``(sum_j a_j^2, sum_j a_j^2 / b_j)`` for parts of sizes ``b_j`` weighted by ``w_j``.

    ``a = w / sum(w)`` are the normalised weights of the parts in the step's gradient
    ``V = sum_j a_j G_j`` (see :func:`pool_parts`); ``counts[j]`` repeats part ``j`` that many
    times (e.g. every example of a micro-batch). The effective pair of App. A.1 is then
    ``b_small = sum a^2 / sum a^2/b`` and ``b_big = 1 / sum a^2/b``.
    """
    c = counts if counts is not None else [1] * len(sizes)
    total_w = sum(n * wj for n, wj in zip(c, weights))
    sum_a2 = sum_a2_over_b = 0.0
    for n, wj, bj in zip(c, weights, sizes):
        a = wj / total_w
        sum_a2 += n * a * a
        sum_a2_over_b += n * a * a / bj
    return sum_a2, sum_a2_over_b


def b_simple(g2: float, trace_sigma: float) -> float | None:
    """Simple noise scale ``B_simple = tr(Sigma)/|G|^2`` (McCandlish Eq. 2.9).

    ``None`` when ``g2 <= 0`` (the estimate of ``|G|^2`` is not yet positive: the ratio is
    undefined, not infinite). Feed it *averaged* ``g2`` and ``trace_sigma``.
    """
    if not g2 > 0:
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


def eps_central(B: Number, eps_star: float, b_star: float, alpha: float = 1.0) -> Number:
    """Centre of the learning-rate grid at batch ``B``: ``eps* / (1 + B*/B)^alpha`` (App. A.2).

    ``alpha = 1`` for SGD and momentum, ``0.5 <= alpha <= 1`` for Adam/RMSProp.
    """
    return eps_star / (1.0 + b_star / B) ** alpha


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


def fieller_interval(mean_num: float, mean_den: float, var_num: float, var_den: float,
                     cov: float, q: float) -> tuple[float, float]:
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
