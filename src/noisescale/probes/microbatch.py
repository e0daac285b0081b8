"""Micro-batch probe: the noise scale from gradient accumulation (McCandlish App. A.1).

With ``k >= 2`` backward passes (micro-batches) per optimizer step, each micro-batch's own
gradient is a small-batch sample and the accumulated ``.grad`` at ``step()`` is the big batch.

How the small-batch norms are taken, without copying any gradient: a tensor hook on every
trainable parameter sees that parameter's gradient *for the current backward pass*, before it
is added into ``.grad`` (for a tied parameter the engine has already summed all its uses, so
the hook sees the true per-micro-batch gradient once). The hook takes ``|P g|^2`` (``P`` the
preconditioner's weights, if any) for the parameter's group; the first hook of a backward pass
arms an end-of-backward callback that closes the micro-batch. Parameters that get no gradient in
a pass contribute zero, which is their true gradient. Nothing is returned from the hooks, so
gradients are untouched.

The step gradient ``V`` (the accumulated ``.grad``) is read once per step, at the end of the pass
that is expected to be the step's last (the previous step's pass count ``k``, and every pass of
the first step): its norm is then what it was when backward ended, so clipping or unscaling
before ``step()`` changes nothing. A step with more passes is read again at its later passes. A
step with fewer passes is read at ``step()``, which is exact when no ``.grad`` changed since its
last pass ended (version counters tell); if one did (the user clipped a short step, e.g. an
epoch's tail), that step is skipped with the reason and steps of that length are read at their
last pass from then on. Reading ``V`` after every pass instead would cost ``k - 1`` extra reads of
every gradient per step. A step's first pass is never read: a step of one pass is not measured.

Sizes: a forward pre-hook on the model records the leading dimension of the first input
tensor of every forward pass run with gradients enabled; explicit sizes (examples or tokens)
passed to ``step()`` take precedence.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ..estimators import StepStats, make_step_stats
from .base import (
    EndOfBackward,
    Hook,
    ProbeConfig,
    StepContext,
    StepTotal,
    Sums,
    _sq_norm_term,
    add_sums,
    check_single_process,
    check_sizes,
    infer_batch_size,
    pass_sums,
    scaled_sums,
)

__all__ = ["MicroBatchProbe"]


class MicroBatchProbe:
    """Collects per-micro-batch squared norms (per group) and the accumulated step's norm.

    Args:
        model: the module whose forward passes define micro-batches (for size inference).
        params: trainable parameters to measure (unique).
        config: reduction, unit, groups and preconditioner (:class:`~noisescale.probes.base.ProbeConfig`).
    """

    name = "microbatch"
    options: ClassVar[frozenset[str]] = frozenset()
    supports: ClassVar[frozenset[str]] = frozenset({"groups", "preconditioner"})
    world_size = 1

    @staticmethod
    def applicable(model: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> str | None:
        return check_single_process(model, "microbatch")

    @staticmethod
    def auto_score(model: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> float:
        return 1.0  # works on any single-process model with gradient accumulation: the fallback

    @classmethod
    def from_config(
        cls, model: torch.nn.Module, params: Sequence[torch.nn.Parameter], config: ProbeConfig
    ) -> MicroBatchProbe:
        return cls(model, params, config)

    def __init__(
        self, model: torch.nn.Module, params: Sequence[torch.nn.Parameter], config: ProbeConfig | None = None
    ) -> None:
        self.config = config = config or ProbeConfig()
        if config.reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {config.reduction!r}")
        self.reduction = config.reduction
        self.params = list(params)
        self.groups = config.resolved_groups(model, params)
        self.preconditioner = config.preconditioner
        self.device = self.params[0].device
        self._lock = threading.Lock()
        self._terms: list[torch.Tensor | float] = []
        self._index: list[int] = []
        self._parts: list[Sums] = []  # per-group sums of each closed backward pass
        self._sizes_seen: list[int | None] = []
        self._expect: int | None = None  # passes the step is expected to have (the last step's); None: unknown
        self._read_at: set[int] = set()  # pass counts of short steps that lost V to an in-place change: read them
        self._total = StepTotal(
            [(p, None, None, True) for p in self.params],
            self.groups,
            self.preconditioner,
            self.device,
            host=self.device.type == "cpu",
        )
        self._end = EndOfBackward(self._end_backward)
        self._batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        self._handles: list[Any] = [p.register_hook(Hook(self._make_hook(p))) for p in self.params]
        if config.infer_sizes:
            self._handles.append(model.register_forward_pre_hook(Hook(self._pre_forward), with_kwargs=True))

    # -- hooks -------------------------------------------------------------------------

    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled():
            self._sizes_seen.append(infer_batch_size(args, kwargs))

    def _make_hook(self, p: torch.nn.Parameter) -> Any:
        gi = self.groups.index(p)
        pre = self.preconditioner

        def hook(grad: torch.Tensor) -> None:
            # this pass's gradient of p, before it is added into .grad (for a tied parameter the
            # engine has already summed its uses); nothing is returned: the gradient is untouched
            term = _sq_norm_term(grad, pre.weight(p) if pre is not None else None)
            with self._lock:
                self._terms.append(term)
                self._index.append(gi)
            self._end.arm()

        return hook

    def _end_backward(self) -> None:
        with self._lock:
            terms, index, self._terms, self._index = self._terms, self._index, [], []
        if terms:
            self._parts.append(pass_sums(terms, index, len(self.groups), self.device))
        n = len(self._parts)  # this pass's number in the step
        if n < 2:
            # a step of one pass is not measured, and a longer one reads V at a later pass
            self._total.clear()
        elif self._expect is None or n >= self._expect or n in self._read_at:
            self._total.capture()  # (possibly) the step's last pass: read V as backward left it
        else:
            self._total.mark()  # not expected to be the last: read at step() if nothing changes .grad

    # -- step --------------------------------------------------------------------------

    def expect_passes(self, n: int) -> None:
        """The optimizer step in progress has ``n`` backward passes: read the step gradient at the end
        of the ``n``-th (instead of the previous step's count). Call it before that pass ends."""
        self._expect = n

    def pending_parts(self) -> int:
        """Backward passes seen since the last :meth:`collect`."""
        return len(self._parts)

    def metrics(self) -> dict[str, float]:
        return {"coverage": 1.0}

    def collect(self, ctx: StepContext) -> StepStats:
        parts, self._parts = self._parts, []
        seen, self._sizes_seen = self._sizes_seen, []
        k = len(parts)
        lost = k >= 2 and self._total.changed()  # (only where V's read was deferred to step(): see mark)
        total: Sums | None = None
        if k >= 2 and not lost:
            total = self._total.take_sums(ctx)  # (a deferred read weighs by this step's preconditioner)
        else:
            self._total.clear()
        if self.preconditioner is not None:
            self.preconditioner.stale = True  # the optimizer updates its state before the next step
        sizes = self._resolve_sizes(ctx.sizes, seen, k)
        expected, self._expect = self._expect, (k if k else self._expect)
        G = len(self.groups)
        if total is None:
            if k < 2:
                reason = self._why_unmeasurable(k)
            else:
                self._read_at.add(k)
                reason = (
                    f"a .grad was changed (clipping, or another in-place edit) between this step's last backward pass "
                    f"and step(), in a step of {k} passes where {expected} were expected, so |V|^2 as backward "
                    f"left it is unknown; steps of {k} passes are read at their last pass from now on"
                )
            ex = float(sum(sizes)) if sizes is not None else float("nan")
            st = make_step_stats([0.0] * G, [0.0] * G, [1.0], parts=k, examples=ex, device=self.device)
            st.reason = reason
            return st
        if sizes is None:
            raise ValueError(
                f"could not infer the sizes of the {k} micro-batches of this step (saw {len(seen)} "
                f"forward passes with gradients enabled, sizes {seen}); pass them explicitly: "
                f"gns.step(sizes=[...]) with {k} numbers in the tracker's unit"
            )
        small = scaled_sums(add_sums(parts, self.device), ctx.inv_scale2_small, self.device)
        return make_step_stats(small, total, sizes, reduction=self.reduction, device=self.device)

    def _why_unmeasurable(self, k: int) -> str:
        if k == 0:
            return (
                "no backward pass reached the measured parameters since the last step(); call step() once per "
                "optimizer step, after the backward passes"
            )
        bn = [type(m).__name__ for m in self._batch_norms if m.training]
        # per-example norms are wrong under batch norm in training mode: do not send the user there
        other = (
            (
                f"(batch norm in training mode, {', '.join(bn)}, rules out per-example norms: accumulate, or "
                "measure in eval mode at a checkpoint with ns.measure)"
            )
            if bn
            else "or use method='per_example'"
        )
        return (
            "only one backward pass (micro-batch) in this step, so there is no smaller batch to compare with: "
            f"accumulate gradients over >= 2 micro-batches per optimizer step {other}"
        )

    @staticmethod
    def _resolve_sizes(given: Sequence[float] | None, seen: list[int | None], k: int) -> list[float] | None:
        if given is not None:
            return check_sizes(given, k)
        if len(seen) == k and all(s is not None for s in seen):
            return [float(s) for s in seen if s is not None]  # (all are: checked above)
        return None

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._parts = []
        self._sizes_seen = []
        self._terms, self._index = [], []
        self._total.clear()
