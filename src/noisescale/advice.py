"""Advice without control: what the measured noise scale says about the batch in use.

McCandlish et al. 2018 model the cost of reaching a loss at a fixed batch ``B`` by the hyperbola
``(S/S_min - 1)(E/E_min - 1) = 1`` (Eq. 2.11), i.e. ``S(B) = S_min (1 + B_crit/B)`` and
``E(B) = E_min (1 + B/B_crit)``, with ``B_crit ~ B_noise`` (App. D.1: the critical batch is the
run-average of the noise scale). Taking the measured noise scale as ``B_crit`` (``B_simple`` by
default: the paper's stand-in, an order-of-magnitude guide, ``B_simple/B_crit`` between 0.05 and
8 across its tasks) gives, for the batch in use,

- ``S(B)/S_min = 1 + B_crit/B``: how many times the fewest possible steps the run is taking;
- ``E(B)/E_min = 1 + B/B_crit``: how many times the fewest possible examples it is using;
- the recommended batch ``factor x B_crit`` (the balance point, ``factor = 1``: twice the minimum
  of both; App. D: larger favours fewer steps, smaller fewer examples).

Both ratios carry the interval of the noise scale. A noise scale beyond the dataset size is
flagged: the ``1/B`` law behind it holds there only for sampling with replacement (the paper's
footnote 6: otherwise the variance scales as ``1/B - 1/D``), and no batch of distinct examples is
that large.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .estimators import E, S

__all__ = ["Advice", "advice", "advice_for"]


@dataclass(frozen=True)
class Advice:
    """What the paper predicts for the batch in use (see :func:`advice`). ``None`` fields come with ``reason``."""

    batch_size: float | None
    noise_scale: float | None
    interval: tuple[float, float] | None
    recommended: float | None
    steps_ratio: float | None
    examples_ratio: float | None
    steps_ratio_interval: tuple[float, float] | None
    examples_ratio_interval: tuple[float, float] | None
    unit: str = "examples"
    signal: str = "B_simple"
    factor: float = 1.0
    dataset_size: float | None = None
    beyond_dataset: bool = False
    reason: str | None = None

    def line(self) -> str:
        """One human line: ``advice: at B = 512 examples: S/S_min = 2.6 [1.9, 3.4], E/E_min = 1.6 [...]; recommended B ~ 812``."""
        if self.reason is not None:
            return f"advice: none yet ({self.reason})"
        assert self.batch_size is not None and self.steps_ratio is not None and self.examples_ratio is not None
        s_iv = _iv(self.steps_ratio_interval)
        e_iv = _iv(self.examples_ratio_interval)
        assert self.recommended is not None
        r = self.batch_size / self.recommended
        where = f"{r:.2g}x the recommended" if r >= 1 else f"1/{1 / r:.2g} of the recommended"
        out = (
            f"advice: at B = {self.batch_size:.4g} {self.unit}: S/S_min = {self.steps_ratio:.3g}{s_iv}, "
            f"E/E_min = {self.examples_ratio:.3g}{e_iv} (Eq. 2.11 with B_crit ~ {self.signal}); "
            f"recommended B ~ {self.recommended:.4g} {self.unit} (the batch in use is {where})"
        )
        if self.beyond_dataset:
            out += (
                f"; beyond the dataset size {self.dataset_size:.4g}: the 1/B law behind it holds there only for "
                "sampling with replacement (footnote 6), and no batch of distinct examples is that large"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers (for loggers and JSON)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _iv(iv: tuple[float, float] | None) -> str:
    return f" [{iv[0]:.3g}, {iv[1]:.3g}]" if iv is not None else ""


def _positive(name: str, v: Any, *, allow_none: bool = False) -> float | None:
    if v is None and allow_none:
        return None
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite positive number, got {v!r}")
    return float(v)


def advice(
    noise_scale: float | None,
    batch_size: float,
    *,
    interval: tuple[float, float] | None = None,
    factor: float = 1.0,
    unit: str = "examples",
    signal: str = "B_simple",
    dataset_size: float | None = None,
    reason: str | None = None,
) -> Advice:
    """The paper's predicted costs at ``batch_size`` with ``B_crit = noise_scale`` (Eq. 2.11).

    ``interval``: the noise scale's confidence interval, carried into both ratios (``S/S_min`` grows
    with ``B_crit``, ``E/E_min`` falls with it). ``noise_scale=None`` gives an :class:`Advice` with
    ``reason`` (say why with ``reason=``).
    """
    B = _positive("batch_size", batch_size)
    f = _positive("factor", factor)
    D = _positive("dataset_size", dataset_size, allow_none=True)
    assert B is not None and f is not None
    if noise_scale is None or not (math.isfinite(noise_scale) and noise_scale > 0):
        why = reason or (
            "the noise scale is not defined yet" if noise_scale is None else f"the noise scale is {noise_scale!r}"
        )
        return Advice(B, None, None, None, None, None, None, None, unit, signal, f, D, False, why)
    bc = float(noise_scale)
    s_ratio, e_ratio = float(S(B, 1.0, bc)), float(E(B, 1.0, bc))
    s_iv = e_iv = None
    if interval is not None:
        lo, hi = float(interval[0]), float(interval[1])
        lo = max(lo, 0.0)
        s_iv = (1.0 + lo / B, 1.0 + hi / B)  # S/S_min = 1 + B_crit/B rises with B_crit
        e_iv = (1.0 + B / hi if hi > 0 else math.inf, 1.0 + B / lo if lo > 0 else math.inf)
    rec = f * bc
    beyond = D is not None and (rec > D or bc > D)
    return Advice(B, bc, None if interval is None else (float(interval[0]), float(interval[1])), rec, s_ratio,
                  e_ratio, s_iv, e_iv, unit, signal, f, D, beyond)  # fmt: skip


def advice_for(
    gns: Any,
    batch_size: float | None = None,
    *,
    factor: float = 1.0,
    dataset_size: float | None = None,
    level: float = 0.95,
) -> Advice:
    """:func:`advice` for a tracker: its ``B_simple`` and interval, at ``batch_size`` (default: the
    batch of its last step, from its records, in the tracker's unit)."""
    if batch_size is None:
        hist = gns.history
        if not hist:
            return Advice(None, None, None, None, None, None, None, None, gns.unit, "B_simple", factor, dataset_size,
                          False, "no step() recorded yet, and no batch_size= given")  # fmt: skip
        last = hist[-1].get("examples")
        prev = hist[-2].get("examples") if len(hist) > 1 else 0.0
        if last is None or prev is None or not last > prev:
            return Advice(None, None, None, None, None, None, None, None, gns.unit, "B_simple", factor, dataset_size,
                          False, "the last step's batch size is unknown; pass batch_size=")  # fmt: skip
        batch_size = float(last - prev)
    name = "B_simple (preconditioned)" if getattr(gns, "preconditioned", None) else "B_simple"
    b = gns.b_simple
    return advice(
        b,
        batch_size,
        interval=gns.interval(level) if b is not None else None,
        factor=factor,
        unit=gns.unit,
        signal=name,
        dataset_size=dataset_size,
        reason=None if b is not None else gns.reason,
    )
