"""Data-parallel probe: the noise scale "for free" under DDP and FSDP (McCandlish et al. App. A.1).

In data-parallel training every rank computes the gradient of its own slice of the batch and the
ranks then average those gradients. The local gradient before the reduction is a small-batch
sample and the synchronized gradient is the big batch; the paper's estimators need nothing else.

What is measured, per optimizer step:

- **local parts**: on every rank, the squared norm of the gradient of each backward pass
  (micro-batch) *before* it enters the reduction. A part closes when a forward pass with
  gradients enabled starts after gradients have arrived, or at ``step()``; so with gradient
  accumulation under ``no_sync`` each micro-batch is its own part (``b_small`` is the per-device
  micro-batch), and without accumulation a part is the rank's batch.

  * DDP: a tensor hook on every measured parameter sees that parameter's gradient for the
    current backward pass before ``AccumulateGrad`` adds it into ``.grad`` and before DDP's
    reducer (a post-hook of the same node) copies it into a bucket — also with
    ``gradient_as_bucket_view=True``. The hooks return ``None``: gradients are untouched.
  * FSDP2 (``fully_shard``): a :class:`ReduceScatter` that wraps the module's own comm object
    and takes ``|input|^2`` of the flat, padded, unsharded local gradient (undoing FSDP's
    pre-division when it uses one) before calling it unchanged.
  * FSDP1 (``FullyShardedDataParallel``, sharded strategies): a communication hook that takes
    ``|grad|^2`` of the unsharded local gradient and then runs FSDP's default reduce-scatter
    (same pre-/post-division, same collective).

- **global**: the squared norm of the synchronized gradient. Under DDP ``.grad`` is the same on
  every rank, so each rank takes the norm of its own size-balanced share of the parameters (1/world
  of a pass); under FSDP each rank takes its gradient shards (``p.grad.to_local()``). The shares
  are summed by the all-reduce below.

At ``step()`` every rank contributes a vector of 8 numbers (sum of its parts' squared norms, the
two weight sums the pooling needs, its examples, its part count, 1 for "active", its share of the
global norm, an error flag) to **one asynchronous all-reduce (SUM)** on the data-parallel group. The
tracker reads the result lazily (on the next value read, or every ``max_pending`` steps), so the
host does not wait for it in the step. Every rank then forms the same :class:`Measurement` from
the same reduced numbers: all ranks report the same ``b_simple`` and skip the same steps.

Pooling (see :func:`noisescale.estimators.pool_parts`): parts are all (rank, micro-batch) pairs,
the big batch is the step. DDP averages the ranks' gradients, so across ranks the convention is
"mean": rank ``r``'s accumulated gradient ``U_r = sum_j alpha_rj G_rj`` (weights normalised within
the rank by the tracker's ``reduction``) enters ``V = (1/n) sum_r U_r``. With normalised weights
``a_rj = alpha_rj / n``::

    |G_small|^2 = sum_rj |u_rj|^2 / sum_rj alpha_rj^2
    b_small     = sum_rj alpha_rj^2 / sum_rj (alpha_rj^2 / b_rj)
    b_big       = n^2 / sum_rj (alpha_rj^2 / b_rj)

For ``n`` ranks with ``k`` equal micro-batches of ``m`` examples this is the paper's recipe
(``b_small = m``, ``b_big = n k m``); unequal sizes across ranks are handled exactly.
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Any, Sequence

from collections import deque

import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Joinable, JoinHook

from ..estimators import Measurement, pooling_moments
from .base import StepContext, check_sizes, infer_batch_size, sq_norm, sum_terms, total_sq_norm

__all__ = [
    "DistributedProbe",
    "DISTRIBUTED_METHODS",
    "joinable",
    "distributed_kind",
]

DISTRIBUTED_METHODS = ("ddp", "ddp_per_example", "fsdp")

# A rank's part of the global norm: (parameter, lo, hi, first) -- elements [lo, hi) of its
# gradient, or all of it when lo is None; first: this rank owns the parameter's element 0.
_Slice = tuple[torch.nn.Parameter, "int | None", "int | None", bool]

# Layout of the per-rank vector that is all-reduced (SUM) once per step.
_A2, _A2B, _EX, _K, _N, _ERR, _S, _BIG = range(8)  # host-known fields first, then the two tensors
_VEC_LEN = 8
_NAMES = ("sum_alpha2", "sum_alpha2_over_b", "examples", "parts", "ranks", "errors", "sum_sq_local", "big_term")


def distributed_kind(model: torch.nn.Module) -> str | None:
    """``"ddp"``, ``"fsdp1"``, ``"fsdp2"`` or ``None`` for how ``model`` is wrapped."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return "ddp"
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if isinstance(model, FullyShardedDataParallel):
            return "fsdp1"
    except ImportError:  # pragma: no cover
        pass
    try:
        from torch.distributed.fsdp import FSDPModule

        if any(isinstance(m, FSDPModule) for m in model.modules()):
            return "fsdp2"
    except ImportError:  # pragma: no cover
        pass
    return None


