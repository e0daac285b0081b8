"""``measure()``: a careful one-shot estimate of the noise scale at fixed parameters.

For analysing a checkpoint: many independent draws at the same ``theta``, averaged with equal
weights (``beta = 1``), with an interval. Nothing the user had is changed: parameters are never
updated, ``.grad`` and buffers (e.g. BatchNorm running statistics) are restored exactly, and the
global RNG streams are forked so that dropout draws here do not shift the user's random stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .tracker import GradientNoiseScale

__all__ = ["measure", "MeasureResult", "split_batch"]


@dataclass
class MeasureResult:
    """Result of :func:`measure`. ``b_simple`` is ``None`` with ``reason`` set when undefined."""

    b_simple: float | None
    g2: float | None
    trace_sigma: float | None
    n: int
    skipped: int
    unit: str
    method: str
    reason: str | None
    coverage: float = 1.0  # fraction of the parameters' elements measured (per-example norms may cover fewer)
    _tracker_state: dict[str, Any] = field(repr=False, default_factory=dict)

    def interval(self, level: float = 0.95) -> tuple[float, float] | None:
        """Fieller interval for ``b_simple`` over the ``n`` draws."""
        from .ema import NoiseScaleEMA

        ema = NoiseScaleEMA(1.0)
        ema.load_state_dict(self._tracker_state["ema"])
        return ema.interval(level)


def split_batch(batch: Any, k: int) -> list[Any]:
    """Split a batch (tensor, or tuple/list/dict of tensors sharing dim 0) into ``k`` parts."""
    if isinstance(batch, torch.Tensor):
        n = batch.shape[0] if batch.dim() else 0
        if n < k:
            raise ValueError(
                f"a batch of {n} examples cannot be split into {k} micro-batches; "
                "use larger batches or fewer micro_batches"
            )
        return list(torch.tensor_split(batch, k, dim=0))
    if isinstance(batch, (tuple, list)):
        cols = [split_batch(x, k) if isinstance(x, (torch.Tensor, tuple, list, dict)) else [x] * k for x in batch]
        return [type(batch)(c[j] for c in cols) if isinstance(batch, tuple) else [c[j] for c in cols] for j in range(k)]
    if isinstance(batch, dict):
        cols_d = {
            key: split_batch(v, k) if isinstance(v, (torch.Tensor, tuple, list, dict)) else [v] * k
            for key, v in batch.items()
        }
        return [{key: c[j] for key, c in cols_d.items()} for j in range(k)]
    raise TypeError(
        f"cannot split a batch of type {type(batch).__name__}; give tensors, "
        "or tuples/lists/dicts of tensors with the batch on dim 0"
    )


def measure(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    batches: Iterable[Any],
    *,
    method: str = "microbatch",
    micro_batches: int = 4,
    sizes: Callable[[Any], float] | None = None,
    unit: str = "examples",
    params: Sequence[torch.nn.Parameter] | None = None,
) -> MeasureResult:
    """Estimate ``b_simple`` of ``model`` at its current parameters.

    Args:
        model: the module; left exactly as it was (parameters, ``.grad``, buffers, RNG).
        loss_fn: ``loss_fn(model, batch) -> scalar loss``, a *mean* over the batch's examples.
        batches: independent batches (e.g. a shuffled ``DataLoader``); one draw per batch. The
            more draws, the tighter the interval.
        method: ``"microbatch"``: each batch is split into ``micro_batches`` equal parts whose
            gradients are the small batches and whose sum is the big batch. ``"per_example"``:
            one backward pass per batch; its exact per-example gradient norms are the small
            batches (``b_small = 1``, the lowest-variance choice) and the batch gradient the big one.
        micro_batches: parts per batch (>= 2).
        sizes: optional ``sizes(micro_batch) -> size`` for units other than examples
            (e.g. the number of non-padding tokens).
        unit: the unit of batch sizes, carried into the result.
        params: measure only these parameters (default: all trainable).
    """
    if method not in ("microbatch", "auto", "per_example"):
        raise ValueError(f"measure() supports method='microbatch' or 'per_example', got {method!r}")
    per_example = method == "per_example"
    if not (isinstance(micro_batches, int) and micro_batches >= 2):
        raise ValueError(
            f"micro_batches must be an integer >= 2 (small batches to compare with the "
            f"whole batch), got {micro_batches!r}"
        )
    if unit != "examples" and sizes is None:
        raise ValueError(f"unit={unit!r} needs sizes=: a function giving each micro-batch's size in {unit}")
    tracked = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    saved_grads = [p.grad for p in tracked]
    saved_buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index for p in tracked if p.device.type == "cuda" and p.device.index is not None})
    # the plain mean of independent draws at fixed parameters: nothing to hold out as a transient
    gns = GradientNoiseScale(
        model, "per_example" if per_example else "microbatch", beta=1.0, unit=unit, params=params, robust=False
    )
    try:
        with torch.random.fork_rng(devices=devices):
            for p in tracked:
                p.grad = None
            for batch in batches:
                parts = [batch] if per_example else split_batch(batch, micro_batches)
                for part in parts:
                    loss = loss_fn(model, part)
                    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                        raise TypeError(
                            f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                            f"{' of shape ' + str(tuple(loss.shape)) if isinstance(loss, torch.Tensor) else ''}"
                        )
                    (loss / len(parts)).backward()
                gns.step([float(sizes(p)) for p in parts] if sizes is not None else None)
                for p in tracked:
                    p.grad = None
        if gns.steps == 0:
            raise ValueError("batches was empty: measure() needs at least 3 batches (draws)")
        sd = gns.state_dict()
        return MeasureResult(
            b_simple=gns.b_simple,
            g2=gns.g2,
            trace_sigma=gns.trace_sigma,
            n=gns.measured,
            skipped=gns.skipped,
            unit=unit,
            method=gns.method,
            reason=gns.reason,
            coverage=float(gns.probe.metrics().get("coverage", 1.0)),
            _tracker_state=sd,
        )
    finally:
        gns.close()
        with torch.no_grad():
            for b, v in saved_buffers:
                b.copy_(v)
        for p, g in zip(tracked, saved_grads):
            p.grad = g
