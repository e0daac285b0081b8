"""Learning-rate schedules indexed by examples (or tokens) seen, not by optimizer steps.

A warm-up of 1,000 steps tuned at batch 256 means "the first 256,000 examples". When the batch
grows during training (:class:`~noisescale.controller.BatchSizeController`), a step-indexed
schedule would finish that warm-up after 256,000 x (larger batch / 256) examples, and a decay
would end early or late. :class:`ExamplesSchedule` keeps warm-up and decay where they were meant
by making any schedule a function of examples seen:

- a function: ``ExamplesSchedule(optimizer, fn)`` sets each group's learning rate to
  ``base_lr * fn(x)`` with ``x`` the examples seen (or ``examples / reference_batch_size``,
  "reference steps", so that a step-indexed ``lr_lambda`` such as Hugging Face's
  ``get_cosine_schedule_with_warmup`` can be reused as it is);
- any ``torch.optim.lr_scheduler`` scheduler: ``ExamplesSchedule.from_scheduler(optimizer,
  lambda opt: CosineAnnealingLR(opt, T_max=1000), reference_batch_size=256)``. The scheduler runs
  on a shadow optimizer (one placeholder tensor per group, the real groups' hyperparameters), and
  is stepped once per ``reference_batch_size`` examples seen: a step of a 4x larger batch advances
  it 4 steps. The real optimizer's learning rate is copied from the shadow one. This works for
  every scheduler, chainable ones (``StepLR``, ``ExponentialLR``, ``CosineAnnealingLR``) included,
  because the scheduler never sees anything but its own values.

Call :meth:`ExamplesSchedule.step` after each optimizer step with the examples seen so far (the
controller does it for you when you pass ``schedule=``). The learning rate in the optimizer's
``param_groups`` is the schedule's; a batch-size rule's multiplier (the controller's
``lr_scale``) is applied on top of it during ``optimizer.step()`` only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["ExamplesSchedule"]

STATE_FORMAT = "noisescale-examples-schedule"
# hyperparameters a scheduler may cycle (OneCycleLR, CyclicLR) besides the learning rate
_MIRRORED = ("lr", "momentum", "betas")


class _ShadowOptimizer(torch.optim.Optimizer):
    """An optimizer that only holds hyperparameters: a scheduler steps it instead of the real one."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        groups = []
        for g in optimizer.param_groups:
            # one placeholder per group: schedulers read hyperparameters, never parameters
            hyper = {k: _copy(v) for k, v in g.items() if k not in ("params", "initial_lr")}
            groups.append({"params": [torch.zeros(1, requires_grad=True)], **hyper})
        super().__init__(groups, {k: _copy(v) for k, v in optimizer.defaults.items()})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        return None


def _copy(v: Any) -> Any:
    return v.clone() if isinstance(v, torch.Tensor) else v


def _plain(v: Any) -> Any:
    """A hyperparameter as numbers only (state_dict must load with weights_only)."""
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


