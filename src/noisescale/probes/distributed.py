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

- **global**: the squared norm of the synchronized gradient, captured when the backward pass
  ends, after DDP's/FSDP's own final callbacks wrote it (so clipping before ``step()`` changes
  nothing). Under DDP ``.grad`` is the same on every rank, so each rank takes the norm of its own
  1/world of the elements; under FSDP each rank takes its gradient shards
  (``p.grad.to_local()``). The shares are summed by the all-reduce below.

At ``step()`` every rank queues its additive :class:`~noisescale.estimators.StepStats` (the head
of pooling sums, then per group its parts' squared norms and its share of the global norm). Every
``reduce_every`` steps (default 10; at step numbers that are multiples of it, the same on every
rank) the queued records of all ranks are summed by **one asynchronous all-reduce (SUM)** of a
``[steps, entries]`` matrix on the data-parallel group: no collective of noisescale's runs on the
other steps. The tracker folds a step only once its reduction has been issued, and reads the
results lazily (when its subscribers are due, a value is read, or every ``max_pending`` steps), so
the host does not wait in the step. Every rank then forms the same estimates from the same reduced
numbers: all ranks report the same ``b_simple`` and skip the same steps; values lag by at most
``reduce_every - 1`` steps. ``GradientNoiseScale.synchronize()`` (every rank) reduces the queue at
once; a ``Join`` context reduces it when it ends, and the ranks that ran out of data count the steps
they shadow. Steps still queued at ``state_dict()`` or ``close()`` are counted as skipped, with
the reason (neither is a collective: rank 0 alone may call them).

Pooling: parts are all (rank, micro-batch) pairs, the big batch is the step. DDP averages the
ranks' gradients, so across ranks the convention is "mean": rank ``r``'s accumulated gradient
``U_r = sum_j alpha_rj G_rj`` (weights normalised within the rank by the tracker's ``reduction``)
enters ``V = (1/n) sum_r U_r``. Each rank therefore contributes its parts with weights
``a_rj = alpha_rj / n`` and squared norms ``|u_rj / n|^2``; the sums over ranks are exactly the
single-process statistics of the whole step, and :func:`noisescale.estimators.step_estimates`
forms the estimate. For ``n`` ranks with ``k`` equal micro-batches of ``m`` examples this is the
paper's recipe (``b_small = m``, ``b_big = n k m``); unequal sizes across ranks are handled exactly.
With ``method="ddp_per_example"`` a rank's parts are its examples (the per-example probe's
statistics, rescaled the same way).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Joinable, JoinHook

from ..estimators import ERRORS, HEAD, SUM_A2, SUM_A2_OVER_B, StepStats, make_step_stats
from .base import (
    EndOfBackward,
    Hook,
    Piece,
    ProbeConfig,
    StepContext,
    StepTotal,
    Sums,
    _sq_norm_term,
    add_sums,
    check_sizes,
    infer_batch_size,
    pass_sums,
    scaled_sums,
    sq_norm,
)

__all__ = [
    "DistributedProbe",
    "DDPProbe",
    "FSDPProbe",
    "DDPPerExampleProbe",
    "DISTRIBUTED_METHODS",
    "joinable",
    "distributed_kind",
]

DISTRIBUTED_METHODS = ("ddp", "ddp_per_example", "fsdp")

# Steps per reduction across ranks. Issuing a collective costs a fixed ~0.4 ms on gloo (its thread
# competes with training for the cores); once per 10 steps that is nothing, values lag by at most 9
# steps, and 10 divides the usual logging and checkpoint intervals (10, 50, 100, 1000 steps).
REDUCE_EVERY = 10

# Why FSDP cannot carry these exactly (it refuses rather than approximates).
FSDP_UNSUPPORTED = {
    "groups": "groups= under FSDP is not supported: the local gradients reach the reduce-scatter as flat "
    "buffers of whole FSDP units, not per group; use DDP, or measure per group on one process",
    "preconditioner": "preconditioner= under FSDP is not supported: the optimizer's second moment is sharded "
    "while the local gradient is not, so P * g cannot be formed exactly; use DDP, or measure on one process",
}


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
            "e.g. under torchrun); for one process use method='microbatch'"
        )
    found = distributed_kind(model)
    if found is None:
        raise TypeError(
            f"method={method!r} needs a model wrapped in DistributedDataParallel, FullyShardedDataParallel "
            f"or fully_shard; got {type(model).__name__}. Wrap the model first and pass the wrapper to "
            "GradientNoiseScale"
        )
    if kind is not None and not found.startswith(kind):
        raise TypeError(
            f"method={method!r} expects a {kind.upper()}-wrapped model, but the model is wrapped "
            f"as {found}; use method='auto'"
        )
    group = process_group if process_group is not None else DistributedProbe._default_group(model)
    world = dist.get_world_size(group)
    if world < 2:
        raise ValueError(
            f"method={method!r} compares each rank's gradient with the average over ranks, but the "
            f"data-parallel group has world size {world}: there is nothing to compare. Run with >= 2 "
            "processes, or use method='microbatch' (gradient accumulation with >= 2 micro-batches) on a "
            "single process"
        )
    return found, group, world


