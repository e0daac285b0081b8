"""The signal study: which measured signal tracks the critical batch (issue #11, item 3).

Two tasks, each trained once at a small base batch ``B0`` with checkpoints along the run:

- ``digits``: the digits MLP (64-128-128-10, tanh) with SGD + momentum 0.9, the model and learning
  rate rule of ``noisescale sweep --task digits`` (``eps_central(B) = 1/(1 + 256/B)``);
- ``char``: a small causal character transformer (tests/models.py ``CharTransformer``, d = 64,
  2 layers, context 64) on tinyshakespeare with AdamW (``eps_central(B) = 0.02/sqrt(1 + 64/B)``),
  batch sizes in sequences of 64 characters.

At every checkpoint, at fixed parameters (on a copy: the base run is not touched), it measures

- ``b_simple``: ``tr(Sigma)/|G|^2`` from micro-batches (McCandlish et al. 2018, App. A.1), Fieller interval;
- ``b_simple_pre``: the same for Adam's preconditioned update, ``tr(P Sigma P)/|P G|^2`` with
  ``P = 1/(sqrt(v_hat) + eps)`` (docs/method.md); SGD has no preconditioner (``P = I``), so on
  digits it is not a separate signal and is recorded as ``None`` with that reason;
- ``b_simple_norm``: normalisation layers only, from exact per-example norms (Gray et al. 2024);
  the digits MLP has no normalisation layer: ``None`` with that reason;
- ``b_layer_max`` and ``layer_spread``: the largest per-layer ``B_simple`` (``groups="layers"``) and
  the spread ``max/min`` over layers, with percentile-bootstrap intervals over the draws;
- ``b_noise``: ``tr(H Sigma)/(G^T H G)`` from Hessian-vector products (``measure(hessian=True)``),
  when the installed noisescale has it;
- ``b_branch``: the branched local critical batch (Merrill et al. 2025; ``ns.local_critical_batch``,
  Merrill's geometric mean), with a percentile interval from resampling the branch seeds.

Then: Spearman's rank correlation of every signal with ``b_branch`` across checkpoints, with the
exact permutation p-value (few points: read it as weak evidence), and the paper's Table 1 ratio:
the run-averaged signal over the sweep's ``b_crit`` (``noisescale sweep --task digits``; a small
sweep of the same kind for ``char``). Results are appended per checkpoint to
``<out>/checkpoints.jsonl`` (a rerun skips what is there), then ``summary.json``, ``table.md`` and
``signal-study.png``.

    python benchmarks/signal_study.py                      # the full study (see docs/signal-validity.md)
    python benchmarks/signal_study.py --quick              # seconds: tiny sizes, for CI
    python benchmarks/signal_study.py --tasks digits --out runs/s --figure docs/img/signal-study.png
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import inspect
import itertools
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import noisescale as ns
from noisescale.data import digits_mlp, load_digits
from noisescale.measure import split_batch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from models import CharTransformer, char_data

# ../shared beside the repository (as the tests expect), or NOISESCALE_SHAKESPEARE
_DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
SHAKESPEARE = Path(os.environ.get("NOISESCALE_SHAKESPEARE", str(_DEFAULT_TEXT)))
SIGNALS = ("b_simple", "b_simple_pre", "b_simple_norm", "b_layer_max", "layer_spread", "b_noise")
LABELS = {
    "b_simple": "B_simple",
    "b_simple_pre": "B_simple preconditioned",
    "b_simple_norm": "B_simple norm layers",
    "b_layer_max": "largest layer B_simple",
    "layer_spread": "layer spread (max/min)",
    "b_noise": "B_noise (HVP)",
    "b_branch": "branched critical batch",
}
UNITLESS = {"layer_spread"}  # a ratio of batch sizes: no Table 1 ratio


# ---------------------------------------------------------------------------------------------
# Configuration.


@dataclass(frozen=True)
class Config:
    """Everything that fixes one task's numbers (its hash keys the resumable results)."""

    task: str
    optimizer: str  # "sgd" (momentum 0.9) or "adamw"
    b0: int  # base batch of the run and of the branches
    eps_star: float  # lr rule eps_central(B) = eps_star / (1 + b_star/B)^alpha (App. A.2)
    b_star: float
    alpha: float
    checkpoints: tuple[int, ...]  # base-run steps
    draws: int  # independent batches per fixed-parameter measurement
    measure_batch: int  # examples per draw
    micro: int  # micro-batches per draw
    hvp_draws: int  # draws for B_noise (each costs a double backward)
    ks: tuple[int, ...]  # branch batch multipliers
    branch_examples: int  # Merrill's Delta: examples per branch
    seeds: tuple[int, ...]  # branch seeds
    rel_eps: float  # epsilon as a fraction of the checkpoint loss
    n_boot: int = 1000
    model: dict[str, int] = field(default_factory=dict)
    sweep_batch_sizes: tuple[int, ...] = ()
    sweep_targets: tuple[float, ...] = ()
    sweep_lr_factors: tuple[float, ...] = ()
    sweep_max_steps: int = 0
    sweep_max_examples: float | None = None  # budget per run in examples (caps the slow large-batch runs)
    sweep_extra: tuple[tuple[int, float], ...] = ()  # (batch size, lr factor) runs beyond the grid

    def lr(self, batch: float) -> float:
        return float(ns.eps_central(batch, self.eps_star, self.b_star, self.alpha))

    def key(self) -> str:
        """Hash of what fixes the checkpoint rows (everything but the sweep's settings)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if not k.startswith("sweep_")}
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def sweep_key(self) -> str:
        """Hash of what fixes the sweep's runs (its CSV is reused while only the study around it changes)."""
        d = dataclasses.asdict(self)
        keep = ("task", "optimizer", "eps_star", "b_star", "alpha", "model")
        fixed = {k: v for k, v in d.items() if k in keep or k.startswith("sweep_")}
        return hashlib.sha1(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:12]


