"""Autograd functions that compute a layer's ordinary gradients *and* the sum over examples of
its per-example squared gradient norms, in the one normal backward pass.

Each function's ``forward`` runs the same ATen op the stock layer runs, and its ``backward``
runs the same ATen backward op (``convolution_backward``, ``native_layer_norm_backward``, ...,
or for ``linear`` the exact ``mm`` calls of ``addmm``'s derivative), so the gradients that reach
``.grad`` are bit-identical to an unwrapped model's. Beside them it adds
``sum_i |g_i|^2`` for the covered parameters of the layer into ``acc`` (a 0-d float64 tensor
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

All norms are computed in float32 (float64 for float64 inputs) whatever the autocast dtype.
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


def _chunks(n: int, per_example: int):
    step = max(1, CHUNK_ELEMS // max(1, per_example))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _ghost_or_materialise(a: torch.Tensor, g: torch.Tensor, w_on: bool, b_on: bool) -> torch.Tensor:
    """``sum_i (|g_i^T a_i|_F^2 [w_on] + |sum_t g_{i,t}|^2 [b_on])`` for ``a: [B, T, d]``,
    ``g: [B, T, p]`` (float32/64), as a 0-d tensor.

    Ghost norm when ``T (d + p) <= d p`` (fewer FLOPs: ``B T^2 (d+p)`` vs ``B T d p``), else
    materialisation; both chunked over examples to bound the transient memory. In the ghost
    branch the bias term is the sum of the gradient Gram matrix, so it costs nothing extra.
    """
    B, T, d = a.shape
    p = g.shape[-1]
    total = None
    if w_on and T * (d + p) <= d * p:
        for s, e in _chunks(B, 2 * T * T):
            aa = torch.bmm(a[s:e], a[s:e].transpose(1, 2))  # [b, T, T]
            gg = torch.bmm(g[s:e], g[s:e].transpose(1, 2))  # [b, T, T]
            if b_on:
                aa.add_(1.0)
            part = torch.dot(aa.view(-1), gg.view(-1))
            total = part if total is None else total + part
        return total
    if w_on:
        for s, e in _chunks(B, d * p):
            pe = torch.bmm(g[s:e].transpose(1, 2), a[s:e])  # [b, p, d] per-example gradients
            part = _sqsum(pe)
            total = part if total is None else total + part
    if b_on:
        part = _sqsum(g.sum(1))
        total = part if total is None else total + part
    return total


class LinearFn(torch.autograd.Function):
    """``F.linear`` with per-example squared norms of (weight, bias) added into ``acc``."""

    @staticmethod
    def forward(ctx, x, w, b, acc, w_on, b_on, fused):  # type: ignore[override]
        ctx.save_for_backward(x, w)
        ctx.acc, ctx.w_on, ctx.b_on, ctx.has_b = acc, w_on, b_on, b is not None
        # fused: form the weight gradient of a sequence layer from the per-example gradients
        # (Gray et al. 2024 "simultaneous"): no extra GEMM, equal to the stock gradient up to
        # rounding. Where materialising is cheaper anyway, or the sequences are long enough
        # (FUSED_MIN_ROWS); for short sequences the ghost norm stays (a batched GEMM over examples
        # with few rows is slower than the one plain GEMM).
        d, p = w.shape[1], w.shape[0]
        if fused and w_on and x.dim() > 2:
            T = x[0].numel() // d
            ctx.fused = T * (d + p) > d * p or T >= FUSED_MIN_ROWS
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
        dt = _acc_dtype(g)
        if flat:  # Goodfellow: sum_i (|x_i|^2 [w_on] + [b_on]) |g_i|^2, in as few kernels as possible
            if ctx.w_on:
                xn = torch.linalg.vector_norm(x, dim=1, dtype=dt).square_()
                if ctx.b_on:
                    xn.add_(1.0)
                s = torch.dot(xn, torch.linalg.vector_norm(g, dim=1, dtype=dt).square_())
            else:
                s = _sqsum(g)
        elif ctx.fused:
            B = x.shape[0]
            a3 = x.reshape(B, -1, d)
            g3 = g.reshape(B, -1, p)
            s = None
            for st, e in _chunks(B, d * p):
                pe = torch.bmm(g3[st:e].transpose(1, 2), a3[st:e])  # [b, p, d] per-example gradients
                part = pe.sum(0)
                gw = part if gw is None else gw + part
                s = _sqsum(pe) if s is None else s + _sqsum(pe)
            if ctx.b_on:
                s = s + _sqsum(g3.sum(1))
            if not ctx.needs_input_grad[1]:
                gw = None
        else:
            B = x.shape[0]
            s = _ghost_or_materialise(x.reshape(B, -1, d).to(dt), g.reshape(B, -1, p).to(dt), ctx.w_on, ctx.b_on)
        ctx.acc.add_(s)
        return gx, gw, gb, None, None, None, None


class ConvFn(torch.autograd.Function):
    """``aten.convolution`` (1-d or 2-d, not transposed) with per-example squared norms into ``acc``.

    ``x`` has the batch first and already carries any non-zero padding mode (padded outside).
    """

    @staticmethod
    def forward(ctx, x, w, b, acc, stride, padding, dilation, groups, w_on, b_on, fused):  # type: ignore[override]
        ctx.save_for_backward(x, w)
        ctx.acc, ctx.w_on, ctx.b_on, ctx.fused = acc, w_on, b_on, fused and w_on
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
        gx, gw, gb = aten.convolution_backward(g, x, w, ctx.bias_sizes, ctx.stride, ctx.padding, ctx.dilation,
                                               False, [0] * nd, ctx.groups, mask)
        if want_b and ctx.fused:
            gb = g.sum([0] + list(range(2, g.dim())))
        with torch.no_grad():
            dt = _acc_dtype(g)
            B, c_out = g.shape[0], g.shape[1]
            gf = g.reshape(B, c_out, -1).to(dt)  # [B, C_out, L]
            s = gf.new_zeros(())
            if ctx.w_on:
                if nd == 1:  # treat a 1-d conv as a 2-d one of height 1
                    x4, k = x.unsqueeze(2), (1, w.shape[2])
                    st, pd, dl = (1, ctx.stride[0]), (0, ctx.padding[0]), (1, ctx.dilation[0])
                else:
                    x4, k = x, tuple(w.shape[2:])
                    st, pd, dl = tuple(ctx.stride), tuple(ctx.padding), tuple(ctx.dilation)
                G = ctx.groups
                c_in = x.shape[1]
                L = gf.shape[2]
                dd = c_in // G * w[0, 0].numel()  # inputs per output unit
                pp = c_out // G
                sq, pe_sum = _conv_weight_sq(x4 if ctx.fused else x4.to(dt), g.reshape(B, c_out, -1) if ctx.fused
                                             else gf, k, dl, pd, st, G, dd, pp, L, ctx.fused)
                s = s + sq
                if ctx.fused and ctx.needs_input_grad[1]:
                    gw = pe_sum.reshape(w.shape)
            if ctx.b_on:
                s = s + gf.sum(2).pow(2).sum()
            ctx.acc.add_(s.to(ctx.acc.dtype))
        return gx, gw, gb, None, None, None, None, None, None, None, None


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


def _conv_weight_sq(x4, gf, k, dl, pd, st, G, dd, pp, L, fused=False):
    """``(sum_i |per-example weight gradient|^2, sum_i per-example gradient or None)``."""
    B = x4.shape[0]
    dt = _acc_dtype(gf)
    total = gf.new_zeros((), dtype=dt)
    pe_sum = None
    ghost = L * (dd + pp) <= dd * pp and not fused
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
            total = total + _sqsum(pe)
            if fused:
                part = pe.sum(0)
                pe_sum = part if pe_sum is None else pe_sum + part
    return total, pe_sum


class EmbeddingFn(torch.autograd.Function):
    """``torch.embedding`` with per-example squared norms of the weight gradient into ``acc``."""

    @staticmethod
    def forward(ctx, ids, w, acc, padding_idx, sparse):  # type: ignore[override]
        ctx.save_for_backward(ids)
        ctx.acc, ctx.padding_idx, ctx.sparse, ctx.num_weights = acc, padding_idx, sparse, w.shape[0]
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
            ctx.acc.add_(total.to(ctx.acc.dtype))
        return None, gw, None, None, None


def _sum_over_positions(t: torch.Tensor, keep_last: int) -> torch.Tensor:
    """Sum ``t`` over every dim except the batch (0) and the last ``keep_last`` dims -> ``[B, ...]``."""
    dims = tuple(range(1, t.dim() - keep_last))
    return t.sum(dims) if dims else t


class LayerNormFn(torch.autograd.Function):
    """``aten.native_layer_norm`` (what ``F.layer_norm`` runs) with per-example norms of (weight, bias)."""

    @staticmethod
    def forward(ctx, x, w, b, acc, normalized_shape, eps, w_on, b_on):  # type: ignore[override]
        out, mean, rstd = aten.native_layer_norm(x, list(normalized_shape), w, b, eps)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, w, b, mean, rstd)
        ctx.acc, ctx.w_on, ctx.b_on, ctx.shape = acc, w_on, b_on, list(normalized_shape)
        return out, mean, rstd

    @staticmethod
    def backward(ctx, g, _gm, _gr):
        x, w, b, mean, rstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], w is not None and ctx.needs_input_grad[1],
                b is not None and ctx.needs_input_grad[2]]
        gx, gw, gb = aten.native_layer_norm_backward(g, x, ctx.shape, mean, rstd, w, b, mask)
        with torch.no_grad():
            dt = _acc_dtype(g)
            k = len(ctx.shape)
            gf = g.to(dt)
            s = gf.new_zeros(())
            if ctx.w_on:
                xhat = (x.to(dt) - mean.to(dt)) * rstd.to(dt)
                s = s + _sum_over_positions(xhat * gf, k).pow(2).sum()
            if ctx.b_on:
                s = s + _sum_over_positions(gf, k).pow(2).sum()
            ctx.acc.add_(s.to(ctx.acc.dtype))
        return gx, gw, gb, None, None, None, None, None


class GroupNormFn(torch.autograd.Function):
    """``aten.native_group_norm`` (what ``F.group_norm`` runs) with per-example norms of (weight, bias)."""

    @staticmethod
    def forward(ctx, x, w, b, acc, groups, eps, w_on, b_on):  # type: ignore[override]
        N, C = x.shape[0], x.shape[1]
        HxW = x[0, 0].numel()
        out, mean, rstd = aten.native_group_norm(x, w, b, N, C, HxW, groups, eps)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, w, mean, rstd)
        ctx.acc, ctx.w_on, ctx.b_on, ctx.groups, ctx.has_b = acc, w_on, b_on, groups, b is not None
        return out, mean, rstd

    @staticmethod
    def backward(ctx, g, _gm, _gr):
        x, w, mean, rstd = ctx.saved_tensors
        N, C = x.shape[0], x.shape[1]
        HxW = x[0, 0].numel()
        mask = [ctx.needs_input_grad[0], w is not None and ctx.needs_input_grad[1],
                ctx.has_b and ctx.needs_input_grad[2]]
        gx, gw, gb = aten.native_group_norm_backward(g, x, mean, rstd, w, N, C, HxW, ctx.groups, mask)
        with torch.no_grad():
            dt = _acc_dtype(g)
            gf = g.reshape(N, C, HxW).to(dt)
            s = gf.new_zeros(())
            if ctx.w_on:
                G = ctx.groups
                xc = (x.reshape(N, G, -1).to(dt) - mean.reshape(N, G, 1).to(dt)).reshape(N, C, HxW)
                sxg = torch.linalg.vecdot(xc, gf).reshape(N, G, C // G)  # sum_hw (x - mean) g
                s = s + _sqsum(sxg * rstd.reshape(N, G, 1).to(dt))
            if ctx.b_on:
                s = s + gf.sum(2).pow(2).sum()
            ctx.acc.add_(s.to(ctx.acc.dtype))
        return gx, gw, gb, None, None, None, None, None


class ScaleFn(torch.autograd.Function):
    """``xhat * w`` (the affine step of ``F.rms_norm``, which decomposes into ``mul`` ops) with the
    per-example squared norms of ``w``'s gradient. ``w`` covers the last ``w.dim()`` dims."""

    @staticmethod
    def forward(ctx, xhat, w, acc):  # type: ignore[override]
        ctx.save_for_backward(xhat, w)
        ctx.acc = acc
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
        with torch.no_grad():
            dt = _acc_dtype(g)
            pf = prod if prod.dtype == dt else g.to(dt) * xhat.to(dt)
            ctx.acc.add_(_sum_over_positions(pf, w.dim()).pow(2).sum().to(ctx.acc.dtype))
        return gx, gw, None