class _TapReduceScatter:
    """FSDP2 reduce-scatter comm that records ``|input|^2`` and then calls the original comm."""

    def __init__(self, probe: DistributedProbe, inner: Any, param_group: Any) -> None:
        self.probe, self.inner, self.param_group = probe, inner, param_group

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.inner.allocate(size, dtype=dtype, device=device)

    def __call__(
        self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any, op: Any, async_op: bool = False
    ) -> Any:
        if self.probe._active:
            term = sq_norm(input_tensor)
            pre = self._predivide_factor(input_tensor, group)
            if pre is not None and pre != 1:
                term = term * float(pre) ** 2  # FSDP divided the input before this call
            self.probe._add(term, 0)
        return self.inner(output_tensor=output_tensor, input_tensor=input_tensor, group=group, op=op, async_op=async_op)

    def _predivide_factor(self, input_tensor: torch.Tensor, group: Any) -> float | None:
        # Same rule as FSDP2's foreach_reduce: fp32/bf16 reductions divide inside the collective
        # (no pre-division) unless sums are forced; otherwise it pre-divides by ~sqrt(world).
        pg = self.param_group
        force = bool(getattr(pg, "force_sum_reduction_for_comms", False))
        if input_tensor.dtype in (torch.float32, torch.bfloat16) and not force:
            return None
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import _get_gradient_divide_factors

        return _get_gradient_divide_factors(
            group,
            None,
            input_tensor.dtype,
            input_tensor.device.type,
            getattr(pg, "gradient_divide_factor", None),
            force,
        )[0]


def _fsdp1_tap_hook(state: _FSDP1HookState, grad: torch.Tensor, output: torch.Tensor) -> None:
    """FSDP1 comm hook: record the local unsharded ``|grad|^2``, then FSDP's default reduce-scatter."""
    from torch.distributed.algorithms._comm_hooks import default_hooks

    if state.probe._active:
        state.probe._add(sq_norm(grad), 0)
    default_hooks.reduce_scatter_hook(state.default, grad, output)


class _FSDP1HookState:
    def __init__(self, probe: DistributedProbe, process_group: Any) -> None:
        from torch.distributed.algorithms._comm_hooks import default_hooks

        self.probe = probe
        self.default = default_hooks.DefaultState(process_group)


