"""``B_noise`` and ``eps_max`` from a learning-rate sweep: McCandlish et al. 2018, Eqs. 2.4-2.8.

The paper's other route to the noise scale. Under the quadratic model of the loss (Eq. 2.4), an
SGD step of size ``eps`` with a batch of ``B`` improves the loss on average by::

    dL(eps, B) = eps |G|^2 - eps^2 (G^T H G + tr(H Sigma)/B) / 2                        (Eq. 2.4)

which is largest at (Eqs. 2.6-2.8)::

    eps_opt(B) = eps_max / (1 + B_noise/B),   eps_max = |G|^2/(G^T H G),   B_noise = tr(H Sigma)/(G^T H G)

So the best learning rate grows linearly with ``B`` below ``B_noise`` and saturates at
``eps_max`` above it. From a sweep with several learning rates at each of several batch sizes
this module:

1. finds the best learning rate at each batch size (:func:`best_lr`): the grid learning rate
   that reaches the target in the fewest steps (seeds of a cell averaged in ``log S``), refined
   between its neighbours with the model itself. At fixed ``B`` the steps to a target scale as
   ``1/dL(eps)``, so the *rate* ``1/S`` is a parabola in ``eps`` through the origin,
   ``1/S = a eps - b eps^2``, whose peak ``a/(2b)`` is ``eps_opt(B)`` exactly. A best learning
   rate at either end of the grid is not a measured optimum: that batch size is excluded, and
   said so;
2. fits ``log eps_opt(B_i) = log eps_max - log(1 + B_noise/B_i)`` by weighted least squares in
   ``log eps`` (:func:`fit_eps_opt`; two parameters, profiled over ``log eps_max`` and solved on
   a grid in ``log B_noise``, pure NumPy);
3. puts percentile bootstrap intervals on both (:func:`fit_lr_sweep`): seeds resampled within
   each (batch size, learning rate) cell when every cell has two or more, otherwise a
   parametric residual bootstrap as for ``b_crit``.

A ``B_noise`` the sweep cannot resolve (best learning rates linear in ``B`` over the whole range:
``B_noise`` above the largest batch; or flat: below the smallest) is ``None`` with the reason and
a one-sided bound, never an extrapolated number.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from .critical import RunRecord, _target_key, group_by_target, one_target
from .estimators import t_quantile

__all__ = ["BestLR", "LRSweepFit", "best_lr", "fit_eps_opt", "fit_lr_sweep", "fit_lr_sweeps", "REFINE"]

# B_noise is searched in [B_min/1000, 1000 B_max], as b_crit is in critical.py: beyond that the best
# learning rates are flat (or linear) in B to within any noise, and the sweep says nothing more.
_BOUND_FACTOR = 1e3
_GRID = 801
# An estimate outside [B_min/4, 4 B_max] is an extrapolation; one whose interval also runs to the
# search edge on that side is not a number the sweep supports (None and a bound instead).
_EXTRAPOLATE = 4.0

REFINE = ("model", "parabola", "none")

# status codes of the refinement (vectorised over bootstrap replicates)
_OK, _UNREFINED, _EDGE_LOW, _EDGE_HIGH, _NONE = 0, 1, 2, 3, 4


# ---------------------------------------------------------------------------------------
# Step 1: the best learning rate at one batch size.


def _refine(log_lr: np.ndarray, y: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Refined ``log eps_opt`` and a status per replicate.

    ``log_lr``: (L,) sorted log learning rates of the grid at one batch size; ``y``: (R, L) mean
    ``log S`` of each cell per replicate, ``inf`` where the cell did not reach the target.
    """
    R, L = y.shape
    reached = np.isfinite(y)
    any_reached = reached.any(1)
    j = np.where(any_reached, np.argmin(np.where(reached, y, np.inf), axis=1), 0)  # (R,)
    status = np.full(R, _OK)
    status[~any_reached] = _NONE
    status[any_reached & (j == 0)] = _EDGE_LOW
    status[any_reached & (j == L - 1)] = _EDGE_HIGH
    out = log_lr[j].astype(float)
    inner = status == _OK
    if method == "none" or not inner.any():
        status[inner] = _UNREFINED if method != "none" else _OK
        return out, status
    r = np.arange(R)
    jm, jp = np.clip(j - 1, 0, L - 1), np.clip(j + 1, 0, L - 1)
    x = np.stack([log_lr[jm], log_lr[j], log_lr[jp]], 1)  # (R, 3)
    v = np.stack([y[r, jm], y[r, j], y[r, jp]], 1)  # (R, 3) log S; inf: not reached
    m = np.isfinite(v)
    if method == "parabola":
        # Vertex of the parabola through the three points in (log eps, log S).
        ok = inner & m.all(1)
        vv = np.where(m, v, 0.0)
        d1 = (vv[:, 1] - vv[:, 0]) / (x[:, 1] - x[:, 0])
        d2 = (vv[:, 2] - vv[:, 1]) / (x[:, 2] - x[:, 1])
        curv = (d2 - d1) / (x[:, 2] - x[:, 0])  # half the second derivative
        ok &= curv > 0
        xs = 0.5 * (x[:, 0] + x[:, 1]) - d1 / (2 * np.where(ok, curv, 1.0))
    else:
        # Eq. 2.4 at fixed B: steps to a fixed loss decrease scale as 1/dL(eps), so the rate
        # 1/S = a eps - b eps^2 (a parabola through the origin) peaks at eps_opt = a/(2b). Fitted
        # to the best cell and its neighbours that reached the target, minimising the relative
        # error of the rate (= the error in log S to first order); exact through two points.
        # Learning rates and rates are taken relative to the best cell's (numbers of order 1).
        e = np.exp(x - x[:, 1:2])
        rate = np.exp(np.where(m, v[:, 1:2] - np.where(m, v, 0.0), 0.0))
        p, q = e / rate, -(e**2) / rate
        mm = m.astype(float)
        spp, spq, sqq = (mm * p * p).sum(1), (mm * p * q).sum(1), (mm * q * q).sum(1)
        sp, sq = (mm * p).sum(1), (mm * q).sum(1)
        det = spp * sqq - spq**2
        okd = np.abs(det) > 1e-12 * np.maximum(spp * sqq, 1e-300)
        sdet = np.where(okd, det, 1.0)
        a = (sp * sqq - sq * spq) / sdet
        b = (spp * sq - spq * sp) / sdet
        ok = inner & okd & (m.sum(1) >= 2) & (a > 0) & (b > 0)
        xs = x[:, 1] + np.log(np.where(ok, a / (2 * np.where(ok, b, 1.0)), 1.0))
    # The refined optimum stays between the neighbours: the grid shows the best cell beat them.
    xs = np.clip(xs, x[:, 0], x[:, 2])
    out = np.where(ok, xs, out)
    status[inner & ~ok] = _UNREFINED
    return out, status


