"""Micro-batch probe: the noise scale from gradient accumulation (McCandlish App. A.1).

With ``k >= 2`` backward passes (micro-batches) per optimizer step, each micro-batch's own
gradient is a small-batch sample and the accumulated ``.grad`` at ``step()`` is the big batch.

How the small-batch norms are taken, without copying any gradient: a tensor hook on every
trainable parameter sees that parameter's gradient *for the current backward pass*, before it
is added into ``.grad`` (for a tied parameter the engine has already summed all its uses, so
the hook sees the true per-micro-batch gradient once). The hook adds ``|g|^2`` into a running
0-d tensor; the first hook of a backward pass queues an engine callback that closes the
micro-batch when the pass ends. Parameters that get no gradient in a pass contribute zero,
which is their true gradient. Nothing is returned from the hooks, so gradients are untouched.

Sizes: a forward pre-hook on the model records the leading dimension of the first input
tensor of every forward pass run with gradients enabled; explicit sizes (examples or tokens)
passed to ``step()`` take precedence.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import torch
from torch.autograd import Variable

from ..estimators import Measurement, pool_parts
from .base import StepContext, check_sizes, infer_batch_size, sq_norm, total_sq_norm

__all__ = ["MicroBatchProbe"]


class MicroBatchProbe:
    """Collects per-micro-batch squared norms and pools them with the accumulated step norm.

    Args:
        model: the module whose forward passes define micro-batches (for size inference).
        params: trainable parameters to measure (unique).
        reduction: ``"mean"`` or ``"sum"``; see :func:`noisescale.estimators.pool_parts`.
        infer_sizes: record batch sizes from forward inputs.
    """

    name = "microbatch"

    def __init__(self, model: torch.nn.Module, params: Sequence[torch.nn.Parameter], *,
                 reduction: str = "mean", infer_sizes: bool = True) -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction
        self.params = list(params)
        self._lock = threading.Lock()
        self._current: torch.Tensor | None = None
        self._callback_queued = False
        self._parts: list[torch.Tensor] = []
        self._sizes_seen: list[int | None] = []
        self._handles: list[Any] = [p.register_hook(self._grad_hook) for p in self.params]
        if infer_sizes:
            self._handles.append(model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))

    # -- hooks -------------------------------------------------------------------------

    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled():
            self._sizes_seen.append(infer_batch_size(args, kwargs))

    def _grad_hook(self, grad: torch.Tensor) -> None:
        term = sq_norm(grad)
        with self._lock:
            if self._current is None:
                self._current = term
            else:
                self._current = self._current + term.to(self._current.device)
            if not self._callback_queued:
                self._callback_queued = True
                Variable._execution_engine.queue_callback(self._end_backward)

    def _end_backward(self) -> None:
        with self._lock:
            if self._current is not None:
                self._parts.append(self._current)
            self._current = None
            self._callback_queued = False

    # -- step --------------------------------------------------------------------------

    def pending_parts(self) -> int:
        """Backward passes seen since the last :meth:`collect`."""
        return len(self._parts)

    def collect(self, ctx: StepContext) -> tuple[Measurement | None, str | None, float | None]:
        parts, self._parts = self._parts, []
        seen, self._sizes_seen = self._sizes_seen, []
        k = len(parts)
        sizes = self._resolve_sizes(ctx.sizes, seen, k)
        examples = float(sum(sizes)) if sizes is not None else None
        if k == 0:
            return None, ("no backward pass reached the measured parameters since the last step(); "
                          "call step() once per optimizer step, after the backward passes"), examples
        if k == 1:
            return None, ("only one backward pass (micro-batch) in this step, so there is no smaller "
                          "batch to compare with: accumulate gradients over >= 2 micro-batches per "
                          "optimizer step, or use method='per_example'"), examples
        if sizes is None:
            raise ValueError(
                f"could not infer the sizes of the {k} micro-batches of this step (saw {len(seen)} "
                f"forward passes with gradients enabled, sizes {seen}); pass them explicitly: "
                f"gns.step(sizes=[...]) with {k} numbers in the tracker's unit"
            )
        grads = [p.grad for p in self.params if p.grad is not None]
        big = total_sq_norm(grads)
        if big is None:
            return None, "no parameter has a .grad at step(): call step() before optimizer.zero_grad()", examples
        dev = big.device if isinstance(big, torch.Tensor) else parts[0].device  # (big: a float on CPU)
        small = torch.stack([x.to(device=dev, dtype=torch.float64) for x in parts])
        m = pool_parts(small * ctx.inv_scale2_small, sizes, big * ctx.inv_scale2_big,
                       reduction=self.reduction, source=self.name)
        return m, None, examples

    @staticmethod
    def _resolve_sizes(given: Sequence[float] | None, seen: list[int | None], k: int) -> list[float] | None:
        if given is not None:
            return check_sizes(given, k)
        if len(seen) == k and all(s is not None for s in seen):
            return [float(s) for s in seen]  # type: ignore[arg-type]
        return None

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._parts = []
        self._sizes_seen = []
        self._current = None