def _validate(model: torch.nn.Module, kind: str | None, method: str, process_group: Any) -> tuple[str, Any, int]:
    """Check the wrapper and the group; return ``(kind, group, world_size)``. Same answer on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"method={method!r} needs an initialized process group (torch.distributed.init_process_group, "
            "e.g. under torchrun); for one process use method='microbatch'")
    found = distributed_kind(model)
    if found is None:
        raise TypeError(
            f"method={method!r} needs a model wrapped in DistributedDataParallel, FullyShardedDataParallel "
            f"or fully_shard; got {type(model).__name__}. Wrap the model first and pass the wrapper to "
            "GradientNoiseScale")
    if kind is not None and not found.startswith(kind):
        raise TypeError(f"method={method!r} expects a {kind.upper()}-wrapped model, but the model is wrapped "
                        f"as {found}; use method='auto'")
    group = process_group if process_group is not None else DistributedProbe._default_group(model)
    world = dist.get_world_size(group)
    if world < 2:
        raise ValueError(
            f"method={method!r} compares each rank's gradient with the average over ranks, but the "
            f"data-parallel group has world size {world}: there is nothing to compare. Run with >= 2 "
            "processes, or use method='microbatch' (gradient accumulation with >= 2 micro-batches) on a "
            "single process")
    return found, group, world


class _DeferredMeasurement(Measurement):
    """A :class:`Measurement` whose numbers come from an all-reduce still in flight.

    The four fields resolve (wait for the reduction and read it, together with every other
    outstanding step of the same probe: one host sync) the first time any of them is read.
    """

    def __init__(self, probe: "DistributedProbe", record: "_StepRecord", source: str) -> None:  # noqa: D107
        object.__setattr__(self, "_probe", probe)
        object.__setattr__(self, "_record", record)
        object.__setattr__(self, "source", source)

    def _values(self) -> tuple[float, float, float, float]:
        rec = self._record
        if rec.result is None:
            self._probe._resolve_all()
        assert rec.result is not None
        return rec.result

    @property  # type: ignore[override]
    def sq_norm_small(self) -> float:  # type: ignore[override]
        return self._values()[0]

    @property  # type: ignore[override]
    def b_small(self) -> float:  # type: ignore[override]
        return self._values()[1]

    @property  # type: ignore[override]
    def sq_norm_big(self) -> float:  # type: ignore[override]
        return self._values()[2]

    @property  # type: ignore[override]
    def b_big(self) -> float:  # type: ignore[override]
        return self._values()[3]

    def reduced_examples(self) -> float:
        """The step's examples summed over the ranks (the all-reduced count)."""
        self._values()
        assert self._record.raw is not None
        return self._record.raw[_EX]

    @property
    def skip_reason(self) -> str | None:
        """Why this step cannot be used (the same on every rank); read by the tracker."""
        self._values()
        return self._record.reason


class _StepRecord:
    __slots__ = ("vec", "work", "result", "raw", "reason")

    def __init__(self, vec: torch.Tensor, work: Any) -> None:
        self.vec, self.work = vec, work
        self.result: tuple[float, float, float, float] | None = None
        self.raw: list[float] | None = None
        self.reason: str | None = None  # why the step is skipped on every rank, if it is


