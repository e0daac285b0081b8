"""``GradientNoiseScale``: the object a training loop holds.

It picks a probe (where the squared norms come from), turns each step's
:class:`~noisescale.estimators.Measurement` into unbiased ``(g2, trace_sigma)`` (App. A.1),
averages them separately (:mod:`noisescale.ema`) and reports ``b_simple`` with an interval.

Device discipline: ``step()`` only queues 0-d tensors; they are read in one host sync when a
value is asked for (``b_simple``, ``metrics()``, ...) or when ``max_pending`` steps have queued.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Sequence

import torch

from .ema import NoiseScaleEMA
from .estimators import Measurement, estimate
from .probes import PROBES, make_probe
from .probes.base import StepContext, trainable_parameters
from .runlog import RunLogWriter

__all__ = ["GradientNoiseScale"]

STATE_FORMAT = "noisescale-tracker"
STATE_VERSION = 1


_WRAPPER_NAMES = {"ddp": "DistributedDataParallel", "fsdp1": "FullyShardedDataParallel",
                  "fsdp2": "fully_shard (FSDP2)"}


def _distributed_wrapper(model: torch.nn.Module) -> str | None:
    """Name of the data-parallel wrapper around ``model`` when more than one rank is running."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    from .probes.distributed import distributed_kind

    kind = distributed_kind(model)
    return _WRAPPER_NAMES[kind] if kind is not None else None


_DISTRIBUTED_METHODS = ("ddp", "ddp_per_example", "fsdp")


def _auto_method(model: torch.nn.Module, params: Sequence[torch.nn.Parameter] | None = None) -> str:
    """The probe ``method="auto"`` picks for ``model``."""
    wrapper = _distributed_wrapper(model)
    if wrapper is not None:  # several ranks: local norms before the reduction, global after
        return "ddp" if wrapper == "DistributedDataParallel" else "fsdp"
    # One device: exact per-example norms (works from one micro-batch per step, lowest variance)
    # when they cover >= 90% of the trainable elements and no batch norm couples the examples.
    from .probes.per_example import auto_method

    return auto_method(model, params)


class _Entry:
    """One ``step()`` waiting to be folded in (its tensors not yet read)."""

    __slots__ = ("step", "examples", "measurement", "reason", "loss")

    def __init__(self, step: int, examples: float | None, measurement: Measurement | None,
                 reason: str | None, loss: Any) -> None:
        self.step, self.examples, self.measurement, self.reason, self.loss = step, examples, measurement, reason, loss