@dataclass(frozen=True)
class BestLR:
    """The best learning rate at one batch size (one point of the ``eps_opt(B)`` fit).

    ``lr``: the refined optimum (``None`` when the batch size is excluded); ``grid_lr``: the grid
    learning rate that reached the target in the fewest steps (``steps``: its steps, the
    geometric mean over its ``n_seeds`` seeds). ``status``:

    - ``"refined"``: the optimum is interpolated between the best grid point and its neighbours;
    - ``"grid"``: not refined (a neighbour never reached the target, or the points show no
      maximum); ``lr = grid_lr``, uncertain by up to the grid spacing;
    - ``"edge_low"`` / ``"edge_high"``: the fastest learning rate is the smallest / largest of the
      grid, so the optimum may lie beyond it; excluded;
    - ``"not_reached"``: no cell reached the target (with every seed); excluded.
    """

    batch_size: float
    lr: float | None
    grid_lr: float | None
    steps: float | None
    status: str
    n_lrs: int
    n_seeds: int
    n_cells_reached: int
    reason: str | None = None

    @property
    def used(self) -> bool:
        return self.lr is not None


_STATUS = {_OK: "refined", _UNREFINED: "grid", _EDGE_LOW: "edge_low", _EDGE_HIGH: "edge_high", _NONE: "not_reached"}


@dataclass
class _Cells:
    """The runs at one batch size: per learning rate, the seeds' ``log S`` (``None``: a seed did
    not reach the target, so the cell counts as not reached)."""

    batch_size: float
    log_lr: np.ndarray  # (L,) sorted
    logs: list[np.ndarray | None]  # per lr: (k,) log steps of its seeds, or None

    def means(self) -> np.ndarray:
        return np.array([np.inf if v is None else float(v.mean()) for v in self.logs])[None, :]

    def resample(self, rng: np.random.Generator, R: int) -> np.ndarray:
        """(R, L) cell means with the seeds resampled within each cell. The deviations from the
        cell mean are scaled by ``sqrt(k/(k-1))``: a plain resample of ``k`` seeds has ``(k-1)/k``
        of the variance of the mean (3 seeds: 2/3)."""
        out = np.full((R, len(self.logs)), np.inf)
        for i, v in enumerate(self.logs):
            if v is None:
                continue
            k = len(v)
            d = (v - v.mean()) * math.sqrt(k / (k - 1)) if k > 1 else np.zeros(1)
            out[:, i] = v.mean() + d[rng.integers(0, k, (R, k))].mean(1)
        return out


