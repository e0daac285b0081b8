"""``GradientNoiseScale``: the object a training loop holds.

It picks a probe (where the squared norms come from; :mod:`noisescale.probes`), turns each step's
additive :class:`~noisescale.estimators.StepStats` into unbiased per-group ``(g2, trace_sigma)``
(:func:`~noisescale.estimators.step_estimates`, App. A.1), averages them separately
(:mod:`noisescale.ema`) and reports ``b_simple`` with an interval, in total and per group.

Device discipline: ``step()`` only queues the step's statistics (still on the device, or in an
all-reduce in flight). They are read in one host transfer when a subscriber is due, when a value
is read (``b_simple``, ``metrics()``, ...), or when ``max_pending`` steps have queued.
Subscribers (:meth:`GradientNoiseScale.subscribe`) are pushed the latest estimates every N steps;
the run log is one of them.
"""

from __future__ import annotations

import math
import os
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .ema import Estimate, NoiseScaleEMA, RobustAverage
from .estimators import EXAMPLES, HEAD, PARTS, RANKS, SUM_A2, SUM_A2_OVER_B, StepStats, step_estimates
from .hessian import BNoiseAverage, HessianDraw, hessian_draw
from .probes import PROBES, make_probe, select_probe
from .probes.base import Hook, Preconditioner, ProbeConfig, StepContext, resolve_groups, trainable_parameters
from .runlog import RunLogWriter

__all__ = ["GradientNoiseScale", "Update", "Subscription"]

STATE_FORMAT = "noisescale-tracker"
STATE_VERSION = 2
HISTORY = 10000  # step records kept in GradientNoiseScale.history


@dataclass
class Update:
    """What a subscriber is pushed: the estimates after ``step`` and the step records since its last call.

    ``records`` are the per-step dicts of :attr:`GradientNoiseScale.history` (one per ``step()``,
    measured or not, in order). ``final`` is True for the last push, from ``close()``.
    """

    step: int
    examples: float
    total: Estimate
    groups: dict[str, Estimate]
    metrics: dict[str, float]
    records: list[dict[str, Any]] = field(default_factory=list)
    final: bool = False

    @property
    def b_simple(self) -> float | None:
        return self.total.b_simple

    def interval(self, level: float = 0.95) -> tuple[float, float] | None:
        return self.total.interval(level)


class Subscription:
    """Handle returned by :meth:`GradientNoiseScale.subscribe`; :meth:`remove` stops the pushes."""

    def __init__(
        self, tracker: GradientNoiseScale, fn: Callable[[Update], Any], every: int, seconds: float | None = None
    ) -> None:
        self.tracker, self.fn, self.every, self.seconds = tracker, fn, every, seconds
        self.records: list[dict[str, Any]] = []
        self.last = time.monotonic()

    def due(self, step: int, now: float) -> bool:
        return step % self.every == 0 or (self.seconds is not None and now - self.last >= self.seconds)

    def remove(self) -> None:
        if self in self.tracker._subscribers:
            self.tracker._subscribers.remove(self)


_COUNTERS = ("steps", "measured", "skipped", "unmeasurable")


def _section(sd: dict[str, Any], key: str) -> dict[str, Any]:
    sec = sd.get(key)
    if not isinstance(sec, dict):
        raise ValueError(
            f"state_dict lacks its {key!r} section (got {type(sec).__name__}); it is not a complete "
            "GradientNoiseScale state_dict"
        )
    return sec


def _number(name: str, v: Any, *, integer: bool = False, lo: float = 0.0) -> Any:
    """``v`` checked to be a finite number (an integer if asked) >= ``lo``; the error names it."""
    ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)
    if ok and integer:
        ok = float(v).is_integer()
    if not ok or v < lo:
        kind = "a whole number" if integer else "a finite number"
        raise ValueError(f"state_dict entry {name}={v!r} is not valid: expected {kind} >= {lo:g}")
    return int(v) if integer else float(v)


class _Lifetime:
    """What a dropped tracker must release: its probe's hooks (weakref.finalize keeps no tracker alive)."""

    def __init__(self, probe: Any, handles: list[Any]) -> None:
        self.probe = probe
        self.handles = handles  # the tracker's own hooks

    @staticmethod
    def release(lifetime: _Lifetime) -> None:
        warnings.warn(
            "noisescale: a GradientNoiseScale was dropped without close(); its hooks were removed now. Call "
            "gns.close() (or use `with GradientNoiseScale(...) as gns:`) so that they go when you mean them to",
            ResourceWarning,
            stacklevel=2,
        )
        lifetime.probe.close()
        for h in lifetime.handles:
            h.remove()


class _Entry:
    """One ``step()`` waiting to be folded in (its tensors not yet read)."""

    __slots__ = ("step", "stats", "loss", "hessian")

    def __init__(self, step: int, stats: StepStats, loss: Any, hessian: HessianDraw | None = None) -> None:
        self.step, self.stats, self.loss, self.hessian = step, stats, loss, hessian


