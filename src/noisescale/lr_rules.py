"""Learning-rate rules: how the step size should change when the batch size changes.

Every rule here is a pure function of numbers, with its source next to it. The multipliers take
the batch ``B`` at which the learning rate is wanted and the batch ``B0`` at which the base learning
rate was tuned, and return ``lr(B) / lr(B0)``:

- :func:`linear_scale`: ``B/B0`` (Goyal et al. 2017, "Accurate, Large Minibatch SGD"; the small-batch
  limit ``B << B_noise`` of McCandlish et al. 2018, Eq. 2.6). SGD, far below the noise scale.
- :func:`saturating_scale`: ``eps(B)/eps(B0)`` with ``eps(B) = eps_max/(1 + B_noise/B)``
  (McCandlish et al. 2018, Eq. 2.6; AdaScale's "gain" is this ratio with ``B_simple``). SGD at any
  batch: linear far below the noise scale, flat far above it.
- :func:`sqrt_scale`: ``sqrt(B/B0)`` (Malladi, Lyu, Panigrahi & Arora 2022, "On the SDEs and
  Scaling Rules for Adaptive Gradient Algorithms", the square-root scaling rule). Adam, AdamW,
  RMSProp; :func:`adam_sqrt_hyperparameters` gives the matching ``beta`` and ``epsilon``.
- :func:`power_scale`: ``(B/B0)^alpha``, ``0.5 <= alpha <= 1`` for Adam and RMSProp (McCandlish
  et al. 2018, App. A.2 and E.2), with ``alpha`` measured from a sweep by :func:`fit_power_law`.
- ``"none"``: ``1``.

:class:`LRRule` names one of them for :class:`~noisescale.controller.BatchSizeController`;
:func:`resolve_rule` turns ``"auto"`` into the rule for an optimizer. :func:`eps_central` is the
paper's grid centre (App. A.2) and :func:`lr_scaling` the branched method's ``f(k)``; both live here
so that every learning-rate rule has one home (``noisescale.estimators.eps_central`` and
``noisescale.sweeps.lr_scaling`` re-export them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

Number = TypeVar("Number", float, Any)  # elementwise: floats, arrays, tensors

__all__ = [
    "eps_central",
    "eps_saturating",
    "linear_scale",
    "sqrt_scale",
    "power_scale",
    "saturating_scale",
    "adam_sqrt_hyperparameters",
    "fit_power_law",
    "lr_scaling",
    "LRRule",
    "RULES",
    "resolve_rule",
]

RULES = ("linear", "saturating", "sqrt", "power", "none")


def _batch(name: str, b: Any) -> float:
    """``b`` as a float, checked to be a finite positive batch size (the error names it)."""
    ok = isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and b > 0
    if not ok:
        raise ValueError(f"{name} must be a finite positive batch size, got {b!r}")
    return float(b)


def eps_central(B: Number, eps_star: float, b_star: float, alpha: float = 1.0) -> Number:
    """Centre of the learning-rate grid at batch ``B``: ``eps* / (1 + B*/B)^alpha`` (App. A.2).

    ``alpha = 1`` for SGD and momentum, ``0.5 <= alpha <= 1`` for Adam/RMSProp. Elementwise on
    floats, arrays and tensors.
    """
    return eps_star / (1.0 + b_star / B) ** alpha


def eps_saturating(B: Number, eps_max: float, b_noise: float) -> Number:
    """The paper's optimal SGD step at batch ``B``: ``eps_max / (1 + B_noise/B)`` (McCandlish Eq. 2.6).

    The same formula as :func:`noisescale.estimators.eps_opt`, named for its use as a rule:
    ``eps_max`` is the step at an infinite batch. Elementwise.
    """
    return eps_max / (1.0 + b_noise / B)


def linear_scale(batch_size: float, base_batch_size: float) -> float:
    """``B/B0``: the linear scaling rule (Goyal et al. 2017; McCandlish Eq. 2.6 for ``B << B_noise``)."""
    return _batch("batch_size", batch_size) / _batch("base_batch_size", base_batch_size)


def sqrt_scale(batch_size: float, base_batch_size: float) -> float:
    """``sqrt(B/B0)``: the square-root rule for Adam (Malladi et al. 2022)."""
    return math.sqrt(linear_scale(batch_size, base_batch_size))


def power_scale(batch_size: float, base_batch_size: float, alpha: float) -> float:
    """``(B/B0)^alpha`` (McCandlish App. A.2/E.2: ``0.5 < alpha < 1`` for Adam and RMSProp)."""
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0 (0.5..1 for Adam), got {alpha!r}")
    return linear_scale(batch_size, base_batch_size) ** float(alpha)


def saturating_scale(batch_size: float, base_batch_size: float, b_noise: float) -> float:
    """``eps(B)/eps(B0) = (1 + B_noise/B0) / (1 + B_noise/B)`` with ``eps`` of McCandlish Eq. 2.6.

    The ratio of the optimal steps at the two batches, so ``eps_max`` cancels: the base learning
    rate is taken to be right for ``B0`` at this noise scale. Linear for ``B, B0 << B_noise``;
    at most ``1 + B_noise/B0`` however large ``B``. ``b_noise`` in the batches' unit; ``0`` gives 1.
    """
    B, B0 = _batch("batch_size", batch_size), _batch("base_batch_size", base_batch_size)
    if not (isinstance(b_noise, (int, float)) and math.isfinite(b_noise) and b_noise >= 0):
        raise ValueError(f"b_noise must be a finite noise scale >= 0 (in the batch's unit), got {b_noise!r}")
    return (1.0 + b_noise / B0) / (1.0 + b_noise / B)


@dataclass(frozen=True)
class AdamHyperparameters:
    """Adam's hyperparameters for a ``kappa`` times larger batch (:func:`adam_sqrt_hyperparameters`)."""

    lr_factor: float
    betas: tuple[float, float]
    eps: float