def configs(quick: bool) -> dict[str, Config]:
    """The study's two tasks, full or ``quick`` (tiny sizes: it checks the machinery, not the science)."""
    if quick:
        return {
            "digits": Config(
                "digits", "sgd", 16, 1.0, 256.0, 1.0, (10, 30, 60, 100), 8, 64, 4, 4, (1, 2, 4, 8, 16, 32, 64), 1024, (0, 1), 0.05,
                n_boot=200, sweep_batch_sizes=(8, 32, 128), sweep_targets=(0.5,), sweep_lr_factors=(1.0,),
                sweep_max_steps=400,
            ),
            "char": Config(
                "char", "adamw", 4, 0.02, 64.0, 0.5, (5, 15, 30), 6, 16, 4, 4, (1, 2, 4, 8), 32, (0, 1), 0.01,
                n_boot=200, model={"d": 32, "layers": 1, "block": 16},
                sweep_batch_sizes=(4, 8, 16), sweep_targets=(3.0,), sweep_lr_factors=(1.0,), sweep_max_steps=120,
            ),
        }  # fmt: skip
    return {
        "digits": Config(
            "digits", "sgd", 16, 1.0, 256.0, 1.0, (25, 50, 100, 150, 200, 300, 400, 800), 200, 128, 4, 60,
            (1, 2, 4, 8, 16, 32, 64), 4096, tuple(range(8)), 0.05,
            sweep_batch_sizes=(8, 16, 32, 64, 128, 256, 512, 1024, 2048), sweep_targets=(0.2, 0.1, 0.05),
            sweep_lr_factors=(0.25, 0.5, 1.0, 2.0), sweep_max_steps=4000,
        ),
        "char": Config(
            "char", "adamw", 8, 0.02, 64.0, 0.5, (25, 50, 100, 200, 400, 700), 48, 64, 4, 24,
            (1, 2, 4, 8, 16, 32), 1024, (0, 1, 2), 0.01, model={"d": 64, "layers": 2, "block": 64},
            sweep_batch_sizes=(4, 8, 16, 32, 64, 128), sweep_targets=(2.5, 2.3), sweep_lr_factors=(1.0, 2.0),
            sweep_max_steps=2000, sweep_max_examples=24576,
            # the fastest of factors 1 and 2 was at the grid's edge: one more factor beyond that edge
            sweep_extra=((4, 4.0), (8, 4.0), (16, 4.0), (32, 0.5), (64, 0.5), (128, 0.5)),
        ),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The tasks: model, optimizer, batches, loss.


@lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    X, y, _, _ = load_digits(seed=0)
    return X, y


@lru_cache(maxsize=1)
def _text() -> torch.Tensor:
    if not SHAKESPEARE.is_file():
        raise SystemExit(f"signal_study: {SHAKESPEARE} not found; set NOISESCALE_SHAKESPEARE to tinyshakespeare.txt")
    return char_data(str(SHAKESPEARE))[0]


class Task:
    """Model, optimizer, i.i.d. batches and losses of one configured task."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        if cfg.task == "digits":
            self.X, self.y = _digits()
        else:
            self.text = _text()
            self.seq = cfg.model["block"]
            # a fixed evaluation set (training distribution): every branch and run is scored on it
            self.eval_batch = self.sample(torch.Generator().manual_seed(12345), 32)

    def make_model(self, seed: int = 0) -> torch.nn.Module:
        if self.cfg.task == "digits":
            return digits_mlp(seed=seed)
        m = self.cfg.model
        return CharTransformer(vocab=65, d=m["d"], heads=4, layers=m["layers"], block=m["block"], seed=seed)

    def make_opt(self, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)

    def sample(self, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` examples drawn with replacement (i.i.d., as the estimators assume)."""
        if self.cfg.task == "digits":
            idx = torch.randint(len(self.y), (n,), generator=gen)
            return self.X[idx], self.y[idx]
        start = torch.randint(0, len(self.text) - self.seq - 1, (n,), generator=gen)
        w = self.text[start.unsqueeze(1) + torch.arange(self.seq + 1)]
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    @staticmethod
    def loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy per example (per token for the transformer, a mean over its tokens)."""
        logits = model(batch[0])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))

    def eval_loss(self, model: torch.nn.Module) -> float:
        """Full training loss (digits) or the loss on the fixed evaluation windows (char)."""
        with torch.no_grad():
            if self.cfg.task == "digits":
                return float(F.cross_entropy(model(self.X), self.y))
            return float(self.loss(model, self.eval_batch))


@dataclass
class Checkpoint:
    step: int
    loss: float
    model: dict[str, Any]
    opt: dict[str, Any]


def base_run(task: Task) -> Iterator[Checkpoint]:
    """Train at ``B0`` and ``lr(B0)``; yield a copy of the state at every checkpoint step."""
    cfg = task.cfg
    model = task.make_model(0)
    opt = task.make_opt(model, cfg.lr(cfg.b0))
    gen = torch.Generator().manual_seed(0)
    step = 0
    for ck in cfg.checkpoints:
        while step < ck:
            step += 1
            task.loss(model, task.sample(gen, cfg.b0)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        yield Checkpoint(
            step, task.eval_loss(model), copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
        )


def restore(task: Task, ck: Checkpoint, lr: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = task.make_model(0)
    model.load_state_dict(ck.model)
    opt = task.make_opt(model, lr)
    opt.load_state_dict(ck.opt)
    for g in opt.param_groups:
        g["lr"] = lr
    return model, opt


# ---------------------------------------------------------------------------------------------
# Pure helpers: bootstrap, rank correlation, averages.


def percentile_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates (``inf`` replicates allowed: an unbounded end)."""
    v = np.sort(np.asarray(values, dtype=float))
    lo, hi = np.quantile(v, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return float(lo), float(hi)


def _ranks(x: Sequence[float]) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    a = np.asarray(x, dtype=float)
    order = np.argsort(a, kind="mergesort")
    r = np.empty(len(a))
    r[order] = np.arange(1, len(a) + 1)
    for v in np.unique(a):
        tie = a == v
        r[tie] = r[tie].mean()
    return r


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on average ranks); ``None`` if either is constant."""
    rx, ry = _ranks(x), _ranks(y)
    sx, sy = rx.std(), ry.std()
    if len(rx) < 2 or sx == 0 or sy == 0:
        return None
    return float(((rx - rx.mean()) * (ry - ry.mean())).mean() / (sx * sy))


def spearman_exact_p(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Two-sided exact permutation p-value of Spearman's rho (all ``n!`` orders; ``n <= 9``)."""
    rho = spearman(x, y)
    if rho is None or len(x) > 9:
        return None
    rx, ry = _ranks(x), _ranks(y)
    rx = (rx - rx.mean()) / rx.std()
    perms = ry[np.array(list(itertools.permutations(range(len(ry)))))]  # [n!, n]: every order of y's ranks
    rhos = ((perms - ry.mean()) / ry.std() * rx).mean(1)
    return float(np.mean(np.abs(rhos) >= abs(rho) - 1e-12))


def step_average(steps: Sequence[float], values: Sequence[float]) -> float:
    """Average over the run by the trapezoid rule in steps (checkpoints need not be evenly spaced)."""
    if len(steps) == 1:
        return float(values[0])
    return float(np.trapezoid(values, steps) / (steps[-1] - steps[0]))


# ---------------------------------------------------------------------------------------------
# Measurements at a checkpoint.


def _draw_stats(gns: ns.GradientNoiseScale) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per-draw, per-group ``(g2, trace_sigma)`` of a ``beta = 1`` tracker: its records hold running
    means ``m_n``, and draw ``n`` is ``n m_n - (n - 1) m_{n-1}``."""
    names = list(gns.groups.names)
    recs = [r for r in gns.history if r.get("status") == "measured"]
    means = np.array([[[r[f"group/{g}/g2"], r[f"group/{g}/trace_sigma"]] for g in names] for r in recs], dtype=float)
    n = np.arange(1, len(recs) + 1, dtype=float)[:, None, None]
    draws = n * means - (n - 1) * np.concatenate([np.zeros_like(means[:1]), means[:-1]])
    return names, draws[..., 0], draws[..., 1]


def layer_signals(g2: np.ndarray, ts: np.ndarray) -> tuple[float | None, float | None]:
    """``(largest layer B_simple, max/min over layers)`` from per-draw ``[n, layers]`` arrays;
    layers whose ``g2`` or ``tr(Sigma)`` is not resolved above zero are left out."""
    G, S = g2.mean(0), ts.mean(0)
    ok = (G > 0) & (S > 0)
    if ok.sum() < 2:
        return None, None
    b = S[ok] / G[ok]
    return float(b.max()), float(b.max() / b.min())


def measure_signals(task: Task, ck: Checkpoint, seed: int) -> dict[str, Any]:
    """Every fixed-parameter signal at checkpoint ``ck``, each with its 95% interval or a reason."""
    cfg = task.cfg
    out: dict[str, Any] = {}
    model, opt = restore(task, ck, cfg.lr(cfg.b0))
    gen = torch.Generator().manual_seed(seed)
    batches = [task.sample(gen, cfg.measure_batch) for _ in range(cfg.draws)]
    adam = cfg.optimizer != "sgd"

    # plain B_simple per layer and in total, and (Adam) the preconditioned one, on the same draws
    plain = ns.GradientNoiseScale(model, "microbatch", beta=1.0, robust=False, groups="layers")
    pre = ns.GradientNoiseScale(model, "microbatch", beta=1.0, robust=False, preconditioner=opt) if adam else None
    try:
        for batch in batches:
            for part in split_batch(batch, cfg.micro):
                (task.loss(model, part) / cfg.micro).backward()
            plain.step()
            if pre is not None:
                pre.step()
            model.zero_grad(set_to_none=True)
        out["b_simple"] = _estimate(plain.b_simple, plain.interval(0.95), plain.reason)
        if pre is not None:
            out["b_simple_pre"] = _estimate(pre.b_simple, pre.interval(0.95), pre.reason)
        else:
            out["b_simple_pre"] = _none("SGD has no preconditioner (P = I): the same number as b_simple")
        names, g2, ts = _draw_stats(plain)
    finally:
        plain.close()
        if pre is not None:
            pre.close()
    out["layers"] = {n: float(s.mean() / g.mean()) if g.mean() > 0 else None for n, g, s in zip(names, g2.T, ts.T)}
    b_max, spread = layer_signals(g2, ts)
    rng = np.random.default_rng(seed)
    boots = [layer_signals(g2[i], ts[i]) for i in rng.integers(0, len(g2), (cfg.n_boot, len(g2)))]
    for key, val, idx in (("b_layer_max", b_max, 0), ("layer_spread", spread, 1)):
        reps = [b[idx] if b[idx] is not None else math.inf for b in boots]
        reason = None if val is not None else "fewer than two layers have g2 and tr(Sigma) resolved above zero"
        out[key] = _estimate(val, percentile_interval(reps) if val is not None else None, reason)

    # normalisation layers only, from exact per-example norms (Gray et al. 2024)
    try:
        norm = ns.GradientNoiseScale(model, "per_example", beta=1.0, robust=False, layers="norm")
    except ValueError as e:
        out["b_simple_norm"] = _none(f"no normalisation layers to measure ({str(e).split(';')[0]})")
    else:
        try:
            for batch in batches:
                task.loss(model, batch).backward()
                norm.step()
                model.zero_grad(set_to_none=True)
            out["b_simple_norm"] = _estimate(norm.b_simple, norm.interval(0.95), norm.reason)
        finally:
            norm.close()

    # B_noise from Hessian-vector products, when this noisescale has it
    if "hessian" in inspect.signature(ns.measure).parameters:
        r = ns.measure(model, task.loss, batches[: cfg.hvp_draws], micro_batches=max(cfg.micro, 3), hessian=True)
        b_noise = getattr(r, "b_noise", None)
        iv = r.b_noise_interval(0.95) if b_noise is not None else None
        out["b_noise"] = _estimate(b_noise, iv, getattr(r, "b_noise_reason", None) or "B_noise undefined here")
        out["eps_max"] = getattr(r, "eps_max", None)
    else:
        out["b_noise"] = _none("this noisescale has no measure(hessian=True)")
    return out


def _estimate(value: float | None, interval: Sequence[float] | None, reason: str | None) -> dict[str, Any]:
    if value is None:
        return _none(reason or "undefined")
    return {"value": float(value), "low": interval[0] if interval else None, "high": interval[1] if interval else None}


def _none(reason: str) -> dict[str, Any]:
    return {"value": None, "low": None, "high": None, "reason": reason}


def branched(task: Task, ck: Checkpoint) -> dict[str, Any]:
    """The branched local critical batch at ``ck`` (Merrill et al. 2025), with a seed-bootstrap interval.

    Branch ``k`` trains ``branch_examples`` examples at ``k B0`` from the checkpoint, at the lr rule
    of the task's sweep (``eps_central(k B0)``: the linear rule well below ``B*``, saturating above,
    as App. A.2), and scores the mean evaluation loss at up to four points of its second half.
    """
    cfg = task.cfg
    per_seed: dict[tuple[int, int], float] = {}

    def branch(batch: int, lr: float, steps: int, seed: int) -> float:
        model, opt = restore(task, ck, lr)
        gen = torch.Generator().manual_seed(1000 * (seed + 1) + ck.step)
        marks = {steps - 1 - (j * steps) // 8 for j in range(4)}  # up to 4 points in the second half
        tail = []
        for i in range(steps):
            task.loss(model, task.sample(gen, batch)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i in marks:
                tail.append(task.eval_loss(model))
        loss = sum(tail) / len(tail)
        per_seed[(batch, seed)] = loss if math.isfinite(loss) else math.inf
        return per_seed[(batch, seed)]

    lr0 = cfg.lr(cfg.b0)
    scale: Callable[[float], float] = lambda k: cfg.lr(k * cfg.b0) / lr0
    eps = cfg.rel_eps * ck.loss
    kw = dict(examples=cfg.branch_examples, epsilon=eps, ks=cfg.ks, lr_scale=scale)
    r = ns.local_critical_batch(branch, cfg.b0, lr0, seeds=cfg.seeds, **kw)  # type: ignore[arg-type]

    # seeds resampled with replacement (one seed index = one replicate of every branch), the rule reapplied
    rng = np.random.default_rng(ck.step)
    reps = []
    for _ in range(cfg.n_boot):
        pick = rng.integers(0, len(cfg.seeds), len(cfg.seeds))
        rb = ns.local_critical_batch(
            lambda b, lr, s, j, pick=pick: per_seed[(b, cfg.seeds[pick[j]])],
            cfg.b0,
            lr0,
            seeds=range(len(cfg.seeds)),
            **kw,  # type: ignore[arg-type]
        )
        reps.append(rb.b_star_geo if rb.b_star_geo is not None else math.inf)
    low, high = percentile_interval(reps)
    return {
        "value": r.b_star_geo,
        "low": low,
        "high": high,
        "b_star": r.b_star,
        "at_limit": r.at_limit,
        "reason": None if r.b_star_geo is not None else f"every k passed: b_star >= {r.b_star} (a lower bound)",
        "losses": r.losses,
        "seed_losses": [[per_seed[(b, s)] for s in cfg.seeds] for b in r.batch_sizes],  # [k][seed]
        "passed": r.passed,
        "batch_sizes": r.batch_sizes,
        "lrs": r.lrs,
        "epsilon": eps,
    }


# ---------------------------------------------------------------------------------------------
# The sweep's b_crit (the run-averaged comparison of the paper's Table 1).


def char_train(batch_size: int, lr: float, seed: int, *, cfg: Config) -> Iterator[dict[str, float]]:
    """Train the char transformer at ``batch_size`` and ``lr``; yield the evaluation loss (for ns.sweep)."""
    task = Task(cfg)
    torch.manual_seed(seed)
    model = task.make_model(seed)
    opt = task.make_opt(model, lr)
    gen = torch.Generator().manual_seed(10_000 + seed)
    every = max(1, 64 // batch_size)
    L0 = task.eval_loss(model)
    step = 0
    while True:
        step += 1
        task.loss(model, task.sample(gen, batch_size)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % every:
            continue
        L = task.eval_loss(model)
        yield {"step": step, "loss": L if math.isfinite(L) and L < 2 * L0 else math.nan}


def sweep_b_crit(cfg: Config, out: Path) -> dict[str, Any]:
    """``b_crit`` per target from a resumable batch-size sweep (``<out>/sweep-<task>.csv``)."""
    from noisescale.commands.sweep import digits_train

    train = partial(digits_train, targets=cfg.sweep_targets) if cfg.task == "digits" else partial(char_train, cfg=cfg)
    lrs = ns.lr_grid(cfg.sweep_batch_sizes, cfg.eps_star, cfg.b_star, alpha=cfg.alpha, factors=cfg.sweep_lr_factors)
    for b, f in cfg.sweep_extra:
        lrs[b].append(cfg.lr(b) * f)
    res = ns.sweep(
        train,
        list(cfg.sweep_batch_sizes),
        {b: sorted(v) for b, v in lrs.items()},
        list(cfg.sweep_targets),
        max_steps=cfg.sweep_max_steps,
        max_examples=cfg.sweep_max_examples,
        results=out / f"sweep-{cfg.task}-{cfg.sweep_key()}.csv",
        progress=False,
    )
    fits: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in cfg.sweep_targets:
            recs = [r for r in res.records() if float(r.target) == float(t)]
            try:
                f = ns.fit_critical_batch(recs, target=t, n_boot=cfg.n_boot, seed=0)
            except ValueError as e:
                fits[f"{t:g}"] = {"b_crit": None, "reason": str(e)}
                continue
            fits[f"{t:g}"] = {
                "b_crit": f.b_crit,
                "low": f.b_crit_interval[0],
                "high": f.b_crit_interval[1],
                "s_min": f.s_min,
                "e_min": f.e_min,
                "identified": f.identified,
                "messages": list(f.messages),
            }
    return fits


# ---------------------------------------------------------------------------------------------
# Analysis and presentation.


def branch_rank_value(b: dict[str, Any]) -> tuple[float | None, bool]:
    """The branched value used for ranks and run averages, and whether it is censored.

    When even the largest ``k`` passed (``at_limit``) the local critical batch is only known to be
    ``>= b_star``; it then stands at ``sqrt(2) b_star`` (Merrill's geometric mean with a next
    doubling), above every value a smaller ``b_star`` can give, so its rank is right.
    """
    if b.get("value") is not None:
        return float(b["value"]), False
    if b.get("at_limit"):
        return math.sqrt(2.0) * float(b["b_star"]), True
    return None, False


def analyse(rows: list[dict[str, Any]], sweeps: dict[str, Any]) -> dict[str, Any]:
    """Rank correlations with the branched critical batch and Table 1 ratios, per task."""
    out: dict[str, Any] = {}
    for task in sorted({r["task"] for r in rows}):
        rs = sorted((r for r in rows if r["task"] == task), key=lambda r: r["step"])
        corr = {}
        for s in SIGNALS:
            pts = [
                (r["step"], r[s]["value"], branch_rank_value(r["b_branch"])[0])
                for r in rs
                if r[s]["value"] is not None and branch_rank_value(r["b_branch"])[0] is not None
            ]
            rho = spearman([p[1] for p in pts], [p[2] for p in pts]) if len(pts) >= 3 else None
            corr[s] = {
                "censored": sum(branch_rank_value(r["b_branch"])[1] for r in rs if r[s]["value"] is not None),
                "n": len(pts),
                "rho": rho,
                "p_exact": spearman_exact_p([p[1] for p in pts], [p[2] for p in pts]) if rho is not None else None,
                "points": pts,
                "reason": None if rho is not None else "fewer than 3 checkpoints with both values, or a constant one",
            }
        ratios: dict[str, Any] = {}
        for t, fit in sweeps.get(task, {}).items():
            # the run up to the target: checkpoints until the first one at or below the target loss
            upto = []
            for r in rs:
                upto.append(r)
                if r["loss"] <= float(t):
                    break
            reached = upto[-1]["loss"] <= float(t)
            ratios[t] = {"b_crit": fit, "reached": reached, "checkpoints": [r["step"] for r in upto], "signals": {}}
            censored = any(branch_rank_value(r["b_branch"])[1] for r in upto)
            ratios[t]["branch_censored"] = censored  # the branched average is then a lower bound
            for s in (*SIGNALS, "b_branch"):
                if s == "b_branch":
                    vals = [(r["step"], v) for r in upto if (v := branch_rank_value(r[s])[0]) is not None]
                else:
                    vals = [(r["step"], r[s]["value"]) for r in upto if r[s]["value"] is not None]
                if s in UNITLESS or len(vals) < len(upto) or fit.get("b_crit") is None:
                    why = "a ratio of batch sizes" if s in UNITLESS else "undefined at some checkpoint or no b_crit"
                    ratios[t]["signals"][s] = {"average": None, "ratio": None, "reason": why}
                    continue
                avg = step_average([v[0] for v in vals], [v[1] for v in vals])
                lo, hi = fit.get("low"), fit.get("high")
                ratios[t]["signals"][s] = {
                    "average": avg,
                    "ratio": avg / fit["b_crit"],
                    # b_crit's interval only (the averaged signal's own uncertainty is smaller here)
                    "ratio_low": avg / hi if hi else 0.0,
                    "ratio_high": avg / lo if lo else math.inf,
                }
        out[task] = {"correlations": corr, "table1": ratios}
    return out


def _fmt(e: dict[str, Any], digits: int = 3) -> str:
    if e.get("value") is None:
        return "—"
    v, lo, hi = e["value"], e.get("low"), e.get("high")
    s = f"{v:.{digits}g}"
    if lo is not None and hi is not None:
        s += f" [{lo:.{digits}g}, {hi:.{digits}g}]" if math.isfinite(hi) else f" [{lo:.{digits}g}, ∞]"
    return s


def table_md(rows: list[dict[str, Any]], analysis: dict[str, Any], runtime: dict[str, float]) -> str:
    lines = []
    for task, a in analysis.items():
        rs = sorted((r for r in rows if r["task"] == task), key=lambda r: r["step"])
        unit = "sequences of 64 characters" if task == "char" else "examples"
        lines += [f"### {task} (batch sizes in {unit}; 95% intervals)", ""]
        cols = ("b_branch", *SIGNALS)
        lines.append("| step | loss | " + " | ".join(LABELS[c] for c in cols) + " |")
        lines.append("|---" * (2 + len(cols)) + "|")
        for r in rs:
            lines.append(f"| {r['step']} | {r['loss']:.3f} | " + " | ".join(_fmt(r[c]) for c in cols) + " |")
        reasons = {c: r[c]["reason"] for r in rs for c in cols if r[c].get("value") is None and r[c].get("reason")}
        lines += [""] + [f"- {LABELS[c]} —: {why}" for c, why in reasons.items()]
        lines += ["", "| signal | Spearman rho with the branched critical batch | exact permutation p | checkpoints |"]
        lines.append("|---|---|---|---|")
        for s, c in a["correlations"].items():
            rho = f"{c['rho']:+.2f}" if c["rho"] is not None else "—"
            p = f"{c['p_exact']:.3f}" if c["p_exact"] is not None else "—"
            cens = f" ({c['censored']} branched at the limit: ranked as ≥ b*)" if c.get("censored") else ""
            lines.append(f"| {LABELS[s]} | {rho} | {p} | {c['n']}{cens} |")
        if a["table1"]:
            lines += ["", "| sweep target | b_crit [95%] | signal | run average | signal / b_crit [b_crit's 95%] |"]
            lines.append("|---|---|---|---|---|")
            for t, tr in a["table1"].items():
                fit = tr["b_crit"]
                bc = _fmt({"value": fit.get("b_crit"), "low": fit.get("low"), "high": fit.get("high")})
                note = "" if tr["reached"] else " (base run above target: averaged over all checkpoints)"
                for s, v in tr["signals"].items():
                    if v["ratio"] is None:
                        continue
                    rr = _fmt({"value": v["ratio"], "low": v["ratio_low"], "high": v["ratio_high"]}, 2)
                    ge = "≥ " if s == "b_branch" and tr.get("branch_censored") else ""
                    lines.append(f"| {t}{note} | {bc} | {LABELS[s]} | {ge}{v['average']:.3g} | {ge}{rr} |")
        lines.append("")
    lines.append(
        "runtime: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in runtime.items())
        + f" (torch threads {torch.get_num_threads()})"
    )
    return "\n".join(lines) + "\n"


def figure(rows: list[dict[str, Any]], path: Path, sweeps: dict[str, Any] | None = None) -> None:
    """Signals and the branched critical batch against base-run steps, one panel per task; the
    sweep's ``b_crit`` per target as dotted lines (the run-level comparison of Table 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.2 * len(tasks), 4.6), squeeze=False)
    colors = {
        "b_simple": "C0",
        "b_simple_pre": "C1",
        "b_simple_norm": "C2",
        "b_layer_max": "C4",
        "b_noise": "C3",
        "b_branch": "k",
    }
    for ax, task in zip(axes[0], tasks):
        rs = sorted((r for r in rows if r["task"] == task), key=lambda r: r["step"])
        for j, s in enumerate(colors):
            pts = [(r["step"], r[s]) for r in rs if r[s]["value"] is not None]
            if not pts:
                continue
            x = np.array([p[0] for p in pts], dtype=float) * (1 + 0.025 * (j - 2.5))  # side by side
            v = np.array([p[1]["value"] for p in pts])
            lo = np.array([p[1]["low"] if p[1]["low"] is not None else v[i] for i, p in enumerate(pts)])
            hi = np.array([p[1]["high"] if p[1]["high"] is not None else v[i] for i, p in enumerate(pts)])
            top = np.nanmax(np.where(np.isfinite(hi), hi, np.nan)) if np.isfinite(hi).any() else v.max()
            hi = np.where(np.isfinite(hi), hi, 3 * max(top, v.max()))  # unbounded: drawn to the edge
            lw, ms = (2.2, 7) if s == "b_branch" else (1.2, 5)
            ax.errorbar(
                x, v, yerr=[v - lo, hi - v], color=colors[s], marker="s" if s == "b_branch" else "o",
                lw=lw, ms=ms, capsize=2, label=LABELS[s],
            )  # fmt: skip
        lim = [(r["step"], r["b_branch"]["b_star"]) for r in rs if r["b_branch"].get("at_limit")]
        if lim:  # every k passed: a lower bound, drawn as an upward triangle at b*
            ax.plot(*zip(*lim), "k^", ms=9, label="branched: every k passed (≥ b*)")
        for i, (t, fit) in enumerate((sweeps or {}).get(task, {}).items()):
            if fit.get("b_crit") is not None:
                ax.axhline(fit["b_crit"], color="0.4", ls=(0, (1, 1 + i)), lw=1)
                ax.annotate(f"sweep b_crit, loss {t}", (rs[0]["step"], fit["b_crit"]), fontsize=7, color="0.3",
                            xytext=(0, 2), textcoords="offset points")  # fmt: skip
        unit = "sequences" if task == "char" else "examples"
        ax.set(xscale="log", yscale="log", xlabel="base-run step", ylabel=f"batch size [{unit}]")
        steps = [r["step"] for r in rs]
        ax.set_xticks(steps, [str(x) for x in steps], minor=False)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        # a value far above everything else (the preconditioned B_simple early in AdamW) would squash
        # the panel: the axis stops at 5x the largest other value and the clipped points are named
        ref = [r[s]["value"] for r in rs for s in colors if s != "b_simple_pre" and r[s]["value"] is not None]
        if ref:
            top = 5 * max(ref)
            off = [(r["step"], r["b_simple_pre"]["value"]) for r in rs if (r["b_simple_pre"]["value"] or 0) > top]
            ax.set_ylim(top=top)
            for x, v in off:
                ax.annotate(f"{v:.2g} ↑", (x, top), xytext=(0, -12), textcoords="offset points", fontsize=7,
                            color=colors["b_simple_pre"], ha="center")  # fmt: skip
        losses = ", ".join(f"{r['loss']:.2f}" for r in rs)
        ax.set_title(f"{task}: signals vs branched critical batch\n(loss at checkpoints: {losses})", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Driver.


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)


