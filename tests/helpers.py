"""Small helpers shared by the tests: the pooled estimator of explicit squared norms, through the
library's one pooling (``make_step_stats`` + ``step_estimates``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from noisescale.estimators import HEAD, SUM_A2, SUM_A2_OVER_B, StepStats, make_step_stats, step_estimates


@dataclass
class Pooled:
    """The effective App. A.1 pair of a step, and its estimates (totals over groups)."""

    sq_small: float
    b_small: float
    sq_big: float
    b_big: float
    g2: float
    trace_sigma: float

    # the names of the App. A.1 pair (McCandlish Eq. A.2)
    @property
    def sq_norm_small(self) -> float:
        return self.sq_small

    @property
    def sq_norm_big(self) -> float:
        return self.sq_big


def read_stats(stats: StepStats, ranks: int = 1) -> Pooled:
    v = stats.read()
    G = stats.n_groups
    g2, ts, status, reason = step_estimates(v, G, ranks)
    assert status == "measured", reason
    a2, a2b = v[SUM_A2], v[SUM_A2_OVER_B]
    return Pooled(
        float(v[HEAD : HEAD + G].sum() / a2),
        float(a2 / a2b),
        float(v[HEAD + G :].sum()),
        float(1 / a2b),
        float(g2.sum()),
        float(ts.sum()),
    )


def collect(probe, ctx):
    """``(Pooled or None, reason, examples)`` of a probe's step statistics."""
    st = probe.collect(ctx)
    ex = float(st.read()[2])
    ex = ex if ex == ex else None  # NaN: unknown
    if st.reason is not None:
        return None, st.reason, ex
    return read_stats(st), None, ex


def pooled(sq_norms, sizes, sq_total, reduction: str = "mean") -> Pooled:
    """The estimate from part norms ``|u_j|^2`` (one group) and the step norm ``|V|^2``."""
    s = make_step_stats(
        [float(np.sum([float(x) for x in sq_norms]))], [float(sq_total)], [float(b) for b in sizes], reduction=reduction
    )
    return read_stats(s)


def per_group(stats: StepStats, ranks: int = 1) -> tuple[np.ndarray, np.ndarray]:
    g2, ts, status, reason = step_estimates(stats.read(), stats.n_groups, ranks)
    assert status == "measured", reason
    return g2, ts


def train_digits(model, X, y, steps, gns=None, k=4, b=8, seed=0, scaler=None, nan_at=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    snapshots = []
    for t in range(steps):
        idx = torch.randint(len(y), (k * b,), generator=gen)
        for xb, yb in zip(X[idx].chunk(k), y[idx].chunk(k)):
            loss = F.cross_entropy(model(xb), yb) / k
            if nan_at == t:
                loss = loss * float("nan")
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        if gns is not None:
            gns.step()
        snapshots.append([p.grad.clone() for p in model.parameters()])
        if scaler:
            scaler.step(opt)
            scaler.update()
        elif nan_at != t:
            opt.step()
        opt.zero_grad()
    return snapshots
