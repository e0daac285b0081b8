"""Autograd functions that compute a layer's ordinary gradients *and* the sum over examples of
its per-example squared gradient norms, in the one normal backward pass.

Each function's ``forward`` runs the same ATen op the stock layer runs, and its ``backward``
runs the same ATen backward op (``convolution_backward``, ``native_layer_norm_backward``, ...,
or for ``linear`` the exact ``mm`` calls of ``addmm``'s derivative), so the gradients that reach
``.grad`` are bit-identical to an unwrapped model's. Beside them it adds
``sum_i |g_i|^2`` for the covered parameters of the layer into ``acc`` (a 1-D float64 tensor
owned by the probe): no per-example gradient outlives the layer's backward, no host read off
the CPU (see Numerics), no Python state touched, so the functions trace under
``torch.compile(fullgraph=True)``.

Per-example squared norms (``a``: layer input, ``g``: gradient of the layer output, rows of
example ``i``; mechanics note §1):

- Linear, one row per example: ``|a_i|^2 |g_i|^2`` (Goodfellow 2015, arXiv:1510.01799); bias ``|g_i|^2``.
- Linear on sequences (``T`` rows per example, ``d`` inputs, ``p`` outputs): ghost norm
  ``sum_{t,t'} (a_t.a_t')(g_t.g_t')`` (Li et al. 2021, arXiv:2110.05679) when
  ``T (d + p) <= d p`` (it then costs fewer FLOPs), else the per-example gradient ``g_i^T a_i``
  materialised in chunks of examples and squared (Gray et al. 2024, arXiv:2411.00999).
  Bias ``|sum_t g_t|^2``.
- Conv: the same two choices on ``unfold``-ed inputs, per group (Opacus/BackPACK's unfold); a
  stride-1 convolution with many input channels materialises from shifted views of the padded
  input instead (one GEMM per kernel tap, no unfolded copy: :func:`_conv_shift_sq`).
- Embedding: ``|sum_t onehot(id_t) g_t|^2`` by scattering rows into a per-example table when the
  vocabulary has at most ``2 T`` rows, else into a compact table with one row per distinct token of
  each example (found by sorting); ``padding_idx`` rows get no gradient, as in the stock backward.
- LayerNorm / GroupNorm / RMSNorm: ``|sum_t xhat_t * g_t|^2`` (weight), ``|sum_t g_t|^2`` (bias).
- Hugging Face ``Conv1D`` (``LinearFn`` with ``transposed=True``): as Linear.

Groups and elementwise weights. ``acc`` has one slot per parameter group: the weight's sum goes
into ``acc[w_idx]``, the bias's into ``acc[b_idx]``, and an index ``-1`` leaves that parameter
out (nothing is computed for it). With ``w_idx == b_idx`` and no weights the two are computed
together where that is cheaper (Goodfellow ``(|a_i|^2 + 1) |g_i|^2``, ghost ``aa + 1``). An
optional elementwise weight ``w_pre`` (shape of the weight; ``b_pre`` likewise; ``None`` is the
identity, e.g. Adam's ``1 / (sqrt(v_hat) + eps)``) makes the added quantity
``sum_i |w_pre * G_i|_F^2``, ``G_i`` example ``i``'s weight gradient. It is exact: the ghost norm
cannot carry it, so weighted terms are computed as

- Linear, one row per example: ``sum_{i,j,k} P_jk^2 g_ij^2 a_ik^2 = sum((g*g) @ (P*P) * (a*a))``,
  one GEMM the size of the weight-gradient GEMM; bias ``sum_i |b_pre * g_i|^2``.
- Linear on sequences, Conv: the materialised per-example gradients, multiplied by ``P`` before
  squaring (chunked; ``fused=True`` sums the unweighted ones into the weight gradient and is then
  always taken, as the ghost norm is out anyway).
- Embedding: each row ``g_t`` scaled by ``P[id_t]`` (``|sum_t onehot(id_t) (P[id_t] * g_t)|^2 =
  |P * G_i|^2``), then the scatter or compact-table algorithm as above.
- Norm layers: the per-example gradient vector (per channel for GroupNorm) times ``P``, squared.

The weights are read at each backward (nothing derived from them is cached: they may change in
place between steps).

Numerics. The sums are finite and correct for any finite fp16/bf16/fp32/fp64 gradient: wherever
gradients are squared or multiplied together (Goodfellow rows, ghost norms, materialised
per-example gradients, convolutions, embeddings), the output gradient is rescaled first by
a power of two ``s = 2**-e`` with ``e`` the binary exponent of its max-abs (computed on the device,
:func:`_pow2`), so the float32 squares neither underflow nor overflow, and the sum is multiplied by
``2**(2e)`` in float64 when added into ``acc`` (scaling by a power of two is exact, so nothing else
changes). Eager on the CPU, where reading a value costs nothing, the unscaled float32 sums are
computed first and kept when they lie in ``[1e-20, inf)`` (no extra pass in the common case);
elsewhere, and while compiling, the rescaled path is always taken (one max-abs pass over the
output gradient, and one scaled copy where there was no float32 conversion anyway). Squares of
small per-example vectors (norm layers) are summed in float64 where the float32 sum would leave
its range. Everything is accumulated into ``acc`` in float64.

Exactness check. ``w_chk``/``b_chk`` (``-1``: off) are further slots of ``acc`` that receive
``|gradient returned for the weight/bias|^2`` (float64, :func:`noisescale.probes.base.sq_norm`);
the probe compares them with the squared norm of everything that reached the parameter in the
same pass (see :class:`~noisescale.probes.per_example.PerExampleProbe`).

``LinearFn(..., transposed=True)`` runs Hugging Face's GPT-2 ``Conv1D`` (weight ``[in, out]``,
``addmm(b, x.view(-1, in), w)``), with the gradients of that call bit for bit.
"""

from __future__ import annotations

import math

import torch

from .base import sq_norm

__all__ = [
    "LinearFn",
    "ConvFn",
    "EmbeddingFn",
    "LayerNormFn",
    "LayerNormSums",
    "ScaleSums",
    "GroupNormFn",
    "ScaleFn",
    "CHUNK_ELEMS",
]

aten = torch.ops.aten

# Largest transient tensor (elements) a per-example computation may create: larger batches are
# processed in chunks of examples (8 MiB in float32; keeps the peak-memory overhead small).
CHUNK_ELEMS = 1 << 21