class _TapReduceScatter:
    """FSDP2 reduce-scatter comm that records ``|input|^2`` and then calls the original comm."""

    def __init__(self, probe: "DistributedProbe", inner: Any, param_group: Any) -> None:
        self.probe, self.inner, self.param_group = probe, inner, param_group

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.inner.allocate(size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any, op: Any,
                 async_op: bool = False) -> Any:
        if self.probe._active:
            term = sq_norm(input_tensor)
            pre = self._predivide_factor(input_tensor, group)
            if pre is not None and pre != 1:
                term = term * float(pre) ** 2  # FSDP divided the input before this call
            self.probe._add(term)
        return self.inner(output_tensor=output_tensor, input_tensor=input_tensor, group=group, op=op,
                          async_op=async_op)

    def _predivide_factor(self, input_tensor: torch.Tensor, group: Any) -> float | None:
        # Same rule as FSDP2's foreach_reduce: fp32/bf16 reductions divide inside the collective
        # (no pre-division) unless sums are forced; otherwise it pre-divides by ~sqrt(world).
        pg = self.param_group
        force = bool(getattr(pg, "force_sum_reduction_for_comms", False))
        if input_tensor.dtype in (torch.float32, torch.bfloat16) and not force:
            return None
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import _get_gradient_divide_factors

        return _get_gradient_divide_factors(group, None, input_tensor.dtype, input_tensor.device.type,
                                            getattr(pg, "gradient_divide_factor", None), force)[0]


def _fsdp1_tap_hook(state: "_FSDP1HookState", grad: torch.Tensor, output: torch.Tensor) -> None:
    """FSDP1 comm hook: record the local unsharded ``|grad|^2``, then FSDP's default reduce-scatter."""
    from torch.distributed.algorithms._comm_hooks import default_hooks

    if state.probe._active:
        state.probe._add(sq_norm(grad))
    default_hooks.reduce_scatter_hook(state.default, grad, output)


class _FSDP1HookState:
    def __init__(self, probe: "DistributedProbe", process_group: Any) -> None:
        from torch.distributed.algorithms._comm_hooks import default_hooks

        self.probe = probe
        self.default = default_hooks.DefaultState(process_group)


