"""Probes: where squared gradient norms come from. Each yields :class:`~noisescale.estimators.Measurement` records.

A probe is registered under a method name with :func:`register_probe`; the tracker builds it
with ``factory(model, params, reduction=..., unit=...)``. Probe modules register themselves
when imported below.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .base import Probe, StepContext
from .microbatch import MicroBatchProbe

__all__ = ["Probe", "StepContext", "MicroBatchProbe", "register_probe", "make_probe", "PROBES"]

ProbeFactory = Callable[..., Probe]
PROBES: dict[str, ProbeFactory] = {}


def register_probe(name: str, factory: ProbeFactory) -> None:
    """Make ``GradientNoiseScale(model, method=name)`` build ``factory(model, params, **options)``."""
    PROBES[name] = factory


def make_probe(method: str, model: torch.nn.Module, params: Sequence[torch.nn.Parameter], **options: Any) -> Probe:
    if method not in PROBES:
        raise ValueError(f"unknown method {method!r}; choose one of {('auto',) + tuple(PROBES)}")
    return PROBES[method](model, params, **options)


def _microbatch(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], *, reduction: str = "mean",
                unit: str = "examples", **_: Any) -> Probe:
    return MicroBatchProbe(model, params, reduction=reduction, infer_sizes=(unit == "examples"))


register_probe("microbatch", _microbatch)

# Data-parallel probes (DDP, FSDP1, FSDP2): "ddp", "fsdp", "ddp_per_example".
if torch.distributed.is_available():
    from .distributed import register as _register_distributed

    _register_distributed(register_probe)

# Exact per-example squared norms from one batch: "per_example".
from .per_example import PerExampleProbe, _factory as _per_example_factory  # noqa: E402

register_probe("per_example", _per_example_factory)