# fused=True materialises the per-example gradients of a sequence Linear layer (and sums them into
# the weight gradient) where that is cheaper than the ghost norm, and also wherever an example has
# at least this many rows: the batched GEMM over examples then runs about as fast as the one plain
# weight-gradient GEMM it replaces (measured on CPU; at 64 rows it ran at half the speed), so the
# per-example norms cost only their squares instead of the ghost norm's T^2 (d + p) per example.
FUSED_MIN_ROWS = 128


# The ghost norm forms only the blocks on and below the diagonal of its two symmetric Gram matrices
# from this many rows per example on (3/4 of the work; measured 13-17% faster on CPU at T = 64).
GHOST_HALF_MIN = 32

# Stride-1 convolutions with at least this many input channels per group get their per-example
# gradients from shifted views of the padded input (one GEMM per kernel tap) instead of an unfolded
# copy: up to 2x faster on CPU from 16 channels on; with 3-8 channels the GEMMs are too thin.
SHIFT_MIN_CHANNELS = 16

# Elementwise temporaries (products summed right away) on the CPU: chunks of examples this small
# (1 MiB in float32) stay in the cache and reuse the allocator's memory instead of fresh pages.
CPU_ELEMENTWISE_ELEMS = 1 << 18


def _elementwise_chunk(t: torch.Tensor) -> int:
    return min(CHUNK_ELEMS, CPU_ELEMENTWISE_ELEMS) if t.device.type == "cpu" else CHUNK_ELEMS


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# Clamp of the binary exponent in _pow2: 2**-e stays a normal number of the compute dtype.
_EXP_RANGE = {torch.float32: (-125, 126), torch.float64: (-1021, 1022)}


def _pow2(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, inv2)`` for a power-of-two rescaling of ``t`` before squaring, computed on ``t``'s device
    (no host sync): ``s = 2**-e`` (0-d, the compute dtype of ``t``) with ``e`` the binary exponent of
    ``max|t|`` (``2**(e-1) <= max|t| < 2**e``), so ``t * s`` has max-abs in ``[1/2, 1)`` and its squares
    neither overflow nor underflow; ``inv2 = 2**(2e)`` (0-d float64) undoes it on a sum of squares.
    Scaling by a power of two is exact, so the rescaled sums equal the unscaled ones wherever
    those are finite and normal. A zero or non-finite ``t`` gets ``s = 1`` (non-finite values
    propagate, as they should)."""
    dt = _acc_dtype(t)
    lo, hi = torch.aminmax(t.detach())
    m = torch.maximum(hi, lo.neg()).to(dt)
    e = torch.frexp(m).exponent.clamp_(*_EXP_RANGE[dt])
    s = torch.exp2(e.neg().to(dt))
    inv2 = torch.exp2(e.to(torch.float64) * 2.0)
    return s, inv2


def _scaled(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``t * s`` in ``t``'s compute dtype (float32/64): one pass, also for a half-precision ``t``."""
    dt = _acc_dtype(t)
    return t.to(dt).mul_(s) if t.dtype != dt else t * s


def _sqsum(t: torch.Tensor) -> torch.Tensor:
    """``sum(t**2)`` in float32/64 as one BLAS dot (no squared temporary). For rescaled inputs
    (see :func:`_pow2`) or per-example quantities whose squares are known to fit."""
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    f = t.reshape(-1)
    return torch.dot(f, f)


