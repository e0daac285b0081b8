"""What every probe shares: the interface the tracker calls and small tensor helpers."""

from __future__ import annotations

import math
from typing import Any, Iterable, Protocol, Sequence

import torch

from ..estimators import Measurement

__all__ = ["Probe", "StepContext", "sq_norm", "total_sq_norm", "sum_terms", "infer_batch_size", "trainable_parameters",
           "check_sizes"]


class StepContext:
    """What the tracker knows at ``step()`` time and hands to the probe.

    ``sizes``: per-part sizes the user gave (``None``: infer). ``inv_scale2_small`` /
    ``inv_scale2_big``: factors (``1/S^2`` under a GradScaler) that bring squared norms taken
    from scaled gradients back to true units; 0-d tensors or floats.
    """

    __slots__ = ("sizes", "inv_scale2_small", "inv_scale2_big")

    def __init__(self, sizes: Sequence[float] | None, inv_scale2_small: Any = 1.0,
                 inv_scale2_big: Any = 1.0) -> None:
        self.sizes = sizes
        self.inv_scale2_small = inv_scale2_small
        self.inv_scale2_big = inv_scale2_big


class Probe(Protocol):
    """A source of :class:`Measurement` records. One per tracker; owns its hooks."""

    name: str

    def collect(self, ctx: StepContext) -> tuple[Measurement | None, str | None, float | None]:
        """End of an optimizer step: ``(measurement, reason_if_none, examples_in_step)``."""

    def close(self) -> None:
        """Remove every hook; idempotent."""


def sq_norm(t: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of a gradient as a 0-d tensor on its device.

    Reduced in float32 (float64 for float64 tensors): squaring fp16/bf16 values in their own
    dtype overflows or loses the small terms. Sparse gradients are coalesced first (repeated
    indices must be summed before squaring).
    """
    if t.is_sparse:
        t = t.coalesce().values()
    t = t.detach()
    if t.dtype in (torch.float32, torch.float64) and t.is_contiguous():
        # BLAS dot: one pass over the gradient, measured 2.5x faster than vector_norm on CPU
        flat = t.view(-1)
        return torch.dot(flat, flat)
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(t, 2, dtype=dtype).square()


def sum_terms(terms: Sequence[torch.Tensor | float], device: torch.device) -> torch.Tensor | float:
    """Sum squared-norm terms (0-d tensors or floats) in float64.

    A Python float when every term is a float or lives on the CPU: nothing runs asynchronously
    there, so reading a term costs nothing and saves the tiny tensor ops of stacking. Otherwise a
    0-d float64 tensor on ``device``, with no host sync.
    """
    if all(not isinstance(t, torch.Tensor) or t.device.type == "cpu" for t in terms):
        return math.fsum(float(t) for t in terms)
    return torch.stack([torch.as_tensor(t, dtype=torch.float64, device=device) for t in terms]).sum()


def total_sq_norm(grads: Iterable[torch.Tensor]) -> torch.Tensor | float | None:
    """``sum |g|^2`` in float64 (see :func:`sum_terms`: a float on CPU, else a 0-d tensor on the
    first gradient's device); ``None`` if empty.

    Dense tensors of one dtype on one accelerator: a single ``_foreach_norm`` (one fused pass,
    fp32/fp64 accumulation). On CPU, one BLAS dot per tensor (:func:`sq_norm`) is faster.
    """
    grads = list(grads)
    if not grads:
        return None
    device = grads[0].device
    if (device.type != "cpu" and not any(g.is_sparse for g in grads)
            and len({(g.device, g.dtype) for g in grads}) == 1):
        dtype = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
        return torch.stack(torch._foreach_norm(grads, 2, dtype=dtype)).to(torch.float64).square().sum()
    return sum_terms([sq_norm(g) for g in grads], device)


def check_sizes(given: Sequence[float], k: int, passes: str = "this step had") -> list[float]:
    """Validate ``step(sizes=...)``: one finite positive size per backward pass, as floats.

    ``passes`` completes the message's "but ... {k} backward passes" for the probe's context.
    """
    sizes = [float(s) for s in given]
    if len(sizes) != k:
        raise ValueError(
            f"step(sizes=...) got {len(sizes)} sizes {list(given)} but {passes} {k} backward passes "
            f"(micro-batches); give one size per micro-batch, in order")
    for s in sizes:
        if not (s > 0 and math.isfinite(s)):
            raise ValueError(f"micro-batch sizes must be finite and positive, got {list(given)}")
    return sizes


def infer_batch_size(args: tuple, kwargs: dict) -> int | None:
    """Leading dimension of the first tensor in a forward call's inputs (depth first)."""
    stack: list[Any] = list(args) + list(kwargs.values())
    while stack:
        x = stack.pop(0)
        if isinstance(x, torch.Tensor):
            if x.dim() >= 1:
                return int(x.shape[0])
        elif isinstance(x, (list, tuple)):
            stack[0:0] = list(x)
        elif isinstance(x, dict):
            stack[0:0] = list(x.values())
    return None


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Unique parameters with ``requires_grad`` (tied weights appear once), in module order."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        n = sum(1 for _ in model.parameters())
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters ({n} parameters, none with "
            "requires_grad=True): there is no gradient to measure. Unfreeze the parameters you train "
            "before attaching noisescale."
        )
    return params