class GradientNoiseScale:
    """Tracks the simple noise scale ``B_simple = tr(Sigma)/|G|^2`` of a training run.

    Call :meth:`step` once per optimizer step, after all backward passes of the step (and after
    ``scaler.unscale_(optimizer)`` when you use a GradScaler) and before ``optimizer.step()``.
    Gradient clipping may come before or after it: the step gradient's norm is captured when the
    last backward pass ends.

    Args:
        model: the module being trained (its trainable parameters are measured).
        method: ``"auto"`` (the best applicable probe), ``"microbatch"`` (gradient accumulation
            with >= 2 micro-batches), ``"per_example"`` (exact per-example norms from one
            backward), ``"ddp"`` / ``"fsdp"`` (data parallel: local gradients against the
            synchronized one) or ``"ddp_per_example"``. :attr:`method` says which is used.
        beta: EMA decay per measured step, in ``(0, 1]`` (``1``: plain mean). The average spans
            about ``(1+beta)/(1-beta)`` steps.
        unit: what a batch size counts: ``"examples"`` (inferred from the inputs' leading
            dimension) or e.g. ``"tokens"`` (then pass ``sizes=`` to :meth:`step`).
        reduction: ``"mean"`` if each micro-batch's loss is a mean over its examples (weights
            every micro-batch equally), ``"sum"`` if it weights every example equally (summed
            loss, or a token-sum divided by the step's token count). Matters only for unequal
            micro-batches; ``b_simple`` does not depend on any common factor such as
            ``1/num_micro_batches``.
        scaler: the ``torch.amp.GradScaler`` in use, if any: norms taken from scaled gradients
            are divided by the scale squared.
        params: measure only these parameters (default: all trainable ones).
        groups: also measure per group: ``"layers"`` (one group per module that owns parameters),
            an optimizer (its param groups), a dict ``name -> parameters`` or a callable
            ``parameter name -> group name``; see :meth:`by_group`. The groups add up to the total.
        preconditioner: an Adam-family optimizer: measure the noise scale of its preconditioned
            update, every gradient weighted by ``1/(sqrt(v_hat) + eps)`` read from its state
            before this step's update (docs/method.md).
        precondition: ``"update"`` (``tr(P Sigma P)/|P G|^2``, default) or ``"curvature"``
            (``tr(P Sigma)/(G^T P G)``, for a Hessian that ``P`` preconditions well).
        robust: hold out per-step estimates that a transient made absurd (more than 50 median
            absolute deviations from the recent steps) and restart the average when 5 steps in a row
            are (:class:`~noisescale.ema.TransientFilter`); ``False``: the plain debiased EMA.
        warmup: steps not averaged at the start (recorded with status ``"warmup"``).
        warmup_examples: likewise, until this many examples (in :attr:`unit`) have been seen.
        log: path of a JSON-lines run log to write (see :mod:`noisescale.runlog`); it is
            written every ``max_pending`` steps, at least every ``log_seconds`` seconds, and at
            :meth:`close`, so a crash loses at most that much. Restored with
            :meth:`load_state_dict` before the first step, the tracker continues the existing log
            (no step twice); a new run moves an existing log aside to ``<name>.old``.
        max_pending: steps queued on the device before they are read anyway.
        hessian_every: also measure ``B_noise = tr(H Sigma)/(G^T H G)`` and ``eps_max`` (eqs. 2.7-2.8)
            every this many steps (the first at step 1), from Hessian-vector products on fresh
            micro-batches drawn by the ``closure=`` passed to :meth:`step` (:mod:`noisescale.hessian`;
            one draw costs about ``hessian_parts + 3`` gradient passes). Averaged with decay
            ``beta ** hessian_every`` per draw (the same span of steps as ``b_simple``); see
            :attr:`b_noise`, :attr:`eps_max`. Parameters, ``.grad``, buffers and RNG are untouched.
        hessian_parts: gradient micro-batches per draw (>= 2); the closure is called one more time
            for the Hessian's own micro-batch.
        **probe_options: options of the chosen probe (``strict``, ``layers``, ``fused`` for
            per-example norms; ``process_group`` for the distributed methods).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        method: str = "auto",
        *,
        beta: float = 0.99,
        unit: str = "examples",
        reduction: str = "mean",
        scaler: Any = None,
        params: Sequence[torch.nn.Parameter] | None = None,
        groups: Any = None,
        preconditioner: Any = None,
        precondition: str = "update",
        robust: bool = True,
        warmup: int = 0,
        warmup_examples: float = 0.0,
        log: str | os.PathLike | None = None,
        log_seconds: float = 10.0,
        max_pending: int = 64,
        hessian_every: int | None = None,
        hessian_parts: int = 2,
        **probe_options: Any,
    ) -> None:
        if not isinstance(unit, str) or not unit:
            raise ValueError(f"unit must be a non-empty string such as 'examples' or 'tokens', got {unit!r}")
        if not (isinstance(max_pending, int) and max_pending >= 1):
            raise ValueError(f"max_pending must be a positive integer, got {max_pending!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if not (isinstance(warmup, int) and warmup >= 0):
            raise ValueError(f"warmup must be a number of steps >= 0, got {warmup!r}")
        if not (isinstance(warmup_examples, (int, float)) and warmup_examples >= 0):
            raise ValueError(f"warmup_examples must be a number >= 0 (in the tracker's unit), got {warmup_examples!r}")
        if hessian_every is not None and not (isinstance(hessian_every, int) and hessian_every >= 1):
            raise ValueError(f"hessian_every must be a positive number of steps or None, got {hessian_every!r}")
        if not (isinstance(hessian_parts, int) and hessian_parts >= 2):
            raise ValueError(f"hessian_parts must be an integer >= 2, got {hessian_parts!r}")
        self.model = model
        self._own_params = params is None
        self.params = self._tracked(model, params)
        cls = select_probe(method, model, self.params)
        self.method: str = cls.name
        self._explicit = method != "auto"
        self.unit = unit
        self.reduction = reduction
        self.scaler = scaler
        self.max_pending = max_pending
        self.groups = resolve_groups(model, self.params, groups)
        pre = Preconditioner(preconditioner, self.params, precondition) if preconditioner is not None else None
        self.preconditioned = None if pre is None else precondition
        config = ProbeConfig(
            reduction=reduction, unit=unit, groups=self.groups, preconditioner=pre, auto=not self._explicit
        )
        self._config = config
        self.probe = make_probe(cls, model, self.params, config, probe_options)
        if hessian_every is not None and self.method == "fsdp":
            self.probe.close()
            raise ValueError(
                "hessian_every= is not supported with method='fsdp': the parameters are sharded, and a Hessian-vector "
                "product through FSDP's unshard/reshard has no double backward. Measure B_noise at a checkpoint on a "
                "full (unsharded) copy with ns.measure(..., hessian=True)"
            )
        self.hessian_every, self.hessian_parts = hessian_every, hessian_parts
        self._hessian = BNoiseAverage(beta**hessian_every) if hessian_every is not None else None
        self._hessian_failed: str | None = None
        self._avg = RobustAverage(beta, 1 + len(self.groups) if self.groups.grouped else 1, robust=robust)
        self.warmup, self.warmup_examples = warmup, float(warmup_examples)
        self._accumulation_checks = 3  # first steps: check that .grad was cleared after step() (_check_hook)
        self._check_handles = [p.register_hook(Hook(self._make_check(p))) for p in self.params]
        # a tracker dropped without close() must not leave its hooks behind (they slow every step)
        self._lifetime = _Lifetime(self.probe, self._check_handles)
        self._finalizer = weakref.finalize(self, _Lifetime.release, self._lifetime)
        self._pending: list[_Entry] = []
        self._subscribers: list[Subscription] = []
        self._history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self._steps = 0
        self._folded_step = 0  # the last step folded into the averages (behind self.steps under DDP)
        self.device_reads = 0  # host transfers of queued statistics (one per flush and device)
        self._measured = 0  # read through the properties, which fold pending steps first
        self._skipped = 0
        self._unmeasurable = 0
        self._examples = 0.0
        self._warmup_steps = 0
        self._first_pass = False  # the first backward pass after a step() (checks; set by step())
        self._last_reason: str | None = None
        self._warned: set[str] = set()
        self._closed = False
        self._log: RunLogWriter | None = None
        if log is not None:
            self._log = RunLogWriter(
                log,
                {
                    "unit": unit,
                    "method": self.method,
                    "beta": beta,
                    "reduction": reduction,
                    "groups": self.groups.names if self.groups.grouped else [],
                    "preconditioned": self.preconditioned,
                    "fields": {
                        "b_simple": f"simple noise scale [{unit}]",
                        "g2": "|G|^2 (EMA)",
                        "trace_sigma": "tr(Sigma) (EMA)",
                        "examples": f"cumulative batch size [{unit}]",
                        "group/<name>/b_simple": f"simple noise scale of a group [{unit}]",
                    },
                },
            )
            # written every max_pending steps and at least every log_seconds: a crash loses no more
            self.subscribe(self._write_log, every=max_pending, seconds=log_seconds)

    @staticmethod
    def _tracked(model: torch.nn.Module, params: Sequence[torch.nn.Parameter] | None) -> list[torch.nn.Parameter]:
        if params is None:
            return trainable_parameters(model)
        seen: dict[int, torch.nn.Parameter] = {}
        for p in params:
            if not isinstance(p, torch.Tensor) or not p.requires_grad:
                raise ValueError("params= must contain tensors with requires_grad=True")
            seen.setdefault(id(p), p)
        if not seen:
            raise ValueError("params= is empty: give at least one trainable parameter")
        return list(seen.values())

    # -- the loop ----------------------------------------------------------------------

    def step(
        self, sizes: Sequence[Any] | None = None, *, loss: Any = None, closure: Callable[[], Any] | None = None
    ) -> None:
        """Record this optimizer step.

        Args:
            sizes: size of each micro-batch of this step in the tracker's ``unit`` (default:
                inferred from the model's inputs, in examples).
            loss: optional training loss of the step, kept for the run log and plots
                (a tensor is not read until the log is written).
            closure: with ``hessian_every=``: a function that draws a *fresh* micro-batch each time
                it is called and returns its mean loss (or ``(loss, size)`` in the tracker's unit),
                e.g. ``lambda: loss_fn(model, next(batches))``. Called ``hessian_parts + 1`` times
                on the steps that measure ``B_noise`` only; ignored otherwise.
        """
        self._check_open()
        if self._hessian is not None and closure is None and self._hessian_due(self.steps + 1):
            raise ValueError(
                f"hessian_every={self.hessian_every} needs step(closure=...) on the steps that measure B_noise "
                f"(step {self.steps + 1} is one): a function drawing a fresh micro-batch and returning its mean loss"
            )
        if closure is not None and not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        self._adopt_shadow_steps()
        passes = self.probe.pending_parts()  # backward passes (micro-batches) of this step
        try:
            stats = self.probe.collect(self._context(sizes))
        except Exception as e:
            # A distributed probe that raised has still taken part in the step's all-reduce (its peers
            # record the step as skipped): record it the same way so that counters agree on every rank.
            failed = getattr(e, "noisescale_stats", None)
            if isinstance(failed, StepStats):
                self.steps += 1
                self._pending.append(_Entry(self.steps, failed, None))
            raise
        self.steps += 1
        self._first_pass = True
        if self._own_params and (self.steps <= 3 or self.steps % 100 == 0):
            self._check_new_parameters()
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
        if stats.reason is not None:  # one policy for every method: warn once per reason, never raise
            reason = stats.reason
            if reason not in self._warned:
                self._warned.add(reason)
                warnings.warn(f"noisescale: step {self.steps} not measured: {reason}", stacklevel=2)
        draw = self._draw_hessian(closure) if closure is not None and self._hessian_due(self.steps) else None
        self._pending.append(_Entry(self.steps, stats, loss, draw))
        self._maybe_fall_back(passes)
        now = time.monotonic()
        due = [s for s in self._subscribers if s.due(self.steps, now)]
        if due or len(self._pending) >= self.max_pending:
            self._flush()
        if due:
            self._notify(due)

    def _hessian_due(self, step: int) -> bool:
        every = self.hessian_every
        return every is not None and self._hessian_failed is None and (step - 1) % every == 0

    def _draw_hessian(self, closure: Callable[[], Any]) -> HessianDraw | None:
        """One draw at the current parameters (before ``optimizer.step()``), averaged over the ranks of a
        distributed method so that every rank folds the same numbers."""
        try:
            draw = hessian_draw(self.model, self.params, closure, parts=self.hessian_parts, unit=self.unit)
        except (RuntimeError, NotImplementedError) as e:
            # an operation without a double backward (a compiled module, a fused kernel): training goes
            # on, B_noise says why it stopped
            self._hessian_failed = (
                f"the Hessian-vector product failed at step {self.steps} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                "B_noise is no longer measured. A torch.compile'd module has no double backward: call the "
                "original module (model._orig_mod) in the closure; custom or fused kernels need a double backward"
            )
            warnings.warn(f"noisescale: {self._hessian_failed}", stacklevel=3)
            return None
        group = getattr(self.probe, "group", None)
        world = getattr(self.probe, "world_size", 1)
        if world > 1:
            import torch.distributed as dist

            # on the device the probe reduces its own statistics on
            v = torch.tensor(
                [draw.gHg, draw.trace_h_sigma, draw.g2],
                dtype=torch.float64,
                device=getattr(self.probe, "device", self.params[0].device),
            )
            dist.all_reduce(v, op=dist.ReduceOp.SUM, group=group)  # one small collective per draw
            gHg, ts, g2 = (v / world).tolist()
            draw = HessianDraw(gHg, ts, g2, draw.sizes, draw.seconds)
        return draw

    def _maybe_fall_back(self, passes: int) -> None:
        """``method="auto"`` chose exact per-example norms, but they turned out to cover less than 90%
        of the parameters (gradient reaching parameters outside their layers: a functionally tied
        head, a loss term on the parameters; inputs shared by all examples). With gradient
        accumulation the micro-batch probe sees every gradient: measure with it from now on, rather
        than report the noise scale of a fraction of the model. Without accumulation nothing else can
        measure this step: keep the partial measurement, and say so once."""
        cov = getattr(self.probe, "coverage", None)
        if self._explicit or self.method != "per_example" or cov is None or cov.fraction >= 0.9:
            return
        why = "; ".join(f"{k}: {v}" for k, v in list(cov.uncovered.items())[:4])
        if passes < 2:
            msg = (
                f"exact per-example norms cover only {cov.fraction:.0%} of the parameters ({why}); B_simple is "
                "that of the covered parameters. With gradient accumulation (>= 2 micro-batches per step) "
                "method='auto' would switch to the micro-batch probe, which sees every gradient"
            )
            if msg not in self._warned:
                self._warned.add(msg)
                warnings.warn(f"noisescale: {msg}", stacklevel=3)
            return
        warnings.warn(
            f"noisescale: exact per-example norms now cover only {cov.fraction:.0%} of the parameters ({why}); "
            "switching to method='microbatch' from the next step (this step has several backward passes, "
            "and that probe sees every gradient). Pass method='per_example' to keep the partial measurement.",
            stacklevel=3,
        )
        self.probe.close()
        self.probe = self._lifetime.probe = make_probe(PROBES["microbatch"], self.model, self.params, self._config, {})
        self.method = "microbatch"

    def _make_check(self, p: torch.nn.Parameter) -> Callable[[torch.Tensor], None]:
        ref = weakref.ref(self)  # the hooks must not keep a dropped tracker alive (see _release)

        def check(grad: torch.Tensor) -> None:
            self = ref()
            if self is None:
                return
            # The first backward pass after a step() should start from a cleared .grad: what it adds
            # is a new step's gradient. If .grad still holds earlier gradients, step() sits between
            # the micro-batches of one optimizer step (or zero_grad is missing), and every step would
            # compare its own parts with an accumulation of several.
            if self._accumulation_checks <= 0 or not self._first_pass:
                return
            self._first_pass = False
            self._accumulation_checks -= 1
            if p.grad is not None and bool((p.grad != 0).any()):
                msg = (
                    "a backward pass began with gradients left in .grad from before the last step(): "
                    "step() is called between the micro-batches of one optimizer step, or zero_grad() is "
                    "missing after optimizer.step(). Call gns.step() once per optimizer step, after all its "
                    "backward passes; the numbers measured so far are wrong"
                )
                if msg not in self._warned:
                    self._warned.add(msg)
                    warnings.warn(f"noisescale: {msg}", stacklevel=2)
            if self._accumulation_checks <= 0:
                self._remove_checks()

        return check

    def _check_new_parameters(self) -> None:
        known = {id(p) for p in self.params}
        new = [n for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in known]
        if new:
            msg = (
                f"the model has {len(new)} trainable parameters the tracker does not measure ({', '.join(new[:4])}"
                f"{', ...' if len(new) > 4 else ''}): they were added or unfrozen after the tracker was created. "
                "Create the tracker after the model is complete (or pass params=)"
            )
            if msg not in self._warned:
                self._warned.add(msg)
                warnings.warn(f"noisescale: {msg}", stacklevel=3)

    def _remove_checks(self) -> None:
        for h in self._check_handles:
            h.remove()
        self._check_handles.clear()  # (the list is shared with the finalizer's record)

    def reset(self) -> None:
        """Forget the averages (not the counters): measure afresh from the next step, e.g. after a
        learning-rate change or when resuming with other settings."""
        self._check_open()
        self._flush()
        self._avg.reset()
        if self._hessian is not None:
            self._hessian.reset()

    @property
    def _ema(self) -> NoiseScaleEMA:
        return self._avg.ema

    def _context(self, sizes: Sequence[Any] | None) -> StepContext:
        if sizes is not None and isinstance(sizes, (int, float)):
            raise TypeError(f"sizes must be a sequence with one size per micro-batch, got the number {sizes!r}")
        s = self.scaler
        if s is None or not getattr(s, "is_enabled", lambda: False)():
            return StepContext(sizes, step=self.steps + 1)
        scale = s._get_scale_async() if hasattr(s, "_get_scale_async") else None
        if scale is None:
            scale = torch.tensor(float(s.get_scale()), dtype=torch.float64)
        inv2 = scale.detach().to(torch.float64).reciprocal().square()  # a new tensor: update() may mutate the scale
        # norms taken in backward (per micro-batch, and the step gradient's when the last backward
        # ended) saw scaled gradients; a norm read now, after unscale_, does not
        return StepContext(sizes, inv2, 1.0 if self._grads_unscaled() else inv2, step=self.steps + 1)

    def _grads_unscaled(self) -> bool:
        """Whether ``scaler.unscale_`` already ran this step (then ``.grad`` is in true units)."""
        try:
            from torch.amp.grad_scaler import OptState

            states = self.scaler._per_optimizer_states
            return any(st.get("stage") is OptState.UNSCALED for st in states.values())
        except Exception:  # an unknown scaler: trust the documented call order
            return True

    def subscribe(self, fn: Callable[[Update], Any], every: int = 100, *, seconds: float | None = None) -> Subscription:
        """Call ``fn(update)`` every ``every`` steps, or at the first step ``seconds`` after the last
        push if that comes sooner (and once more at :meth:`close`), with the latest estimates
        (:class:`Update`). The device values are read once per push, not per step. Returns a handle
        whose ``remove()`` stops the pushes."""
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be a positive integer number of steps, got {every!r}")
        if seconds is not None and not (isinstance(seconds, (int, float)) and seconds > 0):
            raise ValueError(f"seconds must be a positive number or None, got {seconds!r}")
        if not callable(fn):
            raise TypeError(f"subscribe() needs a callable, got {type(fn).__name__}")
        sub = Subscription(self, fn, every, seconds)
        self._subscribers.append(sub)
        return sub

    def _notify(self, subs: list[Subscription], final: bool = False) -> None:
        total = Estimate(self._ema.series(0))
        groups = self._group_estimates()
        metrics = self._metrics_now("gns/", 0.95)
        now = time.monotonic()
        for sub in subs:
            records, sub.records = sub.records, []
            sub.last = now
            sub.fn(Update(self._folded_step, self._examples, total, groups, metrics, records, final))

    def _write_log(self, update: Update) -> None:
        assert self._log is not None
        for r in update.records:
            self._log.write(r)

    # -- folding queued steps in ---------------------------------------------------------

    @property
    def steps(self) -> int:
        """Optimizer steps recorded (``step()`` calls; under ``Join``, also the steps this rank shadowed
        after running out of data, so that the count is the same on every rank)."""
        self._adopt_shadow_steps()
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        self._steps = value

    def _adopt_shadow_steps(self) -> None:
        """Count the steps this rank shadowed under ``Join`` after running out of data, as the ranks
        still training counted them (distributed probes only)."""
        take = getattr(self.probe, "take_shadow_steps", None)
        if take is None:
            return
        for step, stats in take():
            self._steps = step
            self._pending.append(_Entry(step, stats, None))

    def expect_passes(self, n: int) -> None:
        """Say that the optimizer step in progress (or about to start) has ``n`` backward passes
        (micro-batches). Optional. The micro-batch probe reads the step gradient when the pass it
        expects to be the step's last ends, by default the previous step's count; a step shorter than
        that (an epoch's tail) whose ``.grad`` is clipped before ``step()`` is then skipped once
        (docs/method.md §2). A trainer that knows each step's count (the Hugging Face callback does)
        tells it here, and no step is lost. Other methods ignore it."""
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
            raise ValueError(f"expect_passes(n): n must be a positive integer number of backward passes, got {n!r}")
        self._check_open()
        expect = getattr(self.probe, "expect_passes", None)
        if expect is not None:
            expect(n)

    def synchronize(self) -> int:
        """Under DDP/FSDP: reduce the steps queued since the last reduction across ranks now, so that
        every value includes them; returns how many. A collective: call it on **every** rank at the
        same point (e.g. before the final ``summary()``, or before a checkpoint taken between
        multiples of ``reduce_every``). Otherwise, and once closed, nothing to do (returns 0)."""
        if self._closed:
            return 0  # close() recorded the queued steps as skipped; nothing is queued any more
        self._adopt_shadow_steps()
        sync = getattr(self.probe, "synchronize", None)
        return int(sync()) if sync is not None else 0

    @property
    def unreduced(self) -> int:
        """Steps recorded on this rank whose statistics await the next reduction across ranks (DDP/FSDP
        with ``reduce_every`` > 1; values do not include them yet). 0 on one process."""
        self._adopt_shadow_steps()
        return sum(1 for e in self._pending if not e.stats.ready)

    def _flush(self) -> None:
        self._adopt_shadow_steps()
        if not self._pending:
            return
        # only steps whose reduction across ranks was issued (the same steps on every rank)
        n = 0
        while n < len(self._pending) and self._pending[n].stats.ready:
            n += 1
        if n == 0:
            return
        entries, self._pending = self._pending[:n], self._pending[n:]
        rows = self._read(entries)
        G = len(self.groups)
        grouped = self.groups.grouped
        ranks = getattr(self.probe, "world_size", 1)
        for e, v, loss in rows:
            ex = float(v[EXAMPLES])
            if math.isfinite(ex):
                self._examples += ex
            record: dict[str, Any] = {
                "type": "step",
                "step": e.step,
                "examples": self._examples if math.isfinite(ex) else None,
            }
            if loss is not None:
                record["loss"] = loss
            a2, a2b = float(v[SUM_A2]), float(v[SUM_A2_OVER_B])
            sq_parts, sq_total = float(v[HEAD : HEAD + G].sum()), float(v[HEAD + G :].sum())
            record.update(
                parts=float(v[PARTS]),
                ranks=float(v[RANKS]),
                sum_a2=a2,
                sum_a2_over_b=a2b,
                sq_parts=sq_parts,
                sq_total=sq_total,
            )
            g2, ts, status, reason = step_estimates(v, G, ranks)
            if e.stats.reason is not None:
                status, reason = "unmeasurable", e.stats.reason
            if status == "measured":
                g2_t, ts_t = float(g2.sum()), float(ts.sum())
                # the effective App. A.1 pair of the step (see estimators.step_estimates)
                record.update(
                    g2_step=g2_t,
                    trace_sigma_step=ts_t,
                    b_simple_step=ts_t / g2_t if g2_t > 0 and ts_t >= 0 else None,
                    b_small=a2 / a2b,
                    b_big=1.0 / a2b,
                    sq_small=sq_parts / a2,
                    sq_big=sq_total,
                )
                if e.step <= self.warmup or self._examples <= self.warmup_examples:
                    self._warmup_steps += 1
                    record.update(status="warmup", reason="in the warm-up (warmup=/warmup_examples=): not averaged")
                else:
                    held = len(self._avg.filter.held) if self._avg.filter is not None else 0
                    if grouped:
                        fold = self._avg.fold(np.concatenate([[g2_t], g2]), np.concatenate([[ts_t], ts]))
                    else:
                        fold = self._avg.fold(g2_t, ts_t)
                    if fold == "outlier":
                        record.update(
                            status="outlier",
                            reason=(
                                "held out: far from the recent steps (more than 50 median absolute deviations); "
                                "dropped as a transient unless the next steps agree"
                            ),
                        )
                    else:
                        self._measured += 1 + (held if fold == "restart" else 0)
                        # restart: held steps became the average; drift: the average restarted from
                        # the last steps because the run had moved away from it (ema.RobustAverage)
                        record.update(status="measured", restart=fold == "restart", drift=fold == "drift")
            else:
                if status == "skipped":
                    self._skipped += 1
                    reason = f"step {e.step}: {reason}"
                    if reason not in self._warned and "non-finite" not in (reason or ""):
                        self._warned.add(reason)
                else:
                    self._unmeasurable += 1
                self._last_reason = reason
                record.update(status=status, reason=reason, sq_small=sq_parts / a2 if a2 > 0 else None, sq_big=sq_total)
            total = self._ema.series(0)
            est = Estimate(total)
            iv = est.interval(0.95)
            record.update(
                b_simple=est.b_simple,
                b_simple_low=iv[0] if iv else None,
                b_simple_high=iv[1] if iv else None,
                g2=est.g2,
                trace_sigma=est.trace_sigma,
                n_eff=total.n_eff,
            )
            if self._hessian is not None:
                self._fold_hessian(e, record)
            self._folded_step = e.step
            if grouped:
                for i, name in enumerate(self.groups.names):
                    gst = Estimate(self._ema.series(i + 1))
                    record[f"group/{name}/b_simple"] = gst.b_simple
                    record[f"group/{name}/g2"] = gst.g2
                    record[f"group/{name}/trace_sigma"] = gst.trace_sigma
            self._history.append(record)
            for sub in self._subscribers:
                sub.records.append(record)

    def _drop_unreduced(self) -> None:
        """At ``close()``: record the steps still awaiting a reduction across ranks as skipped, with the
        reason (``close()`` is not a collective, so it cannot reduce them)."""
        self._adopt_shadow_steps()
        k = getattr(self.probe, "reduce_every", 1)
        for e in self._pending:
            reason = (
                f"step {e.step}: not reduced across ranks before close() (one reduction every reduce_every={k} "
                "steps); call gns.synchronize() on every rank before close() to include the last steps"
            )
            self._skipped += 1
            self._last_reason = reason
            self._folded_step = e.step
            record = {"type": "step", "step": e.step, "examples": None, "status": "skipped", "reason": reason}
            self._history.append(record)
            for sub in self._subscribers:
                sub.records.append(record)
        self._pending = []

    def _fold_hessian(self, e: _Entry, record: dict[str, Any]) -> None:
        h = self._hessian
        assert h is not None
        d = e.hessian
        if d is not None:
            record.update(gHg_draw=d.gHg, trace_h_sigma_draw=d.trace_h_sigma, g2_draw=d.g2, hessian_seconds=d.seconds)
            if e.step <= self.warmup or self._examples <= self.warmup_examples:
                record["hessian_status"] = "warmup"
            elif math.isfinite(d.gHg) and math.isfinite(d.trace_h_sigma) and math.isfinite(d.g2):
                h.update(d)
                record["hessian_status"] = "measured"
            else:
                record["hessian_status"] = "skipped"
        iv = h.b_noise_interval(0.95)
        record.update(
            b_noise=h.b_noise,
            b_noise_low=iv[0] if iv else None,
            b_noise_high=iv[1] if iv else None,
            eps_max=h.eps_max,
            gHg=h.gHg,
            trace_h_sigma=h.trace_h_sigma,
        )

    def _read(self, entries: list[_Entry]) -> list[tuple[_Entry, np.ndarray, float | None]]:
        """Every queued vector and loss, waited for and read with one transfer per device."""
        for e in entries:
            if e.stats.work is not None:
                e.stats.work.wait()
                e.stats.work = None
        by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
        for j, e in enumerate(entries):
            by_device.setdefault(e.stats.vec.device, []).append((2 * j, e.stats.vec))
            if isinstance(e.loss, torch.Tensor):
                by_device.setdefault(e.loss.device, []).append((2 * j + 1, e.loss.reshape(1)))
        values: dict[int, np.ndarray] = {}
        for items in by_device.values():
            flat = torch.cat([t.to(torch.float64) for _, t in items]).cpu().numpy()
            self.device_reads += 1
            off = 0
            for key, t in items:
                values[key] = flat[off : off + t.numel()]
                off += t.numel()
        return [
            (e, values[2 * j], float(values[2 * j + 1][0]) if 2 * j + 1 in values else e.loss)
            for j, e in enumerate(entries)
        ]

    # -- reading -----------------------------------------------------------------------

    @property
    def history(self) -> deque[dict[str, Any]]:
        """The last 10000 step records, one per ``step()`` (what the run log writes): ``step``,
        ``examples``, ``status`` (``"measured"``, ``"skipped"`` or ``"unmeasurable"`` with a
        ``reason``); the step's summed statistics (``parts``, ``ranks``, ``sum_a2``,
        ``sum_a2_over_b``, ``sq_parts``, ``sq_total``: see :class:`~noisescale.estimators.StepStats`);
        its App. A.1 pair ``sq_small`` at ``b_small`` and ``sq_big`` at ``b_big`` and own estimates
        ``g2_step``, ``trace_sigma_step``; and the averages after it (``b_simple``, its interval, ...)."""
        self._flush()
        return self._history

    @property
    def examples(self) -> float:
        """Examples (in :attr:`unit`) seen so far, over all ranks for the distributed methods."""
        self._flush()
        return self._examples

    @property
    def b_simple(self) -> float | None:
        """Smoothed ``B_simple`` in :attr:`unit`; ``None`` while undefined (see :attr:`reason`)."""
        self._flush()
        return self._ema.b_simple

    @property
    def g2(self) -> float | None:
        """Smoothed unbiased estimate of ``|G|^2``."""
        self._flush()
        return self._ema.g2

    @property
    def trace_sigma(self) -> float | None:
        """Smoothed unbiased estimate of ``tr(Sigma)`` (per-example covariance)."""
        self._flush()
        return self._ema.trace_sigma

    @property
    def measured(self) -> int:
        """Steps whose measurement was averaged in."""
        self._flush()
        return self._measured

    @property
    def skipped(self) -> int:
        """Steps skipped because a squared norm was NaN or inf (overflow, NaN loss) or a rank failed."""
        self._flush()
        return self._skipped

    @property
    def unmeasurable(self) -> int:
        """Steps with nothing to compare (e.g. a single micro-batch)."""
        self._flush()
        return self._unmeasurable

    @property
    def n_eff(self) -> float:
        """Effective number of measured steps in the average."""
        self._flush()
        return self._ema.state.n_eff

    @property
    def reason(self) -> str | None:
        """Why :attr:`b_simple` is ``None`` (``None`` when it is defined)."""
        self._flush()
        if self._measured == 0:
            if self._skipped or self._unmeasurable:
                return (
                    f"no step measured yet ({self._skipped} skipped, {self._unmeasurable} "
                    f"unmeasurable); last: {self._last_reason}"
                )
            return "no step() has been recorded yet"
        return self._ema.reason()

    def interval(self, level: float = 0.95) -> tuple[float, float] | None:
        """Confidence interval ``(low, high)`` for ``b_simple`` (Fieller; ``high`` may be ``inf``).

        ``None`` until at least 3 steps have been measured.
        """
        self._flush()
        return self._ema.interval(level)

    @property
    def b_noise(self) -> float | None:
        """Smoothed ``B_noise = tr(H Sigma)/(G^T H G)`` in :attr:`unit` (eq. 2.8; ``hessian_every=``);
        ``None`` while undefined (see :attr:`b_noise_reason`)."""
        self._flush()
        return None if self._hessian is None or self._hessian_failed else self._hessian.b_noise

    @property
    def eps_max(self) -> float | None:
        """Smoothed ``eps_max = |G|^2/(G^T H G)`` (eq. 2.7): the best SGD step for the full-batch
        gradient; ``eps_max/(1 + b_noise/B)`` is the best for batch ``B``."""
        self._flush()
        return None if self._hessian is None or self._hessian_failed else self._hessian.eps_max

    @property
    def b_noise_reason(self) -> str | None:
        """Why :attr:`b_noise` is ``None`` (``None`` when it is defined)."""
        self._flush()
        if self._hessian is None:
            return "B_noise is not measured: pass hessian_every=K and step(closure=...)"
        return self._hessian_failed or self._hessian.reason

    def b_noise_interval(self, level: float = 0.95) -> tuple[float, float] | None:
        """Fieller interval for :attr:`b_noise` (``None`` below 3 draws or while undefined)."""
        self._flush()
        if self._hessian is None or self._hessian_failed:
            return None
        return self._hessian.b_noise_interval(level)

    @property
    def hessian_draws(self) -> int:
        """Hessian draws averaged (``hessian_every=``)."""
        self._flush()
        return 0 if self._hessian is None else self._hessian.count

    @property
    def hessian_seconds(self) -> float:
        """Wall time spent in Hessian draws so far."""
        self._flush()
        return 0.0 if self._hessian is None else self._hessian.seconds

    def _group_estimates(self) -> dict[str, Estimate]:
        if not self.groups.grouped:
            return {"all": Estimate(self._ema.series(0))}
        return {name: Estimate(self._ema.series(i + 1)) for i, name in enumerate(self.groups.names)}

    def by_group(self) -> dict[str, Estimate]:
        """``{group name: Estimate}`` with ``.b_simple``, ``.g2``, ``.trace_sigma``, ``.interval(level)``.

        The groups' ``g2`` and ``trace_sigma`` add up to the total's. Without ``groups=`` there is
        one group, ``"all"``.
        """
        self._flush()
        return self._group_estimates()

    def metrics(self, prefix: str = "gns/", level: float = 0.95) -> dict[str, float]:
        """Flat dict of floats for any logger (``nan`` for undefined values); with ``groups=`` also
        ``<prefix><group>/b_simple``, ``.../b_simple_low``, ``.../b_simple_high``, ``.../g2``,
        ``.../trace_sigma``."""
        self._flush()
        return self._metrics_now(prefix, level)

    def _metrics_now(self, prefix: str, level: float) -> dict[str, float]:
        def f(x: float | None) -> float:
            return math.nan if x is None else float(x)

        def series(est: Estimate, pre: str) -> dict[str, float]:
            iv = est.interval(level)
            return {
                pre + "b_simple": f(est.b_simple),
                pre + "b_simple_low": iv[0] if iv else math.nan,
                pre + "b_simple_high": iv[1] if iv else math.nan,
                pre + "g2": f(est.g2),
                pre + "trace_sigma": f(est.trace_sigma),
            }

        out = series(Estimate(self._ema.series(0)), "")
        out.update(
            {
                "n_eff": self._ema.state.n_eff,
                "steps": float(self.steps),
                "measured": float(self._measured),
                "skipped": float(self._skipped),
                "unmeasurable": float(self._unmeasurable),
                "outliers": float(self.outliers),
                "restarts": float(self._avg.filter.restarts if self._avg.filter is not None else 0),
                "drifts": float(self._avg.drifts),
                "warmup": float(self._warmup_steps),
                # the count is named by its unit ("examples", "tokens", ...)
                self.unit: float(self._examples),
            }
        )
        out.update(self.probe.metrics())
        if self._hessian is not None:
            h = self._hessian
            ok = self._hessian_failed is None
            ivn = h.b_noise_interval(level) if ok else None
            out.update(
                {
                    "b_noise": f(h.b_noise if ok else None),
                    "b_noise_low": ivn[0] if ivn else math.nan,
                    "b_noise_high": ivn[1] if ivn else math.nan,
                    "eps_max": f(h.eps_max if ok else None),
                    "gHg": f(h.gHg),
                    "trace_h_sigma": f(h.trace_h_sigma),
                    "hessian_draws": float(h.count),
                    "hessian_seconds": h.seconds,
                }
            )
        if self.groups.grouped:
            for name, est in self._group_estimates().items():
                out.update(series(est, name + "/"))
        return {prefix + k: float(v) for k, v in out.items()}

    @property
    def outliers(self) -> int:
        """Steps held out as transients (far from the recent steps; see ``robust=``)."""
        self._flush()
        flt = self._avg.filter
        return 0 if flt is None else flt.outliers + len(flt.held)

    def summary(self, level: float = 0.95) -> str:
        """One human line: ``B_simple = 812 [95%: 640, 1.1e+03] examples (n_eff=199, skipped=0)``,
        with the coverage when not every parameter is measured and the steps held out."""
        b = self.b_simple
        cov = self.probe.metrics().get("coverage", 1.0)
        extra = f", coverage {cov:.0%} of the parameters" if cov < 1.0 else ""
        extra += f", outliers={self.outliers}" if self.outliers else ""
        extra += f", method={self.method}"
        if self.unreduced:
            extra += f", {self.unreduced} steps awaiting the next reduction across ranks"
        if b is None:
            return f"B_simple undefined: {self.reason} ({extra.lstrip(', ')})"
        iv = self.interval(level)
        ivs = f" [{level:.0%}: {iv[0]:.3g}, {iv[1]:.3g}]" if iv else ""
        line = f"B_simple = {b:.4g}{ivs} {self.unit} (n_eff={self.n_eff:.0f}, skipped={self._skipped}{extra})"
        line += self._b_noise_line(level)
        adv = self.advice(level=level)  # a second line: the paper's costs at the batch in use (advice.py)
        return line if adv.reason is not None else f"{line}\n{adv.line()}"

    def _b_noise_line(self, level: float) -> str:
        if self._hessian is None:
            return ""
        bn = self.b_noise
        if bn is None:
            return f"; B_noise undefined: {self.b_noise_reason}"
        iv = self.b_noise_interval(level)
        ivs = f" [{level:.0%}: {iv[0]:.3g}, {iv[1]:.3g}]" if iv else ""
        eps = self.eps_max
        return f"; B_noise = {bn:.4g}{ivs} {self.unit} ({self.hessian_draws} draws" + (
            f", eps_max = {eps:.3g})" if eps is not None else ")"
        )

    def advice(
        self,
        batch_size: float | None = None,
        *,
        factor: float = 1.0,
        dataset_size: float | None = None,
        level: float = 0.95,
    ) -> Any:
        """The paper's predicted ``S(B)/S_min`` and ``E(B)/E_min`` at ``batch_size`` (default: the last
        step's batch) and the recommended batch ``factor x B_simple``: a :class:`noisescale.advice.Advice`
        (``.line()`` for one human line); see :mod:`noisescale.advice`."""
        from .advice import advice_for

        return advice_for(self, batch_size, factor=factor, dataset_size=dataset_size, level=level)

    # -- state -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Numbers and configuration only (no modules, hooks or tensors).

        Under DDP/FSDP the steps since the last reduction across ranks (``unreduced``; none when the
        step number is a multiple of ``reduce_every``) are saved as skipped: this rank alone cannot
        know the other ranks' numbers, and this call is not a collective. The running tracker still
        folds them at the next reduction; a run resumed from the state does not have them.
        """
        self._flush()
        unreduced = self.unreduced
        if unreduced:
            k = getattr(self.probe, "reduce_every", 1)
            msg = (
                f"noisescale: state_dict() at step {self.steps} saves the last {unreduced} steps as skipped: they "
                f"await the next reduction across ranks (every {k} steps). Save at steps that are multiples of "
                f"reduce_every={k}, or call gns.synchronize() on every rank before saving, to keep them"
            )
            if msg not in self._warned:
                self._warned.add(msg)
                warnings.warn(msg, stacklevel=2)
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "method": self.method,
            "unit": self.unit,
            "reduction": self.reduction,
            "groups": list(self.groups.names),
            "preconditioned": self.preconditioned,
            "ema": self._avg.state_dict(),
            "hessian": None
            if self._hessian is None
            else {**self._hessian.state_dict(), "every": self.hessian_every, "failed": self._hessian_failed},
            "counters": {
                "steps": self.steps,
                "measured": self._measured,
                "skipped": self._skipped + unreduced,
                "unmeasurable": self._unmeasurable,
                "warmup": self._warmup_steps,
                "examples": self._examples,
            },
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore averages and counters saved by :meth:`state_dict` (same method, unit, groups, beta).

        Everything is validated before anything is assigned: a bad state raises ``ValueError``
        naming the key and the value, and leaves the tracker as it was. Call it before the first
        ``step()`` of a resumed run: the run log (``log=``) then continues after the saved step.
        """
        if not isinstance(sd, dict) or sd.get("format") != STATE_FORMAT:
            raise ValueError("not a GradientNoiseScale state_dict (missing format='noisescale-tracker')")
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"state_dict version {sd.get('version')!r} is not supported (expected {STATE_VERSION})")
        for key in ("method", "unit", "reduction", "preconditioned"):
            if sd.get(key) != getattr(self, key):
                raise ValueError(
                    f"state_dict was saved with {key}={sd.get(key)!r} but this tracker has "
                    f"{key}={getattr(self, key)!r}; construct the tracker with the same {key}"
                )
        if list(sd.get("groups", [])) != list(self.groups.names):
            raise ValueError(
                f"state_dict was saved with groups {sd.get('groups')!r} but this tracker has "
                f"{self.groups.names!r}; construct the tracker with the same groups="
            )
        counters = _section(sd, "counters")
        c = {k: _number(f"counters.{k}", counters.get(k), integer=True) for k in _COUNTERS}
        c["warmup"] = _number("counters.warmup", counters.get("warmup", 0), integer=True)
        examples = _number("counters.examples", counters.get("examples"))
        ema = _section(sd, "ema")
        beta = _number("ema.beta", ema.get("beta"))
        if not 0 < beta <= 1 or beta != self._ema.beta:
            raise ValueError(
                f"state_dict has ema.beta={ema.get('beta')!r} but this tracker has beta={self._ema.beta!r}; "
                "construct the tracker with the same beta"
            )
        for k in ("count",):
            _number(f"ema.{k}", ema.get(k), integer=True)
        for k in ("weight", "weight_sq"):
            _number(f"ema.{k}", ema.get(k))
        for k in ("g2", "trace_sigma", "m2_g2", "m2_trace_sigma", "c_cross"):
            vals = np.atleast_1d(np.asarray(ema.get(k), dtype=object))
            for v in vals.tolist():
                _number(f"ema.{k}", v, lo=-math.inf)
        fresh = RobustAverage(self._ema.beta, self._ema.size, robust=self._avg.filter is not None)
        try:
            fresh.load_state_dict(ema)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"state_dict section 'ema' is not valid: {e}") from None
        hsd = sd.get("hessian")
        hess = None
        if self._hessian is not None:
            if not isinstance(hsd, dict) or hsd.get("every") != self.hessian_every:
                raise ValueError(
                    f"state_dict was saved with hessian_every={None if not isinstance(hsd, dict) else hsd.get('every')!r} "
                    f"but this tracker has hessian_every={self.hessian_every!r}; construct the tracker with the same "
                    "hessian_every"
                )
            hess = BNoiseAverage(self._hessian.beta)
            try:
                hess.load_state_dict(hsd)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"state_dict section 'hessian' is not valid: {e}") from None
        self._flush()
        self._avg = fresh
        if hess is not None:
            self._hessian = hess
            failed = hsd.get("failed") if isinstance(hsd, dict) else None
            self._hessian_failed = failed if isinstance(failed, str) else None
        self._warmup_steps = c["warmup"]
        self.steps, self._measured, self._skipped = c["steps"], c["measured"], c["skipped"]
        self._unmeasurable, self._examples = c["unmeasurable"], examples
        self._folded_step = self.steps
        resume = getattr(self.probe, "resume_at", None)
        if resume is not None:
            resume(self.steps)  # the distributed probe reduces at multiples of reduce_every from here
        if self._log is not None and self._log.resume_from is None:
            self._log.resume(self.steps)  # continue the existing log after the saved step

    # -- lifetime ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this GradientNoiseScale is closed (its hooks were removed); create a new one")

    def close(self) -> None:
        """Fold pending steps, push them to subscribers, remove every hook, close the run log. Idempotent."""
        if self._closed:
            return
        self._flush()
        self._drop_unreduced()
        if self._subscribers:
            self._notify(list(self._subscribers), final=True)
        self.probe.close()
        self._remove_checks()
        if self._log is not None:
            self._log.close()
        self._closed = True
        self._finalizer.detach()

    def __enter__(self) -> GradientNoiseScale:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GradientNoiseScale(method={self.method!r}, unit={self.unit!r}, steps={self.steps})"