def _cells(records: Sequence[RunRecord]) -> list[_Cells]:
    """Group one target's records into (batch size, learning rate) cells of seeds."""
    by: dict[float, dict[float, list[RunRecord]]] = {}
    for r in records:
        if r.lr is None:
            raise ValueError(
                f"a run at batch size {r.batch_size:g} has no learning rate; the learning-rate fit needs lr= on every run"
            )
        by.setdefault(float(r.batch_size), {}).setdefault(float(r.lr), []).append(r)
    out = []
    for b in sorted(by):
        lrs = sorted(by[b])
        logs: list[np.ndarray | None] = []
        for lr in lrs:
            runs = by[b][lr]
            seeds = [r.seed for r in runs if r.seed is not None]
            if len(set(seeds)) < len(seeds):
                dup = next(s for s in seeds if seeds.count(s) > 1)
                raise ValueError(
                    f"batch size {b:g}, lr {lr:g}: seed {dup} appears in {seeds.count(dup)} runs for one target; "
                    "give each run its own seed (or none)"
                )
            # A cell in which any seed missed the target is not reached: averaging only the seeds
            # that arrived would flatter it.
            logs.append(np.log([float(r.steps) for r in runs]) if all(r.reached for r in runs) else None)
        out.append(_Cells(b, np.log(lrs), logs))
    return out


def best_lr(records: Iterable[RunRecord], *, refine: str = "model") -> list[BestLR]:
    """The best learning rate at each batch size of a sweep, for the records of one target.

    At each batch size the cells (one per learning rate) average their seeds in ``log S`` (a
    cell where any seed did not reach the target counts as not reached). The fastest cell's
    learning rate is refined (``refine``):

    - ``"model"`` (default): ``1/S = a eps - b eps^2`` through the fastest cell and its
      neighbours that reached the target (Eq. 2.4 at fixed ``B``; its peak is ``eps_opt(B)``,
      Eq. 2.6), relative least squares, exact through two points;
    - ``"parabola"``: the vertex of the parabola through the three points in
      ``(log eps, log S)`` (a generic local shape; both neighbours must have reached the target);
    - ``"none"``: the grid learning rate itself.

    The refined value is kept between the two neighbours. A fastest learning rate at the end of
    the grid is not a measured optimum: that batch size gets ``lr=None`` and a reason.
    """
    if refine not in REFINE:
        raise ValueError(f"refine must be one of {', '.join(REFINE)}, got {refine!r}")
    recs = one_target(records)
    return [_best_point(c, *_refine(c.log_lr, c.means(), refine)) for c in _cells(recs)]


def _best_point(c: _Cells, lx: np.ndarray, st: np.ndarray) -> BestLR:
    s = int(st[0])
    y = c.means()[0]
    reached = np.isfinite(y)
    jbest = int(np.argmin(np.where(reached, y, np.inf)))
    fastest = c.logs[jbest] if reached.any() else None
    n_seeds = 0 if fastest is None else len(fastest)  # seeds averaged in the fastest cell
    grid = float(np.exp(c.log_lr[jbest])) if reached.any() else None
    steps = float(np.exp(y[reached].min())) if reached.any() else None
    lrs = np.exp(c.log_lr)
    reason = None
    if s == _EDGE_LOW:
        reason = (
            f"B = {c.batch_size:g}: the fastest learning rate {grid:g} is the smallest of the grid "
            f"({lrs[0]:g}..{lrs[-1]:g}); the optimum may be lower: excluded (add smaller learning rates)"
        )
    elif s == _EDGE_HIGH:
        reason = (
            f"B = {c.batch_size:g}: the fastest learning rate {grid:g} is the largest of the grid "
            f"({lrs[0]:g}..{lrs[-1]:g}); the optimum may be higher: excluded (add larger learning rates)"
        )
    elif s == _NONE:
        reason = f"B = {c.batch_size:g}: no learning rate reached the target with every seed: excluded"
    elif s == _UNREFINED:
        reason = (
            f"B = {c.batch_size:g}: the optimum is the grid value {grid:g}, not refined (a neighbour did not "
            "reach the target, or the three points show no peak)"
        )
    lr = float(np.exp(lx[0])) if s in (_OK, _UNREFINED) else None
    return BestLR(c.batch_size, lr, grid, steps, _STATUS[s], len(c.logs), n_seeds, int(reached.sum()), reason)


# ---------------------------------------------------------------------------------------
# Step 2: the fit of eps_opt(B) = eps_max/(1 + B_noise/B).


def _cgrid(logb: np.ndarray) -> np.ndarray:
    lo, hi = float(logb.min()), float(logb.max())
    return np.linspace(lo - math.log(_BOUND_FACTOR), hi + math.log(_BOUND_FACTOR), _GRID)


