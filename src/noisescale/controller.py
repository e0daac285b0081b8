"""``BatchSizeController``: grow the batch as the noise scale grows, and the learning rate with it.

McCandlish et al. 2018 found that the useful batch grows during training (Sec. 3.1): small batches
early waste no examples, large ones later waste no steps. Training at ``B ~ B_noise`` balances the
two (Eq. 2.11 with ``B_crit ~ B_noise``: twice the minimal steps and twice the minimal examples),
and an adaptive schedule ``B(s) ~ B_noise(s)`` beats every fixed batch (App. D). The controller
puts that into a loop:

- it subscribes to a :class:`~noisescale.tracker.GradientNoiseScale` (every ``every`` steps: one
  host read per push, none per step) and reads the signal the user picked: ``B_simple`` with its
  interval (preconditioned when the tracker is), ``B_noise``, or a callable;
- once ``patience`` steps have been measured (and again ``patience`` measured steps after each
  change), it sets the next step's batch to ``factor x signal``, in whole micro-batches
  (:func:`decide_accumulation`): it grows only when the interval's lower end is above the batch in
  use, never by more than ``max_growth`` at once, and shrinks only when the interval's upper end
  is below ``1/hysteresis`` of it, so noise in the estimate never shrinks the batch;
- on every change it rescales the learning rate by the chosen rule (:mod:`noisescale.lr_rules`).

The learning-rate multiplier is applied inside ``optimizer.step()`` only (a step pre-hook
multiplies each group's ``lr``, a post-hook puts the value back). ``param_groups[i]["lr"]`` thus
always holds the *schedule's* learning rate, so any scheduler, chainable or not, stepped before
or after :meth:`BatchSizeController.step`, composes exactly: the step uses ``schedule's lr x
lr_scale``. Use :class:`~noisescale.schedules.ExamplesSchedule` (``schedule=``) to keep warm-up
and decay at the same number of examples when the batch grows.

Every rank decides the same: the tracker's estimates are all-reduced, pushes come at fixed step
counts, and the decision is a deterministic function of them and of the controller's state.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .lr_rules import LRRule, adam_sqrt_hyperparameters, resolve_rule
from .schedules import ExamplesSchedule

__all__ = ["BatchSizeController", "decide_accumulation", "Observation"]

STATE_FORMAT = "noisescale-batch-size-controller"
STATE_VERSION = 1
SIGNALS = ("b_simple", "b_noise")


@dataclass(frozen=True)
class Observation:
    """One reading of the signal, in examples: the point estimate and its interval (``None``: none).

    ``step`` is the tracker's step count at the reading and ``measured`` its measured steps.
    """

    step: int
    measured: int
    estimate: float | None
    low: float | None
    high: float | None
    reason: str | None = None


def decide_accumulation(
    accumulation: int,
    estimate: float | None,
    low: float | None = None,
    high: float | None = None,
    *,
    quantum: int,
    min_accumulation: int,
    max_accumulation: int,
    factor: float = 1.0,
    max_growth: float = 2.0,
    min_change: float = 1.25,
    hysteresis: float = 2.0,
) -> int:
    """The next accumulation (micro-batches per rank) from a noise-scale reading, in examples.

    The batch is ``B = accumulation x quantum`` (``quantum = world_size x micro_batch_size``); the
    target is ``factor x estimate`` (``factor = 1``: the balance point ``B ~ B_noise`` of McCandlish
    Eq. 2.11; App. D: larger favours fewer steps, smaller fewer examples). Pure, so every rank
    decides alike.

    - Grow when ``factor x low > B`` (the whole interval says the batch is below the target) and the
      target is at least ``min_change x B`` (or the largest batch): to the target rounded down to
      whole micro-batches, at most ``max_growth x B`` and ``max_accumulation``.
    - Shrink only when ``factor x high < B / hysteresis`` (the whole interval says the batch is far
      above the target): to the target rounded up, at least ``B / max_growth`` and
      ``min_accumulation``. ``hysteresis = inf``: never shrink.
    - Otherwise keep ``accumulation``. ``low``/``high`` ``None``: a point estimate only (gate on it).
    """
    if estimate is None or not math.isfinite(estimate) or estimate < 0:
        return accumulation
    B = accumulation * quantum
    target = factor * estimate
    lo = factor * low if low is not None else target
    hi = factor * high if high is not None else target
    if lo > B and target > B:
        cap = max(accumulation + 1, math.floor(accumulation * max_growth + 1e-9))
        want = min(math.floor(target / quantum + 1e-9), cap, max_accumulation)
        # the clamp to max_accumulation may leave a step smaller than min_change: take it only to the top
        if want > accumulation and (want * quantum >= min_change * B or want == max_accumulation):
            return want
        return accumulation
    if math.isfinite(hysteresis) and hi * hysteresis < B:
        floor_ = max(min_accumulation, math.ceil(accumulation / max_growth - 1e-9))
        want = max(math.ceil(target / quantum - 1e-9), floor_, 1)
        return min(want, accumulation)
    return accumulation


def _positive_int(name: str, v: Any) -> int:
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return v


def _positive(name: str, v: Any, lo: float = 0.0, *, inf_ok: bool = False) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (math.isfinite(v) or (inf_ok and v == math.inf))
    if not ok or not v > lo:
        raise ValueError(f"{name} must be a {'' if inf_ok else 'finite '}number > {lo:g}, got {v!r}")
    return float(v)


class BatchSizeController:
    """Decides each step's batch from the measured noise scale, and rescales the learning rate.

    A plain loop needs three extra lines (see ``examples/adaptive.py``)::

        ctl = ns.BatchSizeController(gns, opt, batch_size=64, micro_batch_size=32, max_batch_size=4096)
        for step in range(steps):
            for _ in range(ctl.accumulation):                # micro-batches of this step
                (loss_fn(model, next(data)) / ctl.accumulation).backward()
            gns.step(); opt.step(); opt.zero_grad()
            ctl.step()                                       # after optimizer.step() and gns.step()

    Args:
        gns: the tracker whose estimates drive the decisions (the controller subscribes to it).
        optimizer: whose learning rate is rescaled on every change (``None``: only report
            :attr:`lr_scale`, e.g. for a framework that applies it itself).
        batch_size: the global batch (examples) of the first step, at which the base learning
            rates were tuned; a whole number of ``world_size x micro_batch_size``.
        micro_batch_size: examples per micro-batch per rank (one backward pass).
        max_batch_size: the largest global batch (rounded down to whole micro-batches).
        min_batch_size: the smallest (default: ``batch_size``, so the batch never falls below
            where it started).
        lr_rule: ``"auto"`` (``"saturating"`` for SGD, ``"sqrt"`` for Adam-family; see
            :func:`~noisescale.lr_rules.resolve_rule`), ``"linear"``, ``"saturating"``, ``"sqrt"``,
            ``"none"``, an :class:`~noisescale.lr_rules.LRRule` (``LRRule("power", alpha=0.7)``,
            ``LRRule("saturating", b_noise=...)``) or ``fn(batch_size, base_batch_size,
            noise_scale) -> multiplier``.
        signal: ``"b_simple"`` (the tracker's ``B_simple`` and interval; the preconditioned one
            when the tracker has ``preconditioner=``), ``"b_noise"`` (the tracker's ``b_noise``),
            or ``fn(update) -> estimate | (estimate, low, high) | None`` given each
            :class:`~noisescale.tracker.Update`. In the tracker's unit.
        factor: the target batch is ``factor x signal`` (the steps/examples exchange rate of
            App. D: at ``B = f B_crit`` a run takes ``(1 + 1/f) S_min`` steps and ``(1 + f) E_min``
            examples).
        world_size: data-parallel ranks (default: the initialized process group's size, else 1).
        tokens_per_example: with a tracker counting tokens (``unit="tokens"``): tokens per example,
            to convert the signal to examples (required then).
        schedule: an :class:`~noisescale.schedules.ExamplesSchedule` on the same optimizer; the
            controller advances it by the examples of each step.
        every: steps between readings of the tracker (each is one host read).
        patience: measured steps before the first decision and after each change.
        level: confidence level of the interval that must support a change.
        max_growth: the largest factor by which one change may grow (or shrink) the batch.
        min_change: the smallest factor worth a change (fewer, larger changes of the learning rate).
        hysteresis: shrink only when the interval's upper end is below ``batch / hysteresis``
            (``math.inf``: never shrink).
        adjust_adam: with the ``"sqrt"`` rule, also scale Adam's ``betas`` and ``eps`` by Malladi
            et al.'s rule (``1 - beta -> kappa (1 - beta)``, ``eps -> eps/sqrt(kappa)``).
    """

    def __init__(
        self,
        gns: Any,
        optimizer: torch.optim.Optimizer | None,
        *,
        batch_size: int,
        micro_batch_size: int,
        max_batch_size: int,
        min_batch_size: int | None = None,
        lr_rule: str | LRRule | Callable[[float, float, float | None], float] = "auto",
        signal: str | Callable[[Any], Any] = "b_simple",
        factor: float = 1.0,
        world_size: int | None = None,
        tokens_per_example: float | None = None,
        schedule: ExamplesSchedule | None = None,
        every: int = 10,
        patience: int = 50,
        level: float = 0.95,
        max_growth: float = 2.0,
        min_change: float = 1.25,
        hysteresis: float = 2.0,
        adjust_adam: bool = False,
    ) -> None:
        if not callable(getattr(gns, "subscribe", None)):
            raise TypeError(f"gns must be a GradientNoiseScale (something with subscribe()), got {type(gns).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        micro = _positive_int("micro_batch_size", micro_batch_size)
        if world_size is None:
            dist = torch.distributed
            world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        world = _positive_int("world_size", world_size)
        quantum = world * micro
        batch = _positive_int("batch_size", batch_size)
        if batch % quantum:
            raise ValueError(
                f"batch_size={batch} is not a whole number of micro-batches: it must be a multiple of "
                f"world_size x micro_batch_size = {world} x {micro} = {quantum}"
            )
        top = _positive_int("max_batch_size", max_batch_size)
        if top < batch:
            raise ValueError(f"max_batch_size={top} is below batch_size={batch}; give the largest batch you allow")
        low_b = batch if min_batch_size is None else _positive_int("min_batch_size", min_batch_size)
        if low_b > batch:
            raise ValueError(
                f"min_batch_size={low_b} is above batch_size={batch}; the first batch must lie within the bounds"
            )
        self.gns = gns
        self.optimizer = optimizer
        self.micro_batch_size = micro
        self.world_size = world
        self.quantum = quantum
        self.base_batch_size = batch
        self.min_accumulation = max(1, math.ceil(low_b / quantum))
        self.max_accumulation = top // quantum
        self.factor = _positive("factor", factor)
        self.every = _positive_int("every", every)
        if not (isinstance(patience, int) and not isinstance(patience, bool) and patience >= 0):
            raise ValueError(f"patience must be a number of measured steps >= 0, got {patience!r}")
        self.patience = patience
        if not (isinstance(level, float) and 0 < level < 1):
            raise ValueError(f"level must be a confidence level in (0, 1), e.g. 0.95, got {level!r}")
        self.level = level
        self.max_growth = _positive("max_growth", max_growth, 1.0)
        self.min_change = _positive("min_change", min_change, 1.0)
        if self.min_change > self.max_growth:
            raise ValueError(f"min_change={min_change!r} is above max_growth={max_growth!r}: no change could be made")
        self.hysteresis = _positive("hysteresis", hysteresis, 1.0, inf_ok=True)

        # the signal and its unit
        unit = getattr(gns, "unit", "examples")
        if unit == "examples":
            if tokens_per_example is not None:
                raise ValueError(
                    f"tokens_per_example={tokens_per_example!r} was given but the tracker counts examples; leave it out"
                )
            self.tokens_per_example = 1.0
        else:
            if tokens_per_example is None:
                raise ValueError(
                    f"the tracker counts {unit!r} but micro_batch_size and batch_size are in examples: pass "
                    f"tokens_per_example= ({unit} per example, e.g. the sequence length) to convert the noise scale"
                )
            self.tokens_per_example = _positive("tokens_per_example", tokens_per_example)
        self.unit = unit
        if isinstance(signal, str):
            if signal not in SIGNALS:
                raise ValueError(f"signal must be 'b_simple', 'b_noise' or a callable, got {signal!r}")
            if signal == "b_noise" and not (hasattr(type(gns), "b_noise") or hasattr(gns, "b_noise")):
                raise ValueError(
                    "signal='b_noise' but this tracker has no b_noise (it needs the Hessian-weighted measurement); "
                    "use signal='b_simple' or a callable"
                )
        elif not callable(signal):
            raise TypeError(f"signal must be 'b_simple', 'b_noise' or a callable, got {type(signal).__name__}")
        self.signal = signal

        # the learning-rate rule
        self._rule_fn: Callable[[float, float, float | None], float] | None = None
        if callable(lr_rule) and not isinstance(lr_rule, (str, LRRule)):
            self._rule_fn = lr_rule
            self.lr_rule: LRRule | None = None
            self.lr_rule_name = getattr(lr_rule, "__name__", "callable")
        else:
            self.lr_rule = resolve_rule(lr_rule, optimizer)
            self.lr_rule_name = str(self.lr_rule)
        self.adjust_adam = bool(adjust_adam)
        if self.adjust_adam:
            if self.lr_rule is None or self.lr_rule.name != "sqrt":
                raise ValueError(
                    f"adjust_adam=True goes with lr_rule='sqrt' (Malladi et al.), not {self.lr_rule_name!r}"
                )
            if optimizer is None or not all("betas" in g and "eps" in g for g in optimizer.param_groups):
                raise ValueError("adjust_adam=True needs an Adam-family optimizer (param groups with betas and eps)")
            for (
                g
            ) in optimizer.param_groups:  # fails now, not mid-run, when the largest batch is out of the rule's range
                adam_sqrt_hyperparameters(self.max_accumulation * quantum / batch, g["betas"], g["eps"])
        if schedule is not None:
            if not isinstance(schedule, ExamplesSchedule):
                raise TypeError(f"schedule must be a noisescale.ExamplesSchedule, got {type(schedule).__name__}")
            if schedule.optimizer is not optimizer:
                raise ValueError("schedule= must be built on the same optimizer as the controller's")
        self.schedule = schedule

        # state
        self.accumulation: int = batch // quantum
        self.batch_size: int = batch
        self.lr_scale: float = 1.0
        self.steps = 0
        self.examples = 0.0 if schedule is None else schedule.examples
        self.changes: list[dict[str, float]] = []
        self.last: Observation | None = None  # the latest reading (what the last decision saw)
        self.reason: str | None = "waiting for the first reading of the tracker"
        self._measured_at_change = 0
        self._pending: Observation | None = None
        self._warned_batch = False
        self._mismatches = 0  # readings in a row whose steps were mostly not of the controller's batch
        self._saved: list[dict[str, Any]] = []
        self._handles: list[Any] = []
        if optimizer is not None:
            self._base_lrs = [g["lr"] for g in optimizer.param_groups]
            self._handles = [
                optimizer.register_step_pre_hook(self._pre_step),
                optimizer.register_step_post_hook(self._post_step),
            ]
        self._subscription = gns.subscribe(self._on_update, every=self.every)

    # -- reading the tracker -----------------------------------------------------------

    def _on_update(self, update: Any) -> None:
        if getattr(update, "final", False):
            return
        self._check_batches(getattr(update, "records", None) or [])
        self._pending = self._observe(update)

    def _check_batches(self, records: list[dict[str, Any]]) -> None:
        """Warn once when the steps the tracker saw were not of the controller's batch (mostly, in two
        readings in a row): the loop does not run ``ctl.accumulation`` micro-batches of
        ``micro_batch_size``, and the learning-rate scale would then be applied to a batch that did not
        grow. Counted in examples only (tokens per example may vary); every step since the last
        reading is of the current batch (decisions come right after readings)."""
        if self.unit != "examples" or self._warned_batch:
            return
        seen = [
            b["examples"] - a["examples"]
            for a, b in itertools.pairwise(records)
            if b.get("step") == a.get("step", -2) + 1
            and a.get("examples") is not None
            and b.get("examples") is not None
        ]
        wrong = [x for x in seen if abs(x - self.batch_size) > 1e-6 * self.batch_size]
        if not seen:
            return
        # two readings in a row: a framework may finish a step or two at the old batch after a change
        self._mismatches = self._mismatches + 1 if len(wrong) * 2 > len(seen) else 0
        if self._mismatches >= 2:
            self._warned_batch = True
            warnings.warn(
                f"noisescale: the tracker saw steps of {wrong[-1]:g} examples but the controller's batch is "
                f"{self.batch_size} (= {self.world_size} x {self.accumulation} x {self.micro_batch_size}): run "
                "ctl.accumulation micro-batches of micro_batch_size examples per rank in each step, or the "
                "learning-rate scale is applied to a batch that did not change",
                stacklevel=4,
            )

    def _observe(self, update: Any) -> Observation:
        measured = int(update.metrics.get("gns/measured", 0)) if getattr(update, "metrics", None) else 0
        step = int(update.step)
        est: Any
        low = high = None
        if self.signal == "b_simple":
            est = update.b_simple
            iv = update.interval(self.level)
            if est is not None and iv is None:  # fewer than 3 measured steps: no interval to trust yet
                return Observation(step, measured, None, None, None, "fewer than 3 measured steps: no interval yet")
            if iv is not None:
                low, high = iv
        elif self.signal == "b_noise":
            est = self.gns.b_noise
            ivf = getattr(self.gns, "b_noise_interval", None)
            if est is not None and callable(ivf):
                iv = ivf(self.level)
                if iv is None:
                    return Observation(step, measured, None, None, None, "b_noise has no interval yet")
                low, high = iv
        else:
            assert callable(self.signal)
            out = self.signal(update)
            if isinstance(out, (tuple, list)):
                if len(out) != 3:
                    raise ValueError(
                        f"signal callable must return estimate, (estimate, low, high) or None; got {out!r}"
                    )
                est, low, high = out
            else:
                est = out
        if est is None:
            if self.signal == "b_noise":
                why = getattr(self.gns, "b_noise_reason", None)
            else:
                why = getattr(getattr(update, "total", None), "reason", None)
            return Observation(step, measured, None, None, None, f"the signal is undefined ({why or 'None'})")
        for name, v in (("estimate", est), ("low", low), ("high", high)):
            if v is not None and (not isinstance(v, (int, float)) or math.isnan(v)):
                raise ValueError(f"signal {self.signal!r} gave {name}={v!r}: expected a number or None")
        t = self.tokens_per_example  # the tracker's unit -> examples
        return Observation(
            step,
            measured,
            float(est) / t,
            None if low is None else float(low) / t,
            None if high is None else float(high) / t,
        )

    # -- the loop ----------------------------------------------------------------------

    def step(self) -> bool:
        """Call once after each optimizer step (and after ``gns.step()``). Counts the step's
        examples, advances ``schedule=``, and decides the next step's batch from the latest reading.
        Returns ``True`` when :attr:`accumulation` (and the learning-rate scale) changed."""
        self.steps += 1
        self.examples += self.batch_size
        if self.schedule is not None:
            self.schedule.step(examples=self.examples)
        obs, self._pending = self._pending, None
        if obs is None:
            return False
        self.last = obs
        if obs.estimate is None:
            self.reason = obs.reason
            return False
        since = obs.measured - self._measured_at_change
        if since < self.patience:
            self.reason = f"waiting: {since} of {self.patience} measured steps since the last change"
            return False
        new = decide_accumulation(
            self.accumulation,
            obs.estimate,
            obs.low,
            obs.high,
            quantum=self.quantum,
            min_accumulation=self.min_accumulation,
            max_accumulation=self.max_accumulation,
            factor=self.factor,
            max_growth=self.max_growth,
            min_change=self.min_change,
            hysteresis=self.hysteresis,
        )
        if new == self.accumulation:
            self.reason = None
            return False
        self._change(new, obs)
        return True

    def _change(self, accumulation: int, obs: Observation) -> None:
        old = self.batch_size
        self.accumulation = accumulation
        self.batch_size = accumulation * self.quantum
        self.lr_scale = self._scale(self.batch_size, obs.estimate)
        self._measured_at_change = obs.measured
        self.reason = None
        self.changes.append(
            {
                "step": float(self.steps),
                "examples": self.examples,
                "from": float(old),
                "batch_size": float(self.batch_size),
                "lr_scale": self.lr_scale,
                "estimate": float(obs.estimate) if obs.estimate is not None else math.nan,
            }
        )

    def _scale(self, batch_size: float, noise_scale: float | None) -> float:
        base = float(self.base_batch_size)
        if self._rule_fn is not None:
            s = self._rule_fn(float(batch_size), base, noise_scale)
        else:
            assert self.lr_rule is not None
            s = self.lr_rule.scale(float(batch_size), base, noise_scale)
        if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0):
            raise ValueError(
                f"lr_rule {self.lr_rule_name!r} gave {s!r} for batch {batch_size:g}: expected a positive number"
            )
        return float(s)

    # -- applying the scale inside optimizer.step() ------------------------------------

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._saved:  # the last optimizer.step() raised before its post-hook: undo, never compound
            self._post_step(optimizer, args, kwargs)
        if self.lr_scale == 1.0 and not (self.adjust_adam and self.batch_size != self.base_batch_size):
            return
        kappa = self.batch_size / self.base_batch_size
        self._saved = []
        for g in optimizer.param_groups:
            saved = {"lr": g["lr"]}
            g["lr"] = g["lr"] * self.lr_scale
            if self.adjust_adam:
                saved["betas"], saved["eps"] = g["betas"], g["eps"]
                h = adam_sqrt_hyperparameters(kappa, g["betas"], g["eps"])
                g["betas"], g["eps"] = h.betas, h.eps
            self._saved.append(saved)

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        for g, saved in zip(optimizer.param_groups, self._saved):
            g.update(saved)
        self._saved = []

    def lrs(self) -> list[float]:
        """The learning rate each param group's next step uses: its ``lr`` (the schedule's) x :attr:`lr_scale`."""
        if self.optimizer is None:
            return []
        scale = self.lr_scale if self._handles else 1.0  # closed: the hooks no longer apply it
        return [float(g["lr"]) * scale for g in self.optimizer.param_groups]

    def metrics(self, prefix: str = "controller/") -> dict[str, float]:
        """Flat dict of floats for a logger: ``batch_size``, ``accumulation``, ``lr_scale``, ``changes``,
        ``examples`` and ``lr`` (the first group's learning rate as applied)."""
        out = {
            "batch_size": float(self.batch_size),
            "accumulation": float(self.accumulation),
            "lr_scale": self.lr_scale,
            "changes": float(len(self.changes)),
            "examples": self.examples,
        }
        lrs = self.lrs()
        if lrs:
            out["lr"] = lrs[0]
        return {prefix + k: v for k, v in out.items()}

    # -- state -------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            "base_batch_size": self.base_batch_size,
            "micro_batch_size": self.micro_batch_size,
            "world_size": self.world_size,
            "min_accumulation": self.min_accumulation,
            "max_accumulation": self.max_accumulation,
            "factor": self.factor,
            "signal": self.signal if isinstance(self.signal, str) else "callable",
            "lr_rule": self.lr_rule_name,
        }

    def state_dict(self) -> dict[str, Any]:
        """Numbers and configuration only (loads with ``torch.load(..., weights_only=True)``). Save it
        after :meth:`step`; the tracker's and the schedule's state are saved by themselves."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "config": self._config(),
            "accumulation": self.accumulation,
            "lr_scale": self.lr_scale,
            "steps": self.steps,
            "examples": self.examples,
            "measured_at_change": self._measured_at_change,
            "changes": [dict(c) for c in self.changes],
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` into a controller built with the same settings.

        Validated before anything is assigned: a bad state raises ``ValueError`` naming the entry."""
        if not isinstance(sd, dict) or sd.get("format") != STATE_FORMAT:
            raise ValueError("not a BatchSizeController state_dict (missing format='noisescale-batch-size-controller')")
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"state_dict version {sd.get('version')!r} is not supported (expected {STATE_VERSION})")
        saved = sd.get("config")
        mine = self._config()
        if not isinstance(saved, dict):
            raise ValueError("state_dict lacks its 'config' section")
        for k, v in mine.items():
            if saved.get(k) != v:
                raise ValueError(
                    f"state_dict was saved with {k}={saved.get(k)!r} but this controller has {k}={v!r}; "
                    "construct the controller with the same settings"
                )
        acc = sd.get("accumulation")
        if not (isinstance(acc, int) and self.min_accumulation <= acc <= self.max_accumulation):
            raise ValueError(
                f"state_dict entry accumulation={acc!r} is not a whole number in "
                f"[{self.min_accumulation}, {self.max_accumulation}]"
            )
        scale = sd.get("lr_scale")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"state_dict entry lr_scale={scale!r} is not a positive number")
        for k in ("steps", "measured_at_change"):
            v = sd.get(k)
            if not (isinstance(v, int) and v >= 0):
                raise ValueError(f"state_dict entry {k}={v!r} is not a whole number >= 0")
        ex = sd.get("examples")
        if not (isinstance(ex, (int, float)) and math.isfinite(ex) and ex >= 0):
            raise ValueError(f"state_dict entry examples={ex!r} is not a finite number >= 0")
        changes = sd.get("changes")
        if not isinstance(changes, list) or not all(isinstance(c, dict) for c in changes):
            raise ValueError("state_dict entry changes is not a list of records")
        self.accumulation = acc
        self.batch_size = acc * self.quantum
        self.lr_scale = float(scale)
        self.steps = sd["steps"]
        self.examples = float(ex)
        self._measured_at_change = sd["measured_at_change"]
        self.changes = [dict(c) for c in changes]
        self._pending = None

    # -- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Stop reading the tracker and remove the optimizer hooks (steps then use the plain ``lr``). Idempotent."""
        self._subscription.remove()
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> BatchSizeController:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"BatchSizeController(batch_size={self.batch_size}, accumulation={self.accumulation}, "
            f"lr_scale={self.lr_scale:.4g}, lr_rule={self.lr_rule_name!r}, changes={len(self.changes)})"
        )
