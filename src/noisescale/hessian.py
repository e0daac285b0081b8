"""The Hessian-aware noise scale ``B_noise = tr(H Sigma)/(G^T H G)`` from Hessian-vector products.

McCandlish et al. (2018), §2.2 (eqs. 2.6-2.8): with the loss locally quadratic, the best step
for a batch of size ``B`` is ``eps_opt(B) = eps_max/(1 + B_noise/B)`` with
``eps_max = |G|^2/(G^T H G)``; ``B_simple = tr(Sigma)/|G|^2`` is its stand-in for a Hessian that is
a multiple of the identity.

One *draw* (:func:`hessian_draw`) takes ``m >= 2`` micro-batch gradients ``g_1..g_m`` (means over
``b_i`` independent examples each) and the Hessian ``H_h`` of the loss on one more micro-batch,
independent of all of them. Then (docs/method.md, "B_noise"), with ``Q_ij = g_i^T H_h g_j`` and
``D_ij = g_i^T g_j``:

- ``E[Q_ij] = G^T H G`` for ``i != j`` (all three factors independent, ``E[H_h] = H``);
- ``E[Q_ii] = G^T H G + tr(H Sigma)/b_i`` (``Cov(g_i) = Sigma/b_i``, independent of ``H_h``);
- likewise ``E[D_ij] = |G|^2`` (``i != j``).

So ``C = mean_{i != j} Q_ij`` is unbiased for ``G^T H G``, ``T = mean_i b_i (Q_ii - C)`` for
``tr(H Sigma)`` and ``mean_{i != j} D_ij`` for ``|G|^2`` (:func:`hessian_terms`). The Hessian
batch must be independent of the gradients: ``H`` evaluated on ``g_i``'s own examples correlates
with ``g_i`` (both depend on those examples), and ``E[g_i^T H_i g_i]`` then carries a third-moment
term that does not vanish. The draws are averaged like every other statistic here: separate
averages of the unbiased terms, divided last (App. A.1), with a Fieller interval.

Each draw costs ``m`` gradient passes and one double-backward graph on the Hessian micro-batch
with ``m`` Hessian-vector products through it (reverse over reverse). Nothing of the user's
changes: parameters, ``.grad`` (gradients are taken with ``torch.autograd.grad``), buffers
(restored) and the RNG (forked); every probe's hooks are suspended meanwhile.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .ema import NoiseScaleEMA, state_interval
from .probes.base import infer_batch_size, suspended

__all__ = ["HessianDraw", "hessian_terms", "hessian_draw", "BNoiseAverage", "B_NOISE_FIELDS"]

# Order of the per-draw vector the tracker averages: (G^T H G, tr(H Sigma), |G|^2).
B_NOISE_FIELDS = ("gHg", "trace_h_sigma", "g2")


@dataclass(frozen=True)
class HessianDraw:
    """One draw's unbiased estimates and what it cost.

    ``gHg``: of ``G^T H G``; ``trace_h_sigma``: of ``tr(H Sigma)`` (per-example ``Sigma``, in the
    unit of ``sizes``); ``g2``: of ``|G|^2`` (from the same gradients, for ``eps_max``).
    """

    gHg: float
    trace_h_sigma: float
    g2: float
    sizes: tuple[float, ...]
    seconds: float

    def as_array(self) -> np.ndarray:
        return np.array([self.gHg, self.trace_h_sigma, self.g2], dtype=np.float64)


def hessian_terms(Q: Any, D: Any, sizes: Sequence[float]) -> tuple[float, float, float]:
    """Unbiased ``(G^T H G, tr(H Sigma), |G|^2)`` from one draw's quadratic forms (module docstring).

    Args:
        Q: ``m x m`` matrix ``g_i^T H g_j`` with ``H`` from data independent of every ``g_i``.
        D: ``m x m`` matrix ``g_i^T g_j``.
        sizes: ``b_i``, the number of independent examples (or tokens) behind each ``g_i``.
    """
    Qa = np.asarray(Q, dtype=np.float64)
    Da = np.asarray(D, dtype=np.float64)
    b = np.asarray(sizes, dtype=np.float64)
    m = b.shape[0]
    if m < 2 or Qa.shape != (m, m) or Da.shape != (m, m):
        raise ValueError(f"need m >= 2 gradients with m x m forms; got sizes {list(b)} and Q {Qa.shape}, D {Da.shape}")
    if not (np.isfinite(b).all() and (b > 0).all()):
        raise ValueError(f"micro-batch sizes must be positive and finite, got {list(b)}")
    Qs = 0.5 * (Qa + Qa.T)  # H is symmetric; rounding in the HVPs is not
    off = m * (m - 1)
    gHg = float((Qs.sum() - np.trace(Qs)) / off)
    trace_h_sigma = float(np.mean(b * (np.diag(Qs) - gHg)))
    g2 = float((Da.sum() - np.trace(Da)) / off)
    return gHg, trace_h_sigma, g2


def _dot(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``sum_k <a_k, b_k>`` in float64 (``None``: a zero block), as a 0-d tensor on the first device."""
    out: torch.Tensor | None = None
    for x, y in zip(a, b):
        if x is None or y is None:
            continue
        t = torch.dot(x.reshape(-1).to(torch.float64), y.reshape(-1).to(torch.float64))
        out = t if out is None else out + t.to(out.device)
    return out if out is not None else torch.zeros((), dtype=torch.float64)