class GradientNoiseScale:
    """Tracks the simple noise scale ``B_simple = tr(Sigma)/|G|^2`` of a training run.

    Call :meth:`step` once per optimizer step, after all backward passes of the step (and after
    ``scaler.unscale_(optimizer)`` when you use a GradScaler) and **before** gradient clipping
    and ``optimizer.zero_grad()``.

    Args:
        model: the module being trained (its trainable parameters are measured).
        method: ``"auto"`` or ``"microbatch"`` (gradient accumulation with >= 2 micro-batches).
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
        log: path of a JSON-lines run log to write (see :mod:`noisescale.runlog`).
        max_pending: steps queued on the device before they are read anyway.
    """

    def __init__(self, model: torch.nn.Module, method: str = "auto", *, beta: float = 0.99,
                 unit: str = "examples", reduction: str = "mean", scaler: Any = None,
                 params: Sequence[torch.nn.Parameter] | None = None,
                 log: str | os.PathLike | None = None, max_pending: int = 64, **probe_options: Any) -> None:
        methods = ("auto",) + tuple(PROBES)
        if method in _DISTRIBUTED_METHODS and method not in PROBES:
            raise NotImplementedError(
                f"method={method!r} needs torch.distributed, which this torch build lacks; use one of {methods}"
            )
        if method not in methods:
            raise ValueError(f"unknown method {method!r}; choose one of {methods}")
        if not isinstance(unit, str) or not unit:
            raise ValueError(f"unit must be a non-empty string such as 'examples' or 'tokens', got {unit!r}")
        if not (isinstance(max_pending, int) and max_pending >= 1):
            raise ValueError(f"max_pending must be a positive integer, got {max_pending!r}")
        wrapper = _distributed_wrapper(model)
        if wrapper is not None and method not in ("auto",) + _DISTRIBUTED_METHODS:
            raise ValueError(
                f"the model is wrapped in {wrapper} with several ranks: method={method!r} would "
                "compare this rank's local norms with the all-reduced gradient and report a wrong "
                "noise scale. Use method='auto' (or 'ddp' / 'fsdp'), which pools every rank's local "
                "norms with the global one."
            )
        if params is None:
            self.params = trainable_parameters(model)
        else:
            seen: dict[int, torch.nn.Parameter] = {}
            for p in params:
                if not isinstance(p, torch.Tensor) or not p.requires_grad:
                    raise ValueError("params= must contain tensors with requires_grad=True")
                seen.setdefault(id(p), p)
            if not seen:
                raise ValueError("params= is empty: give at least one trainable parameter")
            self.params = list(seen.values())
        self.method = _auto_method(model, self.params) if method == "auto" else method
        if probe_options and self.method == "microbatch":
            raise TypeError(f"options {sorted(probe_options)} apply to method='per_example' only, and "
                            f"process_group= to the distributed methods (this tracker uses method={self.method!r})")
        self._explicit = method != "auto"
        self.unit = unit
        self.reduction = reduction
        self.scaler = scaler
        self.max_pending = max_pending
        self._ema = NoiseScaleEMA(beta)
        if method == "auto" and self.method == "per_example":
            # chosen for the user: exclude layers that turn out not to fit (with a warning) rather than raise
            probe_options = {"lenient": True, **probe_options}
        self._probe = make_probe(self.method, model, self.params, reduction=reduction, unit=unit, **probe_options)
        self._pending: list[_Entry] = []
        self.steps = 0
        self._measured = 0  # read through the properties, which fold pending steps first
        self._skipped = 0
        self.unmeasurable = 0
        self._examples = 0.0
        self._last_reason: str | None = None
        self._warned: set[str] = set()
        self._closed = False
        self._log: RunLogWriter | None = None
        if log is not None:
            self._log = RunLogWriter(log, {"unit": unit, "method": self.method, "beta": beta,
                                           "reduction": reduction,
                                           "fields": {"b_simple": f"simple noise scale [{unit}]",
                                                      "g2": "|G|^2 (EMA)", "trace_sigma": "tr(Sigma) (EMA)",
                                                      "examples": f"cumulative batch size [{unit}]"}})

    # -- the loop ----------------------------------------------------------------------

    def step(self, sizes: Sequence[float] | None = None, *, loss: Any = None) -> None:
        """Record this optimizer step.

        Args:
            sizes: size of each micro-batch of this step in the tracker's ``unit`` (default:
                inferred from the model's inputs, in examples).
            loss: optional training loss of the step, kept for the run log and plots
                (a tensor is not read until the log is written).
        """
        self._check_open()
        # examples: this step's count, None if unknown, or a callable when it is only known after a
        # reduction still in flight (distributed probes: the sum over ranks); added up in _flush
        m, reason, examples = self._probe.collect(self._context(sizes))
        self.steps += 1
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
        if m is None:
            self.unmeasurable += 1
            self._last_reason = reason
            if self._explicit and self._measured == 0 and not any(e.measurement for e in self._pending):
                raise ValueError(f"method={self.method!r} cannot measure: {reason}")
            if reason not in self._warned:
                self._warned.add(reason or "")
                warnings.warn(f"noisescale: step {self.steps} not measured: {reason}", stacklevel=2)
        self._pending.append(_Entry(self.steps, examples, m, reason, loss))
        if len(self._pending) >= self.max_pending:
            self._flush()

    def _context(self, sizes: Sequence[float] | None) -> StepContext:
        if sizes is not None and isinstance(sizes, (int, float)):
            raise TypeError(f"sizes must be a sequence with one size per micro-batch, got the number {sizes!r}")
        s = self.scaler
        if s is None or not getattr(s, "is_enabled", lambda: False)():
            return StepContext(sizes)
        scale = s._get_scale_async() if hasattr(s, "_get_scale_async") else None
        if scale is None:
            scale = torch.tensor(float(s.get_scale()), dtype=torch.float64)
        inv2 = scale.detach().to(torch.float64).reciprocal().square()  # a new tensor: update() may mutate the scale
        return StepContext(sizes, inv2, 1.0 if self._grads_unscaled() else inv2)

    def _grads_unscaled(self) -> bool:
        """Whether ``scaler.unscale_`` already ran this step (then ``.grad`` is in true units)."""
        try:
            from torch.amp.grad_scaler import OptState

            states = self.scaler._per_optimizer_states  # type: ignore[union-attr]
            return any(st.get("stage") is OptState.UNSCALED for st in states.values())
        except Exception:  # an unknown scaler: trust the documented call order
            return True

    def _flush(self) -> None:
        if not self._pending:
            return
        entries, self._pending = self._pending, []
        values = _read_scalars(entries)
        for e in entries:
            add = e.examples() if callable(e.examples) else e.examples
            if add is not None:
                self._examples += add
            record: dict[str, Any] = {"type": "step", "step": e.step,
                                      "examples": self._examples if add is not None else None}
            if e.loss is not None:
                record["loss"] = values.get(id(e.loss), e.loss if not isinstance(e.loss, torch.Tensor) else None)
            m = e.measurement
            if m is None:
                record.update(status="unmeasurable", reason=e.reason)
            else:
                small = values.get(id(m.sq_norm_small), m.sq_norm_small)
                big = values.get(id(m.sq_norm_big), m.sq_norm_big)
                g2_t, ts_t = estimate(float(small), m.b_small, float(big), m.b_big)
                if math.isfinite(g2_t) and math.isfinite(ts_t):
                    self._ema.update(g2_t, ts_t)
                    self._measured += 1
                    record.update(status="measured", g2_step=g2_t, trace_sigma_step=ts_t,
                                  b_small=m.b_small, b_big=m.b_big)
                else:
                    self._skipped += 1
                    why = getattr(m, "skip_reason", None)  # a probe may know better than "non-finite"
                    self._last_reason = (f"step {e.step}: {why}" if why else
                                         f"step {e.step} had a non-finite squared gradient norm "
                                         f"(small={small}, big={big}): skipped, not averaged")
                    record.update(status="skipped", reason=self._last_reason)
            if self._log is not None:
                iv = self._ema.interval(0.95)
                record.update(b_simple=self._ema.b_simple, b_simple_low=iv[0] if iv else None,
                              b_simple_high=iv[1] if iv else None, g2=self._ema.g2,
                              trace_sigma=self._ema.trace_sigma, n_eff=self._ema.state.n_eff)
                self._log.write(record)

    # -- reading -----------------------------------------------------------------------

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
        """Steps skipped because a squared norm was NaN or inf (overflow, NaN loss)."""
        self._flush()
        return self._skipped

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
            if self._skipped or self.unmeasurable:
                return (f"no step measured yet ({self._skipped} skipped as non-finite, {self.unmeasurable} "
                        f"unmeasurable); last: {self._last_reason}")
            return "no step() has been recorded yet"
        return self._ema.reason()

    def interval(self, level: float = 0.95) -> tuple[float, float] | None:
        """Confidence interval ``(low, high)`` for ``b_simple`` (Fieller; ``high`` may be ``inf``).

        ``None`` until at least 3 steps have been measured.
        """
        self._flush()
        return self._ema.interval(level)

    def metrics(self, prefix: str = "gns/", level: float = 0.95) -> dict[str, float]:
        """Flat dict of floats for any logger (``nan`` for undefined values)."""
        self._flush()
        nan = math.nan
        iv = self._ema.interval(level)
        b = self._ema.b_simple
        out = {
            "b_simple": b if b is not None else nan,
            "b_simple_low": iv[0] if iv else nan,
            "b_simple_high": iv[1] if iv else nan,
            "g2": self._ema.g2 if self._ema.g2 is not None else nan,
            "trace_sigma": self._ema.trace_sigma if self._ema.trace_sigma is not None else nan,
            "n_eff": self._ema.state.n_eff,
            "steps": float(self.steps),
            "measured": float(self._measured),
            "skipped": float(self._skipped),
            "unmeasurable": float(self.unmeasurable),
            "examples": float(self.examples),
        }
        out.update(getattr(self._probe, "metrics", dict)())  # e.g. per_example: coverage fraction
        return {prefix + k: float(v) for k, v in out.items()}

    def summary(self, level: float = 0.95) -> str:
        """One human line: ``B_simple = 812 [95%: 640, 1.1e+03] examples``."""
        b = self.b_simple
        if b is None:
            return f"B_simple undefined: {self.reason}"
        iv = self.interval(level)
        ivs = f" [{level:.0%}: {iv[0]:.3g}, {iv[1]:.3g}]" if iv else ""
        return f"B_simple = {b:.4g}{ivs} {self.unit} (n_eff={self.n_eff:.0f}, skipped={self._skipped})"

    # -- state -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Numbers and configuration only (no modules, hooks or tensors)."""
        self._flush()
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION, "method": self.method, "unit": self.unit,
            "reduction": self.reduction, "ema": self._ema.state_dict(),
            "counters": {"steps": self.steps, "measured": self._measured, "skipped": self._skipped,
                         "unmeasurable": self.unmeasurable, "examples": self.examples},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore averages and counters saved by :meth:`state_dict` (same method and unit)."""
        if not isinstance(sd, dict) or sd.get("format") != STATE_FORMAT:
            raise ValueError("not a GradientNoiseScale state_dict (missing format='noisescale-tracker')")
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"state_dict version {sd.get('version')!r} is not supported (expected {STATE_VERSION})")
        for key in ("method", "unit", "reduction"):
            if sd.get(key) != getattr(self, key):
                raise ValueError(f"state_dict was saved with {key}={sd.get(key)!r} but this tracker has "
                                 f"{key}={getattr(self, key)!r}; construct the tracker with the same {key}")
        self._flush()
        self._ema.load_state_dict(sd["ema"])
        c = sd["counters"]
        self.steps, self._measured, self._skipped = int(c["steps"]), int(c["measured"]), int(c["skipped"])
        self.unmeasurable, self._examples = int(c["unmeasurable"]), float(c["examples"])

    # -- lifetime ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this GradientNoiseScale is closed (its hooks were removed); create a new one")

    def close(self) -> None:
        """Fold pending steps, remove every hook and close the run log. Idempotent."""
        if self._closed:
            return
        self._flush()
        self._probe.close()
        if self._log is not None:
            self._log.close()
        self._closed = True

    def __enter__(self) -> "GradientNoiseScale":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GradientNoiseScale(method={self.method!r}, unit={self.unit!r}, steps={self.steps})"


def _read_scalars(entries: list[_Entry]) -> dict[int, float]:
    """Read every 0-d tensor queued in ``entries`` with one transfer per device."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for e in entries:
        ts = [e.loss] if isinstance(e.loss, torch.Tensor) else []
        if e.measurement is not None:
            ts += [x for x in (e.measurement.sq_norm_small, e.measurement.sq_norm_big) if isinstance(x, torch.Tensor)]
        for t in ts:
            by_device.setdefault(t.device, []).append(t)
    out: dict[int, float] = {}
    for ts in by_device.values():
        vals = torch.stack([t.reshape(()).to(torch.float64) for t in ts]).tolist()
        out.update({id(t): v for t, v in zip(ts, vals)})
    return out
