"""Probes: where squared gradient norms come from. Each returns additive
:class:`~noisescale.estimators.StepStats` per optimizer step.

A probe class declares what it is (``name``), which keyword options it takes (``options``), which
tracker features it supports (``supports``: ``"groups"``, ``"preconditioner"``), whether it can
measure a model (``applicable``) and how ``method="auto"`` ranks it (``auto_score``); it is built
with ``from_config(model, params, config, **options)``. The tracker has no per-probe branches:
:func:`select_probe` and :func:`make_probe` are all it calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import Probe, ProbeConfig, StepContext
from .microbatch import MicroBatchProbe
from .per_example import PerExampleProbe

__all__ = [
    "Probe",
    "ProbeConfig",
    "StepContext",
    "MicroBatchProbe",
    "PerExampleProbe",
    "register_probe",
    "select_probe",
    "make_probe",
    "PROBES",
]

PROBES: dict[str, Any] = {}
_NEEDS_DISTRIBUTED = ("ddp", "ddp_per_example", "fsdp")


def register_probe(cls: Any) -> None:
    """Make ``GradientNoiseScale(model, method=cls.name)`` use ``cls`` (and ``auto`` consider it)."""
    PROBES[cls.name] = cls


register_probe(MicroBatchProbe)
register_probe(PerExampleProbe)
if torch.distributed.is_available():  # data-parallel probes (DDP, FSDP1, FSDP2)
    from .distributed import DDPPerExampleProbe, DDPProbe, FSDPProbe

    for _cls in (DDPProbe, FSDPProbe, DDPPerExampleProbe):
        register_probe(_cls)


def select_probe(method: str, model: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> Any:
    """The probe class for ``method`` (``"auto"``: the applicable probe with the highest score)."""
    methods = ("auto", *PROBES)
    if method in _NEEDS_DISTRIBUTED and method not in PROBES:
        raise NotImplementedError(
            f"method={method!r} needs torch.distributed, which this torch build lacks; use one of {methods}"
        )
    if method == "auto":
        scored = [
            (cls.auto_score(model, params), cls) for cls in PROBES.values() if cls.applicable(model, params) is None
        ]
        score, best = max(scored, key=lambda sc: sc[0], default=(0.0, None))
        if best is None or score <= 0:  # pragma: no cover - microbatch always applies on one process
            raise ValueError(f"no probe can measure {type(model).__name__}; choose one of {methods}")
        return best
    if method not in PROBES:
        raise ValueError(f"unknown method {method!r}; choose one of {methods}")
    cls = PROBES[method]
    why = cls.applicable(model, params)
    if why is not None:
        raise ValueError(f"method={method!r} cannot measure this model: {why}")
    return cls


def make_probe(
    cls: Any, model: torch.nn.Module, params: Sequence[torch.nn.Parameter], config: ProbeConfig, options: dict[str, Any]
) -> Probe:
    """Build ``cls`` after checking that it takes ``options`` and supports what ``config`` asks for."""
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        takes = f"it takes {sorted(cls.options)}" if cls.options else "it takes none"
        raise TypeError(f"method={cls.name!r} does not take the options {unknown} ({takes})")
    asked = {
        "groups": config.groups is not None and config.groups.grouped,
        "preconditioner": config.preconditioner is not None,
    }
    for feature, wanted in asked.items():
        if wanted and feature not in cls.supports:
            why = getattr(cls, "why_unsupported", {}).get(feature)
            raise NotImplementedError(why or f"method={cls.name!r} does not support {feature}=")
    probe: Probe = cls.from_config(model, params, config, **options)
    return probe
