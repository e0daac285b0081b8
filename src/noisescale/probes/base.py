"""What every probe shares: the interface the tracker calls and small tensor helpers."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.autograd import Variable

from ..estimators import StepStats

__all__ = [
    "Probe",
    "ProbeConfig",
    "StepContext",
    "Groups",
    "Hook",
    "suspended",
    "is_suspended",
    "resolve_groups",
    "Preconditioner",
    "EndOfBackward",
    "sq_norm",
    "grouped_sq_norms",
    "group_sums",
    "host_group_sums",
    "pass_sums",
    "add_sums",
    "scaled_sums",
    "Sums",
    "infer_batch_size",
    "trainable_parameters",
    "check_sizes",
    "check_single_process",
    "StepTotal",
    "Piece",
]


class StepContext:
    """What the tracker knows at ``step()`` time and hands to the probe.

    ``sizes``: per-part sizes the user gave (``None``: infer). ``inv_scale2_small``: the factor
    (``1/S^2`` under a GradScaler) that brings squared norms taken during backward (scaled
    gradients) back to true units; ``inv_scale2_big``: the factor for norms read from ``.grad``
    at ``step()`` (``1`` once ``unscale_`` ran). 0-d tensors or floats. ``step``: the tracker's
    number of this step (1, 2, ...; the same on every rank), or ``None`` outside a tracker.
    """

    __slots__ = ("sizes", "inv_scale2_small", "inv_scale2_big", "step")

    def __init__(
        self,
        sizes: Sequence[Any] | None,
        inv_scale2_small: Any = 1.0,
        inv_scale2_big: Any = 1.0,
        step: int | None = None,
    ) -> None:
        self.sizes = sizes
        self.inv_scale2_small = inv_scale2_small
        self.inv_scale2_big = inv_scale2_big
        self.step = step


class Groups:
    """A partition of the measured parameters into named groups (one group ``"all"`` by default).

    ``names[i]`` is group ``i``; ``index(p)`` the group of parameter ``p``. Every measured
    parameter is in exactly one group, so the groups' statistics add up to the total.
    """

    def __init__(self, names: list[str], index: dict[int, int]) -> None:
        self.names = names
        self._index = index

    def __len__(self) -> int:
        return len(self.names)

    def index(self, p: torch.Tensor) -> int:
        return self._index[id(p)]

    @property
    def grouped(self) -> bool:
        """Whether the user asked for groups (more than the single default group)."""
        return self.names != ["all"]


def _param_names(model: torch.nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
    return names


def resolve_groups(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], groups: Any) -> Groups:
    """Turn the tracker's ``groups=`` into a :class:`Groups` over ``params``.

    ``groups`` is ``None`` (one group), ``"layers"`` (one group per module that owns parameters,
    named by its qualified name; ``"<root>"`` for the model's own), an optimizer (its param
    groups, named by a ``"name"`` entry or ``"group<i>"``), a dict ``name -> parameters``, or a
    callable ``parameter name -> group name``. Measured parameters that a dict or an optimizer
    does not list go to a group ``"other"``.
    """
    pnames = _param_names(model)
    ids = [id(p) for p in params]
    if groups is None:
        return Groups(["all"], {i: 0 for i in ids})
    assign: dict[int, str] = {}
    if isinstance(groups, str):
        if groups != "layers":
            raise ValueError(
                f"groups={groups!r} is not known; use 'layers', an optimizer, a dict "
                "{name: parameters} or a callable(parameter_name) -> group name"
            )
        for mname, mod in model.named_modules(remove_duplicate=True):
            for p in mod._parameters.values():
                if p is not None:
                    assign.setdefault(id(p), mname or "<root>")
    elif isinstance(groups, torch.optim.Optimizer):
        for i, g in enumerate(groups.param_groups):
            name = str(g.get("name", f"group{i}"))
            for p in g["params"]:
                assign.setdefault(id(p), name)
    elif isinstance(groups, dict):
        for name, ps in groups.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"groups= dict keys must be non-empty strings, got {name!r}")
            if isinstance(ps, torch.Tensor):
                ps = [ps]
            for p in ps:
                if not isinstance(p, torch.Tensor):
                    raise TypeError(f"groups[{name!r}] must hold parameters (tensors), got {type(p).__name__}")
                if id(p) in assign and assign[id(p)] != name:
                    raise ValueError(
                        f"parameter {pnames.get(id(p), tuple(p.shape))} is in two groups "
                        f"({assign[id(p)]!r} and {name!r}); groups must not overlap"
                    )
                assign[id(p)] = name
    elif callable(groups):
        for i in ids:
            if i not in pnames:
                continue
            name = groups(pnames[i])
            if not isinstance(name, str) or not name:
                raise ValueError(f"groups(name) must return a non-empty string, got {name!r} for {pnames[i]!r}")
            assign[i] = name
    else:
        raise TypeError(
            f"groups= must be None, 'layers', an optimizer, a dict or a callable, got {type(groups).__name__}"
        )
    names: list[str] = []
    index: dict[int, int] = {}
    for i in ids:
        name = assign.get(i, "other")
        if name not in names:
            names.append(name)
        index[i] = names.index(name)
    return Groups(names, index)


class Preconditioner:
    """Elementwise weights of an Adam-family optimizer, ``P = 1/(sqrt(v_hat) + eps)``.

    ``v_hat = exp_avg_sq / (1 - beta2^step)`` is the bias-corrected second moment as it stands
    when read: before this step's update, since the optimizer steps after ``gns.step()``
    (``max_exp_avg_sq`` with ``amsgrad``). A parameter without optimizer state yet (before the
    first update) gets ``P = 1``. ``mode="update"`` weights every gradient by ``P`` (the noise
    scale of the preconditioned update, ``tr(P Sigma P)/|P G|^2``); ``mode="curvature"`` by
    ``sqrt(P)`` (``tr(P Sigma)/(G^T P G)``, for a Hessian that ``P`` preconditions well).
    See docs/method.md.

    Weights live in buffers (one per parameter, its shape, float32 or float64) refreshed in place
    by :meth:`refresh`, so compiled code can hold on to them.
    """

    MODES = ("update", "curvature")

    def __init__(self, optimizer: Any, params: Sequence[torch.nn.Parameter], mode: str = "update") -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"preconditioner= must be a torch.optim.Optimizer of the Adam family (its state has "
                f"'exp_avg_sq'), got {type(optimizer).__name__}"
            )
        if mode not in self.MODES:
            raise ValueError(f"preconditioner mode must be one of {self.MODES}, got {mode!r}")
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        missing = [tuple(p.shape) for p in params if id(p) not in groups]
        if missing:
            raise ValueError(
                f"preconditioner=: {len(missing)} measured parameters (shapes {missing[:4]}) are not "
                "optimised by this optimizer; pass the optimizer that trains them (or params=)"
            )
        for g in optimizer.param_groups:
            if "eps" not in g or "betas" not in g:
                raise TypeError(
                    f"preconditioner=: {type(optimizer).__name__} has no 'betas'/'eps' in its param "
                    "groups; only Adam-family optimizers (Adam, AdamW, ...) are supported"
                )
        self.optimizer = optimizer
        self.mode = mode
        self._groups = groups
        self.params = list(params)
        self.weights: dict[int, torch.Tensor] = {}
        for p in self.params:
            local = p.to_local() if hasattr(p, "to_local") else p
            dt = torch.float64 if p.dtype == torch.float64 else torch.float32
            self.weights[id(p)] = torch.ones(local.shape, dtype=dt, device=local.device)
        self.stale = True

    def refresh(self) -> None:
        """Recompute every weight from the optimizer state now (call once per step, before norms)."""
        with torch.no_grad():
            for p in self.params:
                w = self.weights[id(p)]
                st = self.optimizer.state.get(p, {})
                g = self._groups[id(p)]
                v = st.get("max_exp_avg_sq") if g.get("amsgrad") else st.get("exp_avg_sq")
                step = st.get("step")
                if v is None or step is None or float(step) == 0:
                    w.fill_(1.0)
                    continue
                if hasattr(v, "to_local"):
                    raise NotImplementedError(
                        "preconditioner= with a sharded second moment (FSDP/DTensor) is not supported"
                    )
                bc2 = 1.0 - float(g["betas"][1]) ** float(step)
                torch.div(v.to(w.dtype), bc2, out=w)
                w.sqrt_().add_(float(g["eps"])).reciprocal_()
                if self.mode == "curvature":
                    w.sqrt_()
        self.stale = False

    def weight(self, p: torch.Tensor) -> torch.Tensor:
        """The current weight of ``p`` (refreshed first if the step changed)."""
        if self.stale:
            self.refresh()
        return self.weights[id(p)]


# Process-wide, not thread-local: backward hooks run on the autograd engine's device threads.
_suspend_depth = [0]


class suspended:
    """Context in which every probe's hooks and instrumented forwards do nothing.

    The Hessian measurement (:mod:`noisescale.hessian`) runs extra forward and backward passes on
    other micro-batches inside ``step()``; they must neither count as parts of the training step
    nor run through the per-example layers' custom autograd functions (which have no double
    backward). Re-entrant.
    """

    def __enter__(self) -> None:
        _suspend_depth[0] += 1

    def __exit__(self, *exc: Any) -> None:
        _suspend_depth[0] -= 1


def is_suspended() -> bool:
    """Whether a :class:`suspended` block is active."""
    return _suspend_depth[0] > 0


class Hook:
    """A tensor or module hook that a deep copy of the model does not carry along.

    ``copy.deepcopy(model)`` (an EMA copy, a checkpoint snapshot) copies the hooks on its
    parameters and modules; the copy's passes must not reach this tracker, so a copied hook
    does nothing (and the probe itself is not copied). Inside :class:`suspended` it does nothing.
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        if _suspend_depth[0]:
            return
        self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> Callable[..., None]:
        return _no_hook