def _softplus(c: Any, logb: np.ndarray) -> np.ndarray:
    # log(1 + B_noise/B) with c = log B_noise, written so that it neither overflows nor cancels
    return np.logaddexp(0.0, np.asarray(c)[..., None] - logb)


def _sse_grid(y: np.ndarray, w: np.ndarray, logb: np.ndarray, cgrid: np.ndarray) -> np.ndarray:
    """Weighted SSE in ``log eps`` of the best ``log eps_max`` at each ``c`` of the grid.

    Model: ``y_i = a - F_i(c)`` with ``F_i = log(1 + e^c/B_i)`` (Eq. 2.6 in logs). For a given
    ``c`` the best ``a`` is the weighted mean of ``z = y + F``, so
    ``SSE(c) = sum w z^2 - (sum w z)^2 / sum w``. ``y``, ``w``: (R, n); returns (R, G).
    """
    F = _softplus(cgrid, logb)  # (G, n)
    W = w.sum(1, keepdims=True)
    swz = (w * y).sum(1, keepdims=True) + w @ F.T
    swz2 = (w * y * y).sum(1, keepdims=True) + 2.0 * (w * y) @ F.T + w @ (F * F).T
    return np.maximum(swz2 - swz**2 / W, 0.0)


def _fit_grid(y: np.ndarray, w: np.ndarray, logb: np.ndarray, cgrid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(c, a)`` per replicate: the grid minimum refined by a parabola through its neighbours;
    ``c`` is exactly the grid end where the minimum lies there (not identified)."""
    sse = _sse_grid(y, w, logb, cgrid)
    k = sse.argmin(1)
    j = np.clip(k, 1, len(cgrid) - 2)
    r = np.arange(len(y))
    s0, s1, s2 = sse[r, j - 1], sse[r, j], sse[r, j + 1]
    den = s0 - 2 * s1 + s2
    shift = np.where(den > 0, 0.5 * (s0 - s2) / np.where(den > 0, den, 1.0), 0.0)
    c = cgrid[j] + np.clip(shift, -1, 1) * (cgrid[1] - cgrid[0])
    c = np.where(k == 0, cgrid[0], np.where(k == len(cgrid) - 1, cgrid[-1], c))
    a = (w * (y + _softplus(c, logb))).sum(1) / w.sum(1)
    return c, a


def _polish(y: np.ndarray, w: np.ndarray, logb: np.ndarray, c: float, step: float) -> float:
    """Golden-section search for the SSE minimum in ``[c - step, c + step]`` (one data set)."""

    def sse(cc: float) -> float:
        z = y + _softplus(cc, logb)
        return float((w * z * z).sum() - (w * z).sum() ** 2 / w.sum())

    lo, hi = c - step, c + step
    g = (math.sqrt(5) - 1) / 2
    x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
    f1, f2 = sse(x1), sse(x2)
    for _ in range(60):
        if f1 <= f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - g * (hi - lo)
            f1 = sse(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + g * (hi - lo)
            f2 = sse(x2)
    best = min((f1, x1), (f2, x2), (sse(c), c))
    return best[1]


def fit_eps_opt(
    batch_sizes: Sequence[float], eps_opt: Sequence[float], weights: Sequence[float] | None = None
) -> tuple[float, float, bool]:
    """Weighted least-squares fit of ``eps_opt(B) = eps_max/(1 + B_noise/B)`` (Eq. 2.6) in logs.

    Minimises ``sum_i w_i (log eps_i - log eps_max + log(1 + B_noise/B_i))^2``: profiled over
    ``log eps_max`` (a weighted mean for each ``B_noise``), solved on a grid of ``log B_noise``
    over ``[B_min/1000, 1000 B_max]``, then polished by golden-section search.

    Returns ``(b_noise, eps_max, identified)``. ``identified`` is false when the minimum is at
    an end of the search range: the best learning rates are flat in ``B`` (``B_noise`` below
    ``B_min/1000``; ``eps_max`` is still their level) or linear in ``B`` (``B_noise`` above
    ``1000 B_max``; only ``eps_max/B_noise``, the linear-scaling slope, is determined).
    """
    b = np.asarray(batch_sizes, dtype=float)
    e = np.asarray(eps_opt, dtype=float)
    w = np.ones_like(b) if weights is None else np.asarray(weights, dtype=float)
    if b.ndim != 1 or e.shape != b.shape or w.shape != b.shape:
        raise ValueError(
            f"batch_sizes, eps_opt and weights must be 1-D of one length, got shapes {b.shape}, {e.shape}, {w.shape}"
        )
    for name, v in (("batch_sizes", b), ("eps_opt", e)):
        if not (np.isfinite(v).all() and (v > 0).all()):
            raise ValueError(f"{name} must be finite and positive, got {v.tolist()}")
    if not (np.isfinite(w).all() and (w >= 0).all() and (w > 0).sum() >= 2):
        raise ValueError(f"weights must be finite, >= 0, with two or more positive, got {w.tolist()}")
    if len(np.unique(b[w > 0])) < 2:
        raise ValueError(f"the fit needs two or more distinct batch sizes, got {b.tolist()}")
    logb, y = np.log(b), np.log(e)
    cgrid = _cgrid(logb)
    c, a = _fit_grid(y[None, :], w[None, :], logb, cgrid)
    c0 = float(c[0])
    identified = bool(cgrid[0] < c0 < cgrid[-1])
    if identified:
        c0 = _polish(y, w, logb, c0, 2 * float(cgrid[1] - cgrid[0]))
        a0 = float((w * (y + _softplus(c0, logb))).sum() / w.sum())
    else:
        a0 = float(a[0])
    return math.exp(c0), _exp(a0), identified


def _exp(x: float) -> float:
    return math.exp(x) if x < 709.0 else math.inf


# ---------------------------------------------------------------------------------------
# Step 3: the sweep fit with its bootstrap.


@dataclass
class LRSweepFit:
    """``B_noise`` and ``eps_max`` fitted to the best learning rate per batch size, for one target.

    ``b_noise`` / ``eps_max`` are ``None`` when the sweep cannot resolve them; ``reason`` then says
    why, and ``b_noise_bound`` gives the one-sided bound (``("lower", x)``: ``B_noise > x``;
    ``("upper", x)``: ``B_noise < x``, at ``level``). ``points`` holds every batch size, used or
    excluded, with its reason; ``best_lr`` maps each used batch size to its refined optimum.
    Intervals are percentile intervals of the bootstrap replicates (``bootstrap``: ``"seeds"``,
    ``"residuals"`` or ``None``); an end is ``0`` or ``inf`` where replicates ran to the edge of
    what the sweep can tell, ``nan`` without a bootstrap.
    """

    target: Any
    b_noise: float | None
    eps_max: float | None
    level: float
    points: list[BestLR]
    refine: str
    sigma: float
    bootstrap: str | None
    n_boot: int
    reason: str | None = None
    b_noise_bound: tuple[str, float] | None = None
    messages: list[str] = field(default_factory=list)
    # Bootstrap replicates of (log B_noise, log eps_max); +-inf where a replicate ran to the edge.
    _boot_c: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    _boot_a: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    _c: float = field(default=math.nan, repr=False)
    _a: float = field(default=math.nan, repr=False)
    _dof: int = field(default=0, repr=False)

    @property
    def best_lr(self) -> dict[float, float]:
        """Refined optimal learning rate per batch size used in the fit."""
        return {p.batch_size: p.lr for p in self.points if p.lr is not None}

    @property
    def n_used(self) -> int:
        return sum(p.used for p in self.points)

    def eps_opt(self, B: Any) -> Any:
        """The fitted ``eps_opt(B) = eps_max/(1 + B_noise/B)`` (Eq. 2.6); ``None`` if not identified."""
        if self.b_noise is None or self.eps_max is None:
            return None
        return self.eps_max / (1.0 + self.b_noise / np.asarray(B, dtype=float))

    def _widen(self, level: float) -> float:
        # Residual bootstrap: the scatter is estimated from n points, so the percentile interval is
        # widened by t_{n-2}/z (as for b_crit). The seed bootstrap needs no widening.
        if self.bootstrap != "residuals":
            return 1.0
        return t_quantile(0.5 + level / 2, self._dof) / NormalDist().inv_cdf(0.5 + level / 2)

    def _interval(self, boot: np.ndarray, center: float, level: float | None) -> tuple[float, float]:
        level = self.level if level is None else level
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level!r}")
        if len(boot) == 0 or not math.isfinite(center):
            return (math.nan, math.nan)
        q = 100 * (1 - level) / 2
        # Replicates beyond the search edge are +-inf; "lower"/"higher" pick replicates (no
        # interpolation, which would give inf - inf), a slightly conservative percentile.
        lo = float(np.percentile(boot, q, method="lower"))
        hi = float(np.percentile(boot, 100 - q, method="higher"))
        k = self._widen(level)
        lo = center + k * (lo - center) if math.isfinite(lo) else lo
        hi = center + k * (hi - center) if math.isfinite(hi) else hi
        return (0.0 if lo == -math.inf else _exp(lo), math.inf if hi == math.inf else _exp(hi))

    def b_noise_interval(self, level: float | None = None) -> tuple[float, float]:
        """Percentile bootstrap interval of ``B_noise`` at ``level`` (default: the fit's)."""
        return self._interval(self._boot_c, self._c, level)

    def eps_max_interval(self, level: float | None = None) -> tuple[float, float]:
        """Percentile bootstrap interval of ``eps_max`` at ``level`` (default: the fit's)."""
        return self._interval(self._boot_a, self._a, level)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready numbers (``inf``/``nan`` become ``None``)."""

        def c(x: float | None) -> float | None:
            return float(x) if x is not None and math.isfinite(x) else None

        return {
            "target": self.target,
            "b_noise": c(self.b_noise),
            "b_noise_interval": [c(v) for v in self.b_noise_interval()],
            "eps_max": c(self.eps_max),
            "eps_max_interval": [c(v) for v in self.eps_max_interval()],
            "b_noise_reason": self.reason,
            "b_noise_bound": list(self.b_noise_bound) if self.b_noise_bound else None,
            "lr_refine": self.refine,
            "lr_bootstrap": self.bootstrap,
            "sigma_log_lr": c(self.sigma),
            "best_lr": [[p.batch_size, p.lr, p.status] for p in self.points],
        }

    def summary(self) -> str:
        t = "" if self.target is None else f"target {self.target}: "
        used = f"({self.n_used} of {len(self.points)} batch sizes, refine={self.refine})"
        if self.b_noise is None:
            eps = "" if self.eps_max is None else f", eps_max = {self.eps_max:.4g}"
            return f"{t}B_noise not resolved: {self.reason}{eps} {used}"
        lo, hi = self.b_noise_interval()
        elo, ehi = self.eps_max_interval()
        return (
            f"{t}B_noise = {self.b_noise:.4g} [{self.level:.0%}: {lo:.3g}, {hi:.3g}], "
            f"eps_max = {self.eps_max:.4g} [{elo:.3g}, {ehi:.3g}] {used}"
        )


def _select(records: Iterable[RunRecord], target: Any) -> tuple[list[RunRecord], Any]:
    recs = list(records)
    if not recs:
        raise ValueError("no runs given")
    groups = group_by_target(recs)
    if target is not None:
        key = _target_key(target)
        if key not in groups:
            raise ValueError(f"no run has target {target!r}; targets present: {sorted(map(str, groups))}")
        return groups[key], key
    if len(groups) > 1:
        raise ValueError(
            f"records mix {len(groups)} targets {sorted(map(str, groups))}; pass target= or use fit_lr_sweeps()"
        )
    return recs, next(iter(groups))


def fit_lr_sweep(
    records: Iterable[RunRecord],
    *,
    target: Any = None,
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    refine: str = "model",
    weights: str = "seeds",
) -> LRSweepFit:
    """``B_noise`` and ``eps_max`` from the best learning rate per batch size (Eqs. 2.4-2.8).

    Steps: :func:`best_lr` per batch size (fastest cell, refined; grid-edge optima excluded with a
    warning naming the batch size), then :func:`fit_eps_opt` on the batch sizes kept, in
    ``log eps``. ``weights="seeds"`` weighs each batch size by the number of seeds averaged at its
    fastest cell (the variance of a mean of ``k`` seeds is ``1/k`` of one); ``"equal"`` weighs all
    alike.

    Interval (``n_boot`` replicates, ``seed``): when every cell that reached the target has two
    or more seeds, the seeds are resampled within each cell (deviations scaled by
    ``sqrt(k/(k-1))``) and the whole procedure, argmin and refinement included, is redone;
    otherwise a parametric residual bootstrap of the ``log eps`` fit (scatter
    ``sigma sqrt(n/(n-2))``, interval widened by ``t_{n-2}/z``), as for ``b_crit``.

    ``B_noise`` is ``None`` with a ``reason`` and a one-sided ``b_noise_bound`` when fewer than
    three batch sizes are usable, when the fit runs to the edge of the search range, or when the
    estimate lies beyond ``4x`` the swept batch sizes and its interval runs to the edge on that
    side (best learning rates linear in ``B``: ``B_noise`` above the largest batch; flat: below
    the smallest). ``eps_max`` is then ``None`` too if ``B_noise`` is above the sweep.

    Args:
        records: runs with ``lr`` set (and ``seed`` for several seeds per cell), of one target
            unless ``target`` picks one.
        target: the target to fit (default: the records' only target).
        level: confidence level of the intervals.
        n_boot: bootstrap replicates (0: no interval).
        seed: seed of the bootstrap.
        refine: ``"model"``, ``"parabola"`` or ``"none"`` (see :func:`best_lr`).
        weights: ``"seeds"`` or ``"equal"``.

    Raises:
        ValueError: a run without ``lr``; fewer than three batch sizes with three or more
            learning rates; a seed repeated in a cell; a bad option.
    """
    if refine not in REFINE:
        raise ValueError(f"refine must be one of {', '.join(REFINE)}, got {refine!r}")
    if weights not in ("seeds", "equal"):
        raise ValueError(f"weights must be 'seeds' or 'equal', got {weights!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot!r}")
    recs, target = _select(records, target)
    tlabel = "" if target is None else f" for target {target}"
    cells = _cells(recs)
    swept = [c for c in cells if len(c.logs) >= 3]
    if len(swept) < 3:
        raise ValueError(
            f"the learning-rate fit{tlabel} needs three or more learning rates at each of three or more batch "
            f"sizes; got {', '.join(f'{len(c.logs)} at B = {c.batch_size:g}' for c in cells)}"
        )
    messages: list[str] = []
    for cl in cells:
        if len(cl.logs) < 3:
            messages.append(f"B = {cl.batch_size:g} has only {len(cl.logs)} learning rate(s): left out")
    refined = [_refine(c.log_lr, c.means(), refine) for c in swept]
    points = [_best_point(c, lx, st) for c, (lx, st) in zip(swept, refined)]
    messages += [p.reason for p in points if p.reason and not p.used]
    n_grid = sum(p.status == "grid" for p in points)
    if refine != "none" and n_grid:
        messages.append(
            f"{n_grid} batch size(s) not refined (a neighbour did not reach the target, or no peak): "
            "their optimum is the grid value, uncertain by up to the grid spacing"
        )
    use = [i for i, p in enumerate(points) if p.used]
    fit = LRSweepFit(target, None, None, level, points, refine, math.nan, None, n_boot, messages=messages)
    if len(use) < 3:
        fit.reason = (
            f"only {len(use)} batch size(s) have a best learning rate inside the grid; "
            "the fit needs three or more (see the excluded batch sizes)"
        )
        messages.append(f"B_noise not resolved: {fit.reason}")
        return _finish(fit, tlabel)
    logb_all = np.log([c.batch_size for c in swept])
    logb = logb_all[use]
    y = np.array([math.log(points[i].lr) for i in use])  # type: ignore[arg-type]  # used: lr set
    w_all = np.array([max(p.n_seeds, 1) if weights == "seeds" else 1.0 for p in points], dtype=float)
    w = w_all[use]
    cgrid = _cgrid(logb_all)  # the search range of the whole sweep, fixed for every replicate
    c_arr, a_arr = _fit_grid(y[None, :], w[None, :], logb, cgrid)
    c, a = float(c_arr[0]), float(a_arr[0])
    edge = 0 if c <= cgrid[0] else (1 if c >= cgrid[-1] else None)
    if edge is None:
        c = _polish(y, w, logb, c, 2 * float(cgrid[1] - cgrid[0]))
        a = float((w * (y + _softplus(c, logb))).sum() / w.sum())
    resid = y - (a - _softplus(c, logb))
    n = len(use)
    fit.sigma = float(math.sqrt((w * resid**2).sum() / w.sum()))
    fit._c, fit._a = c, a

    # -- bootstrap -------------------------------------------------------------------------
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        seeds_ok = all(v is None or len(v) >= 2 for cc in swept for v in cc.logs) and any(
            v is not None for cc in swept for v in cc.logs
        )
        if seeds_ok:
            fit.bootstrap = "seeds"
            Y = np.zeros((n_boot, len(swept)))
            Wb = np.zeros((n_boot, len(swept)))
            for i, cc in enumerate(swept):
                lx, st = _refine(cc.log_lr, cc.resample(rng, n_boot), refine)
                Y[:, i] = lx
                Wb[:, i] = np.where((st == _OK) | (st == _UNREFINED), w_all[i], 0.0)
            good = (Wb > 0).sum(1) >= 3
            cb, ab = np.full(n_boot, np.nan), np.full(n_boot, np.nan)
            if good.any():
                cb[good], ab[good] = _fit_grid(Y[good], Wb[good], logb_all, cgrid)
            if (~good).sum() > 0.1 * n_boot:
                messages.append(f"{int((~good).sum())} of {n_boot} bootstrap replicates had fewer than 3 batch sizes")
        elif n >= 3:
            fit.bootstrap = "residuals"
            fit._dof = max(n - 2, 1)
            sig_b = max(fit.sigma, 1e-12) * math.sqrt(n / max(n - 2, 1))
            mu = a - _softplus(c, logb)
            Y = mu[None, :] + sig_b * rng.standard_normal((n_boot, n)) / np.sqrt(w / w.mean())[None, :]
            cb, ab = _fit_grid(Y, np.broadcast_to(w, Y.shape), logb, cgrid)
        ok = np.isfinite(cb)
        cb, ab = cb[ok], ab[ok]
        # Replicates at the search edge are "beyond": +-inf, so percentiles put them at the ends.
        lo_e, hi_e = cb <= cgrid[0], cb >= cgrid[-1]
        fit._boot_c = np.where(lo_e, -np.inf, np.where(hi_e, np.inf, cb))
        fit._boot_a = np.where(hi_e, np.inf, ab)  # eps_max runs off with B_noise above the sweep
        fit.n_boot = int(ok.sum())

    # -- identification --------------------------------------------------------------------
    bmin, bmax = math.exp(float(logb_all.min())), math.exp(float(logb_all.max()))
    lo_iv, hi_iv = fit.b_noise_interval() if len(fit._boot_c) else (math.nan, math.nan)
    # Whether the data bound B_noise on each side: the profile-likelihood range at `level`
    # (deterministic, there without a bootstrap) or the bootstrap interval.
    p_lo, p_hi = _profile_range(y, w, logb, cgrid, c, 0.5 + level / 2)
    open_hi, open_lo = p_hi is None or hi_iv == math.inf, p_lo is None or lo_iv == 0.0
    above = edge == 1 or (math.exp(c) > _EXTRAPOLATE * bmax and open_hi)
    below = edge == 0 or (math.exp(c) < bmin / _EXTRAPOLATE and open_lo)
    if above:
        bound = _profile_range(y, w, logb, cgrid, c, level)[0]  # one-sided at `level`
        fit.reason = (
            f"the best learning rate grows about linearly with B over the whole sweep (B = {bmin:g}..{bmax:g}): "
            f"B_noise is above the largest batch"
            + (f" (B_noise > {bound:.3g} at {level:.0%})" if bound else "")
            + f"; only the slope eps_max/B_noise = {math.exp(a - c):.3g} (lr per unit of batch size) is measured; "
            "sweep larger batches"
        )
        fit.b_noise_bound = ("lower", bound) if bound else None
        fit.eps_max = None
    elif below:
        bound = _profile_range(y, w, logb, cgrid, c, level)[1]
        fit.reason = (
            f"the best learning rate is flat in B over the whole sweep (B = {bmin:g}..{bmax:g}): "
            f"B_noise is below the smallest batch"
            + (f" (B_noise < {bound:.3g} at {level:.0%})" if bound else "")
            + "; sweep smaller batches"
        )
        fit.b_noise_bound = ("upper", bound) if bound else None
        fit.eps_max = _exp(a)
    else:
        fit.b_noise, fit.eps_max = math.exp(c), _exp(a)
        if not (bmin / _EXTRAPOLATE <= fit.b_noise <= _EXTRAPOLATE * bmax):
            messages.append(
                f"B_noise = {fit.b_noise:.3g} lies outside the swept batch sizes ({bmin:g}..{bmax:g}): an extrapolation"
            )
        if open_lo or open_hi:
            messages.append(
                f"at {level:.0%}, B_noise is compatible with {'0' if open_lo else 'infinity'}: "
                f"the sweep ({bmin:g}..{bmax:g}) bounds it from one side only"
            )
    if fit.reason:
        messages.append(f"B_noise not resolved: {fit.reason}")
    return _finish(fit, tlabel)


def _profile_range(
    y: np.ndarray, w: np.ndarray, logb: np.ndarray, cgrid: np.ndarray, c: float, q: float
) -> tuple[float | None, float | None]:
    """The ``B_noise`` compatible with the data by a profile-likelihood (F) test: those whose
    profiled SSE stays within ``s^2 t_{n-2}(q)^2`` of the minimum (``s^2 = SSE_min/(n-2)``), walked
    out from the estimate ``c``. Returns the ends ``(low, high)``; ``None`` for an end that reaches
    the search range's (the data do not bound that side). Unlike the bootstrap it needs no
    replicates, and it gives a finite bound when replicates pile up at the search edge.
    """
    n = len(y)
    if n < 3:
        return None, None
    sse = _sse_grid(y[None, :], w[None, :], logb, cgrid)[0]
    smin = float(sse.min())
    thr = smin + smin / (n - 2) * t_quantile(q, n - 2) ** 2
    k0 = int(np.argmin(np.abs(cgrid - c)))
    ends: list[float | None] = []
    for step in (-1, 1):
        k = k0
        while 0 <= k + step < len(cgrid) and sse[k + step] <= thr:
            k += step
        ends.append(None if k in (0, len(cgrid) - 1) else math.exp(float(cgrid[k])))
    return ends[0], ends[1]


def _finish(fit: LRSweepFit, tlabel: str) -> LRSweepFit:
    for m in fit.messages:
        warnings.warn(f"noisescale.fit_lr_sweep{tlabel}: {m}", stacklevel=3)
    return fit


def fit_lr_sweeps(records: Iterable[RunRecord], **kwargs: Any) -> dict[Any, LRSweepFit]:
    """:func:`fit_lr_sweep` for every target in ``records`` (keyword arguments passed on)."""
    return {t: fit_lr_sweep(rs, target=t, **kwargs) for t, rs in group_by_target(records).items()}