class DistributedProbe(Joinable):
    """Local (per-rank, per-micro-batch) and global squared norms under DDP / FSDP.

    Args:
        model: the wrapped module: ``DistributedDataParallel``, FSDP1
            ``FullyShardedDataParallel`` (root) or a module containing ``fully_shard`` modules.
        params: trainable parameters to measure (DDP: any subset; FSDP: all of them).
        reduction: how each rank's micro-batch gradients combine into its gradient,
            ``"mean"`` or ``"sum"`` (see :func:`noisescale.estimators.pool_parts`). Across ranks
            the convention is always "mean" (DDP and FSDP average the ranks' gradients).
        infer_sizes: record sizes from the leading dimension of forward inputs.
        local: optional probe that yields this rank's *local* pooled measurement (e.g. the
            per-example probe); its small-batch statistics are pooled across ranks and its big
            norm (the synchronized ``.grad``) is the global one. DDP only.
        process_group: the data-parallel group (default: the wrapper's group).
    """

    name = "ddp"

    def __init__(self, model: torch.nn.Module, params: Sequence[torch.nn.Parameter], *,
                 reduction: str = "mean", infer_sizes: bool = True, local: Any = None,
                 process_group: Any = None, kind: str | None = None) -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.kind, self.group, self.world_size = _validate(
            model, kind, "ddp_per_example" if local is not None else (kind or "ddp"), process_group)
        found = self.kind
        self.name = "ddp_per_example" if local is not None else ("ddp" if found == "ddp" else "fsdp")
        self.model = model
        self.reduction = reduction
        self.device = self._device(params)
        self._local = local
        if local is not None and found != "ddp":
            raise NotImplementedError("composition with a local probe (per-example) is available under DDP only")
        self._lock = threading.Lock()
        self._active = True
        self._current: list[torch.Tensor] = []  # squared norms of the open part's gradients
        self._pending_sizes: list[int | None] = []
        self._parts: list[tuple[torch.Tensor | float, list[int | None]]] = []
        self._records: list[_StepRecord] = []
        self._handles: list[Any] = []
        self._restore: list[tuple[Any, Any]] = []
        self._warned: set[str] = set()
        Joinable.__init__(self)
        self.history: deque[dict[str, float]] = deque(maxlen=10000)
        if found == "ddp":
            ignore = getattr(model, "parameters_to_ignore", set()) or set()
            ignored = {id(p) for n, p in model.module.named_parameters() if n in ignore}
            self.params = [p for p in params if id(p) not in ignored]
            self._global_share: list[_Slice] = _share(self.params, dist.get_rank(self.group), self.world_size)
            if local is None:
                self._handles += [p.register_hook(self._grad_hook) for p in self.params]
        else:
            ids = {id(p) for p in params}
            all_trainable = [p for p in model.parameters() if p.requires_grad]
            if ids != {id(p) for p in all_trainable}:
                raise ValueError("under FSDP the gradient is reduced as flat buffers: measure all trainable "
                                 "parameters (do not pass params=)")
            self.params = list(params)
            self._global_share = [(p, None, None, True) for p in self.params]  # shards: each rank its own
            if found == "fsdp2":
                self._install_fsdp2(model)
            else:
                self._install_fsdp1(model)
        if infer_sizes and local is None:
            self._handles.append(model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))

    # -- setup -------------------------------------------------------------------------

    @staticmethod
    def _default_group(model: torch.nn.Module) -> Any:
        pg = getattr(model, "process_group", None)
        if pg is not None:
            return pg
        for p in model.parameters():
            mesh = getattr(p, "device_mesh", None)
            if mesh is not None:
                if mesh.ndim != 1:
                    raise NotImplementedError(
                        f"fully_shard on a {mesh.ndim}-D device mesh (HSDP or FSDP x TP): pass the "
                        "data-parallel process_group explicitly is not supported yet; use a 1-D mesh")
                return mesh.get_group()
        return dist.group.WORLD

    @staticmethod
    def _device(params: Sequence[torch.nn.Parameter]) -> torch.device:
        for p in params:
            local = p.to_local() if hasattr(p, "to_local") else p
            return local.device
        return torch.device("cpu")

    def _install_fsdp2(self, model: torch.nn.Module) -> None:
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if not isinstance(m, FSDPModule):
                continue
            state = m._get_fsdp_state()
            groups = list(getattr(state, "_fsdp_param_groups", []))
            if not groups:
                continue
            if len(groups) > 1:
                raise NotImplementedError("fully_shard with several parameter groups per module (per-param "
                                          "meshes) is not supported by the distributed probe")
            pg = groups[0]
            inner = pg._reduce_scatter_comm
            m.set_custom_reduce_scatter(_TapReduceScatter(self, inner, pg))
            self._restore.append((m, inner))

    def _install_fsdp1(self, model: torch.nn.Module) -> None:
        from torch.distributed.fsdp import ShardingStrategy

        strategy = getattr(model, "sharding_strategy", None)
        if strategy not in (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP):
            raise NotImplementedError(
                f"FSDP1 with sharding_strategy={strategy}: only FULL_SHARD and SHARD_GRAD_OP are supported "
                "(use DDP instead of NO_SHARD; hybrid strategies do not allow communication hooks)")
        try:
            model.register_comm_hook(_FSDP1HookState(self, self.group), _fsdp1_tap_hook)
        except AssertionError as e:
            raise RuntimeError(
                "could not register noisescale's FSDP1 communication hook: FSDP allows one hook, registered "
                f"on the root before the first forward pass ({e}). Create GradientNoiseScale right after "
                "wrapping the model, and do not register another comm hook") from e

    # -- hooks -------------------------------------------------------------------------

    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not torch.is_grad_enabled():
            return
        with self._lock:
            self._close_part_locked()
            self._pending_sizes.append(infer_batch_size(args, kwargs))

    def _grad_hook(self, grad: torch.Tensor) -> None:
        self._add(sq_norm(grad))

    def _add(self, term: torch.Tensor) -> None:
        # One kernel per gradient here (the norm); summed when the part closes. A list append is
        # atomic, the lock only orders it against _close_part_locked.
        with self._lock:
            self._current.append(term)

    def _close_part_locked(self) -> None:
        if self._current:
            # a float on CPU, where the step's vector is then built from Python floats
            self._parts.append((sum_terms(self._current, self._current[0].device), self._pending_sizes))
            self._current = []
            self._pending_sizes = []

    # -- step --------------------------------------------------------------------------

    def pending_parts(self) -> int:
        """Closed local parts (micro-batches that reached the reduction) since the last step."""
        return len(self._parts) + bool(self._current)

    def collect(self, ctx: StepContext) -> tuple[Measurement | None, str | None, float | None]:
        error: BaseException | None = None
        vec_host = [0.0] * _VEC_LEN
        tensors: dict[int, torch.Tensor | float] = {}
        examples: float | None = None
        try:
            examples = self._local_stats(ctx, vec_host, tensors)
        except Exception as e:  # all-reduce first (peers are waiting in it), raise after
            error = e
            vec_host = [0.0] * _VEC_LEN
            tensors = {}
            vec_host[_ERR] = 1.0
        late = [tensors.get(i, 0.0) for i in (_S, _BIG)]
        if not any(isinstance(t, torch.Tensor) for t in late):
            vec = torch.tensor(vec_host[:_S] + late, dtype=torch.float64, device=self.device)
        else:  # numbers still on the device: no host sync here
            dev_part = torch.stack([torch.as_tensor(t, dtype=torch.float64, device=self.device).reshape(())
                                    for t in late])
            vec = torch.cat([torch.tensor(vec_host[:_S], dtype=torch.float64, device=self.device), dev_part])
        work = dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        rec = _StepRecord(vec, work)
        self._records.append(rec)
        if error is not None:
            raise error
        m = _DeferredMeasurement(self, rec, self.name)
        # the step's examples over all ranks (ranks may differ), read with the reduced numbers
        return m, None, (m.reduced_examples if examples is not None else None)

    def _local_stats(self, ctx: StepContext, vec: list[float], tensors: dict[int, torch.Tensor | float]
                     ) -> float | None:
        """Fill this rank's contribution; return its examples (None if unknown)."""
        vec[_N] = 1.0
        if self._local is not None:
            return self._local_stats_from_probe(ctx, vec, tensors)
        with self._lock:
            self._close_part_locked()
            parts, self._parts = self._parts, []
            self._pending_sizes = []
        k = len(parts)
        sizes = self._resolve_sizes(ctx.sizes, [s for _, s in parts], k)
        tensors[_BIG] = self._global_term() * ctx.inv_scale2_big
        if k == 0:
            return 0.0 if sizes is not None else None
        vec[_A2], vec[_A2B] = pooling_moments(sizes, [1.0] * k if self.reduction == "mean" else sizes)
        vec[_EX] = float(sum(sizes))
        vec[_K] = float(k)
        tensors[_S] = sum_terms([p for p, _ in parts], self.device) * ctx.inv_scale2_small
        return float(sum(sizes))

    def _local_stats_from_probe(self, ctx: StepContext, vec: list[float],
                                tensors: dict[int, torch.Tensor | float]) -> float | None:
        m, reason, examples = self._local.collect(ctx)
        if m is None:
            big = self._global_term(getattr(self._local, "params", self.params))  # same params as the probe's
            tensors[_BIG] = big * ctx.inv_scale2_big / self.world_size
            self._warn_once(f"local probe could not measure this rank's step: {reason}")
            return examples
        # Undo the local pooling: pool_parts gave sq_small = S/A2, b_small = A2/A2b, b_big = 1/A2b.
        a2b = 1.0 / m.b_big
        a2 = m.b_small / m.b_big
        tensors[_S] = sum_terms([m.sq_norm_small], self.device) * a2
        # the local probe's big norm is the full synchronized .grad on every rank: each adds 1/n of it
        tensors[_BIG] = sum_terms([m.sq_norm_big], self.device) / self.world_size
        vec[_A2], vec[_A2B] = a2, a2b
        vec[_K] = float(examples) if examples else 2.0  # parts = examples (informational)
        vec[_EX] = float(examples) if examples is not None else 0.0
        return examples

    def _global_term(self, params: Sequence[torch.nn.Parameter] | None = None) -> torch.Tensor | float:
        """This rank's term of the global squared norm (the ranks' terms are summed by the all-reduce).

        DDP: ``.grad`` is the same synchronized gradient on every rank, so each rank takes the norm
        of its own 1/world of the gradient elements (:func:`_share`): 1/world of a pass over the
        gradients, balanced even when one tensor (an embedding) dominates the model.
        FSDP: the rank's gradient shards. With a local probe (``params`` given): that probe's params.
        """
        share = self._global_share if params is None else [(p, None, None, True) for p in params]
        terms = []
        for p, lo, hi, first in share:
            g = p.grad
            if g is None:
                continue
            if hasattr(g, "to_local"):
                g = g.to_local()
            g = g.detach()
            if lo is None or g.is_sparse or not g.is_contiguous() or (lo == 0 and hi == g.numel()):
                if first and g.numel():  # cannot be sliced (or need not be): the owner of element 0 takes it
                    terms.append(g)
            elif lo < hi:
                terms.append(g.view(-1)[lo:hi])
        total = total_sq_norm(terms)
        if total is None:
            return 0.0
        return total if isinstance(total, float) else total.to(self.device)

    def _resolve_sizes(self, given: Sequence[float] | None, seen: list[list[int | None]], k: int) -> list[float]:
        if given is not None:
            return check_sizes(given, k, "this rank had, since the last step(),")
        out = []
        for group in seen:
            if not group or any(s is None for s in group):
                raise ValueError(
                    f"could not infer the sizes of this rank's {k} micro-batches from the forward inputs "
                    f"(saw {seen}); pass them explicitly: gns.step(sizes=[...]) with one number per "
                    "micro-batch of this rank, in the tracker's unit")
            out.append(float(sum(group)))  # type: ignore[arg-type]
        return out

    # -- resolving the all-reduced numbers --------------------------------------------

    def _resolve_all(self) -> None:
        records, self._records = self._records, []
        if not records:
            return
        for r in records:
            r.work.wait()
        values = torch.stack([r.vec for r in records]).tolist()  # one host sync for all of them
        for r, v in zip(records, values):
            r.raw = v
            r.result, r.reason = self._finish(v)
            self.history.append(dict(zip(_NAMES, v), sq_norm_small=r.result[0], b_small=r.result[1],
                                     sq_norm_big=r.result[2], b_big=r.result[3]))

    def _finish(self, v: list[float]) -> tuple[tuple[float, float, float, float], str | None]:
        """The pooled measurement from the all-reduced vector, or NaNs and the reason to skip it."""
        skipped = (math.nan, 1.0, math.nan, 2.0)
        n = v[_N]
        if v[_ERR] > 0:
            return skipped, self._warn_once("a rank failed to compute its statistics for a step (it raised "
                                            "an error); the step is skipped on every rank")
        if n < self.world_size:
            # Some ranks have joined (uneven inputs): their share of the global norm is missing.
            return skipped, self._warn_once("steps where some ranks had already run out of data (Join) are "
                                            "skipped: the global norm is computed in shares across all ranks")
        if n <= 0 or v[_A2B] <= 0 or not v[_A2] < n * n * (1 - 1e-12):
            return skipped, self._warn_once(
                f"a step had fewer than 2 gradient parts over all ranks ({v[_K]:.0f} micro-batches on "
                f"{n:.0f} active ranks): no smaller batch to compare with; the step is skipped")
        big = v[_BIG]  # DDP: sum of the ranks' shares; FSDP: sum of the shards' squared norms
        sq_small = v[_S] / v[_A2]
        b_small = v[_A2] / v[_A2B]
        b_big = n * n / v[_A2B]
        return (sq_small, b_small, big, b_big), None

    def reduced_history(self) -> list[dict[str, float]]:
        """Every resolved step (up to 10000): the all-reduced sums and the pooled measurement."""
        self._resolve_all()
        return list(self.history)

    def _warn_once(self, msg: str) -> str:
        if msg not in self._warned:
            self._warned.add(msg)
            warnings.warn(f"noisescale: {msg}", UserWarning, stacklevel=3)
        return msg

    # -- uneven inputs (torch.distributed.algorithms.Join) ----------------------------

    def join_hook(self, **kwargs: Any) -> JoinHook:
        probe = self

        class _Hook(JoinHook):
            def main_hook(self) -> None:
                # Shadow the step's all-reduce for ranks still training. DDP's join hook (listed
                # before this one) has just decided whether this iteration synchronizes.
                if probe.kind == "ddp" and not getattr(probe.model, "require_forward_param_sync", True):
                    return
                vec = torch.zeros(_VEC_LEN, dtype=torch.float64, device=probe.device)
                dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=probe.group)

        return _Hook()

    @property
    def join_device(self) -> torch.device:
        return self.device

    @property
    def join_process_group(self) -> Any:
        return self.group

    # -- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        self._resolve_all()
        for h in self._handles:
            h.remove()
        self._handles = []
        for m, inner in self._restore:
            m.set_custom_reduce_scatter(inner)
        self._restore = []
        self._active = False  # an FSDP1 comm hook cannot be removed: it now only reduce-scatters
        if self._local is not None:
            self._local.close()
        self._parts = []
        self._pending_sizes = []
        self._current = []


