"""Per-example probe: the noise scale from one batch, from exact per-example squared gradient norms.

With per-example gradients ``G_i`` the App. A.1 estimator at ``b_small = 1`` is the Bessel-corrected
sample variance of the per-example gradients (McCandlish et al. 2018; its variance is the lowest
of all ``b_small``, Gray et al. 2024, arXiv:2411.00999). It needs ``sum_i |v_i|^2``, where ``v_i``
is example ``i``'s contribution to the step's gradient, and the step gradient itself.

How ``sum_i |v_i|^2`` is obtained: every supported layer's ``forward`` is swapped (on the module
instance; the module object, its parameters, hooks and ``state_dict`` are untouched) for one that
runs a custom :class:`torch.autograd.Function` (:mod:`.per_example_ops`). Its backward computes
the layer's ordinary gradients with the same ATen ops as the stock layer (bit-identical) and adds
the sum over examples of the per-example squared norms of the layer's covered parameters into a
float64 tensor (finite and correct for any finite gradient: see :mod:`.per_example_ops`). Nothing
is materialised beyond one layer, no second backward pass, no host sync in the hooks, and the
functions trace under ``torch.compile`` without graph breaks (register before compiling). Because
the wrapped forward returns a fresh tensor, in-place ops after the layer (``ReLU(inplace=True)``)
are fine; under non-reentrant activation checkpointing the backward runs once per forward, with
recomputed inputs.

Supported: ``nn.Linear`` (any leading dims: Goodfellow for one row per example, ghost norm or
materialisation for sequences, chosen per layer by FLOPs), Hugging Face's ``Conv1D`` (GPT-2's
transposed linear layer; recognised only when ``transformers`` is already imported, which
noisescale never does itself), ``nn.Conv1d``/``nn.Conv2d`` (any padding mode, groups, dilation;
``padding='same'`` with even total padding), ``nn.Embedding`` (repeated tokens, ``padding_idx``),
``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, with their biases.

Per-example means *per row of the batch dimension* (dim 0 of every wrapped layer's input).
Parameters shared between modules (tied weights), modules reused at several places, and
parameters of unsupported layers are *not covered*: by default the noise scale is measured over
the covered parameters only (``coverage`` in ``metrics()``); ``strict=True`` refuses that. Found at
run time and excluded with a warning (``strict=True``: an error): layers whose input is shared by
all examples (position ids ``arange(T)`` or ``[1, T]``, also when ``T`` equals the batch size) and
parameters that receive gradient outside their layer's instrumented call (the *exactness check*,
see :class:`PerExampleProbe`: a weight also used functionally, such as a tied output head
``F.linear(h, emb.weight)``, or a loss term on the parameter itself, such as an L2 penalty).
``coverage`` always reflects the exclusions.

Loss conventions (``reduction`` as for the micro-batch probe). Each micro-batch ``m`` of the step
has ``B_m`` examples with sizes ``b_i`` in the tracker's unit (1 for examples; tokens per example
for ``unit="tokens"``). ``G_i`` is example ``i``'s mean gradient per unit (for a token-mean
language-model loss: the mean over its tokens), and ``v_i = c w_i G_i`` with
``w_i = b_i / sum_{j in m} b_j`` for ``"mean"`` (each micro-batch's loss is a mean over its
examples/tokens, micro-batches weighted equally) and ``w_i = b_i`` for ``"sum"``. The pooled
estimator (derivation in :func:`noisescale.estimators.pool_parts`) then uses
``a_i = w_i/sum w``: ``b_small = sum a^2 / sum(a^2/b)``, ``b_big = 1/sum(a^2/b)``,
``|G_small|^2 = sum|v_i|^2 / sum a^2``. One micro-batch of ``B`` examples: ``b_small = 1``,
``b_big = B``, ``|G_small|^2 = mean_i |G_i|^2``.
"""

from __future__ import annotations

import functools
import math
import sys
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, cast, overload

import torch
from torch import nn

from ..estimators import StepStats, make_step_stats
from .base import (
    EndOfBackward,
    Groups,
    Hook,
    Preconditioner,
    ProbeConfig,
    StepContext,
    StepTotal,
    check_single_process,
    infer_batch_size,
    is_suspended,
    resolve_groups,
    sq_norm,
)
from .per_example_ops import ConvFn, EmbeddingFn, GroupNormFn, LayerNormFn, LayerNormSums, LinearFn, ScaleFn, ScaleSums

__all__ = ["PerExampleProbe", "Coverage", "per_example_coverage", "LAYER_GROUPS"]

# Layer groups accepted by ``layers=`` (Gray et al. 2024: normalisation layers alone predict the GNS).
LAYER_GROUPS: dict[str, tuple[str, ...]] = {
    "linear": ("linear", "hf_conv1d"),
    "conv": ("conv1d", "conv2d"),
    "embedding": ("embedding",),
    "norm": ("layernorm", "rmsnorm", "groupnorm"),
    "layernorm": ("layernorm",),
    "rmsnorm": ("rmsnorm",),
    "groupnorm": ("groupnorm",),
}
EXCLUDED = "excluded by layers="
_KIND_OF_CLASS: dict[type[nn.Module], str] = {
    nn.Linear: "linear",
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
    nn.Embedding: "embedding",
    nn.LayerNorm: "layernorm",
    nn.GroupNorm: "groupnorm",
}
if hasattr(nn, "RMSNorm"):
    _KIND_OF_CLASS[nn.RMSNorm] = "rmsnorm"
_Conv = nn.Conv1d | nn.Conv2d
if TYPE_CHECKING:  # a module of a supported kind (nn.RMSNorm: guarded above at run time; HF Conv1D: duck-typed)
    _Supported = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Embedding | nn.LayerNorm | nn.GroupNorm | nn.RMSNorm

# The exactness check (see PerExampleProbe): on the first CHECK_FIRST steps and then every
# CHECK_EVERY-th, the squared norm of the gradient each wrapped call returns for a parameter is
# compared with the squared norm of what reached the parameter in that backward pass; a relative
# difference above CHECK_RTOL means gradient that did not come through the instrumented call.
CHECK_FIRST = 3
CHECK_EVERY = 100
CHECK_RTOL = 1e-4


def _kind(module: nn.Module) -> str | None:
    """The supported kind of ``module``, or None. Subclasses count only if they keep the stock forward."""
    for cls, kind in _KIND_OF_CLASS.items():
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return kind
    hf = _hf_conv1d()
    if hf is not None and isinstance(module, hf) and type(module).forward is hf.forward:
        return "hf_conv1d"
    return None