def adam_sqrt_hyperparameters(kappa: float, betas: Sequence[float], eps: float) -> AdamHyperparameters:
    """The square-root scaling rule of Malladi et al. 2022 (Def. 4.5) for a ``kappa`` times larger batch.

    ``lr -> sqrt(kappa) lr``, ``1 - beta_i -> kappa (1 - beta_i)``, ``eps -> eps / sqrt(kappa)``:
    Adam's SDE approximation stays the same, so the run follows the same trajectory per example.
    Valid while ``kappa (1 - beta_i) < 1``; beyond that the rule has no ``beta`` to give, and this
    raises rather than clamp (a clamped ``beta`` would be a different optimizer).
    """
    k = _batch("kappa", kappa)
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    new = []
    for i, b in enumerate(betas):
        if not (isinstance(b, (int, float)) and 0 <= b < 1):
            raise ValueError(f"beta{i + 1} must be in [0, 1), got {b!r}")
        one_minus = k * (1.0 - float(b))
        if one_minus >= 1.0:
            raise ValueError(
                f"the square-root rule gives 1 - beta{i + 1} = {k:g} x (1 - {b}) = {one_minus:g} >= 1 for a "
                f"{k:g}x larger batch: Malladi et al.'s rule holds only for kappa (1 - beta) < 1; lower the "
                "largest batch or scale the learning rate alone"
            )
        new.append(1.0 - one_minus)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return AdamHyperparameters(math.sqrt(k), (new[0], new[1]), float(eps) / math.sqrt(k))


def fit_power_law(batch_sizes: Any, lrs: Sequence[float] | None = None) -> tuple[float, float]:
    """``(alpha, c)`` of the least-squares fit ``log lr = log c + alpha log B``: the power law
    ``lr(B) = c B^alpha`` of the best learning rate per batch size (McCandlish App. A.2 reports
    ``0.5 < alpha < 1`` for Adam and RMSProp).

    ``batch_sizes`` with ``lrs``: one best learning rate per batch size from a sweep; or a
    :class:`~noisescale.critical.CriticalBatchFit` alone (``sweep(...).fit()[target]``), whose
    frontier points carry the learning rate of the fastest run at each batch size. Fit only the
    batches where the learning rate still grows with ``B`` (below the critical batch): past it the
    best learning rate saturates and the power law no longer holds.
    """
    if lrs is None:
        points = getattr(batch_sizes, "points", None)
        if points is None:
            raise ValueError(
                "fit_power_law needs batch_sizes and lrs, or a CriticalBatchFit (an object with .points); "
                f"got {type(batch_sizes).__name__} alone"
            )
        pairs = [(p.batch_size, p.lr) for p in points if p.lr is not None]
    else:
        bs = list(batch_sizes)
        if len(bs) != len(lrs):
            raise ValueError(f"batch_sizes has {len(bs)} entries but lrs has {len(lrs)}; give one lr per batch size")
        pairs = list(zip(bs, lrs))
    for b, lr in pairs:
        _batch("batch size", b)
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"learning rate {lr!r} at batch {b!r} is not a finite positive number")
    xs = [math.log(b) for b, _ in pairs]
    ys = [math.log(lr) for _, lr in pairs]
    if len(set(xs)) < 2:
        raise ValueError(f"fit_power_law needs at least 2 distinct batch sizes, got {sorted({b for b, _ in pairs})}")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    alpha = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return alpha, math.exp(my - alpha * mx)


