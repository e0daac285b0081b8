"""Autograd functions that compute a layer's ordinary gradients *and* the sum over examples of
its per-example squared gradient norms, in the one normal backward pass.

Each function's ``forward`` runs the same ATen op the stock layer runs, and its ``backward``
runs the same ATen backward op (``convolution_backward``, ``native_layer_norm_backward``, ...,
or for ``linear`` the exact ``mm`` calls of ``addmm``'s derivative), so the gradients that reach
``.grad`` are bit-identical to an unwrapped model's. Beside them it adds
``sum_i |g_i|^2`` for the covered parameters of the layer into ``acc`` (a 1-D float64 tensor
owned by the probe): no per-example gradient outlives the layer's backward, no ``.item()``,
no Python state touched, so the functions trace under ``torch.compile(fullgraph=True)``.

Per-example squared norms (``a``: layer input, ``g``: gradient of the layer output, rows of
example ``i``; mechanics note §1):

- Linear, one row per example: ``|a_i|^2 |g_i|^2`` (Goodfellow 2015, arXiv:1510.01799); bias ``|g_i|^2``.
- Linear on sequences (``T`` rows per example, ``d`` inputs, ``p`` outputs): ghost norm
  ``sum_{t,t'} (a_t.a_t')(g_t.g_t')`` (Li et al. 2021, arXiv:2110.05679) when
  ``T (d + p) <= d p`` (it then costs fewer FLOPs), else the per-example gradient ``g_i^T a_i``
  materialised in chunks of examples and squared (Gray et al. 2024, arXiv:2411.00999).
  Bias ``|sum_t g_t|^2``.
- Conv: the same two choices on ``unfold``-ed inputs, per group (Opacus/BackPACK's unfold).
- Embedding: ``|sum_t onehot(id_t) g_t|^2`` by scattering rows into a per-example table when the
  vocabulary is small relative to ``T^2``, else by the token-equality-masked Gram matrix;
  ``padding_idx`` rows get no gradient, as in the stock backward.
- LayerNorm / GroupNorm / RMSNorm: ``|sum_t xhat_t * g_t|^2`` (weight), ``|sum_t g_t|^2`` (bias).

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
  |P * G_i|^2``), then the scatter or masked-Gram algorithm as above.
- Norm layers: the per-example gradient vector (per channel for GroupNorm) times ``P``, squared.

The weights are read at each backward (nothing derived from them is cached: they may change in
place between steps). All norms are computed in float32 (float64 for float64 inputs) whatever the
autocast dtype, and added to ``acc`` in its dtype.
"""

from __future__ import annotations

import torch

__all__ = ["LinearFn", "ConvFn", "EmbeddingFn", "LayerNormFn", "GroupNormFn", "ScaleFn", "CHUNK_ELEMS"]

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


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _sqsum(t: torch.Tensor) -> torch.Tensor:
    """``sum(t**2)`` in float32/64 as one BLAS dot (no squared temporary)."""
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    f = t.reshape(-1)
    return torch.dot(f, f)


def _wsq(t: torch.Tensor, pre: torch.Tensor | None, scratch: bool = False) -> torch.Tensor:
    """``sum((pre * t)**2)`` in float32/64, ``pre`` broadcast over ``t``'s leading dims (``None``:
    ``sum(t**2)``). ``scratch``: ``t`` is a temporary that may be overwritten (saves a copy)."""
    if pre is None:
        return _sqsum(t)
    dt = _acc_dtype(t)
    pre = pre.to(dt)
    return _sqsum(t.mul_(pre) if scratch and t.dtype == dt else t.to(dt) * pre)