class DistributedProbe(Joinable):
    """Local (per-rank, per-micro-batch) and global squared norms under DDP / FSDP.

    Args:
        model: the wrapped module: ``DistributedDataParallel``, FSDP1
            ``FullyShardedDataParallel`` (root) or a module containing ``fully_shard`` modules.
        params: trainable parameters to measure (DDP: any subset; FSDP: all of them).
        config: reduction (how each rank's micro-batch gradients combine into its gradient; across
            ranks the convention is always "mean", since DDP and FSDP average the ranks' gradients),
            unit, groups and preconditioner (DDP only).
        local: optional probe whose :class:`StepStats` are this rank's local parts (e.g. the
            per-example probe); its total is replaced by this rank's share of the synchronized
            gradient. DDP only.
        process_group: the data-parallel group (default: the wrapper's group).
        kind: ``"ddp"`` or ``"fsdp"`` to insist on a wrapper.
    """

    name = "ddp"
    wrapper = "ddp"  # the wrapper the registered probe insists on
    options: ClassVar[frozenset[str]] = frozenset({"process_group", "reduce_every"})
    supports: ClassVar[frozenset[str]] = frozenset({"groups", "preconditioner"})

    @staticmethod
    def applicable(model: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> str | None:
        return None  # the constructor says what is wrong (wrapper, process group, world size)

    @classmethod
    def from_config(
        cls,
        model: torch.nn.Module,
        params: Sequence[torch.nn.Parameter],
        config: ProbeConfig,
        process_group: Any = None,
        reduce_every: int = REDUCE_EVERY,
    ) -> DistributedProbe:
        return cls(model, params, config, process_group=process_group, kind=cls.wrapper, reduce_every=reduce_every)

    def __init__(
        self,
        model: torch.nn.Module,
        params: Sequence[torch.nn.Parameter],
        config: ProbeConfig | None = None,
        *,
        local: Any = None,
        process_group: Any = None,
        kind: str | None = None,
        reduce_every: int = REDUCE_EVERY,
    ) -> None:
        self.config = config = config or ProbeConfig()
        if config.reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {config.reduction!r}")
        if not (isinstance(reduce_every, int) and not isinstance(reduce_every, bool) and reduce_every >= 1):
            raise ValueError(
                f"reduce_every must be a positive integer number of steps, got {reduce_every!r} (1: reduce "
                "every step; larger: one all-reduce per that many steps, values up to that many steps behind)"
            )
        self.kind, self.group, self.world_size = _validate(
            model, kind, "ddp_per_example" if local is not None else (kind or "ddp"), process_group
        )
        found = self.kind
        self.name = "ddp_per_example" if local is not None else ("ddp" if found == "ddp" else "fsdp")
        self.model = model
        self.reduction = config.reduction
        self.groups = config.resolved_groups(model, params)
        self.preconditioner = config.preconditioner
        self.device = self._device(params)
        self._local = local
        if local is not None and found != "ddp":
            raise NotImplementedError("composition with a local probe (per-example) is available under DDP only")
        if found != "ddp" and self.groups.grouped:
            raise NotImplementedError(FSDP_UNSUPPORTED["groups"])
        if found != "ddp" and self.preconditioner is not None:
            raise NotImplementedError(FSDP_UNSUPPORTED["preconditioner"])
        self._lock = threading.Lock()
        self._active = True
        self._current: list[torch.Tensor | float] = []  # squared norms of the open part's gradients
        self._current_index: list[int] = []  # their groups
        self._pending_sizes: list[int | None] = []
        self._parts: list[tuple[Sums, list[int | None]]] = []
        self._handles: list[Any] = []
        self.reduce_every = reduce_every
        self._queue: list[StepStats] = []  # this rank's records since the last reduction
        self._shadow: list[tuple[int, StepStats]] = []  # steps shadowed under Join, for the tracker
        self._step = 0  # the number of the last step queued (the tracker's; shadowed ones counted)
        self._restore: list[tuple[Any, Any]] = []
        self._warned: set[str] = set()
        Joinable.__init__(self)
        pieces: list[Piece]
        if found == "ddp":
            ddp = cast(torch.nn.parallel.DistributedDataParallel, model)  # found == "ddp": distributed_kind checked
            ignore: set[str] = getattr(ddp, "parameters_to_ignore", set()) or set()
            ignored = {id(p) for n, p in ddp.module.named_parameters() if n in ignore}
            self.params = [p for p in params if id(p) not in ignored]
            # .grad is the same synchronized gradient on every rank: each rank takes the norm of its
            # own 1/world of the elements (1/world of a pass, balanced even when one tensor dominates)
            pieces = _share(self.params, dist.get_rank(self.group), self.world_size)
            self._handles += [p.register_hook(Hook(self._make_hook(p, measure=local is None))) for p in self.params]
        else:
            ids = {id(p) for p in params}
            all_trainable = [p for p in model.parameters() if p.requires_grad]
            if ids != {id(p) for p in all_trainable}:
                raise ValueError(
                    "under FSDP the gradient is reduced as flat buffers: measure all trainable "
                    "parameters (do not pass params=)"
                )
            self.params = list(params)
            pieces = [(p, None, None, True) for p in self.params]  # shards: each rank its own
            if found == "fsdp2":
                self._install_fsdp2(model)
            else:
                self._install_fsdp1(model)
        # The global norm is captured when a backward pass ends, after DDP's/FSDP's own final
        # callbacks wrote the synchronized gradient: clipping before step() changes nothing.
        self._total = StepTotal(pieces, self.groups, self.preconditioner, self.device, host=self.device.type == "cpu")
        self._end = EndOfBackward(self._capture)
        if config.infer_sizes and local is None:
            self._handles.append(model.register_forward_pre_hook(Hook(self._pre_forward), with_kwargs=True))

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
                        "data-parallel process_group explicitly is not supported yet; use a 1-D mesh"
                    )
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
                raise NotImplementedError(
                    "fully_shard with several parameter groups per module (per-param "
                    "meshes) is not supported by the distributed probe"
                )
            pg = groups[0]
            inner = pg._reduce_scatter_comm
            # _TapReduceScatter duck-types FSDP2's private ReduceScatter ABC (not subclassed on purpose)
            m.set_custom_reduce_scatter(_TapReduceScatter(self, inner, pg))  # type: ignore[arg-type]
            self._restore.append((m, inner))

    def _install_fsdp1(self, model: torch.nn.Module) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

        fsdp = cast(FullyShardedDataParallel, model)  # called for distributed_kind(model) == "fsdp1" only
        strategy = getattr(model, "sharding_strategy", None)
        if strategy not in (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP):
            raise NotImplementedError(
                f"FSDP1 with sharding_strategy={strategy}: only FULL_SHARD and SHARD_GRAD_OP are supported "
                "(use DDP instead of NO_SHARD; hybrid strategies do not allow communication hooks)"
            )
        try:
            fsdp.register_comm_hook(_FSDP1HookState(self, self.group), _fsdp1_tap_hook)
        except AssertionError as e:
            raise RuntimeError(
                "could not register noisescale's FSDP1 communication hook: FSDP allows one hook, registered "
                f"on the root before the first forward pass ({e}). Create GradientNoiseScale right after "
                "wrapping the model, and do not register another comm hook"
            ) from e

    # -- hooks -------------------------------------------------------------------------

    def _capture(self) -> None:
        # A pass under DDP's no_sync() leaves a local .grad that the step's last, synchronized pass
        # replaces: only that one is worth reading (one share of the gradients per step, not per pass).
        if getattr(self.model, "require_backward_grad_sync", True):
            self._total.capture()

    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not torch.is_grad_enabled():
            return
        with self._lock:
            self._close_part_locked()
            self._pending_sizes.append(infer_batch_size(args, kwargs))

    def _make_hook(self, p: torch.nn.Parameter, measure: bool) -> Any:
        gi = self.groups.index(p)
        pre = self.preconditioner

        def hook(grad: torch.Tensor) -> None:
            # this pass's local gradient of p, before AccumulateGrad and before DDP's reducer
            # copies it into a bucket; nothing is returned: the gradient is untouched
            if measure:
                # (a float on the CPU, read at once; a 0-d tensor on accelerators: no host sync)
                self._add(_sq_norm_term(grad, pre.weight(p) if pre is not None else None), gi)
            else:
                self._end.arm()

        return hook

    def _add(self, term: torch.Tensor | float, group: int) -> None:
        # One kernel per gradient here (the norm); summed when the part closes. The lock orders the
        # appends against _close_part_locked.
        with self._lock:
            self._current.append(term)
            self._current_index.append(group)
        self._end.arm()

    def _close_part_locked(self) -> None:
        if self._current:
            part = pass_sums(self._current, self._current_index, len(self.groups), self.device)
            self._parts.append((part, self._pending_sizes))
            self._current, self._current_index, self._pending_sizes = [], [], []

    # -- step --------------------------------------------------------------------------

    def pending_parts(self) -> int:
        """Closed local parts (micro-batches that reached the reduction) since the last step."""
        return len(self._parts) + bool(self._current)

    def metrics(self) -> dict[str, float]:
        return self._local.metrics() if self._local is not None else {"coverage": 1.0}

    def collect(self, ctx: StepContext) -> StepStats:
        """This rank's statistics, queued for the next reduction across ranks.

        The returned record holds this rank's numbers and ``ready=False`` until the step whose
        number is a multiple of ``reduce_every`` (the same steps on every rank), when the queued
        records of all ranks are summed by one asynchronous all-reduce of a ``[steps, entries]``
        matrix; each record then points at its reduced row (``ready=True``). Outside a tracker
        (``ctx.step`` is None) the step is reduced at once.
        """
        G = len(self.groups)
        error: Exception | None = None
        try:
            vec = self._local_stats(ctx).vec
        except Exception as e:  # queue the step anyway (peers count it), raise after
            vec = self._zeros()
            vec[ERRORS] = 1.0  # every rank then skips the step
            error = None if isinstance(e, _LocalSkip) else e
        if self.preconditioner is not None:
            self.preconditioner.stale = True
        st = StepStats(vec, G, ready=False)
        self._enqueue(st, ctx.step)
        if ctx.step is None:  # (outside a tracker: reduced at once)
            self.synchronize()
        if error is not None:
            # the tracker records the step from the reduced numbers, as the other ranks do
            error.noisescale_stats = st  # type: ignore[attr-defined]
            raise error
        return st

    def _enqueue(self, st: StepStats, step: int | None) -> None:
        """Queue a step's record under its number (the tracker's; ``None``: the next one) and reduce the
        queue at the step numbers that are multiples of ``reduce_every`` (the same on every rank)."""
        self._queue.append(st)
        self._step = step if step is not None else self._step + 1
        if self._step % self.reduce_every == 0:
            self.synchronize()

    def _zeros(self) -> torch.Tensor:
        """A record of nothing (it adds nothing when summed), to fill in with a flag if needed."""
        return torch.zeros(HEAD + 2 * len(self.groups), dtype=torch.float64, device=self.device)

    def synchronize(self) -> int:
        """Reduce the queued steps across ranks now (one asynchronous all-reduce); return how many.

        A collective: every rank of the group must call it at the same point (the tracker's
        :meth:`~noisescale.GradientNoiseScale.synchronize`). The probe calls it itself every
        ``reduce_every`` steps and when a :class:`~torch.distributed.algorithms.Join` context ends.
        """
        queue, self._queue = self._queue, []
        if not queue:
            return 0
        # one collective for the whole queue: a [steps, entries] float64 matrix, summed over ranks
        buf = torch.stack([st.vec for st in queue])
        work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        for i, st in enumerate(queue):
            st.vec, st.work, st.ready = buf[i], work, True
        return len(queue)

    def unreduced(self) -> int:
        """Steps queued on this rank since the last reduction across ranks."""
        return len(self._queue)

    def resume_at(self, step: int) -> None:
        """The tracker resumed at ``step`` (``load_state_dict``): count the next steps from there."""
        self._step = step

    def take_shadow_steps(self) -> list[tuple[int, StepStats]]:
        """Steps this rank shadowed after running out of data under ``Join`` (its part of them is
        zero): ``(step number, record)`` pairs for the tracker, which counts them like the other
        ranks do."""
        out, self._shadow = self._shadow, []
        return out

    def _local_stats(self, ctx: StepContext) -> StepStats:
        """This rank's additive statistics: its parts with weights ``a = alpha / n`` in the global step
        ``V = (1/n) sum_r U_r`` (DDP averages the ranks' gradients), and its share of ``|V|^2``."""
        G = len(self.groups)
        n = self.world_size
        total = self._total.take_sums(ctx)
        if self._local is not None:
            st = self._local.collect(ctx)
            if st.reason is not None:
                self._warn_once(f"the local probe could not measure this rank's step: {st.reason}")
                raise _LocalSkip(st.reason)
        else:
            with self._lock:
                self._close_part_locked()
                parts, self._parts = self._parts, []
                self._pending_sizes = []
            k = len(parts)
            sizes = self._resolve_sizes(ctx.sizes, [sz for _, sz in parts], k)
            if k == 0:
                st = make_step_stats([0.0] * G, [0.0] * G, [1.0], parts=0, examples=0.0, device=self.device)
                st.vec[SUM_A2] = st.vec[SUM_A2_OVER_B] = 0.0
                st.vec[HEAD + G :] = torch.as_tensor(total, dtype=torch.float64, device=self.device)
                return st
            # a_rj = alpha_rj / n: the parts' weights and squared norms (u_rj / n in V's units) scale
            # by 1/n^2, applied as the record is built (no in-place ops after: the step's fixed cost)
            nn = float(n * n)
            small = add_sums([x for x, _ in parts], self.device)
            return make_step_stats(
                scaled_sums(small, ctx.inv_scale2_small / nn, self.device),
                total,
                sizes,
                reduction=self.reduction,
                device=self.device,
                a2_scale=1.0 / nn,
            )
        # a_rj = alpha_rj / n: the parts' weights and squared norms (u_rj / n in V's units) scale by 1/n^2
        st.vec[SUM_A2] /= n * n
        st.vec[SUM_A2_OVER_B] /= n * n
        st.vec[HEAD : HEAD + G] /= n * n
        st.vec[HEAD + G :] = torch.as_tensor(total, dtype=torch.float64, device=self.device)
        return st

    def _resolve_sizes(self, given: Sequence[float] | None, seen: list[list[int | None]], k: int) -> list[float]:
        if given is not None:
            return check_sizes(given, k, "this rank had, since the last step(),")
        out = []
        for group in seen:
            if not group or any(s is None for s in group):
                raise ValueError(
                    f"could not infer the sizes of this rank's {k} micro-batches from the forward inputs "
                    f"(saw {seen}); pass them explicitly: gns.step(sizes=[...]) with one number per "
                    "micro-batch of this rank, in the tracker's unit"
                )
            out.append(float(sum(s for s in group if s is not None)))  # (all are: checked above)
        return out

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
                # A rank out of data shadows each step of the ranks still training: it queues a zero
                # record (it adds nothing) under the step's number and joins the reductions at the
                # same steps. DDP's join hook (listed before this one) has just decided whether this
                # iteration synchronizes, i.e. ends a step.
                if probe.kind == "ddp" and not getattr(probe.model, "require_forward_param_sync", True):
                    return
                st = StepStats(probe._zeros(), len(probe.groups), ready=False)
                probe._enqueue(st, None)
                probe._shadow.append((probe._step, st))

            def post_hook(self, is_last_joiner: bool) -> None:
                # every rank runs this when the Join context ends: reduce what is left, so that
                # the steps since the last reduction are not lost at the end of uneven inputs
                probe.synchronize()

        return _Hook()

    @property
    def join_device(self) -> torch.device:
        return self.device

    @property
    def join_process_group(self) -> Any:
        return self.group

    # -- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
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
        self._current, self._current_index = [], []
        self._queue = []  # never reduced (close() is not a collective): the tracker records them skipped


