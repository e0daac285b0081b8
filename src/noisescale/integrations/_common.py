"""What the framework adapters share: batch sizes, state that survives JSON, and the controller options."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from ..probes.base import infer_batch_size

__all__ = ["batch_size_of", "checked_size", "json_safe", "check_every"]


def batch_size_of(batch: Any) -> float:
    """Examples in a batch: the leading dimension of its first tensor (depth first through tuples, lists
    and dicts), as the tracker infers it from a forward call."""
    n = infer_batch_size((batch,), {})
    if n is None:
        raise ValueError(
            f"could not find a tensor with a batch dimension in the batch (a {type(batch).__name__}); pass "
            "size_fn=lambda batch: <its size in the tracker's unit>"
        )
    return float(n)


def checked_size(fn: Callable[[Any], Any], batch: Any) -> float:
    """``fn(batch)`` as a finite positive float; the error names the value."""
    v = fn(batch)
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(
            f"size_fn returned {v!r}; it must return a number (the batch's size in the tracker's unit)"
        ) from None
    if not (f > 0 and math.isfinite(f)):
        raise ValueError(f"size_fn returned {v!r}; a batch's size must be finite and positive")
    return f


def json_safe(state: Any) -> Any:
    """``state`` with numpy scalars and arrays turned into Python numbers and lists (a JSON round trip
    leaves it equal), for checkpoints that are written as JSON (the Hugging Face trainer state)."""

    def default(o: Any) -> Any:
        if hasattr(o, "tolist"):
            return o.tolist()
        raise TypeError(f"state value {o!r} ({type(o).__name__}) cannot be saved as JSON")

    return json.loads(json.dumps(state, default=default))


def check_every(name: str, every: Any) -> int | None:
    if every is None:
        return None
    if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
        raise ValueError(f"{name} must be a positive whole number of optimizer steps or None, got {every!r}")
    return every