class ExamplesSchedule:
    """A learning-rate schedule that is a function of the examples seen.

    Args:
        optimizer: the optimizer whose ``param_groups[i]["lr"]`` the schedule sets.
        fn: ``x -> multiplier`` of each group's base learning rate, or one such function per
            group. ``x`` is the examples seen, or ``examples / reference_batch_size`` when that is
            given (then a step-indexed ``lr_lambda`` keeps its meaning at the reference batch).
        reference_batch_size: the batch at which ``fn``'s steps are counted (optional here;
            required by :meth:`from_scheduler`).
        examples: examples already seen (a run that starts mid-way).

    The base learning rates are the groups' ``initial_lr`` (set by a torch scheduler) or ``lr``
    when the schedule is built. The schedule's value at ``examples`` is applied at once.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        fn: Callable[[float], float] | Sequence[Callable[[float], float]] | None,
        *,
        reference_batch_size: float | None = None,
        examples: float = 0.0,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if reference_batch_size is not None and not (
            isinstance(reference_batch_size, (int, float))
            and math.isfinite(reference_batch_size)
            and reference_batch_size > 0
        ):
            raise ValueError(f"reference_batch_size must be a finite positive batch size, got {reference_batch_size!r}")
        self.optimizer = optimizer
        self.reference_batch_size = None if reference_batch_size is None else float(reference_batch_size)
        self.base_lrs = [_copy(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        self._fns: list[Callable[[float], float]] | None = None
        self._scheduler: Any = None
        self._shadow: _ShadowOptimizer | None = None
        self._ref_steps = 0  # scheduler steps taken (from_scheduler)
        if fn is not None:
            fns = list(fn) if isinstance(fn, Sequence) else [fn] * len(optimizer.param_groups)
            if len(fns) != len(optimizer.param_groups) or not all(callable(f) for f in fns):
                raise ValueError(
                    f"fn must be a callable or one callable per param group ({len(optimizer.param_groups)}), got {fn!r}"
                )
            self._fns = fns
        self.examples = 0.0
        self._set_examples(examples)
        if fn is not None:
            self._apply()

    @classmethod
    def from_scheduler(
        cls,
        optimizer: torch.optim.Optimizer,
        make_scheduler: Callable[[torch.optim.Optimizer], Any],
        *,
        reference_batch_size: float,
        examples: float = 0.0,
    ) -> ExamplesSchedule:
        """Any torch scheduler, stepped once per ``reference_batch_size`` examples seen.

        ``make_scheduler(opt)`` must build the scheduler on the optimizer it is given (a shadow
        of ``optimizer`` with the same hyperparameters), e.g. ``lambda opt: LinearLR(opt, 0.1,
        total_iters=100)``. Its steps are steps at ``reference_batch_size``; the learning rate
        changes every ``reference_batch_size`` examples (between them it holds).
        """
        if reference_batch_size is None:
            raise ValueError(
                "from_scheduler needs reference_batch_size: the batch at which the scheduler's steps are counted"
            )
        self = cls(optimizer, None, reference_batch_size=reference_batch_size, examples=0.0)
        self._shadow = _ShadowOptimizer(optimizer)
        sched = make_scheduler(self._shadow)
        if not hasattr(sched, "step") or getattr(sched, "optimizer", None) is not self._shadow:
            raise ValueError(
                "make_scheduler must build a scheduler on the optimizer it is passed (the shadow), e.g. "
                "`lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)`"
            )
        self._scheduler = sched
        self._set_examples(examples)
        self._apply()
        return self

    @property
    def scheduler(self) -> Any:
        """The wrapped torch scheduler (stepping a shadow optimizer), or ``None``."""
        return self._scheduler

    @property
    def reference_steps(self) -> float:
        """Examples seen in steps of ``reference_batch_size`` (what the schedule is indexed by)."""
        return self.examples / self.reference_batch_size if self.reference_batch_size else self.examples

    def _set_examples(self, examples: float) -> None:
        if not (isinstance(examples, (int, float)) and math.isfinite(examples) and examples >= 0):
            raise ValueError(f"examples must be a finite number >= 0 (examples seen so far), got {examples!r}")
        if examples < self.examples:
            raise ValueError(
                f"examples seen cannot go back (from {self.examples:g} to {examples:g}): pass the running total, "
                "or load_state_dict to resume"
            )
        self.examples = float(examples)

    def step(self, examples: float | None = None, *, batch_size: float | None = None) -> None:
        """Move to ``examples`` seen in total, or on by ``batch_size`` examples; set the learning rates."""
        if (examples is None) == (batch_size is None):
            raise ValueError("pass exactly one of examples= (the running total) or batch_size= (this step's examples)")
        if batch_size is not None:
            if not (isinstance(batch_size, (int, float)) and math.isfinite(batch_size) and batch_size >= 0):
                raise ValueError(f"batch_size must be a finite number >= 0, got {batch_size!r}")
            examples = self.examples + float(batch_size)
        assert examples is not None
        self._set_examples(examples)
        self._apply()

    def lrs(self) -> list[float]:
        """The schedule's current learning rate of each group."""
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def _apply(self) -> None:
        groups = self.optimizer.param_groups
        if self._fns is not None:
            x = self.reference_steps
            for g, base, f in zip(groups, self.base_lrs, self._fns):
                m = f(x)
                if not (isinstance(m, (int, float)) and math.isfinite(m) and m >= 0):
                    raise ValueError(f"the schedule's function gave {m!r} at {x:g}: expected a finite multiplier >= 0")
                g["lr"] = base * m
            return
        assert self._shadow is not None and self.reference_batch_size is not None
        target = math.floor(self.examples / self.reference_batch_size + 1e-9)  # a whole number of reference steps
        while self._ref_steps < target:
            self._shadow.step()  # a scheduler warns when stepped before its optimizer
            self._scheduler.step()
            self._ref_steps += 1
        for g, s in zip(groups, self._shadow.param_groups):
            for k in _MIRRORED:
                if k in g and k in s:
                    g[k] = _copy(s[k])

    # -- state -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Numbers only: the examples seen and, for a wrapped scheduler, its state and the shadow's
        hyperparameters (chainable schedulers read them back)."""
        sd: dict[str, Any] = {
            "format": STATE_FORMAT,
            "examples": self.examples,
            "reference_batch_size": self.reference_batch_size,
            "base_lrs": [_plain(b) for b in self.base_lrs],
        }
        if self._scheduler is not None:
            assert self._shadow is not None
            sd["reference_steps"] = self._ref_steps
            sd["scheduler"] = self._scheduler.state_dict()
            sd["shadow_groups"] = [
                {k: _plain(v) for k, v in g.items() if k != "params"} for g in self._shadow.param_groups
            ]
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved into a schedule built the same way, and apply it."""
        if not isinstance(sd, dict) or sd.get("format") != STATE_FORMAT:
            raise ValueError("not an ExamplesSchedule state_dict (missing format='noisescale-examples-schedule')")
        if sd.get("reference_batch_size") != self.reference_batch_size:
            raise ValueError(
                f"state_dict was saved with reference_batch_size={sd.get('reference_batch_size')!r} but this schedule "
                f"has {self.reference_batch_size!r}; build the schedule the same way"
            )
        if ("scheduler" in sd) != (self._scheduler is not None):
            raise ValueError("state_dict and this schedule differ in kind (a function vs a wrapped torch scheduler)")
        examples = sd.get("examples")
        if not (isinstance(examples, (int, float)) and math.isfinite(examples) and examples >= 0):
            raise ValueError(f"state_dict entry examples={examples!r} is not a finite number >= 0")
        base = sd.get("base_lrs")
        if not isinstance(base, list) or len(base) != len(self.base_lrs):
            raise ValueError(f"state_dict has base_lrs={base!r}; expected one per param group ({len(self.base_lrs)})")
        if self._scheduler is not None:
            assert self._shadow is not None
            shadow = sd.get("shadow_groups")
            if not isinstance(shadow, list) or len(shadow) != len(self._shadow.param_groups):
                raise ValueError("state_dict's shadow_groups do not match this optimizer's param groups")
            self._scheduler.load_state_dict(sd["scheduler"])
            for g, saved in zip(self._shadow.param_groups, shadow):
                for k, v in saved.items():
                    g[k] = tuple(v) if isinstance(g.get(k), tuple) else v
            self._ref_steps = int(sd["reference_steps"])
        self.base_lrs = list(base)
        self.examples = float(examples)
        self._apply()