def _hf_conv1d() -> type[nn.Module] | None:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's linear layer, weight ``[in, out]``)
    if ``transformers`` is already imported: a model holding one has imported it, so noisescale
    never imports ``transformers`` itself."""
    mod = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(mod, "Conv1D", None) if mod is not None else None
    return cls if isinstance(cls, type) and issubclass(cls, nn.Module) else None


@dataclass
class Coverage:
    """Which trainable parameters the per-example probe measures.

    ``fraction``: covered elements / tracked trainable elements. ``covered``: names of the wrapped
    modules. ``uncovered``: parameter name -> why it is not covered. ``tied``: parameter names
    shared by several modules (or inside a module used at several places).
    """

    fraction: float
    covered: list[str] = field(default_factory=list)
    uncovered: dict[str, str] = field(default_factory=dict)
    tied: list[str] = field(default_factory=list)
    batch_norm_training: list[str] = field(default_factory=list)

    def describe(self, limit: int = 8) -> str:
        items = list(self.uncovered.items())
        shown = "; ".join(f"{k}: {v}" for k, v in items[:limit])
        more = f"; ... and {len(items) - limit} more" if len(items) > limit else ""
        return f"{self.fraction:.1%} of trainable parameter elements covered; not covered: {shown}{more}"


@dataclass
class _Plan:
    coverage: Coverage
    layers: list[tuple[str, nn.Module, str, bool, bool]]  # name, module, kind, w_on, b_on
    covered_params: list[nn.Parameter]


def _kinds_from_filter(layers: Any) -> Callable[[str, nn.Module, str | None], bool] | None:
    if layers is None:
        return None
    if callable(layers) and not isinstance(layers, type):
        return lambda name, mod, kind: bool(layers(name, mod))
    items = [layers] if isinstance(layers, (str, type)) else list(layers)
    kinds: set[str] = set()
    classes: list[type] = []
    for it in items:
        if isinstance(it, str):
            key = it.lower()
            if key not in LAYER_GROUPS:
                raise ValueError(
                    f"layers= got unknown layer group {it!r}; use one of {sorted(LAYER_GROUPS)}, "
                    "module classes (e.g. nn.LayerNorm), or a callable(name, module) -> bool"
                )
            kinds.update(LAYER_GROUPS[key])
        elif isinstance(it, type) and issubclass(it, nn.Module):
            classes.append(it)
        else:
            raise TypeError(f"layers= items must be group names or nn.Module classes, got {it!r}")
    return lambda name, mod, kind: kind in kinds or isinstance(mod, tuple(classes))


def _plan(model: nn.Module, params: Sequence[nn.Parameter] | None, layers: Any) -> _Plan:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    tracked = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    tracked_ids = {id(p) for p in tracked}
    keep = _kinds_from_filter(layers)

    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    places: dict[int, list[str]] = {}
    pname: dict[int, str] = {}
    mha_inside: set[int] = set()
    bn: list[str] = []
    for mname, mod in model.named_modules(remove_duplicate=False):
        places.setdefault(id(mod), []).append(mname or "<root>")
        if isinstance(mod, nn.MultiheadAttention):
            mha_inside.update(id(s) for s in mod.modules())
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training and mname not in bn:
            bn.append(mname)
        for n, p in mod._parameters.items():
            if p is None:
                continue
            full = f"{mname}.{n}" if mname else n
            pname.setdefault(id(p), full)
            lst = owners.setdefault(id(p), [])
            if all(m is not mod for _, m in lst):
                lst.append((mname or "<root>", mod))
    uncovered: dict[str, str] = {}
    tied: list[str] = []
    plan_layers: list[tuple[str, nn.Module, str, bool, bool]] = []
    covered_params: list[nn.Parameter] = []
    done_modules: set[int] = set()
    for mname, mod in model.named_modules(remove_duplicate=False):
        if id(mod) in done_modules:
            continue
        done_modules.add(id(mod))
        own = [(n, p) for n, p in mod._parameters.items() if p is not None and id(p) in tracked_ids]
        if not own:
            continue
        kind = _kind(mod)
        why = None
        if keep is not None and not keep(mname, mod, kind):
            why = EXCLUDED
        elif id(mod) in mha_inside:
            why = "inside nn.MultiheadAttention, which uses these weights functionally (not via forward)"
        elif kind is None:
            why = f"unsupported layer type {type(mod).__name__}"
        elif len(places[id(mod)]) > 1:
            why = f"module registered at {len(places[id(mod)])} places ({', '.join(places[id(mod)])}): reused"
        elif kind == "embedding" and (mod.max_norm is not None or mod.scale_grad_by_freq):
            why = "Embedding with max_norm or scale_grad_by_freq (couples the examples of a batch)"
        elif kind in ("conv1d", "conv2d") and _conv_padding(cast(_Conv, mod)) is None:
            why = f"Conv padding={mod.padding!r} needs asymmetric padding"
        names = {n: pname[id(p)] for n, p in own}
        w_on = b_on = False
        for n, p in own:
            shared = owners.get(id(p), [])
            if len(shared) > 1 or (kind is not None and len(places[id(mod)]) > 1):
                full = pname[id(p)]
                if full not in tied:
                    tied.append(full)
            if why is not None:
                uncovered[names[n]] = why
            elif len(shared) > 1:
                uncovered[names[n]] = (
                    "tied: shared by "
                    + ", ".join(m for m, _ in shared)
                    + "; the per-example gradient is the sum over uses (cross terms), "
                    "which is not computed"
                )
            elif n == "weight":
                w_on = True
                covered_params.append(p)
            elif n == "bias":
                b_on = True
                covered_params.append(p)
            else:  # pragma: no cover - supported layers only have weight/bias
                uncovered[names[n]] = f"parameter {n!r} of {type(mod).__name__} is not handled"
        if w_on or b_on:
            assert kind is not None  # a covered parameter means why is None: a supported kind
            plan_layers.append((mname or "<root>", mod, kind, w_on, b_on))
    # parameters not owned by any submodule's _parameters (should not happen) are uncovered too
    covered_ids = {id(p) for p in covered_params}
    for p in tracked:
        if id(p) not in covered_ids and pname.get(id(p)) not in uncovered:
            uncovered[pname.get(id(p), f"<parameter {tuple(p.shape)}>")] = "not owned by a supported module"
    total = sum(p.numel() for p in tracked)
    frac = sum(p.numel() for p in covered_params) / total if total else 0.0
    cov = Coverage(frac, [n for n, *_ in plan_layers], uncovered, tied, bn)
    return _Plan(cov, plan_layers, covered_params)


def per_example_coverage(
    model: nn.Module, params: Sequence[nn.Parameter] | None = None, layers: Any = None
) -> Coverage:
    """What ``method="per_example"`` would measure on ``model`` (nothing is wrapped)."""
    return _plan(model, params, layers).coverage


def _conv_padding(mod: _Conv) -> tuple[int, ...] | None:
    pad = mod.padding
    nd = len(mod.kernel_size)
    if isinstance(pad, str):
        if pad == "valid":
            return (0,) * nd
        totals = [d * (k - 1) for d, k in zip(mod.dilation, mod.kernel_size)]
        if any(t % 2 for t in totals):
            return None
        return tuple(t // 2 for t in totals)
    return tuple(pad)


@overload
def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor: ...
@overload
def _cast(t: None, dtype: torch.dtype) -> None: ...
def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if t is None or not t.is_floating_point() or t.dtype == dtype or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs matmul-like ops in on ``x``'s device, or None when it is off."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def _autocast_fp32(x: torch.Tensor) -> torch.dtype | None:
    """float32 where CUDA-style autocast runs normalisation layers in float32 (not on the CPU), else None."""
    dev = x.device.type
    return torch.float32 if dev != "cpu" and torch.is_autocast_enabled(dev) else None


def _stock_ok(x: torch.Tensor) -> bool:
    """Whether a layer may run its stock op with a tensor hook for the per-example sums instead of an
    autograd Function: eager (not compiling), autocast off, and no saved-tensor hooks (activation
    checkpointing, offloading: the hook keeps its inputs itself, which would bypass them)."""
    return (
        not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled(x.device.type)
        and torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    )


def _apply(
    fn: Any, x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, dtype: torch.dtype | None, *rest: Any
) -> Any:
    """``fn.apply(x, w, b, *rest)``; with ``dtype``, in the dtype autocast would run the stock op in (the
    inputs cast, autocast off inside, so that the function's own ops are not cast again)."""
    if dtype is None:
        return fn.apply(x, w, b, *rest)
    dev = x.device.type
    with torch.autocast(dev, enabled=False):
        return fn.apply(_cast(x, dtype), _cast(w, dtype), _cast(b, dtype), *rest)


class _Forward:
    """The instrumented ``forward`` set on a module instance.

    A deep copy of the module (e.g. an EMA copy of the model) gets the stock forward bound to the
    copy: the copy is not instrumented, and never computes with the original's parameters.
    """

    __slots__ = ("module", "fn")

    def __init__(self, module: nn.Module, fn: Callable[..., torch.Tensor]) -> None:
        self.module, self.fn = module, fn

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if is_suspended():  # a Hessian measurement: the stock forward, which has a double backward
            return type(self.module).forward(self.module, *args, **kwargs)
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> Any:
        new = memo.get(id(self.module))
        if new is None:
            return self
        return types.MethodType(type(self.module).forward, new)


class _Layer:
    __slots__ = (
        "name",
        "module",
        "kind",
        "w_on",
        "b_on",
        "acc",
        "w_idx",
        "b_idx",
        "w_pre",
        "b_pre",
        "w_chk",
        "b_chk",
        "calls",
        "had_forward",
        "old_forward",
        "excluded",
    )

    def __init__(self, name: str, module: nn.Module, kind: str, w_on: bool, b_on: bool) -> None:
        self.name, self.module, self.kind, self.w_on, self.b_on = name, module, kind, w_on, b_on
        self.acc: torch.Tensor = torch.zeros(1, dtype=torch.float64)  # the probe's accumulator for this layer's device
        self.w_idx = self.b_idx = -1  # slots of acc (the parameters' groups); -1: not covered
        # exactness check: acc slot of |gradient returned by the wrapped call|^2 for the weight/bias;
        # the slot + 2 * (number of layers) receives |gradient that reached the parameter|^2. -1: off
        self.w_chk = self.b_chk = -1
        self.w_pre: torch.Tensor | None = None  # preconditioner weights (buffers refreshed in place)
        self.b_pre: torch.Tensor | None = None
        self.calls = 0
        self.excluded = False
        self.had_forward = "forward" in module.__dict__
        self.old_forward: Callable[..., Any] | None = module.__dict__.get("forward")

    @property
    def weight_bias(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The module's ``weight`` and ``bias`` as it holds them now (a norm without affine: None)."""
        m = cast("_Supported", self.module)  # a supported kind: see _kind
        return m.weight, getattr(m, "bias", None)

    def param_name(self, which: str) -> str:
        return which if self.name == "<root>" else f"{self.name}.{which}"


class PerExampleProbe:
    """Exact per-example squared gradient norms, pooled into one :class:`Measurement` per step.

    Args:
        model: the module; its supported layers are instrumented until :meth:`close`.
        params: the tracked parameters (default: all trainable); only covered ones are measured.
        reduction: ``"mean"`` or ``"sum"`` (see the module docstring).
        unit: ``"examples"`` (sizes inferred) or another unit such as ``"tokens"`` (then
            ``step(sizes=...)`` gives, per micro-batch, its size, split equally over its examples,
            or a sequence with one size per example).
        strict: refuse (``ValueError``) unless every tracked trainable parameter is covered
            (with ``layers=``: every parameter of the selected layers).
        layers: measure only these layer types: group names (``"norm"``, ``"linear"``,
            ``"conv"``, ``"embedding"``, ``"layernorm"``, ...), ``nn.Module`` classes, or a
            ``callable(name, module) -> bool``.
        fused: form the weight gradients of sequence Linear layers and of convolutions by summing
            the per-example gradients that are materialised anyway (Gray et al. 2024,
            "simultaneous"), instead of a separate GEMM. Much cheaper for long sequences and
            convolutions, but the gradients then equal the stock ones only up to float rounding
            (not bit-identical). Default ``False``: bit-identical gradients.
        lenient: exclude (with a warning) layers found at run time to get non-batch-first inputs
            or to be reused within an example, instead of raising; ``method="auto"`` sets it so
            that attaching by default never breaks a training loop.

    Exactness check. Per-example norms are exact only for gradient that reaches a parameter through
    its layer's instrumented call. On the first ``CHECK_FIRST`` steps and then every
    ``CHECK_EVERY``-th step (structural problems show up at once), each wrapped call also adds the
    squared norm of the weight/bias gradient it returns into a slot of the accumulator, and a
    tensor hook on each covered parameter adds the squared norm of everything that reached it in
    the pass (summed over uses, before accumulation into ``.grad``). At ``collect()`` the two are
    compared (relative tolerance ``CHECK_RTOL``; they are equal to float64 rounding when nothing
    else contributes, also under autocast and with ``fused=True``). A parameter that differs is
    excluded (``coverage`` updated, ``uncovered[name]`` says why) with a warning naming it, also in
    the default explicit mode; ``strict=True`` raises ``ValueError``. The step of the detection
    is reported unmeasurable (``reason`` set), never averaged in. Under ``torch.compile`` the
    calls record on every step (a traced graph is reused); the comparison still runs on checked
    steps only. A checked step reads a few numbers on the host (a sync on accelerators), and the
    values of 1-d Embedding inputs whose length equals the batch size (the position-id check).
    """

    name = "per_example"
    options: ClassVar[frozenset[str]] = frozenset({"strict", "layers", "fused"})
    supports: ClassVar[frozenset[str]] = frozenset({"groups", "preconditioner"})
    world_size = 1

    @staticmethod
    def applicable(model: nn.Module, params: Sequence[nn.Parameter]) -> str | None:
        return check_single_process(model, "per_example")

    @staticmethod
    def auto_score(model: nn.Module, params: Sequence[nn.Parameter], min_coverage: float = 0.9) -> float:
        """2 (preferred over micro-batches: works from one micro-batch, lowest variance) when the exact
        per-example norms cover at least ``min_coverage`` of the elements and no batch norm in training
        mode couples the examples; else 0."""
        try:
            cov = per_example_coverage(model, params)
        except Exception:  # analysis must never break the default path
            return 0.0
        return 0.0 if cov.batch_norm_training or cov.fraction < min_coverage else 2.0

    @classmethod
    def from_config(
        cls, model: nn.Module, params: Sequence[nn.Parameter], config: ProbeConfig, **options: Any
    ) -> PerExampleProbe:
        return cls(
            model,
            params,
            reduction=config.reduction,
            unit=config.unit,
            lenient=config.auto,
            groups=config.groups,
            preconditioner=config.preconditioner,
            **options,
        )

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[nn.Parameter] | None = None,
        *,
        reduction: str = "mean",
        unit: str = "examples",
        strict: bool = False,
        layers: Any = None,
        fused: bool = False,
        lenient: bool = False,
        groups: Groups | None = None,
        preconditioner: Preconditioner | None = None,
        capture_total: bool = True,
    ) -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        plan = _plan(model, params, layers)
        cov = plan.coverage
        if not plan.layers:
            raise ValueError(
                f"method='per_example' covers none of the {len(params) if params is not None else 'trainable'} "
                f"tracked parameters of {type(model).__name__} (supported: Linear, Conv1d, Conv2d, Embedding, "
                f"LayerNorm, RMSNorm, GroupNorm{'; layers=' + repr(layers) if layers is not None else ''}). "
                f"{cov.describe()}. Use method='microbatch' with gradient accumulation instead."
            )
        if strict and any(v != EXCLUDED for v in cov.uncovered.values()):
            raise ValueError(
                f"strict=True: method='per_example' does not cover every trainable parameter: {cov.describe()}. "
                "Pass strict=False to measure over the covered parameters only (reported as coverage in "
                "metrics()), exclude the others with params=, or use method='microbatch'."
            )
        for name, mod, *_ in plan.layers:
            if isinstance(mod.__dict__.get("forward"), _Forward):
                raise ValueError(
                    f"layer {name} is already instrumented by another per-example probe; "
                    "close() it first (one per-example probe per model)"
                )
        if cov.tied:
            warnings.warn(
                f"noisescale: tied or reused parameters are not measured by the per-example probe: "
                f"{', '.join(cov.tied)} (their per-example gradients have cross terms)",
                stacklevel=3,
            )
        self._bn_warned = False
        self._warn_batch_norm(cov.batch_norm_training)
        self.model = model
        self.coverage = cov
        self.reduction = reduction
        self.unit = unit
        self.params = plan.covered_params
        self.strict = strict
        self.fused = bool(fused)
        self.lenient = bool(lenient) and not strict
        self._tracked_numel = sum(
            p.numel() for p in (params if params is not None else [q for q in model.parameters() if q.requires_grad])
        )
        self._layers = [_Layer(*t) for t in plan.layers]
        tracked = list(params) if params is not None else [q for q in model.parameters() if q.requires_grad]
        self.groups = groups if groups is not None else resolve_groups(model, tracked, None)
        self.preconditioner = preconditioner
        G = len(self.groups)
        # One float64 accumulator per device, shared by the layers on it (fewer reads at step()):
        # a slot per group, then the exactness check's slots, two per layer (weight, bias) for the
        # squared norms of the gradients the wrapped calls return, and two per layer for those of
        # the gradients that reached the parameters. A layer excluded at run time gets a private
        # one never read.
        self._accs: dict[torch.device, torch.Tensor] = {}
        self._n_chk = 2 * len(self._layers)
        for j, L in enumerate(self._layers):
            w, b = L.weight_bias
            p = w if w is not None else b
            assert p is not None  # a covered layer has a weight or a bias
            L.acc = self._accs.setdefault(
                p.device, torch.zeros(G + 2 * self._n_chk, dtype=torch.float64, device=p.device)
            )
            if L.w_on:
                assert w is not None  # w_on: the weight is covered
                L.w_idx = self.groups.index(w)
                L.w_pre = preconditioner.weights[id(w)] if preconditioner is not None else None
                L.w_chk = G + 2 * j
            if L.b_on:
                assert b is not None  # b_on: the bias is covered
                L.b_idx = self.groups.index(b)
                L.b_pre = preconditioner.weights[id(b)] if preconditioner is not None else None
                L.b_chk = G + 2 * j + 1
        self.device = next(iter(self._accs))
        self._total = StepTotal([(q, None, None, True) for q in self.params], self.groups, preconditioner, self.device)
        self._capture_total = capture_total
        self._end = EndOfBackward(self._capture)  # (self._total is replaced when coverage changes)
        self._bn_modules = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._seen: list[int | None] = []
        self._passes = 0  # backward passes that reached a covered parameter since the last step
        self._batch: int | None = None
        self._not_called_warned: set[str] = set()
        self._steps = 0  # collect() calls so far
        self._checking = True  # whether this step runs the exactness check (see _on_grad)
        self._handles: list[Any] = [model.register_forward_pre_hook(Hook(self._pre_forward), with_kwargs=True)]
        # on every covered parameter: arm the capture of the step gradient's norm when a backward
        # pass ends, and take the exactness check's squared norm of what reached the parameter
        for L in self._layers:
            for k, (q, on) in enumerate(zip(L.weight_bias, (L.w_on, L.b_on))):
                if on:
                    assert q is not None  # on: the parameter is covered
                    self._handles.append(q.register_hook(Hook(functools.partial(self._on_grad, L, k))))
        for L in self._layers:
            L.module.forward = _Forward(L.module, self._make_forward(L))

    # -- instrumentation ---------------------------------------------------------------

    def _warn_batch_norm(self, names: list[str]) -> None:
        if names and not self._bn_warned:
            self._bn_warned = True
            warnings.warn(
                f"noisescale: batch norm in training mode ({', '.join(names)}) normalises each example with "
                "statistics of the whole batch, so examples are not independent and per-example gradients "
                "do not estimate the noise scale correctly; use method='microbatch' (micro-batches are "
                "normalised separately) or GroupNorm/LayerNorm",
                stacklevel=4,
            )

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not torch.is_grad_enabled():
            return
        # (not during a backward pass: recomputation under activation checkpointing)
        if torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1:
            b = infer_batch_size(args, kwargs)
            self._seen.append(b)
            self._batch = b
            pre = self.preconditioner
            if pre is not None and pre.stale and not torch.compiler.is_compiling():
                pre.refresh()  # the weights the layers' backward reads: v_hat before this step's update

    def _capture(self) -> None:
        self._passes += 1
        if self._capture_total:
            self._total.capture()

    def _on_grad(self, L: _Layer, k: int, grad: torch.Tensor) -> None:
        """Tensor hook on covered parameter ``k`` (0: weight, 1: bias) of ``L``: ``grad`` is everything
        that reached it in this backward pass (summed over all its uses, before accumulation)."""
        self._end.arm()
        if self._checking:
            slot = L.w_chk if k == 0 else L.b_chk
            if slot >= 0:
                L.acc.select(0, slot + self._n_chk).add_(sq_norm(grad))

    def _check(self, L: _Layer, x: torch.Tensor, min_dim: int) -> None:
        """Bookkeeping on the layer's input: call counts (reuse) and the batch dimension.

        An input whose dim 0 is not the model's batch is either not batch-first (the batch sits
        on another dim: an error) or shared by all examples (e.g. position ids ``arange(T)`` or
        ``[1, T]``: the layer's output is broadcast over the batch, so its gradient is already
        summed over examples). A shared input whose dim 0 happens to equal the batch size is caught
        where it can be: an ``nn.Parameter`` as input, and on checked steps a 1-d Embedding input
        equal to ``arange(B) + c`` (position ids when ``T == B``). A shared layer is excluded from
        the measurement with a warning (an error with ``strict=True`` or while compiling, where
        the exclusion cannot be made).
        """
        b = self._batch
        if torch.compiler.is_compiling():
            if b is not None and (x.dim() < min_dim or x.shape[0] != b):
                raise ValueError(
                    self._batch_message(L, x, b) + " Exclude this layer before compiling "
                    "(layers= or params=), or run one eager step first."
                )
            return
        if not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
            return  # no gradient, or recomputation in backward (activation checkpointing)
        L.calls += 1
        if x.dim() < min_dim:
            raise ValueError(
                f"per-example norms: layer {L.name} ({type(L.module).__name__}) got an input of shape "
                f"{tuple(x.shape)} with no batch dimension (expected >= {min_dim} dims, batch first)"
            )
        if L.excluded or b is None:
            return
        shared = None
        if x.shape[0] == b:
            shared = self._shared_input(L, x, b)
            if shared is None:
                return
        not_batch_first = shared is None and x.shape[0] != 1 and x.dim() >= 2 and b in tuple(x.shape[1:])
        if self.strict or (not_batch_first and not self.lenient):
            if not_batch_first:
                raise ValueError(self._batch_message(L, x, b))
            raise ValueError(self._shared_message(L, x, shared or f"broadcast over the batch (dim 0 is not {b})"))
        self._exclude(
            L, "not batch-first" if not_batch_first else "input has no batch dimension (shared by all examples)"
        )
        if shared is not None:
            where = f"that are {shared}: although dim 0 equals the batch size ({b} examples), they are shared by all examples"
        else:
            what = (
                "the batch is not on dim 0"
                if not_batch_first
                else "they are shared by all examples (e.g. position ids)"
            )
            where = f"without the batch ({b} examples) on dim 0: {what}"
        warnings.warn(
            f"noisescale: layer {L.name} ({type(L.module).__name__}) gets inputs of shape {tuple(x.shape)} "
            f"{where}, so its per-example gradients are not available; its parameters are excluded from the "
            f"measurement (coverage now {self.coverage.fraction:.1%})",
            stacklevel=4,
        )

    def _shared_input(self, L: _Layer, x: torch.Tensor, b: int) -> str | None:
        """What makes an input whose dim 0 equals the batch size ``b`` shared by all examples anyway
        (a description), or None. Reads the values of a 1-d Embedding input on checked steps only
        (a host sync on an accelerator)."""
        if b < 2:
            return None
        if isinstance(x, nn.Parameter):
            return "a parameter"
        if L.kind == "embedding" and x.dim() == 1 and self._checking:
            ramp = torch.arange(x.shape[0], device=x.device, dtype=x.dtype)
            if torch.equal(x - x[0], ramp):
                return f"position ids (arange({b}){' + offset' if int(x[0]) else ''})"
        return None

    def _shared_message(self, L: _Layer, x: torch.Tensor, what: str) -> str:
        return (
            f"per-example norms need batch-first inputs: layer {L.name} ({type(L.module).__name__}) gets an "
            f"input of shape {tuple(x.shape)} that is {what}: its output is shared by all examples, so its "
            "per-example gradients are not available. Give it per-example inputs "
            "(e.g. position_ids of shape [B, T]), exclude the layer (layers= or params=), or pass "
            "strict=False to measure without it."
        )

    def _exclude(self, L: _Layer, why: str) -> None:
        """Exclude every covered parameter of layer ``L`` (found at run time not to fit)."""
        for k, on in enumerate((L.w_on, L.b_on)):
            if on:
                self.coverage.uncovered.setdefault(L.param_name(("weight", "bias")[k]), why)
        L.excluded = True
        L.acc = torch.zeros_like(L.acc)  # (nothing is computed for it from now on: slots -1)
        L.w_idx = L.b_idx = L.w_chk = L.b_chk = -1
        self._refresh_coverage()
        if not any(not M.excluded for M in self._layers) and not self.lenient:
            raise ValueError(
                "per-example norms: every covered layer was excluded (no batch dimension on dim 0); "
                "use method='microbatch'"
            )

    def _exclude_param(self, L: _Layer, k: int, why: str) -> None:
        """Exclude parameter ``k`` (0: weight, 1: bias) of layer ``L``: nothing is computed for it from
        now on, and it leaves the measured parameters (coverage, the step gradient's norm)."""
        self.coverage.uncovered[L.param_name(("weight", "bias")[k])] = why
        if k == 0:
            L.w_on, L.w_idx, L.w_chk = False, -1, -1
        else:
            L.b_on, L.b_idx, L.b_chk = False, -1, -1
        if not (L.w_on or L.b_on):
            L.excluded = True
            L.acc = torch.zeros_like(L.acc)
        self._refresh_coverage()

    @staticmethod
    def _batch_message(L: _Layer, x: torch.Tensor, b: int) -> str:
        return (
            f"per-example norms need batch-first inputs: layer {L.name} ({type(L.module).__name__}) got an "
            f"input of shape {tuple(x.shape)} whose dim 0 is not the batch size {b} of the model's input. "
            "Make every layer see the batch on dim 0 (e.g. batch_first=True), exclude the layer (layers= or "
            "params=), or use method='microbatch'."
        )

    def _refresh_coverage(self) -> None:
        live = [L for L in self._layers if not L.excluded]
        self.params = [
            cast(nn.Parameter, p)  # covered: registered parameters (see _plan)
            for L in live
            for p, on in zip(L.weight_bias, (L.w_on, L.b_on))
            if on
        ]
        self.coverage.covered = [L.name for L in live]
        self._total = StepTotal(
            [(q, None, None, True) for q in self.params], self.groups, self.preconditioner, self.device
        )
        covered = sum(p.numel() for p in self.params)
        self.coverage.fraction = covered / self._tracked_numel if self._tracked_numel else 0.0

    def _make_forward(self, L: _Layer) -> Callable[..., torch.Tensor]:
        check = self._check
        kind = L.kind
        fused = self.fused
        probe = self

        def chk() -> tuple[int, int]:
            """The exactness check's slots for this call: always while compiling (a traced graph is
            reused for every step), else on checked steps only."""
            if torch.compiler.is_compiling() or probe._checking:
                return L.w_chk, L.b_chk
            return -1, -1

        if kind == "linear":
            lin = cast(nn.Linear, L.module)

            def forward(input: torch.Tensor) -> torch.Tensor:
                check(L, input, 2)
                b: torch.Tensor | None  # None with bias=False
                x, w, b = input, lin.weight, lin.bias
                wc, bc = chk()
                # autocast runs linear in the low-precision dtype
                return _apply(
                    LinearFn, x, w, b, _autocast_dtype(x), L.acc, L.w_idx, L.b_idx, L.w_pre, L.b_pre, fused, wc, bc
                )
        elif kind == "hf_conv1d":  # transformers' Conv1D: addmm(bias, x.view(-1, in), weight [in, out])
            c1 = L.module

            def forward(input: torch.Tensor) -> torch.Tensor:
                check(L, input, 2)
                b: torch.Tensor | None
                x, w, b = input, cast(torch.Tensor, c1.weight), cast("torch.Tensor | None", c1.bias)
                wc, bc = chk()
                # addmm runs in the low-precision dtype
                return _apply(
                    LinearFn,
                    x,
                    w,
                    b,
                    _autocast_dtype(x),
                    L.acc,
                    L.w_idx,
                    L.b_idx,
                    L.w_pre,
                    L.b_pre,
                    fused,
                    wc,
                    bc,
                    True,
                )
        elif kind in ("conv1d", "conv2d"):
            conv = cast(_Conv, L.module)
            nd = 1 if kind == "conv1d" else 2
            padding = _conv_padding(conv)
            zero = (0,) * nd

            def forward(input: torch.Tensor) -> torch.Tensor:
                check(L, input, nd + 2)
                x, w, b = input, conv.weight, conv.bias
                pad = padding
                if conv.padding_mode != "zeros":
                    x = torch.nn.functional.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
                    pad = zero
                wc, bc = chk()
                return _apply(
                    ConvFn,
                    x,
                    w,
                    b,
                    _autocast_dtype(x),
                    L.acc,
                    conv.stride,
                    pad,
                    conv.dilation,
                    conv.groups,
                    L.w_idx,
                    L.b_idx,
                    L.w_pre,
                    L.b_pre,
                    fused,
                    wc,
                    bc,
                )
        elif kind == "embedding":
            emb = cast(nn.Embedding, L.module)
            pidx = -1 if emb.padding_idx is None else emb.padding_idx

            def forward(input: torch.Tensor) -> torch.Tensor:
                check(L, input, 1)
                wc, _ = chk()
                return EmbeddingFn.apply(input, emb.weight, L.acc, L.w_idx, L.w_pre, pidx, emb.sparse, wc)
        elif kind == "layernorm":
            ln = cast(nn.LayerNorm, L.module)
            shape = tuple(ln.normalized_shape)

            sl, k = list(shape), len(shape)

            def forward(input: torch.Tensor) -> torch.Tensor:
                check(L, input, k + 1)
                w: torch.Tensor | None  # None without affine parameters
                b: torch.Tensor | None
                x, w, b = input, ln.weight, ln.bias
                wc, bc = chk()
                if wc < 0 and bc < 0 and _stock_ok(x):  # the stock op and a hook (see LayerNormSums)
                    out, mean, rstd = torch.native_layer_norm(x, sl, w, b, ln.eps)
                    if out.requires_grad and (L.w_idx >= 0 or L.b_idx >= 0):
                        out.register_hook(LayerNormSums(x, mean, rstd, k, L.acc, L.w_idx, L.b_idx, L.w_pre, L.b_pre))
                    return out
                args = (L.acc, shape, ln.eps, L.w_idx, L.b_idx, L.w_pre, L.b_pre, wc, bc)
                return _apply(LayerNormFn, x, w, b, _autocast_fp32(x), *args)[0]
        elif kind == "groupnorm":
            gn = cast(nn.GroupNorm, L.module)

            def forward(input: torch.Tensor) -> torch.Tensor:
                check(L, input, 2)
                w: torch.Tensor | None  # None without affine parameters
                b: torch.Tensor | None
                x, w, b = input, gn.weight, gn.bias
                cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
                x = x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
                w = w.contiguous() if w is not None else None
                b = b.contiguous() if b is not None else None
                wc, bc = chk()
                args = (L.acc, gn.num_groups, gn.eps, L.w_idx, L.b_idx, L.w_pre, L.b_pre, wc, bc)
                return _apply(GroupNormFn, x, w, b, _autocast_fp32(x), *args)[0]
        elif kind == "rmsnorm":
            rms = cast(nn.RMSNorm, L.module)
            shape = tuple(rms.normalized_shape)

            def forward(input: torch.Tensor) -> torch.Tensor:
                check(L, input, len(shape) + 1)
                # F.rms_norm's composite on CPU, op for op: half inputs are upcast to float32
                # (eps defaults to float32's), normalised, scaled by the weight, cast back.
                # (A fused CUDA kernel, where one is used, is not reproduced bit for bit.)
                lowp = input.dtype in (torch.float16, torch.bfloat16)
                x = input.float() if lowp else input
                xhat = torch.nn.functional.rms_norm(x, shape, None, rms.eps)  # stock autograd
                wc = chk()[0]
                if wc < 0 and _stock_ok(x):  # the stock mul and a hook (see ScaleSums)
                    out = xhat * rms.weight
                    if out.requires_grad and L.w_idx >= 0:
                        out.register_hook(ScaleSums(xhat, rms.weight.dim(), L.acc, L.w_idx, L.w_pre))
                else:
                    out = ScaleFn.apply(xhat, rms.weight, L.acc, L.w_idx, L.w_pre, wc)
                return out.to(input.dtype) if lowp else out
        else:  # pragma: no cover
            raise AssertionError(kind)
        return forward

    # -- step --------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        return {"coverage": float(self.coverage.fraction)}

    def pending_parts(self) -> int:
        return len(self._seen)

    def _example_sizes(
        self, given: Sequence[Any] | None, seen: list[int | None]
    ) -> list[tuple[int, list[float] | float]]:
        """Per micro-batch ``(B_m, sizes)``: ``sizes`` a float (every example the same) or a list."""
        k = len(seen)
        if any(s is None for s in seen):
            raise ValueError(
                f"could not infer the number of examples of the {k} forward passes of this step "
                f"(saw {seen}): give the model a tensor input with the batch on dim 0"
            )
        counts = [int(s) for s in seen if s is not None]  # (all are: checked above)
        if given is None:
            if self.unit != "examples":
                raise ValueError(
                    f"unit={self.unit!r}: pass step(sizes=[...]) with each micro-batch's size in "
                    f"{self.unit} ({k} micro-batches this step)"
                )
            return [(c, 1.0) for c in counts]
        if len(given) != k:
            raise ValueError(
                f"step(sizes=...) got {len(given)} sizes but this step had {k} forward passes "
                f"(micro-batches) with gradients; give one per micro-batch, in order"
            )
        out: list[tuple[int, list[float] | float]] = []
        for c, s in zip(counts, given):
            if isinstance(s, torch.Tensor):
                s = s.tolist() if s.dim() else float(s)
            if isinstance(s, (list, tuple)):
                v = [float(x) for x in s]
                if len(v) != c or not all(x > 0 and math.isfinite(x) for x in v):
                    raise ValueError(f"per-example sizes {list(s)[:8]}... must be {c} finite positive numbers")
                out.append((c, v))
            else:
                s = float(s)
                if not (s > 0 and math.isfinite(s)):
                    raise ValueError(f"micro-batch sizes must be finite and positive, got {list(given)}")
                if self.unit == "examples" and s != c:
                    raise ValueError(f"step(sizes=...) says a micro-batch has {s:g} examples but its input had {c}")
                out.append((c, s / c))
        return out

    def collect(self, ctx: StepContext) -> StepStats:
        if not self._layers:
            raise RuntimeError("this per-example probe is closed")
        seen, self._seen = self._seen, []
        calls = [L.calls for L in self._layers]
        for L in self._layers:
            L.calls = 0
        checked = self._checking
        self._steps += 1
        self._checking = self._steps < CHECK_FIRST or self._steps % CHECK_EVERY == 0
        accs = list(self._accs.values())
        # a copy: the accumulators are zeroed next (on the CPU, read as floats right away)
        acc = accs[0].clone() if len(accs) == 1 else torch.stack([a.to(self.device) for a in accs]).sum(0)
        for a in accs:
            a.zero_()
        G = len(self.groups)
        raw = acc[:G]
        total = self._total.take(ctx) if self._capture_total else torch.zeros_like(raw)
        if self.preconditioner is not None:
            # (after the read above, which may weigh .grad by this step's weights): the optimizer
            # updates its state before the next step
            self.preconditioner.stale = True
        k = len(seen)
        passes, self._passes = self._passes, 0
        if self._bn_modules and not self._bn_warned:
            self._warn_batch_norm([type(m).__name__ for m in self._bn_modules if m.training])
        reason = self._unmeasurable(k, calls)
        if reason is None and passes > k:
            # some forward pass's graph was backpropagated twice (retain_graph=True): each example's
            # gradient is then a sum over the passes, whose cross terms per-example norms do not have
            reason = (
                f"{passes} backward passes for {k} forward pass{'es' if k > 1 else ''}: a graph was backpropagated "
                "more than once (retain_graph=True, or several losses of one forward pass each with its own "
                "backward), so per-example gradients are sums over passes that per-example norms cannot add up; "
                "add the losses and call backward once, or use method='microbatch'"
            )
        elif reason is None and 0 < passes < k:
            # forward passes merged into one backward (their losses added) or never backpropagated: the
            # exactness check (one gradient per layer and pass) and the examples counted would be wrong
            reason = (
                f"{k} forward passes but {passes} backward pass{'es' if passes > 1 else ''}: per-example norms need "
                "one backward pass per forward pass of the model (a forward pass whose loss was added to another's, "
                "or that was never backpropagated, breaks the count of examples and the exactness check); call "
                "backward once per forward pass (per micro-batch), or use method='microbatch'"
            )
        if reason is None and checked:
            reason = self._verify(acc[G:], calls, k)
        if reason is not None:
            return self._empty(reason)
        groups = self._example_sizes(ctx.sizes, seen)
        n_examples = sum(c for c, _ in groups)
        counts: list[int] = []
        weights: list[float] = []
        sizes: list[float] = []
        for c, sz in groups:  # an example's weight in the step gradient: its share of its micro-batch under "mean"
            size_m = sum(sz) if isinstance(sz, list) else c * sz
            for n, b in [(c, sz)] if not isinstance(sz, list) else [(1, x) for x in sz]:
                counts.append(n)
                sizes.append(b)
                weights.append(b / size_m if self.reduction == "mean" else b)
        st = make_step_stats(
            raw * ctx.inv_scale2_small, total, sizes, counts=counts, weights=weights, device=self.device
        )
        if n_examples < 2:
            st.reason = f"only {n_examples} example this step: per-example norms need >= 2 examples"
        return st

    def _empty(self, reason: str) -> StepStats:
        G = len(self.groups)
        st = make_step_stats([0.0] * G, [0.0] * G, [1.0], parts=0, examples=float("nan"), device=self.device)
        st.reason = reason
        return st

    def _verify(self, chk: torch.Tensor, calls: list[int], k: int) -> str | None:
        """The exactness check of a checked step: for every covered parameter, the squared norm of the
        gradients its layer's wrapped calls returned against that of what reached the parameter
        (``chk``: the check slots of the accumulator). A difference means gradient from outside the
        instrumented call (a weight also used functionally, a loss term on the parameter itself, a
        hook that changed it): the parameter's per-example norms would be wrong. It is excluded
        (``strict=True``: ``ValueError``) and this step is not measured (its reason is returned)."""
        vals = chk.tolist()  # one small host read, on checked steps only
        G = len(self.groups)
        bad: list[tuple[_Layer, int, float, float]] = []
        for L, n in zip(self._layers, calls):
            if L.excluded or n > k:  # (reuse within an example is reported by _unmeasurable)
                continue
            for which, (on, slot) in enumerate(((L.w_on, L.w_chk), (L.b_on, L.b_chk))):
                if not on or slot < 0:
                    continue
                got, reached = vals[slot - G], vals[slot - G + self._n_chk]
                if reached == 0.0 or not (math.isfinite(got) and math.isfinite(reached)):
                    continue  # no gradient reached it (or a non-finite step, reported as such)
                if abs(reached - got) > CHECK_RTOL * max(got, reached):
                    bad.append((L, which, got, reached))
        if not bad:
            return None
        names = [L.param_name(("weight", "bias")[w]) for L, w, _, _ in bad]
        detail = "; ".join(
            f"{n}: |gradient|^2 {r:.4g} reached it, {g:.4g} came through {L.name} ({type(L.module).__name__})"
            for n, (L, _, g, r) in zip(names, bad)
        )
        cause = (
            "gradient that did not come through the layer's forward reached it (e.g. the weight is also used "
            "functionally, like a tied output head F.linear(h, emb.weight), or the loss has a term on the "
            "parameter itself, like an L2 penalty, or a hook changed its gradient)"
        )
        if self.strict:
            raise ValueError(
                f"strict=True: per-example norms are not exact for {', '.join(names)}: {cause}, so its per-example "
                f"gradients are not known. {detail}. Exclude it (params= or layers=), or use method='microbatch'."
            )
        for L, which, _, _ in bad:
            self._exclude_param(L, which, cause)
        warnings.warn(
            f"noisescale: per-example norms are not exact for {', '.join(names)}: {cause}. {detail}. "
            f"Excluded from the measurement (coverage now {self.coverage.fraction:.1%}); this step is not measured",
            stacklevel=4,
        )
        return f"gradient from outside the instrumented layers reached {', '.join(names)} (excluded from now on)"

    def _unmeasurable(self, k: int, calls: list[int]) -> str | None:
        """Why this step cannot be measured (run-time exclusions and their warnings happen here)."""
        if k == 0:
            return (
                "no forward pass with gradients enabled since the last step(); call step() once per optimizer "
                "step, after the backward passes"
            )
        if not any(not L.excluded for L in self._layers):
            return (
                "every layer the per-example probe covers was excluded (inputs without the batch on dim 0): "
                "use method='microbatch'"
            )
        for L, n in zip(self._layers, calls):
            if n > k and self.lenient and not L.excluded:
                self._exclude(L, "called several times per forward pass (weights reused within an example)")
                warnings.warn(
                    f"noisescale: layer {L.name} was called {n} times in {k} forward passes: its weights "
                    "are reused within an example; excluded from the measurement from the next step on, "
                    "this step is not measured",
                    stacklevel=4,
                )
                return f"layer {L.name} is reused within an example (excluded from the next step on)"
            if n > k and not L.excluded:
                raise ValueError(
                    f"per-example norms: layer {L.name} ({type(L.module).__name__}) was called {n} times in {k} "
                    f"forward passes of the model: its weights are reused within an example, so the per-example "
                    f"gradient is a sum over uses with cross terms that are not computed. Exclude it "
                    f"(params= or layers=), or use method='microbatch'."
                )
        if any(calls):
            for L, n in zip(self._layers, calls):
                if (
                    n == 0
                    and L.name not in self._not_called_warned
                    and any(
                        p is not None and p.grad is not None for p in (L.module.weight, getattr(L.module, "bias", None))
                    )
                ):
                    self._not_called_warned.add(L.name)
                    warnings.warn(
                        f"noisescale: layer {L.name} has gradients but its forward was not called this step "
                        "(are its weights used functionally?): its per-example norms are missing",
                        stacklevel=4,
                    )
        return None

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for L in self._layers:
            mod = L.module
            if L.had_forward:
                assert L.old_forward is not None  # the instance's own forward, saved when wrapped
                mod.forward = L.old_forward
            elif "forward" in mod.__dict__:
                del mod.__dict__["forward"]
        self._layers = []
        self._seen = []