def lr_scaling(optimizer: str) -> Callable[[float], float]:
    """``f(k)``, the learning-rate multiplier for a ``k`` times larger batch.

    ``"sgd"`` (and momentum): ``k`` (the linear scaling rule; McCandlish Eq. 2.6 for
    ``B << b_noise``). ``"adam"`` (and RMSProp, AdamW): ``sqrt(k)`` (Malladi et al. 2022; used by
    Merrill et al. 2025 Sec. 3).
    """
    name = optimizer.lower()
    if name in ("sgd", "momentum"):
        return lambda k: float(k)
    if name in ("adam", "adamw", "rmsprop"):
        return lambda k: math.sqrt(k)
    raise ValueError(f"optimizer must be 'sgd' or 'adam' (or pass lr_scale=callable), got {optimizer!r}")


@dataclass(frozen=True)
class LRRule:
    """A named learning-rate rule: :meth:`scale` gives ``lr(B)/lr(B0)``.

    ``name`` is one of :data:`RULES`. ``alpha`` is the exponent of ``"power"``. ``b_noise`` is a
    fixed noise scale for ``"saturating"`` (e.g. ``b_crit`` from a fit); ``None`` takes the one
    measured at the time of the change (the controller passes it as ``noise_scale``).
    """

    name: str
    alpha: float | None = None
    b_noise: float | None = None

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise ValueError(f"lr_rule must be one of {', '.join(RULES)} (or 'auto', or a callable), got {self.name!r}")
        if self.name == "power":
            power_scale(1.0, 1.0, self.alpha if self.alpha is not None else math.nan)
        elif self.alpha is not None:
            raise ValueError(f"alpha applies to the 'power' rule only, not to {self.name!r}")
        if self.b_noise is not None:
            if self.name != "saturating":
                raise ValueError(f"b_noise applies to the 'saturating' rule only, not to {self.name!r}")
            saturating_scale(1.0, 1.0, self.b_noise)

    @property
    def needs_noise_scale(self) -> bool:
        """Whether :meth:`scale` needs the measured noise scale."""
        return self.name == "saturating" and self.b_noise is None

    def scale(self, batch_size: float, base_batch_size: float, noise_scale: float | None = None) -> float:
        """``lr(batch_size) / lr(base_batch_size)`` by this rule (``noise_scale`` for ``"saturating"``)."""
        if self.name == "linear":
            return linear_scale(batch_size, base_batch_size)
        if self.name == "sqrt":
            return sqrt_scale(batch_size, base_batch_size)
        if self.name == "power":
            assert self.alpha is not None
            return power_scale(batch_size, base_batch_size, self.alpha)
        if self.name == "saturating":
            b = self.b_noise if self.b_noise is not None else noise_scale
            if b is None:
                raise ValueError("the 'saturating' rule needs a noise scale: pass noise_scale= or LRRule(b_noise=...)")
            return saturating_scale(batch_size, base_batch_size, b)
        _batch("batch_size", batch_size), _batch("base_batch_size", base_batch_size)
        return 1.0

    def __str__(self) -> str:
        if self.name == "power":
            return f"power(alpha={self.alpha:g})"
        if self.name == "saturating" and self.b_noise is not None:
            return f"saturating(b_noise={self.b_noise:g})"
        return self.name


# Optimizers whose update is sign-like (divided by a running RMS of the gradient): square root.
_ADAPTIVE = ("adam", "adamw", "adamax", "nadam", "radam", "rmsprop", "adagrad", "adadelta", "sparseadam")


def resolve_rule(rule: str | LRRule, optimizer: Any = None) -> LRRule:
    """The :class:`LRRule` for ``rule``; ``"auto"`` picks by the optimizer's class.

    ``"auto"``: ``"saturating"`` for SGD (with or without momentum: the paper's Eq. 2.6 at the
    measured noise scale), ``"sqrt"`` for the Adam family and RMSProp (Malladi et al. 2022), and
    ``"none"`` without an optimizer. Any other optimizer must be given a rule explicitly.
    """
    if isinstance(rule, LRRule):
        return rule
    if not isinstance(rule, str):
        raise TypeError(f"lr_rule must be a rule name, an LRRule or a callable, got {type(rule).__name__}")
    if rule != "auto":
        if rule == "power":
            raise ValueError("the 'power' rule needs its exponent: pass lr_rule=LRRule('power', alpha=...)")
        return LRRule(rule)
    if optimizer is None:
        return LRRule("none")
    name = type(optimizer).__name__.lower()
    if name == "sgd":
        return LRRule("saturating")
    if name in _ADAPTIVE:
        return LRRule("sqrt")
    raise ValueError(
        f"lr_rule='auto' has no rule for the optimizer {type(optimizer).__name__}: pass lr_rule='linear', "
        "'saturating', 'sqrt', LRRule('power', alpha=...), 'none' or a callable"
    )