class _LocalSkip(Exception):
    """This rank's local probe could not measure the step: the step is skipped on every rank."""


def _share(params: Sequence[torch.nn.Parameter], rank: int, world: int) -> list[Piece]:
    """This rank's part of the global norm: ``(param, lo, hi, first)`` for each parameter it holds
    elements ``[lo, hi)`` of, in the order of ``params`` laid end to end and cut into ``world`` equal
    ranges (the same cut on every rank). ``first``: this rank holds the parameter's element 0, and
    takes the whole gradient if that cannot be sliced (sparse, or not contiguous).
    """
    total = sum(p.numel() for p in params)
    lo_r, hi_r = total * rank // world, total * (rank + 1) // world
    out: list[Piece] = []
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

    Ranks that run out of data shadow the tracker's reductions (and count the steps they shadow, so
    that every rank ends with the same counters and estimates), so the others do not hang; the steps
    queued since the last reduction are reduced when the context ends.
    """
    probe = gns.probe if hasattr(gns, "probe") else gns
    if not isinstance(probe, DistributedProbe):
        raise TypeError(f"joinable() needs a GradientNoiseScale using a distributed method, got {gns!r}")
    return probe


# -- the registered probes ------------------------------------------------------------


def _several_ranks(model: torch.nn.Module) -> str | None:
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return distributed_kind(model)


class DDPProbe(DistributedProbe):
    """``method="ddp"``: local norms in tensor hooks, the global one in shares across ranks."""

    name = "ddp"
    wrapper = "ddp"

    @staticmethod
    def auto_score(model: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> float:
        return 10.0 if _several_ranks(model) == "ddp" else 0.0


class FSDPProbe(DistributedProbe):
    """``method="fsdp"``: local norms at the reduce-scatter, the global one from the shards."""

    name = "fsdp"
    wrapper = "fsdp"
    supports: ClassVar[frozenset[str]] = frozenset()
    why_unsupported: ClassVar[dict[str, str]] = FSDP_UNSUPPORTED

    @staticmethod
    def auto_score(model: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> float:
        return 10.0 if (_several_ranks(model) or "").startswith("fsdp") else 0.0


class DDPPerExampleProbe(DistributedProbe):
    """``method="ddp_per_example"``: exact per-example norms on every rank, pooled by addition."""

    name = "ddp_per_example"
    options: ClassVar[frozenset[str]] = frozenset({"process_group", "reduce_every", "strict", "layers", "fused"})

    @staticmethod
    def auto_score(model: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> float:
        return 0.0  # chosen explicitly

    @classmethod
    def from_config(
        cls,
        model: torch.nn.Module,
        params: Sequence[torch.nn.Parameter],
        config: ProbeConfig,
        process_group: Any = None,
        reduce_every: int = REDUCE_EVERY,
        **options: Any,
    ) -> DistributedProbe:
        from .per_example import PerExampleProbe

        _validate(model, "ddp", "ddp_per_example", process_group)  # before the local probe attaches its hooks
        # this rank's per-example statistics; the step's norm is this probe's share of the synchronized one
        local = PerExampleProbe.from_config(model, params, config, capture_total=False, **options)
        try:
            return cls(
                model, params, config, local=local, process_group=process_group, kind="ddp", reduce_every=reduce_every
            )
        except Exception:
            local.close()
            raise