@contextlib.contextmanager
def _quiet(model: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Everything the draw does stays invisible: probes suspended, RNG forked, buffers restored,
    DDP's gradient synchronisation off (its reducer expects the next pass to be a training one),
    attention on the MATH kernel (the fused kernels have no double backward)."""
    devices = sorted({p.device.index for p in params if p.device.type == "cuda" and p.device.index is not None})
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    no_sync = getattr(model, "no_sync", None)
    with contextlib.ExitStack() as stack:
        stack.enter_context(suspended())
        stack.enter_context(torch.random.fork_rng(devices=devices))
        if callable(no_sync):
            stack.enter_context(no_sync())
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        except ImportError:  # older torch: the default kernel choice stands
            pass
        try:
            yield
        finally:
            with torch.no_grad():
                for buf, v in saved:
                    buf.copy_(v)


def _call(closure: Callable[[], Any], model: torch.nn.Module, unit: str) -> tuple[torch.Tensor, float]:
    """One micro-batch: ``closure()`` returns its mean loss, or ``(loss, size)``; with a bare loss the
    size is the leading dimension of the model's input (examples)."""
    seen: list[int | None] = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(infer_batch_size(a, kw)), with_kwargs=True)
    try:
        out = closure()
    finally:
        handle.remove()
    if isinstance(out, (tuple, list)) and len(out) == 2:
        loss, size = out
        size = float(size)
    else:
        loss = out
        if unit != "examples":
            raise ValueError(
                f"the Hessian closure returned a bare loss, but the tracker's unit is {unit!r}: return (loss, size) "
                f"with the micro-batch's size in {unit}"
            )
        if not seen or seen[0] is None:
            raise ValueError(
                "could not infer the Hessian closure's micro-batch size (no forward call of the model with a batched "
                "tensor input): return (loss, size) from the closure"
            )
        size = float(seen[0])
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise TypeError(
            "the Hessian closure must return a scalar loss tensor (the mean over a fresh micro-batch), or "
            f"(loss, size); got {type(loss).__name__}"
            f"{' of shape ' + str(tuple(loss.shape)) if isinstance(loss, torch.Tensor) else ''}"
        )
    if not loss.requires_grad:
        raise ValueError(
            "the Hessian closure's loss does not require grad: run the forward pass with gradients enabled "
            "(not under torch.no_grad())"
        )
    if not (size > 0 and np.isfinite(size)):
        raise ValueError(f"the Hessian closure's micro-batch size must be positive, got {size!r}")
    return loss, size