def _plus(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    return part if total is None else total + part


def _reshaped(pre: torch.Tensor | None, *shape: int) -> torch.Tensor | None:
    return None if pre is None else pre.reshape(shape)


def _add(acc: torch.Tensor, idx: int, s: torch.Tensor | None) -> None:
    """``acc[idx] += s`` (in place, traceable); ``idx < 0`` or ``s is None``: nothing."""
    if idx >= 0 and s is not None:
        acc.select(0, idx).add_(s.to(acc.dtype))


def _keep(ctx, acc, w_idx, w_pre, b=None, b_idx=-1, b_pre=None) -> None:
    """Store the accumulator, slots and weights on ``ctx`` (a missing bias gets slot -1: nothing is
    added for it, not even a joint ``+1``)."""
    ctx.acc, ctx.w_idx, ctx.w_pre, ctx.b_pre = acc, w_idx, w_pre, b_pre
    ctx.b_idx = b_idx if b is not None else -1


def _chunks(n: int, per_example: int):
    step = max(1, CHUNK_ELEMS // max(1, per_example))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _goodfellow(x, g, w_on, b_on, joint, wp, bp):
    """``(weight term, bias term)`` for one row per example (``x: [B, d]``, ``g: [B, p]``); with
    ``joint`` the bias term is folded into the weight term (``(|x_i|^2 + 1) |g_i|^2``)."""
    dt = _acc_dtype(g)
    sw = sb = gn = None
    if w_on and wp is None:
        xn = torch.linalg.vector_norm(x, dim=1, dtype=dt).square_()
        if joint:
            xn.add_(1.0)
        gn = torch.linalg.vector_norm(g, dim=1, dtype=dt).square_()
        sw = torch.dot(xn, gn)
        if joint:
            return sw, None
    elif w_on:  # sum_ijk P_jk^2 g_ij^2 x_ik^2: one GEMM, no per-example gradient
        P2 = wp.to(dt).square()
        for s, e in _chunks(x.shape[0], 2 * x.shape[1] + g.shape[1]):
            gxp = torch.mm(g[s:e].to(dt).square(), P2)  # [b, d]: sum_j P_jk^2 g_ij^2
            sw = _plus(sw, torch.dot(gxp.view(-1), x[s:e].to(dt).square().view(-1)))
    if b_on:
        sb = gn.sum() if gn is not None and bp is None else _wsq(g, bp)
    return sw, sb


def _ghost_or_materialise(a, g, w_on, b_on, joint, wp, bp):
    """``(sum_i |wp * g_i^T a_i|_F^2 or None, sum_i |bp * sum_t g_{i,t}|^2 or None)`` for
    ``a: [B, T, d]``, ``g: [B, T, p]`` (float32/64); with ``joint`` the bias term is in the first.

    Ghost norm when unweighted and ``T (d + p) <= d p`` (fewer FLOPs: ``B T^2 (d+p)`` vs
    ``B T d p``), else materialisation; both chunked over examples to bound the transient memory.
    In the ghost branch a joint bias term is the sum of the gradient Gram matrix (costs nothing).
    """
    B, T, d = a.shape
    p = g.shape[-1]
    sw = sb = None
    if w_on and wp is None and T * (d + p) <= d * p:
        for s, e in _chunks(B, 2 * T * T):
            aa = torch.bmm(a[s:e], a[s:e].transpose(1, 2))  # [b, T, T]
            gg = torch.bmm(g[s:e], g[s:e].transpose(1, 2))  # [b, T, T]
            if joint:
                aa.add_(1.0)
            sw = _plus(sw, torch.dot(aa.view(-1), gg.view(-1)))
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
    """``F.linear`` with per-example squared norms of (weight, bias) added into ``acc``."""

    @staticmethod
    def forward(ctx, x, w, b, acc, w_idx, b_idx, w_pre, b_pre, fused):
        ctx.save_for_backward(x, w)
        _keep(ctx, acc, w_idx, w_pre, b, b_idx, b_pre)
        ctx.has_b = b is not None
        # fused: form the weight gradient of a sequence layer from the per-example gradients
        # (Gray et al. 2024 "simultaneous"): no extra GEMM, equal to the stock gradient up to
        # rounding. Where materialising is needed (a w_pre) or cheaper anyway, or the sequences
        # are long enough (FUSED_MIN_ROWS); for short sequences the ghost norm stays (a batched
        # GEMM over examples with few rows is slower than the one plain GEMM).
        d, p = w.shape[1], w.shape[0]
        if fused and w_idx >= 0 and x.dim() > 2:
            T = x[0].numel() // d
            ctx.fused = w_pre is not None or T * (d + p) > d * p or T >= FUSED_MIN_ROWS
        else:
            ctx.fused = False
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
        p, d = w.shape
        flat = x.dim() == 2
        g2 = g if flat else g.reshape(-1, p)
        gx = gw = gb = None
        # The derivative of addmm(b, x, w.t()) exactly as autograd computes it (mm_mat1_backward /
        # mm_mat2_backward with a column-major mat2, sum_to for the bias): bit-identical grads.
        if ctx.needs_input_grad[0]:
            gx = g2.mm(w) if flat else g2.mm(w).view(x.shape)
        if ctx.needs_input_grad[1] and not ctx.fused:
            gw = g2.t().mm(x if flat else x.reshape(-1, d))
        if ctx.has_b and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        wi, bi, wp, bp = ctx.w_idx, ctx.b_idx, ctx.w_pre, ctx.b_pre
        w_on, b_on = wi >= 0, bi >= 0
        joint = w_on and wi == bi and wp is None and bp is None  # one slot, unweighted: one sum
        if flat:
            sw, sb = _goodfellow(x, g, w_on, b_on, joint, wp, bp)
        elif ctx.fused:
            B = x.shape[0]
            a3 = x.reshape(B, -1, d)
            g3 = g.reshape(B, -1, p)
            sw = sb = None
            for st, e in _chunks(B, d * p):
                pe = torch.bmm(g3[st:e].transpose(1, 2), a3[st:e])  # [b, p, d] per-example gradients
                gw = _plus(gw, pe.sum(0))  # the unweighted sum first: _wsq may overwrite pe
                sw = _plus(sw, _wsq(pe, wp, scratch=True))
            if b_on:
                sb = _wsq(g3.sum(1), bp)
            if not ctx.needs_input_grad[1]:
                gw = None
        else:
            B = x.shape[0]
            dt = _acc_dtype(g)
            sw, sb = _ghost_or_materialise(
                x.reshape(B, -1, d).to(dt), g.reshape(B, -1, p).to(dt), w_on, b_on, joint, wp, bp
            )
        _add(ctx.acc, wi, sw)
        _add(ctx.acc, bi, sb)
        return gx, gw, gb, None, None, None, None, None, None


class ConvFn(torch.autograd.Function):
    """``aten.convolution`` (1-d or 2-d, not transposed) with per-example squared norms into ``acc``.

    ``x`` has the batch first and already carries any non-zero padding mode (padded outside).
    """

    @staticmethod
    def forward(ctx, x, w, b, acc, stride, padding, dilation, groups, w_idx, b_idx, w_pre, b_pre, fused):
        ctx.save_for_backward(x, w)
        _keep(ctx, acc, w_idx, w_pre, b, b_idx, b_pre)
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
            dt = _acc_dtype(g)
            B, c_out = g.shape[0], g.shape[1]
            gf = g.reshape(B, c_out, -1).to(dt)  # [B, C_out, L]
            if ctx.w_idx >= 0:
                if nd == 1:  # treat a 1-d conv as a 2-d one of height 1
                    x4, k = x.unsqueeze(2), (1, w.shape[2])
                    st, pd, dl = (1, ctx.stride[0]), (0, ctx.padding[0]), (1, ctx.dilation[0])
                else:
                    x4, k = x, tuple(w.shape[2:])
                    st, pd, dl = tuple(ctx.stride), tuple(ctx.padding), tuple(ctx.dilation)
                G = ctx.groups
                dd = x.shape[1] // G * w[0, 0].numel()  # inputs per output unit
                pp = c_out // G
                sq, pe_sum = _conv_weight_sq(
                    x4 if ctx.fused else x4.to(dt),
                    g.reshape(B, c_out, -1) if ctx.fused else gf,
                    k,
                    dl,
                    pd,
                    st,
                    G,
                    dd,
                    pp,
                    gf.shape[2],
                    ctx.fused,
                    _reshaped(ctx.w_pre, G, pp, dd),
                )
                _add(ctx.acc, ctx.w_idx, sq)
                if ctx.fused and ctx.needs_input_grad[1]:
                    gw = pe_sum.reshape(w.shape)
            if ctx.b_idx >= 0:
                _add(ctx.acc, ctx.b_idx, _wsq(gf.sum(2), ctx.b_pre, scratch=True))
        return gx, gw, gb, None, None, None, None, None, None, None, None, None, None


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


def _conv_weight_sq(x4, gf, k, dl, pd, st, G, dd, pp, L, fused=False, pre=None):
    """``(sum_i |pre * per-example weight gradient|^2, sum_i per-example gradient or None)``;
    ``pre``: ``[G, pp, dd]`` or None."""
    B = x4.shape[0]
    dt = _acc_dtype(gf)
    total = gf.new_zeros((), dtype=dt)
    pe_sum = None
    ghost = L * (dd + pp) <= dd * pp and not fused and pre is None
    per = G * (2 * L * L if ghost else dd * pp) + G * dd * L
    for s, e in _chunks(B, per):
        A = _unfold(x4[s:e], k, dl, pd, st)  # [b, C_in*K, L]
        A = A.view(e - s, G, dd, L)
        Gr = gf[s:e].view(e - s, G, pp, L)
        if ghost:
            aa = torch.matmul(A.transpose(2, 3), A)  # [b, G, L, L]
            gg = torch.matmul(Gr.transpose(2, 3), Gr)
            total = total + (aa * gg).sum()
        else:
            pe = torch.matmul(Gr, A.transpose(2, 3))  # [b, G, pp, dd] per-example gradients
            if fused:  # the unweighted sum first: _wsq may overwrite pe
                pe_sum = _plus(pe_sum, pe.sum(0))
            total = total + _wsq(pe, pre, scratch=True)
    return total, pe_sum


class EmbeddingFn(torch.autograd.Function):
    """``torch.embedding`` with per-example squared norms of the weight gradient into ``acc``."""

    @staticmethod
    def forward(ctx, ids, w, acc, w_idx, w_pre, padding_idx, sparse):
        ctx.save_for_backward(ids)
        _keep(ctx, acc, w_idx, w_pre)
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
        if ctx.w_idx < 0:
            return None, gw, None, None, None, None, None
        with torch.no_grad():
            dt = _acc_dtype(g)
            B = ids.shape[0]
            V = ctx.num_weights
            D = g.shape[-1]
            i2 = ids.reshape(B, -1)
            g3 = g.reshape(B, -1, D).to(dt)
            T = i2.shape[1]
            if ctx.padding_idx >= 0:
                g3 = g3 * (i2 != ctx.padding_idx).unsqueeze(-1).to(dt)
            if ctx.w_pre is not None:  # row t scaled by P[id_t]: the per-example gradient becomes P * G_i
                g3 = g3 * ctx.w_pre.to(dt).index_select(0, i2.reshape(-1)).view(g3.shape)
            total = g3.new_zeros(())
            if T == 1:
                total = g3.pow(2).sum()
            elif V <= T * T:  # scatter rows into a per-example table [b, V, D]
                for s, e in _chunks(B, V * D):
                    n = e - s
                    table = g3.new_zeros(n * V, D)
                    rows = (torch.arange(n, device=ids.device).unsqueeze(1) * V + i2[s:e]).reshape(-1)
                    table.index_add_(0, rows, g3[s:e].reshape(-1, D))
                    total = total + _sqsum(table)
            else:  # token-equality-masked Gram matrix [b, T, T]
                for s, e in _chunks(B, 2 * T * T):
                    same = (i2[s:e].unsqueeze(2) == i2[s:e].unsqueeze(1)).to(dt)
                    gg = torch.bmm(g3[s:e], g3[s:e].transpose(1, 2))
                    total = total + (gg * same).sum()
            _add(ctx.acc, ctx.w_idx, total)
        return None, gw, None, None, None, None, None


def _sum_over_positions(t: torch.Tensor, keep_last: int) -> torch.Tensor:
    """Sum ``t`` over every dim except the batch (0) and the last ``keep_last`` dims -> ``[B, ...]``."""
    dims = tuple(range(1, t.dim() - keep_last))
    return t.sum(dims) if dims else t


class LayerNormFn(torch.autograd.Function):
    """``aten.native_layer_norm`` (what ``F.layer_norm`` runs) with per-example norms of (weight, bias)."""

    @staticmethod
    def forward(ctx, x, w, b, acc, normalized_shape, eps, w_idx, b_idx, w_pre, b_pre):
        out, mean, rstd = aten.native_layer_norm(x, list(normalized_shape), w, b, eps)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, w, b, mean, rstd)
        _keep(ctx, acc, w_idx, w_pre, b, b_idx, b_pre)
        ctx.shape = list(normalized_shape)
        return out, mean, rstd

    @staticmethod
    def backward(ctx, g, _gm, _gr):
        x, w, b, mean, rstd = ctx.saved_tensors
        mask = [
            ctx.needs_input_grad[0],
            w is not None and ctx.needs_input_grad[1],
            b is not None and ctx.needs_input_grad[2],
        ]
        gx, gw, gb = aten.native_layer_norm_backward(g, x, ctx.shape, mean, rstd, w, b, mask)
        with torch.no_grad():
            dt = _acc_dtype(g)
            k = len(ctx.shape)
            gf = g.to(dt)
            if ctx.w_idx >= 0:
                xhat = (x.to(dt) - mean.to(dt)) * rstd.to(dt)
                _add(ctx.acc, ctx.w_idx, _wsq(_sum_over_positions(xhat * gf, k), ctx.w_pre, scratch=True))
            if ctx.b_idx >= 0:  # (not scratch: without positions the sum is g itself)
                _add(ctx.acc, ctx.b_idx, _wsq(_sum_over_positions(gf, k), ctx.b_pre))
        return gx, gw, gb, None, None, None, None, None, None, None


class GroupNormFn(torch.autograd.Function):
    """``aten.native_group_norm`` (what ``F.group_norm`` runs) with per-example norms of (weight, bias)."""

    @staticmethod
    def forward(ctx, x, w, b, acc, groups, eps, w_idx, b_idx, w_pre, b_pre):
        N, C = x.shape[0], x.shape[1]
        HxW = x[0, 0].numel()
        out, mean, rstd = aten.native_group_norm(x, w, b, N, C, HxW, groups, eps)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, w, mean, rstd)
        _keep(ctx, acc, w_idx, w_pre, b, b_idx, b_pre)
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
            if ctx.w_idx >= 0:
                xc = (x.reshape(N, G, -1).to(dt) - mean.reshape(N, G, 1).to(dt)).reshape(N, C, HxW)
                sxg = torch.linalg.vecdot(xc, gf).reshape(N, G, C // G)  # sum_hw (x - mean) g
                # per-example weight gradient, channel c = (group, c mod C/G): sxg * rstd
                _add(
                    ctx.acc,
                    ctx.w_idx,
                    _wsq(sxg * rstd.reshape(N, G, 1).to(dt), _reshaped(ctx.w_pre, G, C // G), scratch=True),
                )
            if ctx.b_idx >= 0:
                _add(ctx.acc, ctx.b_idx, _wsq(gf.sum(2), ctx.b_pre, scratch=True))
        return gx, gw, gb, None, None, None, None, None, None, None


class ScaleFn(torch.autograd.Function):
    """``xhat * w`` (the affine step of ``F.rms_norm``, which decomposes into ``mul`` ops) with the
    per-example squared norms of ``w``'s gradient. ``w`` covers the last ``w.dim()`` dims."""

    @staticmethod
    def forward(ctx, xhat, w, acc, w_idx, w_pre):
        ctx.save_for_backward(xhat, w)
        _keep(ctx, acc, w_idx, w_pre)
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
                _add(ctx.acc, ctx.w_idx, _wsq(_sum_over_positions(pf, w.dim()), ctx.w_pre))
        return gx, gw, None, None, None
