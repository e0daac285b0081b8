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

from .hessian import BNoiseAverage, hessian_draw
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
    # with hessian=True (None otherwise): B_noise = tr(H Sigma)/(G^T H G) and eps_max = |G|^2/(G^T H G)
    b_noise: float | None = None
    eps_max: float | None = None
    gHg: float | None = None
    trace_h_sigma: float | None = None
    b_noise_reason: str | None = "not measured: pass hessian=True"
    hessian_draws: int = 0
    hessian_seconds: float = 0.0  # time spent in the Hessian draws
    _tracker_state: dict[str, Any] = field(repr=False, default_factory=dict)
    _hessian: BNoiseAverage | None = field(repr=False, default=None)

    def interval(self, level: float = 0.95) -> tuple[float, float] | None:
        """Fieller interval for ``b_simple`` over the ``n`` draws."""
        from .ema import NoiseScaleEMA

        ema = NoiseScaleEMA(1.0)
        ema.load_state_dict(self._tracker_state["ema"])
        return ema.interval(level)

    def b_noise_interval(self, level: float = 0.95) -> tuple[float, float] | None:
        """Fieller interval for ``b_noise`` over the Hessian draws (``None`` without ``hessian=True``,
        below 3 draws, or while ``b_noise`` is undefined)."""
        return None if self._hessian is None else self._hessian.b_noise_interval(level)

    def eps_max_interval(self, level: float = 0.95) -> tuple[float, float] | None:
        """Fieller interval for ``eps_max``."""
        return None if self._hessian is None else self._hessian.eps_max_interval(level)


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


def _hessian_draw(
    model: torch.nn.Module,
    params: Sequence[torch.nn.Parameter],
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    parts: Sequence[Any],
    sizes: Callable[[Any], float] | None,
    unit: str,
) -> Any:
    """One draw from one batch's parts: gradients of all but the last, the Hessian of the last."""
    it = iter(parts)

    def closure() -> Any:
        part = next(it)
        loss = loss_fn(model, part)
        return (loss, float(sizes(part))) if sizes is not None else loss

    return hessian_draw(model, params, closure, parts=len(parts) - 1, unit=unit)


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
    hessian: bool = False,
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
        hessian: also measure ``B_noise = tr(H Sigma)/(G^T H G)`` and ``eps_max = |G|^2/(G^T H G)``
            (eqs. 2.7-2.8) by Hessian-vector products (:mod:`noisescale.hessian`): each batch is
            split into ``micro_batches`` parts (>= 3); the gradients of all parts but the last
            and the Hessian of the last, independent of them, make one unbiased draw. Costs about
            ``micro_batches + 3`` gradient passes per batch on top of the ``B_simple`` measurement.
            The loss must be twice differentiable (attention runs on the MATH SDPA kernel meanwhile;
            a ``torch.compile``'d module has no double backward: pass the original module).
    """
    if method not in ("microbatch", "auto", "per_example"):
        raise ValueError(f"measure() supports method='microbatch' or 'per_example', got {method!r}")
    per_example = method == "per_example"
    if not (isinstance(micro_batches, int) and micro_batches >= 2):
        raise ValueError(
            f"micro_batches must be an integer >= 2 (small batches to compare with the "
            f"whole batch), got {micro_batches!r}"
        )
    if hessian and micro_batches < 3:
        raise ValueError(
            f"hessian=True needs micro_batches >= 3 (two or more gradient micro-batches and one, independent of "
            f"them, for the Hessian), got {micro_batches}"
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
    avg = BNoiseAverage(1.0) if hessian else None
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
                if avg is not None:
                    hparts = parts if not per_example else split_batch(batch, micro_batches)
                    avg.update(_hessian_draw(model, tracked, loss_fn, hparts, sizes, unit))
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
            b_noise=avg.b_noise if avg is not None else None,
            eps_max=avg.eps_max if avg is not None else None,
            gHg=avg.gHg if avg is not None else None,
            trace_h_sigma=avg.trace_h_sigma if avg is not None else None,
            b_noise_reason=avg.reason if avg is not None else "not measured: pass hessian=True",
            hessian_draws=avg.count if avg is not None else 0,
            hessian_seconds=avg.seconds if avg is not None else 0.0,
            _tracker_state=sd,
            _hessian=avg,
        )
    finally:
        gns.close()
        with torch.no_grad():
            for b, v in saved_buffers:
                b.copy_(v)
        for p, g in zip(tracked, saved_grads):
            p.grad = g