def _share(params: Sequence[torch.nn.Parameter], rank: int, world: int) -> list[_Slice]:
    """This rank's part of the global norm: ``(param, lo, hi, first)`` for each parameter it holds
    elements ``[lo, hi)`` of, in the order of ``params`` laid end to end and cut into ``world`` equal
    ranges (the same cut on every rank). ``first``: this rank holds the parameter's element 0, and
    takes the whole gradient if that cannot be sliced (sparse, or not contiguous).
    """
    total = sum(p.numel() for p in params)
    lo_r, hi_r = total * rank // world, total * (rank + 1) // world
    out: list[_Slice] = []
    off = 0
    for p in params:
        n = p.numel()
        lo, hi = max(off, lo_r), min(off + n, hi_r)
        if n and lo < hi:
            out.append((p, lo - off, hi - off, lo_r <= off < hi_r))
        off += n
    return out


def joinable(gns: Any) -> DistributedProbe:
    """The :class:`~torch.distributed.algorithms.Join`-able part of a tracker, for uneven inputs::

        with Join([ddp_model, joinable(gns)]):   # DDP first, then the tracker
            for batch in loader: ...

    Ranks that run out of data shadow the tracker's per-step all-reduce, so the others do not hang.
    """
    probe = getattr(gns, "_probe", gns)
    if not isinstance(probe, DistributedProbe):
        raise TypeError(f"joinable() needs a GradientNoiseScale using a distributed method, got {gns!r}")
    return probe