def _check_twice_differentiable(gh: Sequence[torch.Tensor | None]) -> None:
    """Refuse a gradient graph that holds an ``@once_differentiable`` backward: torch marks it with an
    ``Error`` node but, where the second derivative flows through the saved inputs, silently leaves
    that term out of the Hessian-vector product instead of raising (torch 2.13; a wrong B_noise)."""
    seen: set[Any] = set()
    stack = [t.grad_fn for t in gh if t is not None and t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "Error":
            raise RuntimeError(
                "the loss's gradient passes through a backward marked @once_differentiable (a custom autograd "
                "Function without a double backward), so Hessian-vector products would miss its second derivative"
            )
        stack.extend(f for f, _ in node.next_functions if f is not None)


def hessian_draw(
    model: torch.nn.Module,
    params: Sequence[torch.nn.Parameter],
    closure: Callable[[], Any],
    *,
    parts: int = 2,
    unit: str = "examples",
) -> HessianDraw:
    """One unbiased draw of ``(G^T H G, tr(H Sigma), |G|^2)`` at the current parameters.

    Args:
        model: the module whose forward ``closure`` runs (its buffers are restored afterwards).
        params: the parameters measured (``H`` is their block of the Hessian).
        closure: called ``parts + 1`` times; each call must draw a *fresh, independent*
            micro-batch and return its mean loss (or ``(loss, size)`` for units other than
            examples). The first ``parts`` give the gradients, the last the Hessian.
        parts: number of gradient micro-batches ``m >= 2``.
        unit: the unit of the sizes.
    """
    if not (isinstance(parts, int) and parts >= 2):
        raise ValueError(f"hessian parts must be an integer >= 2 (independent gradients to compare), got {parts!r}")
    params = list(params)
    t0 = time.perf_counter()
    with _quiet(model, params):
        grads: list[list[torch.Tensor | None]] = []
        sizes: list[float] = []
        for _ in range(parts):
            loss, size = _call(closure, model, unit)
            g = torch.autograd.grad(loss, params, allow_unused=True)
            grads.append([None if x is None else x.detach() for x in g])
            sizes.append(size)
            del loss, g
        loss_h, _ = _call(closure, model, unit)
        gh = torch.autograd.grad(loss_h, params, create_graph=True, allow_unused=True)
        _check_twice_differentiable(gh)
        # parameters whose gradient does not depend on the parameters have a zero Hessian row and
        # column (H is symmetric): only the others enter the Hessian-vector products
        live = [j for j, t in enumerate(gh) if t is not None and t.requires_grad]
        hv: list[list[torch.Tensor | None]] = []
        for i, g_i in enumerate(grads):
            if not live or all(g_i[j] is None for j in live):
                hv.append([None] * len(params))
                continue
            outs = [gh[j] for j in live if g_i[j] is not None]
            vecs = [g_i[j] for j in live if g_i[j] is not None]
            r = torch.autograd.grad(outs, params, grad_outputs=vecs, retain_graph=i < parts - 1, allow_unused=True)
            hv.append([None if x is None else x.detach() for x in r])
        del gh, loss_h
        Q = torch.stack([torch.stack([_dot(grads[a], hv[c]) for c in range(parts)]) for a in range(parts)])
        D = torch.stack([torch.stack([_dot(grads[a], grads[c]) for c in range(parts)]) for a in range(parts)])
        Qn, Dn = Q.cpu().numpy(), D.cpu().numpy()
    gHg, ts, g2 = hessian_terms(Qn, Dn, sizes)
    return HessianDraw(gHg, ts, g2, tuple(sizes), time.perf_counter() - t0)


class BNoiseAverage:
    """Separate (debiased, exponentially weighted) averages of one series of draws, divided last.

    Two series share the weights: ``(G^T H G, tr(H Sigma))`` gives ``B_noise`` and
    ``(G^T H G, |G|^2)`` gives ``eps_max = |G|^2/(G^T H G)``, each with its Fieller interval
    (:mod:`noisescale.ema`; the draws are independent, so the interval is calibrated at fixed
    parameters: tests/test_hessian.py).

    Args:
        beta: decay per draw in ``(0, 1]`` (``1``: the plain mean).
    """

    def __init__(self, beta: float = 1.0) -> None:
        self._ema = NoiseScaleEMA(beta, size=2)
        self.seconds = 0.0  # total time spent in draws

    @property
    def beta(self) -> float:
        return self._ema.beta

    @property
    def count(self) -> int:
        """Draws averaged."""
        return self._ema.count

    def update(self, draw: HessianDraw) -> None:
        """Fold one draw in."""
        self._ema.update([draw.gHg, draw.gHg], [draw.trace_h_sigma, draw.g2])
        self.seconds += draw.seconds

    def reset(self) -> None:
        self._ema = NoiseScaleEMA(self._ema.beta, size=2)

    @property
    def gHg(self) -> float | None:
        """Averaged estimate of ``G^T H G``."""
        return self._ema.series(0).g2 if self.count else None

    @property
    def trace_h_sigma(self) -> float | None:
        """Averaged estimate of ``tr(H Sigma)``."""
        return self._ema.series(0).trace_sigma if self.count else None

    @property
    def g2(self) -> float | None:
        """Averaged estimate of ``|G|^2`` from the draws' own gradients."""
        return self._ema.series(1).trace_sigma if self.count else None

    @property
    def b_noise(self) -> float | None:
        """``tr(H Sigma)/(G^T H G)`` of the averages (eq. 2.8); ``None`` with :attr:`reason` when undefined."""
        if self.reason is not None:
            return None
        st = self._ema.series(0)
        return st.trace_sigma / st.g2

    @property
    def eps_max(self) -> float | None:
        """``|G|^2/(G^T H G)`` (eq. 2.7): the best step for the full-batch gradient (``None`` if undefined)."""
        st = self._ema.series(1)
        if not self.count or not st.g2 > 0 or st.trace_sigma < 0:
            return None
        return st.trace_sigma / st.g2

    @property
    def reason(self) -> str | None:
        """Why :attr:`b_noise` is ``None`` (``None`` when it is defined)."""
        if not self.count:
            return "no Hessian draw has been averaged yet"
        st = self._ema.series(0)
        if not st.g2 > 0:
            return (
                f"the averaged estimate of G^T H G is {st.g2:.3g} <= 0: along the gradient the loss is not convex "
                "here, or its curvature is not resolved above the noise. B_noise (eq. 2.8) assumes positive "
                "curvature along G; average more draws (or larger micro-batches), or read B_simple"
            )
        if st.trace_sigma < 0:
            return (
                f"the averaged estimate of tr(H Sigma) is {st.trace_sigma:.3g} < 0: the gradient noise is not resolved "
                "(or lies in directions of negative curvature); average more draws"
            )
        return None

    def b_noise_interval(self, level: float = 0.95) -> tuple[float, float] | None:
        """Fieller interval for :attr:`b_noise` (``None`` below 3 draws or while undefined)."""
        if self.b_noise is None:
            return None
        return state_interval(self._ema.series(0), level)

    def eps_max_interval(self, level: float = 0.95) -> tuple[float, float] | None:
        """Fieller interval for :attr:`eps_max` (``None`` below 3 draws or while undefined)."""
        if self.eps_max is None:
            return None
        return state_interval(self._ema.series(1), level)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self._ema.state_dict(), "seconds": self.seconds}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if not isinstance(sd, dict) or "ema" not in sd:
            raise ValueError("not a BNoiseAverage state_dict (missing 'ema')")
        ema = NoiseScaleEMA(self._ema.beta, size=2)
        ema.load_state_dict(sd["ema"])
        if ema.beta != self._ema.beta:
            raise ValueError(f"the saved Hessian average has beta={ema.beta!r}, this one {self._ema.beta!r}")
        self._ema = ema
        self.seconds = float(sd.get("seconds", 0.0))