def _wsq(
    t: torch.Tensor, pre: torch.Tensor | None, scratch: bool = False, s: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum((pre * s * t)**2)`` in float32/64, ``pre`` broadcast over ``t``'s leading dims (``None``:
    the identity; ``s``: a 0-d rescaling factor from :func:`_pow2`, ``None``: 1). ``scratch``: ``t``
    is a temporary that may be overwritten (saves a copy)."""
    if pre is None and s is None:
        return _sqsum(t)
    dt = _acc_dtype(t)
    f = pre.to(dt) if pre is not None else None
    if s is not None:
        f = s if f is None else f * s
    assert f is not None  # pre or s is given
    return _sqsum(t.mul_(f) if scratch and t.dtype == dt else t.to(dt) * f)


def _sq64(t: torch.Tensor) -> torch.Tensor:
    """``sum(t**2)`` as a 0-d float64 for a float64 ``t``, rescaled by a power of two first (the
    squares of a float64 tensor may leave float64's range)."""
    s, inv2 = _pow2(t)
    return _sqsum(t * s) * inv2


# Float32 sums of squares (or of products of gradients) that come out in this range have lost
# nothing to overflow (a finite sum of non-negative terms), and to underflow (terms below float32's
# normal range, ~1e-38) at most ~1e-18 relative per term: they are kept as they are. Outside it (or
# non-finite), the sums are redone from the gradient rescaled by a power of two (_pow2).
_FAST_MIN = 1e-20


def _cpu_eager(t: torch.Tensor) -> bool:
    """Whether results may be read on the host to pick a path: on the CPU, where reading a value costs
    nothing, and not while compiling. Elsewhere the rescaled path is always taken (no host sync)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _in_range(*sums: torch.Tensor | None) -> bool:
    return all(v is None or _FAST_MIN <= float(v) < math.inf for v in sums)


def _fast_or_rescaled(g: torch.Tensor, run):
    """``(run(g'), inv2)``: ``run`` computes sums of squares (a tuple, ``None`` entries allowed) from a
    gradient ``g'`` in the compute dtype. On the CPU (eager) first from ``g`` itself, kept when in
    range (no extra pass in the common case); else from ``g`` rescaled by ``s`` (:func:`_pow2`),
    with ``inv2`` to undo it (``None``: nothing to undo)."""
    if _cpu_eager(g):
        out = run(g.to(_acc_dtype(g)))
        if _in_range(*out):
            return out, None
    s, inv2 = _pow2(g)
    return run(_scaled(g, s)), inv2


def _wsq64(t: torch.Tensor, pre: torch.Tensor | None) -> torch.Tensor:
    """``sum((pre * t)**2)`` (0-d float32 or float64) for a *small* tensor of per-example quantities (e.g.
    ``[B, d]``), finite and accurate for any finite ``t``: the float32 sum where it is in range (CPU),
    else the sum in float64 (a float64 ``t``: rescaled)."""
    if _cpu_eager(t) and t.dtype != torch.float64:
        r = _wsq(t, pre)
        if _in_range(r):
            return r  # (float32: _add sums it in float64)
    v = t.double() if pre is None else t.double() * pre.double()
    if t.dtype == torch.float64:
        return _sq64(v)
    return _sqsum(v)  # the squares of float32/half values are normal float64 numbers


def _add_sq(acc: torch.Tensor, idx: int, t: torch.Tensor, pre: torch.Tensor | None) -> None:
    """``acc[idx] += sum((pre * t)**2)`` for a *small* tensor of per-example quantities (as
    :func:`_wsq64`). Eager on the CPU with a float32 ``t`` and no weights: one dot, read on the host
    and added as a Python float (float64) when in range (4 ops in all); else :func:`_wsq64`."""
    if pre is None and t.dtype == torch.float32 and _cpu_eager(t):
        f = t.reshape(-1)
        v = float(torch.dot(f, f))
        if _FAST_MIN <= v < math.inf:
            acc.select(0, idx).add_(v)
            return
    _add(acc, idx, _wsq64(t, pre))


def _plus(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    return part if total is None else total + part


def _reshaped(pre: torch.Tensor | None, *shape: int) -> torch.Tensor | None:
    return None if pre is None else pre.reshape(shape)


def _add(acc: torch.Tensor, idx: int, s: torch.Tensor | None, inv2: torch.Tensor | None = None) -> None:
    """``acc[idx] += s * inv2`` in float64 (in place, traceable; ``inv2``: undoes a :func:`_pow2`
    rescaling, ``None``: 1); ``idx < 0`` or ``s is None``: nothing."""
    if idx >= 0 and s is not None:
        v = s.to(acc.dtype)
        acc.select(0, idx).add_(v if inv2 is None else v * inv2)


def _record(acc: torch.Tensor, idx: int, grad: torch.Tensor | None) -> None:
    """The exactness check: ``acc[idx] += |grad|^2`` (float64) for the gradient a function returns
    for a parameter; the probe compares it with what reached the parameter. ``idx < 0``: off."""
    if idx >= 0 and grad is not None:
        acc.select(0, idx).add_(sq_norm(grad))  # (the same robust float64 norm as the probe's hook)


def _keep(ctx, acc, w_idx, w_pre, b=None, b_idx=-1, b_pre=None, w_chk=-1, b_chk=-1) -> None:
    """Store the accumulator, slots and weights on ``ctx`` (a missing bias gets slot -1: nothing is
    added for it, not even a joint ``+1``). ``w_chk``/``b_chk``: slots of the exactness check."""
    ctx.acc, ctx.w_idx, ctx.w_pre, ctx.b_pre, ctx.w_chk = acc, w_idx, w_pre, b_pre, w_chk
    ctx.b_idx = b_idx if b is not None else -1
    ctx.b_chk = b_chk if b is not None else -1


def _chunk_step(per_example: int, limit: int | None = None) -> int:
    """Examples per chunk of :func:`_chunks`."""
    return max(1, (CHUNK_ELEMS if limit is None else limit) // max(1, per_example))


def _chunks(n: int, per_example: int, limit: int | None = None):
    step = _chunk_step(per_example, limit)
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _goodfellow(x, g, w_on, b_on, joint, wp, bp):
    """``(weight term, bias term, inv2)`` for one row per example (``x: [B, d]``, ``g: [B, p]``);
    with ``joint`` the bias term is folded into the weight term (``(|x_i|^2 + 1) |g_i|^2``). The
    sums come from ``g`` or from ``g`` rescaled (:func:`_fast_or_rescaled`; ``inv2`` undoes it)."""
    dt = _acc_dtype(g)
    xn = xsq = None
    if w_on and wp is None:
        xn = torch.linalg.vector_norm(x, dim=1, dtype=dt).square_()
        if joint:
            xn.add_(1.0)
    elif w_on:
        xsq = x.to(dt).square()

    def run(gg):  # gg: [B, p] in the compute dtype
        sw = sb = gn = None
        if xn is not None:
            gn = torch.linalg.vector_norm(gg, dim=1).square_()
            sw = torch.dot(xn, gn)
            if joint:
                return sw, None
        elif xsq is not None:  # sum_ijk P_jk^2 g_ij^2 x_ik^2: one GEMM, no per-example gradient
            P2 = wp.to(dt).square()
            for st, e in _chunks(x.shape[0], 2 * x.shape[1] + gg.shape[1]):
                gxp = torch.mm(gg[st:e].square(), P2)  # [b, d]: sum_j P_jk^2 g_ij^2
                sw = _plus(sw, torch.dot(gxp.view(-1), xsq[st:e].view(-1)))
        if b_on:
            sb = gn.sum() if gn is not None and bp is None else _wsq(gg, bp)
        return sw, sb

    (sw, sb), inv2 = _fast_or_rescaled(g, run)
    return sw, sb, inv2


def _ghost(a, g, joint):
    """``sum_i sum_{t,t'} (a_t.a_t' [+ 1 if joint]) (g_t.g_t')`` for ``a: [b, T, d]``, ``g: [b, T, p]``.
    Both Gram matrices are symmetric: from ``GHOST_HALF_MIN`` rows on, only the blocks on and below
    the diagonal of a 2 x 2 split are formed (3/4 of the GEMM work), the block below counted twice."""
    T = a.shape[1]
    if T < GHOST_HALF_MIN:
        aa = torch.bmm(a, a.transpose(1, 2))  # [b, T, T]
        gg = torch.bmm(g, g.transpose(1, 2))
        if joint:
            aa.add_(1.0)
        return torch.dot(aa.view(-1), gg.view(-1))
    h = T // 2
    aa0 = torch.bmm(a[:, :h], a[:, :h].transpose(1, 2))  # [b, h, h]: upper-left block
    gg0 = torch.bmm(g[:, :h], g[:, :h].transpose(1, 2))
    aa1 = torch.bmm(a[:, h:], a.transpose(1, 2))  # [b, T - h, T]: lower-left and lower-right blocks
    gg1 = torch.bmm(g[:, h:], g.transpose(1, 2))
    if joint:
        aa0.add_(1.0)
        aa1.add_(1.0)
    gg1[:, :, :h].mul_(2.0)  # (exact) the lower-left block stands for the upper-right one too
    return torch.dot(aa0.view(-1), gg0.view(-1)) + torch.dot(aa1.view(-1), gg1.view(-1))


def _ghost_or_materialise(a, g, w_on, b_on, joint, wp, bp):
    """``(sum_i |wp * g_i^T a_i|_F^2 or None, sum_i |bp * sum_t g_{i,t}|^2 or None)`` for
    ``a: [B, T, d]``, ``g: [B, T, p]`` (float32/64; ``g`` rescaled by the caller, see :func:`_pow2`);
    with ``joint`` the bias term is in the first.

    Ghost norm when unweighted and ``T (d + p) <= d p`` (fewer FLOPs: ``B T^2 (d+p)`` vs
    ``B T d p``), else materialisation; both chunked over examples to bound the transient memory.
    In the ghost branch a joint bias term is the sum of the gradient Gram matrix (costs nothing).
    """
    B, T, d = a.shape
    p = g.shape[-1]
    sw = sb = None
    if w_on and wp is None and T * (d + p) <= d * p:
        for s, e in _chunks(B, 2 * T * T):
            sw = _plus(sw, _ghost(a[s:e], g[s:e], joint))
        if joint:
            return sw, None
    elif w_on:
        for s, e in _chunks(B, d * p):
            pe = torch.bmm(g[s:e].transpose(1, 2), a[s:e])  # [b, p, d] per-example gradients
            sw = _plus(sw, _wsq(pe, wp, scratch=True))
    if b_on:
        sb = _wsq(g.sum(1), bp)
    return sw, sb


class LinearFn(torch.autograd.Function):
    """``F.linear`` with per-example squared norms of (weight, bias) added into ``acc``.

    ``transposed=True``: the weight is stored ``[in, out]`` and the layer computes
    ``addmm(b, x.view(-1, in), w)`` (Hugging Face's GPT-2 ``Conv1D``); the gradients are those of
    that call, bit for bit. ``w_chk``/``b_chk``: accumulator slots that receive the squared norm of
    the weight/bias gradient returned (the probe's exactness check; ``-1``: off).
    """

    @staticmethod
    def forward(ctx, x, w, b, acc, w_idx, b_idx, w_pre, b_pre, fused, w_chk=-1, b_chk=-1, transposed=False):
        ctx.save_for_backward(x, w)
        _keep(ctx, acc, w_idx, w_pre, b, b_idx, b_pre, w_chk, b_chk)
        ctx.has_b = b is not None
        ctx.transposed = transposed
        # fused: form the weight gradient of a sequence layer from the per-example gradients
        # (Gray et al. 2024 "simultaneous"): no extra GEMM, equal to the stock gradient up to
        # rounding. Where materialising is needed (a w_pre) or cheaper anyway, or the sequences
        # are long enough (FUSED_MIN_ROWS); for short sequences the ghost norm stays (a batched
        # GEMM over examples with few rows is slower than the one plain GEMM).
        d, p = (w.shape[0], w.shape[1]) if transposed else (w.shape[1], w.shape[0])
        if fused and w_idx >= 0 and x.dim() > 2:
            T = x[0].numel() // d
            ctx.fused = w_pre is not None or T * (d + p) > d * p or T >= FUSED_MIN_ROWS
        else:
            ctx.fused = False
        if transposed:  # Conv1D.forward: addmm on x.view(-1, in), viewed back
            out = x.new_empty(x.shape[:-1] + (p,))
            x2 = x.view(-1, d)
            if b is not None:
                torch.addmm(b, x2, w, out=out.view(-1, p))
            else:
                torch.mm(x2, w, out=out.view(-1, p))
            return out
        if x.dim() > 2 and b is not None and x.is_contiguous():
            # What at::linear does here (addmm on the flattened input, then a view), written into a
            # fresh base tensor: a view output would forbid in-place ops after the layer.
            out = x.new_empty(x.shape[:-1] + (w.shape[0],))
            torch.addmm(b, x.view(-1, x.shape[-1]), w.t(), out=out.view(-1, w.shape[0]))
            return out
        return torch.nn.functional.linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        # (the engine runs backward with gradients disabled: no no_grad() needed)
        x, w = ctx.saved_tensors
        tr = ctx.transposed
        d, p = w.shape if tr else (w.shape[1], w.shape[0])
        flat = x.dim() == 2
        g2 = g if flat else g.reshape(-1, p)
        x2 = x if flat else x.reshape(-1, d)
        gx = gw = gb = None
        # The derivative of addmm(b, x, w.t()) (nn.Linear) or addmm(b, x, w) (Conv1D) exactly as
        # autograd computes it (mm_mat1_backward / mm_mat2_backward, column-major mat2 for Linear,
        # row-major for Conv1D; sum_to for the bias): bit-identical grads.
        if ctx.needs_input_grad[0]:
            gx = g2.mm(w.t() if tr else w)
            gx = gx if flat else gx.view(x.shape)
        if ctx.needs_input_grad[1] and not ctx.fused:
            gw = x2.t().mm(g2) if tr else g2.t().mm(x2)
        if ctx.has_b and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        wi, bi, bp = ctx.w_idx, ctx.b_idx, ctx.b_pre
        wp = ctx.w_pre.t() if tr and ctx.w_pre is not None else ctx.w_pre  # as [out, in]
        w_on, b_on = wi >= 0, bi >= 0
        joint = w_on and wi == bi and wp is None and bp is None  # one slot, unweighted: one sum
        inv2 = None  # rescaling of the sums computed from a rescaled g (see _pow2)
        sw = sb = None
        if not (w_on or b_on):
            pass
        elif flat:
            sw, sb, inv2 = _goodfellow(x, g, w_on, b_on, joint, wp, bp)
        elif ctx.fused:
            B = x.shape[0]
            a3 = x.reshape(B, -1, d)
            g3 = g.reshape(B, -1, p)
            s, inv2 = _pow2(g3)
            for st, e in _chunks(B, d * p):
                pe = torch.bmm(g3[st:e].transpose(1, 2), a3[st:e])  # [b, p, d] per-example gradients
                gw = _plus(gw, pe.sum(0))  # the unweighted sum first: _wsq may overwrite pe
                sw = _plus(sw, _wsq(pe, wp, scratch=True, s=s))
            if b_on:
                sb = _wsq(g3.sum(1), bp, s=s)
            if not ctx.needs_input_grad[1]:
                gw = None
            elif tr and gw is not None:
                gw = gw.t().contiguous()
        else:
            B = x.shape[0]
            a3 = x.reshape(B, -1, d).to(_acc_dtype(g))
            (sw, sb), inv2 = _fast_or_rescaled(
                g.reshape(B, -1, p), lambda g3: _ghost_or_materialise(a3, g3, w_on, b_on, joint, wp, bp)
            )
        _add(ctx.acc, wi, sw, inv2)
        _add(ctx.acc, bi, sb, inv2)
        _record(ctx.acc, ctx.w_chk, gw)
        _record(ctx.acc, ctx.b_chk, gb)
        return gx, gw, gb, None, None, None, None, None, None, None, None, None


class ConvFn(torch.autograd.Function):
    """``aten.convolution`` (1-d or 2-d, not transposed) with per-example squared norms into ``acc``.

    ``x`` has the batch first and already carries any non-zero padding mode (padded outside).
    """

    @staticmethod
    def forward(
        ctx, x, w, b, acc, stride, padding, dilation, groups, w_idx, b_idx, w_pre, b_pre, fused, w_chk=-1, b_chk=-1
    ):
        ctx.save_for_backward(x, w)
        _keep(ctx, acc, w_idx, w_pre, b, b_idx, b_pre, w_chk, b_chk)
        ctx.fused = fused and w_idx >= 0
        ctx.bias_sizes = None if b is None else list(b.shape)
        ctx.stride, ctx.padding, ctx.dilation, ctx.groups = list(stride), list(padding), list(dilation), groups
        nd = x.dim() - 2
        return aten.convolution(x, w, b, list(stride), list(padding), list(dilation), False, [0] * nd, groups)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        nd = x.dim() - 2
        want_b = ctx.bias_sizes is not None and ctx.needs_input_grad[2]
        # fused: the weight gradient comes from the per-example gradients; the bias gradient is
        # summed here too (asking the backend for it makes it compute the weight gradient as well)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1] and not ctx.fused, want_b and not ctx.fused]
        gx, gw, gb = aten.convolution_backward(
            g, x, w, ctx.bias_sizes, ctx.stride, ctx.padding, ctx.dilation, False, [0] * nd, ctx.groups, mask
        )
        if want_b and ctx.fused:
            gb = g.sum([0] + list(range(2, g.dim())))
        with torch.no_grad():
            _record(ctx.acc, ctx.w_chk, gw if not ctx.fused else None)
            _record(ctx.acc, ctx.b_chk, gb)
            if ctx.w_idx < 0 and ctx.b_idx < 0:
                return gx, gw, gb, None, None, None, None, None, None, None, None, None, None, None, None
            dt = _acc_dtype(g)
            B, c_out = g.shape[0], g.shape[1]
            if nd == 1:  # treat a 1-d conv as a 2-d one of height 1
                x4, k = x.unsqueeze(2), (1, w.shape[2])
                st, pd, dl = (1, ctx.stride[0]), (0, ctx.padding[0]), (1, ctx.dilation[0])
            else:
                x4, k = x, tuple(w.shape[2:])
                st, pd, dl = tuple(ctx.stride), tuple(ctx.padding), tuple(ctx.dilation)
            G = ctx.groups
            dd = x.shape[1] // G * w[0, 0].numel()  # inputs per output unit
            pp = c_out // G
            pre = _reshaped(ctx.w_pre, G, pp, dd)
            g3 = g.reshape(B, c_out, -1)
            L = g3.shape[2]
            if ctx.fused:  # the unscaled per-example gradients sum to the weight gradient: rescale their squares
                s, inv2 = _pow2(g3)
                sq = sb = None
                if ctx.w_idx >= 0:
                    sq, pe_sum = _conv_weight_sq(x4, g3, k, dl, pd, st, G, dd, pp, L, True, pre, s)
                    if ctx.needs_input_grad[1]:
                        gw = pe_sum.reshape(w.shape)
                if ctx.b_idx >= 0:
                    sb = _wsq(g3.sum(2), ctx.b_pre, s=s)
                _record(ctx.acc, ctx.w_chk, gw)
            else:
                x4 = x4.to(dt)

                def run(gf):  # gf: [B, C_out, L] in the compute dtype
                    sq = _conv_weight_sq(x4, gf, k, dl, pd, st, G, dd, pp, L, False, pre)[0] if ctx.w_idx >= 0 else None
                    sb = _wsq(gf.sum(2), ctx.b_pre, scratch=True) if ctx.b_idx >= 0 else None
                    return sq, sb

                (sq, sb), inv2 = _fast_or_rescaled(g3, run)
            _add(ctx.acc, ctx.w_idx, sq, inv2)
            _add(ctx.acc, ctx.b_idx, sb, inv2)
        return gx, gw, gb, None, None, None, None, None, None, None, None, None, None, None, None


def _unfold(x, k, dl, pd, st):
    """``F.unfold(x, k, dl, pd, st)`` (same values) as pad + strided windows + one copy: several
    times faster than ``im2col`` on CPU."""
    if pd[0] or pd[1]:
        x = torch.nn.functional.pad(x, (pd[1], pd[1], pd[0], pd[0]))
    v = x.unfold(2, dl[0] * (k[0] - 1) + 1, st[0]).unfold(3, dl[1] * (k[1] - 1) + 1, st[1])
    if dl[0] > 1 or dl[1] > 1:
        v = v[..., :: dl[0], :: dl[1]]  # [B, C, H', W', kh, kw]
    B, C, H, W = v.shape[:4]
    return v.permute(0, 1, 4, 5, 2, 3).reshape(B, C * k[0] * k[1], H * W)


def _conv_weight_sq(x4, gf, k, dl, pd, st, G, dd, pp, L, fused=False, pre=None, s=None):
    """``(sum_i |pre * per-example weight gradient|^2, sum_i per-example gradient or None)``;
    ``pre``: ``[G, pp, dd]`` or None. ``gf`` is rescaled by the caller (see :func:`_pow2`), except
    with ``fused``, where the unscaled per-example gradients are summed into the weight gradient
    and rescaled by ``s`` before squaring."""
    B = x4.shape[0]
    dt = _acc_dtype(gf)
    total = gf.new_zeros((), dtype=dt)
    pe_sum = None
    ghost = L * (dd + pp) <= dd * pp and not fused and pre is None
    if not ghost and st == (1, 1) and x4.shape[1] // G >= SHIFT_MIN_CHANNELS:
        return _conv_shift_sq(x4, gf, k, dl, pd, G, pp, fused, pre, s)
    per = G * (2 * L * L if ghost else dd * pp) + G * dd * L
    # the per-example gradients as [.., dd, pp] when dd < pp: the smaller dimension as the GEMM's
    # rows ran up to 1.4x faster on CPU (e.g. a first layer with 3 input channels: dd = 27)
    flip = dd < pp
    if flip and pre is not None:
        pre = pre.transpose(-1, -2)
    for st_, e in _chunks(B, per):
        A = _unfold(x4[st_:e], k, dl, pd, st)  # [b, C_in*K, L]
        A = A.view(e - st_, G, dd, L)
        Gr = gf[st_:e].view(e - st_, G, pp, L)
        if ghost:
            aa = torch.matmul(A.transpose(2, 3), A)  # [b, G, L, L]
            gg = torch.matmul(Gr.transpose(2, 3), Gr)
            total = total + (aa * gg).sum()
        else:
            # [b, G, pp, dd] per-example gradients (flip: [b, G, dd, pp])
            pe = torch.matmul(A, Gr.transpose(2, 3)) if flip else torch.matmul(Gr, A.transpose(2, 3))
            if fused:  # the unweighted sum first: _wsq may overwrite pe
                pe_sum = _plus(pe_sum, pe.sum(0))
            total = total + _wsq(pe, pre, scratch=True, s=s)
    if flip and pe_sum is not None:
        pe_sum = pe_sum.transpose(-1, -2)
    return total, pe_sum


def _conv_shift_sq(x4, gf, k, dl, pd, G, pp, fused, pre, s):
    """:func:`_conv_weight_sq` for a stride-1 convolution, without ``unfold``: the input is padded
    and flattened (rows of ``Wp``), the output gradient padded to rows of ``Wp`` too; then the
    per-example gradient of kernel tap ``(i, j)`` is one batched GEMM of the gradient with the
    input shifted by ``i dl0 Wp + j dl1`` (a view). Same values as unfold + GEMM, without the
    unfolded copy (``k_h k_w`` times the input)."""
    B, C = x4.shape[:2]
    cg = C // G
    kk = k[0] * k[1]
    Hp, Wp = x4.shape[2] + 2 * pd[0], x4.shape[3] + 2 * pd[1]
    Ho, Wo = Hp - dl[0] * (k[0] - 1), Wp - dl[1] * (k[1] - 1)
    K = (Ho - 1) * Wp + Wo  # the last row's padding columns are not needed
    flip = cg < pp  # the smaller dimension as the GEMM's rows (as in _conv_weight_sq)
    dt = _acc_dtype(gf)
    total = gf.new_zeros((), dtype=dt)
    pe_sum = None
    if pre is not None:  # [G, pp, cg * kk] -> [kk, 1, G, pp, cg] (flip: [..., cg, pp])
        pre = pre.reshape(G, pp, cg, kk).permute(3, 0, 1, 2).unsqueeze(1)
        if flip:
            pre = pre.transpose(-1, -2)
    mat = (cg, pp) if flip else (pp, cg)
    for a, e in _chunks(B, kk * G * pp * cg + C * Hp * Wp + G * pp * Ho * Wp):
        n = e - a
        xp = x4[a:e]
        if pd[0] or pd[1]:
            xp = torch.nn.functional.pad(xp, (pd[1], pd[1], pd[0], pd[0]))
        xf = xp.reshape(n * G, cg, Hp * Wp)
        gq = gf[a:e].reshape(n, G * pp, Ho, Wo)
        if Wp != Wo:
            gq = torch.nn.functional.pad(gq, (0, Wp - Wo))
        gq = gq.reshape(n * G, pp, Ho * Wp)[:, :, :K]
        out = gf.new_empty((kk, n * G) + mat)  # [tap, example x group, ...] per-example gradients
        for i in range(k[0]):
            for j in range(k[1]):
                xs = xf[:, :, i * dl[0] * Wp + j * dl[1] :][:, :, :K]
                if flip:
                    torch.bmm(xs, gq.transpose(1, 2), out=out[i * k[1] + j])
                else:
                    torch.bmm(gq, xs.transpose(1, 2), out=out[i * k[1] + j])
        o = out.view((kk, n, G) + mat)
        if fused:  # the unweighted sum first: _wsq may overwrite out
            pe_sum = _plus(pe_sum, o.sum(1))
        total = total + _wsq(o, pre, scratch=True, s=s)
    if pe_sum is not None:  # [kk, G, *mat] -> [G, pp, cg, kk] (the weight's layout)
        pe_sum = pe_sum.permute(1, 3, 2, 0) if flip else pe_sum.permute(1, 2, 3, 0)
    return total, pe_sum


class EmbeddingFn(torch.autograd.Function):
    """``torch.embedding`` with per-example squared norms of the weight gradient into ``acc``."""

    @staticmethod
    def forward(ctx, ids, w, acc, w_idx, w_pre, padding_idx, sparse, w_chk=-1):
        ctx.save_for_backward(ids)
        _keep(ctx, acc, w_idx, w_pre, w_chk=w_chk)
        ctx.padding_idx, ctx.sparse, ctx.num_weights = padding_idx, sparse, w.shape[0]
        if ids.dim() == 1:
            return w.index_select(0, ids)
        # what torch.embedding does (index_select, then a view), into a fresh base tensor
        out = w.new_empty(ids.shape + (w.shape[1],))
        torch.index_select(w, 0, ids.reshape(-1), out=out.view(-1, w.shape[1]))
        return out

    @staticmethod
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        gw = None
        if ctx.needs_input_grad[1]:
            gw = aten.embedding_backward(g, ids, ctx.num_weights, ctx.padding_idx, False, ctx.sparse)
        nones = (None,) * 6
        if ctx.w_idx < 0:
            _record(ctx.acc, ctx.w_chk, gw)
            return (None, gw, *nones)
        with torch.no_grad():
            dt = _acc_dtype(g)
            B = ids.shape[0]
            V = ctx.num_weights
            D = g.shape[-1]
            i2 = ids.reshape(B, -1)
            T = i2.shape[1]
            pad = (i2 != ctx.padding_idx).unsqueeze(-1).to(dt) if ctx.padding_idx >= 0 else None
            pre = ctx.w_pre.to(dt).index_select(0, i2.reshape(-1)).view(B, T, D) if ctx.w_pre is not None else None

            def run(g3):  # g3: [B, T, D] in the compute dtype
                if pad is not None:
                    g3 = g3 * pad
                if pre is not None:  # row t scaled by P[id_t]: the per-example gradient becomes P * G_i
                    g3 = g3 * pre
                total = g3.new_zeros(())
                if T == 1:
                    total = _sqsum(g3)
                elif V <= 2 * T:  # scatter rows into a per-example table [b, V, D]
                    for s_, e in _chunks(B, V * D):
                        n = e - s_
                        table = g3.new_zeros(n * V, D)
                        rows = (torch.arange(n, device=ids.device).unsqueeze(1) * V + i2[s_:e]).reshape(-1)
                        table.index_add_(0, rows, g3[s_:e].reshape(-1, D))
                        total = total + _sqsum(table)
                else:  # rows summed per distinct (example, token): a compact table [<= b T, D]
                    for s_, e in _chunks(B, T * D):
                        n = e - s_
                        keys = (torch.arange(n, device=ids.device).unsqueeze(1) * V + i2[s_:e]).reshape(-1)
                        sk, perm = keys.sort()
                        new = torch.ones_like(sk, dtype=torch.bool)
                        torch.ne(sk[1:], sk[:-1], out=new[1:])
                        rows = torch.empty_like(sk).index_copy_(0, perm, new.cumsum(0).sub_(1))
                        table = g3.new_zeros(n * T, D)
                        table.index_add_(0, rows, g3[s_:e].reshape(-1, D))
                        total = total + _sqsum(table)
                return (total,)

            (total,), inv2 = _fast_or_rescaled(g.reshape(B, -1, D), run)
            _add(ctx.acc, ctx.w_idx, total, inv2)
            _record(ctx.acc, ctx.w_chk, gw)
        return (None, gw, *nones)


def _sum_over_positions(t: torch.Tensor, keep_last: int) -> torch.Tensor:
    """Sum ``t`` over every dim except the batch (0) and the last ``keep_last`` dims -> ``[B, ...]``."""
    dims = tuple(range(1, t.dim() - keep_last))
    return t.sum(dims) if dims else t


def _layer_norm_sums(g, x, mean, rstd, k, acc, wi, bi, wp, bp) -> None:
    """Add the per-example squared norms of a layer norm's weight (slot ``wi``) and bias (``bi``) into
    ``acc``, from the output gradient ``g``, the input ``x`` and ``native_layer_norm``'s ``mean`` and
    ``rstd`` (``k`` normalised dims)."""
    dt = _acc_dtype(g)
    B = x.shape[0]
    D = math.prod(x.shape[x.dim() - k :])
    gf = g.reshape(B, -1, D)  # [B, positions, D]
    if gf.dtype != dt:
        gf = gf.to(dt)
    # the per-example gradients [B, D] of the weight (row 0) and the bias (last row), as finite as
    # the stock gradient (a sum of the same terms); their squares: _add_sq
    n = (wi >= 0) + (bi >= 0)
    P = gf.new_empty(n, B, D)
    if wi >= 0:
        # sum_t rstd_t (x_t - mean_t) g_t: (x - mean) * g in cache-sized chunks of examples (in
        # place), summed over positions with the weights rstd_t as a batched GEMV
        x3, m3, r3 = x.reshape(B, -1, D), mean.reshape(B, -1, 1), rstd.reshape(B, 1, -1)
        if not x3.dtype == m3.dtype == r3.dtype == dt:
            x3, m3, r3 = x3.to(dt), m3.to(dt), r3.to(dt)
        pw = P[0].unsqueeze(1)  # [B, 1, D]
        step = _chunk_step(x3[0].numel(), _elementwise_chunk(x))
        if step >= B:
            torch.bmm(r3, torch.sub(x3, m3).mul_(gf), out=pw)
        else:
            for s in range(0, B, step):
                e = min(B, s + step)
                torch.bmm(r3[s:e], torch.sub(x3[s:e], m3[s:e]).mul_(gf[s:e]), out=pw[s:e])
    if bi >= 0:
        torch.sum(gf, 1, out=P[n - 1])
    if n == 2 and wi == bi and wp is None and bp is None:
        _add_sq(acc, wi, P, None)  # one slot: one sum
    else:
        if wi >= 0:
            _add_sq(acc, wi, P[0], _reshaped(wp, D))
        if bi >= 0:
            _add_sq(acc, bi, P[n - 1], _reshaped(bp, D))


class LayerNormSums:
    """The per-example sums of :class:`LayerNormFn` as a hook on the stock op, for eager steps
    without the exactness check: ``out, mean, rstd = torch.native_layer_norm(x, ...)`` (what
    ``F.layer_norm`` runs, with its own C++ autograd node: no Python autograd Function, no Python
    backward), then ``out.register_hook(LayerNormSums(x, mean, rstd, ...))``. The hook receives the
    output gradient before the node's backward runs and adds the sums into ``acc``. It keeps
    ``x``, ``mean`` and ``rstd`` (detached: no reference cycle through the graph) until it has run
    once, then lets them go, so that a graph kept alive after its backward pass (a ``loss`` still
    referenced during the next forward) does not keep them. A second backward pass through the same
    graph (``retain_graph=True``) adds NaN: its per-example gradients would be sums over the passes,
    with cross terms these sums do not have."""

    __slots__ = ("x", "mean", "rstd", "k", "acc", "w_idx", "b_idx", "w_pre", "b_pre")

    def __init__(self, x, mean, rstd, k, acc, w_idx, b_idx, w_pre, b_pre) -> None:
        self.x, self.mean, self.rstd = x.detach(), mean.detach(), rstd.detach()
        self.k, self.acc, self.w_idx, self.b_idx, self.w_pre, self.b_pre = k, acc, w_idx, b_idx, w_pre, b_pre

    def __call__(self, g: torch.Tensor) -> None:
        x, mean, rstd = self.x, self.mean, self.rstd
        if x is None or mean is None or rstd is None:
            self.acc.select(0, max(self.w_idx, self.b_idx)).add_(math.nan)
            return
        self.x = self.mean = self.rstd = None
        with torch.no_grad():
            _layer_norm_sums(g, x, mean, rstd, self.k, self.acc, self.w_idx, self.b_idx, self.w_pre, self.b_pre)


class LayerNormFn(torch.autograd.Function):
    """``aten.native_layer_norm`` (what ``F.layer_norm`` runs) with per-example norms of (weight, bias)."""

    @staticmethod
    def forward(ctx, x, w, b, acc, normalized_shape, eps, w_idx, b_idx, w_pre, b_pre, w_chk=-1, b_chk=-1):
        out, mean, rstd = aten.native_layer_norm(x, list(normalized_shape), w, b, eps)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)  # (no zero tensors for mean and rstd in backward)
        ctx.save_for_backward(x, w, b, mean, rstd)
        _keep(ctx, acc, w_idx, w_pre, b, b_idx, b_pre, w_chk, b_chk)
        ctx.shape = list(normalized_shape)
        return out, mean, rstd

    @staticmethod
    def backward(ctx, g, _gm, _gr):
        if g is None:  # the output got no gradient
            return (None,) * 12
        x, w, b, mean, rstd = ctx.saved_tensors
        mask = [
            ctx.needs_input_grad[0],
            w is not None and ctx.needs_input_grad[1],
            b is not None and ctx.needs_input_grad[2],
        ]
        gx, gw, gb = aten.native_layer_norm_backward(g, x, ctx.shape, mean, rstd, w, b, mask)
        if ctx.w_idx >= 0 or ctx.b_idx >= 0:
            with torch.no_grad():
                _layer_norm_sums(g, x, mean, rstd, len(ctx.shape), ctx.acc, ctx.w_idx, ctx.b_idx, ctx.w_pre, ctx.b_pre)
        if ctx.w_chk >= 0 or ctx.b_chk >= 0:
            with torch.no_grad():
                _record(ctx.acc, ctx.w_chk, gw)
                _record(ctx.acc, ctx.b_chk, gb)
        return gx, gw, gb, None, None, None, None, None, None, None, None, None


class GroupNormFn(torch.autograd.Function):
    """``aten.native_group_norm`` (what ``F.group_norm`` runs) with per-example norms of (weight, bias)."""

    @staticmethod
    def forward(ctx, x, w, b, acc, groups, eps, w_idx, b_idx, w_pre, b_pre, w_chk=-1, b_chk=-1):
        N, C = x.shape[0], x.shape[1]
        HxW = x[0, 0].numel()
        out, mean, rstd = aten.native_group_norm(x, w, b, N, C, HxW, groups, eps)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, w, mean, rstd)
        _keep(ctx, acc, w_idx, w_pre, b, b_idx, b_pre, w_chk, b_chk)
        ctx.groups, ctx.has_b = groups, b is not None
        return out, mean, rstd

    @staticmethod
    def backward(ctx, g, _gm, _gr):
        x, w, mean, rstd = ctx.saved_tensors
        N, C = x.shape[0], x.shape[1]
        HxW = x[0, 0].numel()
        mask = [
            ctx.needs_input_grad[0],
            w is not None and ctx.needs_input_grad[1],
            ctx.has_b and ctx.needs_input_grad[2],
        ]
        gx, gw, gb = aten.native_group_norm_backward(g, x, mean, rstd, w, N, C, HxW, ctx.groups, mask)
        with torch.no_grad():
            dt = _acc_dtype(g)
            gf = g.reshape(N, C, HxW).to(dt)
            G = ctx.groups
            # per channel c = (group, c mod C/G) of example n, as the stock kernel forms them:
            # ds = sum_hw x g, db = sum_hw g (the bias gradient); weight gradient (ds - db mean) rstd
            # (in chunks of examples that stay in the cache between the two sums)
            x3 = x.reshape(N, C, HxW).to(dt)
            db = gf.new_empty(N, C)
            ds = gf.new_empty(N, C) if ctx.w_idx >= 0 else None
            for s, e in _chunks(N, C * HxW, _elementwise_chunk(x)):
                torch.sum(gf[s:e], 2, out=db[s:e])
                if ds is not None:
                    torch.sum(x3[s:e] * gf[s:e], 2, out=ds[s:e])
            if ds is not None:
                sg = (G, C // G)
                pw = (
                    ds.view(N, *sg)
                    .sub_(db.view(N, *sg) * mean.reshape(N, G, 1).to(dt))
                    .mul_(rstd.reshape(N, G, 1).to(dt))
                )
                _add(ctx.acc, ctx.w_idx, _wsq64(pw, _reshaped(ctx.w_pre, G, C // G)))
            if ctx.b_idx >= 0:
                _add(ctx.acc, ctx.b_idx, _wsq64(db, ctx.b_pre))
            _record(ctx.acc, ctx.w_chk, gw)
            _record(ctx.acc, ctx.b_chk, gb)
        return gx, gw, gb, None, None, None, None, None, None, None, None, None


class ScaleFn(torch.autograd.Function):
    """``xhat * w`` (the affine step of ``F.rms_norm``, which decomposes into ``mul`` ops) with the
    per-example squared norms of ``w``'s gradient. ``w`` covers the last ``w.dim()`` dims."""

    @staticmethod
    def forward(ctx, xhat, w, acc, w_idx, w_pre, w_chk=-1):
        ctx.save_for_backward(xhat, w)
        _keep(ctx, acc, w_idx, w_pre, w_chk=w_chk)
        return xhat * w

    @staticmethod
    def backward(ctx, g):
        xhat, w = ctx.saved_tensors
        gx = gw = None
        # MulBackward0 and the engine's sum_to for the broadcast operand: bit-identical.
        if ctx.needs_input_grad[0]:
            gx = g * w
        prod = g * xhat
        if ctx.needs_input_grad[1]:
            gw = prod.sum_to_size(w.shape)
        if ctx.w_idx >= 0:
            with torch.no_grad():
                dt = _acc_dtype(g)
                pf = prod if prod.dtype == dt else g.to(dt) * xhat.to(dt)
                _add_sq(ctx.acc, ctx.w_idx, _sum_over_positions(pf, w.dim()), ctx.w_pre)
        _record(ctx.acc, ctx.w_chk, gw)
        return gx, gw, None, None, None, None


class ScaleSums:
    """The per-example sums of :class:`ScaleFn` as a hook on the stock ``xhat * w`` (as
    :class:`LayerNormSums`: eager steps without the exactness check; ``xhat`` kept, detached, until
    the hook has run once; a second backward pass through the graph adds NaN). One more elementwise
    product than :class:`ScaleFn` (the stock ``MulBackward0`` forms ``g * xhat`` for the weight
    gradient itself), but no Python autograd Function."""

    __slots__ = ("xhat", "nd", "acc", "w_idx", "w_pre")

    def __init__(self, xhat, nd, acc, w_idx, w_pre) -> None:
        self.xhat, self.nd, self.acc, self.w_idx, self.w_pre = xhat.detach(), nd, acc, w_idx, w_pre

    def __call__(self, g: torch.Tensor) -> None:
        xhat = self.xhat
        if xhat is None:
            self.acc.select(0, self.w_idx).add_(math.nan)
            return
        self.xhat = None
        with torch.no_grad():
            dt = _acc_dtype(g)
            pf = g * xhat if g.dtype == xhat.dtype == dt else g.to(dt) * xhat.to(dt)
            _add_sq(self.acc, self.w_idx, _sum_over_positions(pf, self.nd), self.w_pre)
