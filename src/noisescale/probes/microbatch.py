"""Micro-batch probe: the noise scale from gradient accumulation (McCandlish App. A.1).

With ``k >= 2`` backward passes (micro-batches) per optimizer step, each micro-batch's own
gradient is a small-batch sample and the accumulated ``.grad`` at ``step()`` is the big batch.

How the small-batch norms are taken, without copying any gradient: a tensor hook on every
trainable parameter sees that parameter's gradient *for the current backward pass*, before it
is added into ``.grad`` (for a tied parameter the engine has already summed all its uses, so
the hook sees the true per-micro-batch gradient once). The hook takes ``|P g|^2`` (``P`` the
preconditioner's weights, if any) for the parameter's group; the first hook of a backward pass
arms an end-of-backward callback that closes the micro-batch and captures the accumulated
``.grad``'s norm per group (so that clipping before ``step()`` changes nothing). Parameters that
get no gradient in a pass contribute zero, which is their true gradient. Nothing is returned
from the hooks, so gradients are untouched.

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
    check_single_process,
    check_sizes,
    group_sums,
    infer_batch_size,
    sq_norm,
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
        self._terms: list[torch.Tensor] = []
        self._index: list[int] = []
        self._parts: list[torch.Tensor] = []  # one [G] float64 vector per closed backward pass
        self._hooked = 0  # parameters whose gradient arrived in the open pass
        self._had_grad = False  # one of them already had a .grad when it arrived
        self._sizes_seen: list[int | None] = []
        self._total = StepTotal(
            [(p, None, None, True) for p in self.params], self.groups, self.preconditioner, self.device
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
            term = sq_norm(grad, pre.weight(p) if pre is not None else None)
            with self._lock:
                self._terms.append(term)
                self._index.append(gi)
                self._hooked += 1
                if p.grad is not None:  # (AccumulateGrad has not run yet: .grad is what came before)
                    self._had_grad = True
            self._end.arm()

        return hook

    def _end_backward(self) -> None:
        with self._lock:
            terms, index, self._terms, self._index = self._terms, self._index, [], []
            hooked, had_grad, self._hooked, self._had_grad = self._hooked, self._had_grad, 0, False
        part = group_sums(terms, index, len(self.groups), self.device) if terms else None
        first = not self._parts
        if part is not None:
            self._parts.append(part)
        if first and part is not None and not had_grad and sum(p.grad is not None for p in self.params) == hooked:
            # The step's first pass into cleared gradients (zero_grad(set_to_none=True)): .grad is
            # exactly this pass's gradient, whose norms the hooks just took. No second read of it.
            self._total.set(part)
        else:
            self._total.capture()

    # -- step --------------------------------------------------------------------------

    def pending_parts(self) -> int:
        """Backward passes seen since the last :meth:`collect`."""
        return len(self._parts)

    def metrics(self) -> dict[str, float]:
        return {"coverage": 1.0}

    def collect(self, ctx: StepContext) -> StepStats:
        parts, self._parts = self._parts, []
        seen, self._sizes_seen = self._sizes_seen, []
        if self.preconditioner is not None:
            self.preconditioner.stale = True  # the optimizer updates its state before the next step
        k = len(parts)
        sizes = self._resolve_sizes(ctx.sizes, seen, k)
        total = self._total.take(ctx)
        G = len(self.groups)
        if k < 2:
            reason = self._why_unmeasurable(k)
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
        small = torch.stack(parts).sum(0)  # (k >= 2 here)
        return make_step_stats(small * ctx.inv_scale2_small, total, sizes, reduction=self.reduction, device=self.device)

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