# -- factories for the tracker (registered in probes/__init__.py) ----------------------


def _no_options(method: str, options: dict[str, Any]) -> None:
    if options:
        raise TypeError(f"method={method!r} takes no options {sorted(options)} (it accepts process_group=); "
                        "per-example options apply to method='per_example' or 'ddp_per_example'")


def _make_ddp(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], *, reduction: str = "mean",
              unit: str = "examples", process_group: Any = None, **options: Any) -> DistributedProbe:
    _no_options("ddp", options)
    return DistributedProbe(model, params, reduction=reduction, infer_sizes=(unit == "examples"), kind="ddp",
                            process_group=process_group)


def _make_fsdp(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], *, reduction: str = "mean",
               unit: str = "examples", process_group: Any = None, **options: Any) -> DistributedProbe:
    _no_options("fsdp", options)
    return DistributedProbe(model, params, reduction=reduction, infer_sizes=(unit == "examples"), kind="fsdp",
                            process_group=process_group)


def _make_ddp_per_example(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], *,
                          reduction: str = "mean", unit: str = "examples", process_group: Any = None,
                          **options: Any) -> DistributedProbe:
    from . import PROBES, make_probe

    if "per_example" not in PROBES:
        raise NotImplementedError("method='ddp_per_example' needs the per-example probe, which is not available "
                                  "in this version of noisescale; use method='ddp'")
    if distributed_kind(model) != "ddp":
        raise TypeError("method='ddp_per_example' needs a DistributedDataParallel model")
    _validate(model, "ddp", "ddp_per_example", process_group)  # before the local probe attaches its hooks
    local = make_probe("per_example", model, params, reduction=reduction, unit=unit, **options)
    try:
        return DistributedProbe(model, params, reduction=reduction, infer_sizes=False, local=local, kind="ddp",
                                process_group=process_group)
    except Exception:
        local.close()
        raise


def register(register_probe: Any) -> None:
    """Register ``ddp``, ``fsdp`` and ``ddp_per_example`` with the probe registry."""
    register_probe("ddp", _make_ddp)
    register_probe("fsdp", _make_fsdp)
    register_probe("ddp_per_example", _make_ddp_per_example)