def _dumps(o: Any) -> str:
    """JSON with ``inf`` as ``"inf"`` (strict JSON has no infinities)."""

    def fix(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
        return v

    return json.dumps(fix(o), default=_json_default)


def _loads(s: str) -> Any:
    def fix(v: Any) -> Any:
        if v in ("inf", "-inf", "nan"):
            return float(v)
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v

    return fix(json.loads(s))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Finished checkpoints in ``path`` (a torn last line, from a crash, is ignored)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(_loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def run_task(cfg: Config, out: Path, log: Callable[[str], None]) -> tuple[list[dict[str, Any]], float]:
    path = out / "checkpoints.jsonl"
    done = {(r["task"], r["step"]) for r in read_rows(path) if r.get("config") == cfg.key()}
    task = Task(cfg)
    t0 = time.perf_counter()
    for ck in base_run(task):
        if (cfg.task, ck.step) in done:
            log(f"{cfg.task} step {ck.step}: already in {path}")
            continue
        t1 = time.perf_counter()
        row: dict[str, Any] = {"task": cfg.task, "config": cfg.key(), "step": ck.step, "loss": ck.loss}
        row.update(measure_signals(task, ck, seed=ck.step))
        t2 = time.perf_counter()
        row["b_branch"] = branched(task, ck)
        row["seconds"] = {"signals": t2 - t1, "branches": time.perf_counter() - t2}
        with open(path, "a") as f:  # one line per checkpoint, flushed: a crash loses at most one
            f.write(_dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        log(
            f"{cfg.task} step {ck.step}: loss {ck.loss:.3f}, branched {_fmt(row['b_branch'])}, "
            f"B_simple {_fmt(row['b_simple'])}, B_noise {_fmt(row['b_noise'])} ({time.perf_counter() - t1:.0f} s)"
        )
    rows = [r for r in read_rows(path) if r.get("config") == cfg.key() and r["task"] == cfg.task]
    return rows, time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds): checks the machinery, for CI")
    p.add_argument("--tasks", default="digits,char", help="comma-separated: digits, char (default: both)")
    p.add_argument("--out", type=Path, default=Path("runs/signal-study"), help="results directory")
    p.add_argument("--figure", type=Path, default=None, help="also write the figure here (e.g. docs/img/...)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: tiny models on shared cores)")
    p.add_argument("--no-sweep", action="store_true", help="skip the b_crit sweeps (no Table 1 ratio)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    presets = configs(args.quick)
    bad = [t for t in tasks if t not in presets]
    if bad or not tasks:
        p.error(f"--tasks must name digits and/or char, got {args.tasks!r}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    try:
        rows: list[dict[str, Any]] = []
        sweeps: dict[str, Any] = {}
        runtime: dict[str, float] = {}
        for t in tasks:
            cfg = presets[t]
            r, sec = run_task(cfg, args.out, log)
            rows += r
            runtime[f"{t} checkpoints"] = sec
            if not args.no_sweep:
                t0 = time.perf_counter()
                sweeps[t] = sweep_b_crit(cfg, args.out)
                runtime[f"{t} sweep"] = time.perf_counter() - t0
                (args.out / "sweeps.json").write_text(_dumps(sweeps))
                log(
                    f"{t} sweep: "
                    + ", ".join(f"{k}: {_fmt({'value': v.get('b_crit'), **v})}" for k, v in sweeps[t].items())
                )
        analysis = analyse(rows, sweeps)
        summary = {"rows": rows, "sweeps": sweeps, "analysis": analysis, "runtime_s": runtime}
        summary["configs"] = {t: dataclasses.asdict(presets[t]) for t in tasks}
        (args.out / "summary.json").write_text(_dumps(summary))
        md = table_md(rows, analysis, runtime)
        (args.out / "table.md").write_text(md)
        try:
            figure(rows, args.out / "signal-study.png", sweeps)
            if args.figure is not None:
                figure(rows, args.figure, sweeps)
        except ImportError as e:
            log(f"(no figure: {e})")
        log(md)
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