def _no_hook(*args: Any, **kwargs: Any) -> None:
    return None


class EndOfBackward:
    """Calls ``fn`` once at the end of every backward pass in which :meth:`arm` was called.

    ``arm`` (from any hook that runs during backward) queues an engine callback; that callback
    queues ``fn`` again, so ``fn`` runs after every callback queued during the pass, including
    DDP's and FSDP's finalisation that writes the synchronized gradients into ``.grad``.
    """

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self._queued = False
        self._lock = threading.Lock()

    def arm(self) -> None:
        if self._queued or torch.compiler.is_compiling():
            return
        with self._lock:
            if self._queued:
                return
            self._queued = True
        Variable._execution_engine.queue_callback(self._requeue)

    def _requeue(self) -> None:
        Variable._execution_engine.queue_callback(self._run)

    def _run(self) -> None:
        self._queued = False
        self.fn()


@dataclass
class ProbeConfig:
    """What every probe is built with (besides the model and the measured parameters)."""

    reduction: str = "mean"
    unit: str = "examples"
    groups: Groups | None = None  # None: one group of everything measured
    preconditioner: Preconditioner | None = None
    auto: bool = False  # chosen by method="auto": exclude what does not fit (with a warning) instead of raising

    @property
    def infer_sizes(self) -> bool:
        return self.unit == "examples"

    def resolved_groups(self, model: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> Groups:
        return self.groups if self.groups is not None else resolve_groups(model, params, None)


class Probe(Protocol):
    """A source of :class:`~noisescale.estimators.StepStats`. One per tracker; owns its hooks.

    Class attributes declare what the probe does: ``name``; ``options`` (the keyword options it
    takes); ``supports`` (a subset of ``{"groups", "preconditioner"}``). ``applicable(model,
    params)`` returns ``None`` or why the probe cannot measure ``model``; ``auto_score(model,
    params)`` ranks it for ``method="auto"`` (the highest positive score wins).
    """

    name: str
    world_size: int

    def collect(self, ctx: StepContext) -> StepStats:
        """End of an optimizer step: this step's statistics (``reason`` set if unmeasurable)."""
        ...

    def metrics(self) -> dict[str, float]:
        """Probe-specific numbers for ``metrics()`` (e.g. coverage)."""
        ...

    def pending_parts(self) -> int:
        """Backward passes seen since the last :meth:`collect`."""
        ...

    def close(self) -> None:
        """Remove every hook; idempotent."""
        ...


def check_single_process(model: torch.nn.Module, method: str) -> str | None:
    """Why a single-process probe cannot measure ``model`` (wrapped for several ranks), or None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    from .distributed import distributed_kind

    kind = distributed_kind(model)
    if kind is None:
        return None
    return (
        f"the model is wrapped in {kind.upper()} with several ranks: method={method!r} would compare this "
        "rank's local norms with the all-reduced gradient and report a wrong noise scale. Use method='auto' "
        "(or 'ddp' / 'fsdp'), which pools every rank's local norms with the global one."
    )


# Squared norms in float64 for any finite gradient.
#
# fp32 arithmetic (a BLAS ``sdot``, or a reduction that accumulates in fp32) squares and sums in
# fp32's range: entries below ~1e-19 square to subnormals or zero and sums above ~3.4e38 become
# inf, although every gradient is finite and its squared norm a perfectly good float64. In float64
# the squared norm of any fp16/bf16/fp32 tensor (entries in [1e-45, 3.4e38], so squares in
# [1e-90, 1.2e77]) is representable and computed without underflow or overflow, so:
#
# - CPU: the fast fp32 dot (or fp32 norm) is read at once (nothing on the CPU is asynchronous, so the
#   read costs no sync) and kept when it shows that nothing went out of range: finite, and at least
#   ``n * 2**-100``, where squares that fell below fp32's normal range (each off by at most 2**-126)
#   change it by at most 2**-26 relative. Otherwise the term is recomputed exactly in float64
#   (:func:`_sq_norm_exact`): an all-zero gradient, tiny or huge gradients, a product ``w * g``
#   that left fp32's range. No extra pass in the common case.
# - Accelerators (no host reads): ``_foreach_norm(..., dtype=float64)``, which reads the gradient in
#   its own dtype and squares and accumulates in float64 in one fused pass (no float64 copy of the
#   gradient); the norm is squared in float64. A weighted gradient ``w * g`` is formed in float64
#   (its product of two fp32 numbers is exact there) before the norm.
#
# float64 gradients are reduced in float64 throughout: their squared norm is exact unless it lies
# outside float64's own range (entries >= ~1e154 give inf, which no float64 can hold).

_F32_SAFE_PER_ELEMENT = 2.0**-100  # the fp32 sum is trusted when >= numel * this (see above)
_ZERO64: dict[torch.device, torch.Tensor] = {}


def sq_norm(t: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Squared L2 norm of a gradient (times ``weight`` elementwise, if given) as a 0-d float64 tensor
    on its device.

    Finite and correct (to float64 rounding, or fp32 accumulation where that is safe) for any finite
    fp16/bf16/fp32/fp64 gradient and weight, however small or large: no underflow to zero and no
    overflow to inf on the way (see the notes above :data:`_F32_SAFE_PER_ELEMENT`). On the CPU the
    fast fp32 result is checked and recomputed exactly when it is out of range; on accelerators the
    reduction accumulates in float64, with no host sync. Sparse gradients are coalesced first
    (repeated indices must be summed before squaring).
    """
    s = _sq_norm_term(t, weight)
    return s if isinstance(s, torch.Tensor) else torch.scalar_tensor(s, dtype=torch.float64)


def _sq_norm_term(t: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor | float:
    """:func:`sq_norm` as a term for :func:`group_sums`: a Python float where the CPU path has read
    the value already (no 0-d tensor to make and read back), else a 0-d float64 tensor."""
    if t.requires_grad:  # (a hook under create_graph=True): nothing here belongs in a graph
        t = t.detach()
    if not t.is_cpu or torch.compiler.is_compiling():
        return _sq_norm_device(t, weight)
    return _sq_norm_cpu(t, weight)


def _sq_norm_cpu(t: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor | float:
    """CPU: a float64 0-d tensor (float64 data, reduced in float64) or a Python float (fp32 data:
    the fast fp32 sum when it is in range, else the exact float64 one)."""
    if t.is_sparse:
        t = t.coalesce()
        x = (t * weight).coalesce().values() if weight is not None else t.values()
    elif weight is not None:
        x = _weighted(t, weight)
    else:
        x = t
    if x.dtype == torch.float64:
        return _dot64(x)
    if x.dtype == torch.float32 and x.is_contiguous():
        a = _numpy_view(x) if torch.get_num_threads() == 1 else None
        if a is None:  # torch's dot (MKL sdot; it uses torch's threads), 2.5x faster than vector_norm
            flat = x if x.dim() == 1 else x.view(-1)
            s = float(torch.dot(flat, flat))
        else:
            with np.errstate(over="ignore", under="ignore", invalid="ignore"):  # out of range: checked below
                s = float(np.dot(a, a))
    else:
        s = float(torch.linalg.vector_norm(x, 2, dtype=torch.float32)) ** 2
    if x.numel() * _F32_SAFE_PER_ELEMENT <= s < math.inf:
        return s
    if s != s:  # NaN: a non-finite gradient, nothing to recover
        return s
    return float(_sq_norm_exact(t, weight))


def _numpy_view(x: torch.Tensor) -> np.ndarray | None:
    """A zero-copy flat numpy view of a CPU tensor, or None where numpy cannot view it.

    On one torch thread numpy's BLAS dot (OpenBLAS, single-threaded for a dot) reads a hot 4 MB
    fp32 gradient in 44 us where torch.dot (MKL sdot) takes 81 us on the AMD CPUs measured, with
    more accurate partial sums. With several threads torch.dot splits the read over them, which
    pays off for gradients that come from DRAM (the 2-thread micro-batch benchmark), so it is kept.
    """
    try:
        return x.numpy().reshape(-1)
    except (RuntimeError, TypeError):
        return None


def _dot64(x: torch.Tensor) -> torch.Tensor:
    flat = x if x.dim() == 1 and x.is_contiguous() else x.reshape(-1)
    return torch.dot(flat, flat)


def _sq_norm_exact(t: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``|w * t|^2`` with the product and the reduction in float64 (CPU; a float64 copy of ``t``)."""
    if t.is_sparse:
        t = t.coalesce().to(torch.float64)
        return _dot64((t * weight).coalesce().values() if weight is not None else t.values())
    x = torch.empty(t.shape, dtype=torch.float64, device=t.device)
    x.copy_(t)
    if weight is not None:
        x.mul_(weight)
    return _dot64(x)


def _sq_norm_device(t: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Accelerator branch (also taken under ``torch.compile``): float64 accumulation, no host read."""
    if t.is_sparse:
        t = t.coalesce()
        if weight is not None:
            t = t.to(torch.float64) * weight
            t = t.coalesce()
        x = t.values()
    elif weight is not None:
        x = _weighted(t, weight, torch.float64)
    else:
        x = t
    return torch._foreach_norm([x], 2, dtype=torch.float64)[0].square()


_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _weighted(g: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``g * weight`` (computed in ``dtype``, default the promoted dtype) written into a scratch buffer
    reused across calls (one per device and dtype, as large as the largest gradient seen): a
    full-size temporary per gradient and pass cost more than the product itself. The result is valid
    until the next call on the same device; hooks on one device run one after another, in stream
    order. With ``dtype=float64`` and fp32 operands the product is formed in float64 (exact) without
    a float64 copy of either operand."""
    promoted = torch.promote_types(g.dtype, weight.dtype)
    dtype = dtype if dtype is not None else promoted
    if not (g.is_contiguous() and weight.is_contiguous()) or dtype not in (torch.float32, torch.float64):
        return g.to(dtype) * weight if dtype != promoted else g * weight
    key = (g.device, dtype)
    buf = _SCRATCH.get(key)
    n = g.numel()
    if buf is None or buf.numel() < n:
        buf = _SCRATCH[key] = torch.empty(n, dtype=dtype, device=g.device)
    out = buf[:n]
    if dtype == promoted:
        torch.mul(g.view(-1), weight.view(-1), out=out)
    else:
        # 0 + g * w with a float64 (dimensioned, broadcast) first operand: type promotion computes
        # in float64, and device kernels cast g and w as they load them
        zero = _ZERO64.get(g.device)
        if zero is None:
            zero = _ZERO64[g.device] = torch.zeros(1, dtype=torch.float64, device=g.device)
        torch.addcmul(zero.expand(n), g.view(-1), weight.view(-1), out=out)
    return out


_INDEX_CACHE: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}


def _index_tensor(index: Sequence[int], device: torch.device) -> torch.Tensor:
    """The group indices as a device tensor, made once per (pattern, device): hooks fire in the same
    order every pass, so this saves a host-to-device copy per pass."""
    key = (tuple(index), device)
    t = _INDEX_CACHE.get(key)
    if t is None:
        if len(_INDEX_CACHE) > 256:  # patterns are few; bound the cache anyway
            _INDEX_CACHE.clear()
        t = _INDEX_CACHE[key] = torch.tensor(key[0], dtype=torch.long, device=device)
    return t


# Per-group sums held on the host (a list of Python floats, CPU only) or as a float64 tensor.
Sums = torch.Tensor | list[float]


def host_group_sums(terms: Sequence[torch.Tensor | float], index: Sequence[int], n_groups: int) -> list[float] | None:
    """:func:`group_sums` as Python floats where every term is a float or a CPU tensor, else ``None``.

    The CPU probes keep their sums on the host until the step's record is built: a tiny tensor made
    right after a backward pass costs 20-50 us on a 2-thread CPU (the first small op after a
    parallel kernel), as much as a dot over a 1M-entry gradient."""
    acc = [0.0] * n_groups
    for t, i in zip(terms, index):
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            return None
        acc[i] += float(t)
    return acc


def pass_sums(terms: Sequence[torch.Tensor | float], index: Sequence[int], n_groups: int, device: torch.device) -> Sums:
    """One backward pass's per-group sums: host floats on the CPU (:func:`host_group_sums`: no tensor
    is made until the step's record), else a device tensor (:func:`group_sums`, no host sync)."""
    acc = host_group_sums(terms, index, n_groups)
    return acc if acc is not None else group_sums(terms, index, n_groups, device)


def add_sums(parts: Sequence[Sums], device: torch.device) -> Sums:
    """The sum of several passes' per-group sums (:func:`pass_sums`): on the host while all are host
    floats, else one stack and sum on ``device``."""
    if all(isinstance(x, list) for x in parts):
        return [sum(col) for col in zip(*parts)]  # (all lists: checked)
    return torch.stack([torch.as_tensor(x, dtype=torch.float64, device=device) for x in parts]).sum(0)


def scaled_sums(value: Sums, factor: Any, device: torch.device) -> Sums:
    """``value * factor`` (``factor`` a float or a 0-d tensor, e.g. a GradScaler's ``1/S^2``): on the
    host while both are host numbers, else a float64 tensor on ``device``."""
    if isinstance(value, list):
        if isinstance(factor, (int, float)):
            return value if factor == 1 else [v * float(factor) for v in value]
        value = torch.tensor(value, dtype=torch.float64, device=device)
    return value if isinstance(factor, (int, float)) and factor == 1 else value * factor


def group_sums(
    terms: Sequence[torch.Tensor | float], index: Sequence[int], n_groups: int, device: torch.device
) -> torch.Tensor:
    """Per-group sums of squared-norm terms (term ``j`` belongs to group ``index[j]``) as a float64
    ``[n_groups]`` tensor on ``device``.

    On the CPU the terms are read as floats (nothing runs asynchronously there, and this saves the
    tiny tensor ops of stacking); elsewhere one stack and one ``index_add_``, with no host sync.
    """
    acc = host_group_sums(terms, index, n_groups)
    if acc is not None:
        return torch.tensor(acc, dtype=torch.float64, device=device)
    out = torch.zeros(n_groups, dtype=torch.float64, device=device)
    if not terms:
        return out
    vals = torch.stack([torch.as_tensor(t, dtype=torch.float64, device=device).reshape(()) for t in terms])
    return out.index_add_(0, _index_tensor(index, device), vals)


def grouped_sq_norms(
    grads: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor | None],
    index: Sequence[int],
    n_groups: int,
    device: torch.device,
) -> torch.Tensor:
    """``sum |w * g|^2`` per group as a float64 ``[n_groups]`` tensor on ``device``, finite and correct
    for any finite gradients (see :func:`sq_norm`).

    Dense unweighted tensors of one dtype on one accelerator: a single ``_foreach_norm`` (one fused
    pass, float64 accumulation, no host sync). On the CPU one BLAS dot per tensor (:func:`sq_norm`)
    is faster.
    """
    if (
        grads
        and device.type != "cpu"
        and all(w is None for w in weights)
        and not any(g.is_sparse for g in grads)
        and len({(g.device, g.dtype) for g in grads}) == 1
    ):
        return _grouped_sq_norms_fused(grads, index, n_groups, device)
    return group_sums([_sq_norm_term(g, w) for g, w in zip(grads, weights)], index, n_groups, device)


def _grouped_sq_norms_fused(
    grads: Sequence[torch.Tensor], index: Sequence[int], n_groups: int, device: torch.device
) -> torch.Tensor:
    """The accelerator branch of :func:`grouped_sq_norms`: each gradient is read in its own dtype and
    squared and summed in float64 (fp32 accumulation underflows below ~1e-19 and overflows above
    ~1e19 per entry; float64 holds the squared norm of any finite fp16/bf16/fp32 tensor)."""
    norms = torch.stack(torch._foreach_norm([g.detach() for g in grads], 2, dtype=torch.float64)).square()
    out = torch.zeros(n_groups, dtype=torch.float64, device=device)
    return out.index_add_(0, _index_tensor(index, device), norms)


# A piece of the step gradient whose norm a process takes: (parameter, lo, hi, first) -- elements
# [lo, hi) of its flattened gradient, or all of it when lo is None; ``first``: this process holds
# element 0, and takes the whole gradient where it cannot be sliced (sparse, not contiguous).
Piece = tuple[torch.nn.Parameter, "int | None", "int | None", bool]


class StepTotal:
    """Per-group ``|P * V|^2`` of the step's accumulated gradient ``V`` (``.grad``), over ``pieces``.

    :meth:`capture` runs when a backward pass ends (see :class:`EndOfBackward`): the value of the
    step's last pass is what :meth:`take` returns at ``step()``, so clipping or anything else that
    rescales ``.grad`` in place between the backward and ``step()`` changes nothing. Without a
    captured value (no backward reached the probe's hooks, or the last pass only :meth:`mark`-ed)
    :meth:`take` reads ``.grad`` now; :meth:`changed` says whether that read would differ from one
    at the end of the marked pass.
    """

    def __init__(
        self,
        pieces: Sequence[Piece],
        groups: Groups,
        preconditioner: Preconditioner | None,
        device: torch.device,
        host: bool = False,
    ) -> None:
        self.pieces = list(pieces)
        self.groups = groups
        self.preconditioner = preconditioner
        self.device = device
        self.host = host  # keep CPU sums as Python floats (see host_group_sums): take_sums() returns a list
        self._index = [groups.index(p) for p, *_ in self.pieces]
        self._value: Sums | None = None
        self._marks: list[tuple[torch.Tensor | None, int]] | None = None

    def compute(self) -> Sums:
        grads: list[torch.Tensor] = []
        weights: list[torch.Tensor | None] = []
        index: list[int] = []
        pre = self.preconditioner
        for (p, lo, hi, first), gi in zip(self.pieces, self._index):
            g = p.grad
            if g is None:
                continue
            if hasattr(g, "to_local"):
                g = g.to_local()
            g = g.detach()
            w = pre.weight(p) if pre is not None else None
            if lo is None or g.is_sparse or not g.is_contiguous() or (lo == 0 and hi == g.numel()):
                if not (first and g.numel()):
                    continue  # cannot be sliced (or need not be): the holder of element 0 takes it
            else:
                assert hi is not None  # hi is set whenever lo is (see Piece, _share)
                if not lo < hi:
                    continue
                g = g.view(-1)[lo:hi]
                w = w.reshape(-1)[lo:hi] if w is not None else None
            grads.append(g)
            weights.append(w)
            index.append(gi)
        if self.host and self.device.type == "cpu":
            acc = host_group_sums([_sq_norm_term(g, w) for g, w in zip(grads, weights)], index, len(self.groups))
            if acc is not None:
                return acc
        return grouped_sq_norms(grads, weights, index, len(self.groups), self.device)

    def capture(self) -> None:
        self._value = self.compute()
        self._marks = None

    def mark(self) -> None:
        """Defer the read of ``.grad`` to :meth:`take`, and remember each ``.grad``'s identity and
        version counter now (a backward pass ended) so that :meth:`changed` can tell whether anything
        wrote into them in between. Forgets any captured value: it belongs to an earlier pass."""
        self._value = None
        self._marks = [((g := p.grad), g._version if g is not None else 0) for p, *_ in self.pieces]

    def changed(self) -> bool:
        """Whether a ``.grad`` was replaced, set, cleared or changed in place (clipping, ``mul_``, ...)
        since :meth:`mark`; ``False`` when nothing was marked. In-place writes through ``.grad.data``
        bypass version counters and are not seen. (``GradScaler.unscale_`` writes without bumping the
        version on some builds; that is harmless: :meth:`take` reads ``.grad`` with ``inv_scale2_big``,
        which is 1 once ``unscale_`` has run.)"""
        if self._marks is None:
            return False
        for (p, *_), (g, version) in zip(self.pieces, self._marks):
            now = p.grad
            if now is not g or (now is not None and now._version != version):
                return True
        return False

    def clear(self) -> None:
        """Forget the captured value and the marks (the step is not measured)."""
        self._value = None
        self._marks = None

    def take_sums(self, ctx: StepContext) -> Sums:
        """Per-group squared norms in true units: the captured value (taken in backward, from scaled
        gradients under a GradScaler), or ``.grad``'s now when nothing was captured (check
        :meth:`changed` first where a read was deferred by :meth:`mark`). With ``host=True`` on the
        CPU a list of floats, else a float64 tensor."""
        value, self._value = self._value, None
        self._marks = None
        if value is not None:
            return scaled_sums(value, ctx.inv_scale2_small, self.device)
        return scaled_sums(self.compute(), ctx.inv_scale2_big, self.device)

    def take(self, ctx: StepContext) -> torch.Tensor:
        """:meth:`take_sums` as a float64 ``[groups]`` tensor on the device."""
        out = self.take_sums(ctx)
        return torch.tensor(out, dtype=torch.float64, device=self.device) if isinstance(out, list) else out


def check_sizes(given: Sequence[float], k: int, passes: str = "this step had") -> list[float]:
    """Validate ``step(sizes=...)``: one finite positive size per backward pass, as floats.

    ``passes`` completes the message's "but ... {k} backward passes" for the probe's context.
    """
    sizes = [float(s) for s in given]
    if len(sizes) != k:
        raise ValueError(
            f"step(sizes=...) got {len(sizes)} sizes {list(given)} but {passes} {k} backward passes "
            f"(micro-batches); give one size per micro-batch, in order"
        )
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
