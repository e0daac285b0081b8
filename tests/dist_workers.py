"""Worker functions for the distributed tests (run in spawned gloo processes) and their single-process twins.

Everything is deterministic from a seed: the model, and the data of step ``t``, rank ``r``,
micro-batch ``j``. The parent process recomputes every quantity on one process from the same split.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import noisescale as ns

TIMEOUT = timedelta(seconds=60)


# -- the problem -----------------------------------------------------------------------


class Net(nn.Module):
    """A small MLP on 8x8 digits with an optional unused layer (for find_unused_parameters)."""

    def __init__(self, hidden: int = 16, unused: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)
        self.unused = nn.Linear(3, 3) if unused else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


_DATA: tuple[torch.Tensor, torch.Tensor] | None = None


def data() -> tuple[torch.Tensor, torch.Tensor]:
    global _DATA
    if _DATA is None:
        cached = os.environ.get("NOISESCALE_TEST_DIGITS")
        if cached and os.path.exists(cached):  # written by the parent: workers skip importing scikit-learn
            X, y = torch.load(cached)
        else:
            from noisescale.data import load_digits

            X, y, _, _ = load_digits(seed=0)
        _DATA = (X, y)
    return _DATA


_STD: tuple[torch.Tensor, torch.Tensor] | None = None


def std_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits with standardised pixels, the almost-blank ones (std <= 0.05) set to 0.

    For the preconditioned tests: a pixel that is almost never inked has an Adam second moment near
    0, so ``P ~ 1/eps`` and the rare examples that ink it dominate ``tr(P Sigma P)`` (a heavy-tailed
    truth that a few hundred steps do not estimate well). A pixel that is always 0 has a gradient of
    exactly 0 in every example, so its ``P`` does not matter.
    """
    global _STD
    if _STD is None:
        X, y = data()
        keep = X.std(0) > 0.05
        Xs = torch.zeros_like(X)
        Xs[:, keep] = (X[:, keep] - X[:, keep].mean(0)) / X[:, keep].std(0)
        _STD = (Xs, y)
    return _STD


def batch(
    seed: int, step: int, rank: int, micro: int, size: int, standardized: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples drawn with replacement, deterministic in (seed, step, rank, micro)."""
    X, y = std_data() if standardized else data()
    g = torch.Generator().manual_seed(1_000_003 * seed + 10_007 * step + 101 * rank + micro)
    idx = torch.randint(0, len(y), (size,), generator=g)
    return X[idx], y[idx]


def micro_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str, k: int, n_local: int
) -> torch.Tensor:
    """The user's loss for one micro-batch: mean/k ("mean") or sum/n_local ("sum")."""
    out = model(x)
    if reduction == "mean":
        return F.cross_entropy(out, y) / k
    return F.cross_entropy(out, y, reduction="sum") / n_local


def flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in model.parameters()])


def reference(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Single-process twin: per step, every (rank, micro) local squared norm and the global one."""
    model = Net(cfg.get("hidden", 16), seed=cfg["seed"])
    world, sizes, red = cfg["world"], cfg["sizes"], cfg.get("reduction", "mean")
    out = []
    for t in range(cfg["steps"]):
        rank_grads, parts, part_sizes, alphas = [], [], [], []
        for r in range(world):
            k = len(sizes[r])
            acc = None
            w = [1.0] * k if red == "mean" else [float(s) for s in sizes[r]]
            for j, m in enumerate(sizes[r]):
                model.zero_grad(set_to_none=True)
                x, y = batch(cfg["seed"], t, r, j, m)
                micro_loss(model, x, y, red, k, sum(sizes[r])).backward()
                g = flat_grad(model).double()
                acc = g if acc is None else acc + g
                if cfg.get("method") == "ddp_per_example":  # parts are examples: v_i = example i's share
                    for i in range(m):
                        model.zero_grad(set_to_none=True)
                        scale = (1.0 / (m * k)) if red == "mean" else 1.0 / sum(sizes[r])
                        (F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]) * scale).backward()
                        parts.append(float(flat_grad(model).double().square().sum()))
                        part_sizes.append(1.0)
                        alphas.append(scale)  # the scales of one rank sum to 1 in both conventions
                    continue
                parts.append(float(g.square().sum()))
                part_sizes.append(float(m))
                alphas.append(w[j] / sum(w))
            rank_grads.append(acc)
        V = torch.stack(rank_grads).mean(0)
        out.append(
            {
                "parts": parts,
                "sizes": part_sizes,
                "alphas": alphas,
                "big": float(V.square().sum()),
                "rank_grads": rank_grads,
            }
        )
    return out


# -- process plumbing ------------------------------------------------------------------


def entry(rank: int, world: int, init_file: str, out_dir: str, scenario: str, cfg: dict[str, Any]) -> None:
    import faulthandler

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    faulthandler.dump_traceback_later(cfg.get("_dump_after", 55), exit=False)  # a hang leaves a trace
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        result = SCENARIOS[scenario](rank, world, cfg)
    except BaseException:
        # Save the error and leave at once: peers blocked in a collective see the closed
        # connection instead of waiting for the timeout.
        torch.save({"error": traceback.format_exc()}, os.path.join(out_dir, f"{scenario}.{rank}.pt"))
        os._exit(3)
    dist.barrier()
    dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"{scenario}.{rank}.pt"))
    faulthandler.cancel_dump_traceback_later()
    # Leave without interpreter finalization: with torch 2.13, a process that used fully_shard on
    # gloo aborts at exit in ~7% of runs ("terminate called without an active exception", SIGABRT)
    # after everything is done -- also with no noisescale attached (2 of 30 runs of plain FSDP2).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# -- scenarios -------------------------------------------------------------------------


def _tracker_summary(gns: ns.GradientNoiseScale) -> dict[str, Any]:
    gns.synchronize()  # every rank: the steps since the last multiple of reduce_every are reduced too
    return {
        "b_simple": gns.b_simple,
        "state": gns.state_dict(),
        "history": list(gns.history),
        "method": gns.method,
        "measured": gns.measured,
        "skipped": gns.skipped,
        "g2": gns.g2,
        "trace_sigma": gns.trace_sigma,
    }


def ddp_exact(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """DDP at fixed parameters, optionally with no_sync accumulation and unequal sizes."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = Net(cfg.get("hidden", 16), unused=cfg.get("unused", False), seed=cfg["seed"])
    extra: dict[str, Any] = {}
    if cfg.get("own_group"):  # a data-parallel group other than WORLD, given to DDP and to the tracker
        extra["process_group"] = dist.new_group(list(range(world)))
    ddp = DDP(model, **cfg.get("ddp", {}), **extra)
    red = cfg.get("reduction", "mean")
    gns = ns.GradientNoiseScale(
        ddp, method=cfg.get("method", "auto"), beta=1.0, reduction=red, max_pending=cfg.get("max_pending", 64), **extra
    )
    if extra:
        assert gns.probe.group is extra["process_group"], "process_group= was not used"
    sizes = cfg["sizes"][rank]
    k = len(sizes)
    for t in range(cfg["steps"]):
        for j, m in enumerate(sizes):
            x, y = batch(cfg["seed"], t, rank, j, m)
            if cfg.get("nan_at") == (t, rank):
                x = x.clone()
                x[0, 0] = float("nan")
            ctx = ddp.no_sync() if j < k - 1 else _null()
            with ctx:
                micro_loss(ddp, x, y, red, k, sum(sizes)).backward()
        gns.step()
        ddp.zero_grad(set_to_none=True)
    res = _tracker_summary(gns)
    gns.close()
    return res


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def ddp_brute(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Many i.i.d. steps at fixed parameters, plain DDP, per-rank batch m: b_simple vs the exact value.

    Options: ``groups`` (``"layers"``, or ``"kind"`` for a dict ``{"weight": ..., "bias": ...}`` across
    layers), ``method``, ``standardized`` (inputs of :func:`std_data`), ``adam_steps`` (AdamW steps
    first, real updates, to populate the optimizer state; with ``precondition`` set, ``"update"`` or
    ``"curvature"``, the tracker is given that optimizer as its preconditioner). The measurement
    itself runs at fixed parameters: no optimizer step once the tracker is attached.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = Net(cfg.get("hidden", 16), seed=cfg["seed"])
    ddp = DDP(model)
    std = cfg.get("standardized", False)
    opt = None
    if cfg.get("adam_steps"):
        opt = torch.optim.AdamW(ddp.parameters(), lr=cfg.get("lr", 1e-2))
        for t in range(cfg["adam_steps"]):
            x, y = batch(cfg["seed"] + 1, t, rank, 0, 32, std)
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    groups: Any = cfg.get("groups")
    if groups == "kind":
        groups = {"weight": [model.fc1.weight, model.fc2.weight], "bias": [model.fc1.bias, model.fc2.bias]}
    pre = cfg.get("precondition")
    gns = ns.GradientNoiseScale(
        ddp,
        method=cfg.get("method", "auto"),
        beta=1.0,
        groups=groups,
        preconditioner=opt if pre else None,
        precondition=pre or "update",
    )
    for t in range(cfg["steps"]):
        x, y = batch(cfg["seed"], t, rank, 0, cfg["m"], std)
        F.cross_entropy(ddp(x), y).backward()
        gns.step()
        ddp.zero_grad(set_to_none=True)
    gns.synchronize()
    out = {
        "b_simple": gns.b_simple,
        "interval": gns.interval(0.95),
        "measured": gns.measured,
        "method": gns.method,
        "g2": gns.g2,
        "trace_sigma": gns.trace_sigma,
        "by_group": {
            n: {"b_simple": e.b_simple, "g2": e.g2, "trace_sigma": e.trace_sigma, "interval": e.interval(0.95)}
            for n, e in gns.by_group().items()
        },
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }
    if opt is not None:  # P = 1/(sqrt(v_hat) + eps), read from the optimizer state as it stands
        grp = opt.param_groups[0]
        P = {}
        for n, p in model.named_parameters():
            st = opt.state[p]
            v_hat = st["exp_avg_sq"] / (1 - grp["betas"][1] ** float(st["step"]))
            P[n] = 1.0 / (v_hat.sqrt() + grp["eps"])
        out["P"] = P
    gns.close()
    return out


def ddp_inert(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Training steps with and without the tracker: gradients and parameters must be bit-identical."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    runs = {}
    for with_tracker in (False, True):
        model = Net(cfg.get("hidden", 16), seed=cfg["seed"])
        ddp = DDP(model, **cfg.get("ddp", {}))
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        every = cfg.get("hessian_every")
        gns = ns.GradientNoiseScale(ddp, hessian_every=every) if with_tracker else None
        grads = []
        local = []  # with hessian_every: this rank's own draws, for the parent to average
        k = cfg.get("k", 1)
        for t in range(cfg["steps"]):
            for j in range(k):
                x, y = batch(cfg["seed"], t, rank, j, 8)
                with ddp.no_sync() if j < k - 1 else _null():
                    (F.cross_entropy(ddp(x), y) / k).backward()
            if gns is not None:

                def closure(t: int = t, it: list[int] = [0], net: nn.Module = ddp) -> torch.Tensor:  # noqa: B006 (a per-step counter)
                    x, y = batch(cfg["seed"], t, rank, 100 + it[0] % 3, 8)
                    it[0] += 1
                    return F.cross_entropy(net(x), y)  # through the DDP wrapper, as users write it

                if every is not None and t % every == 0:
                    from noisescale.hessian import hessian_draw

                    local.append(hessian_draw(ddp, list(ddp.parameters()), closure).as_array())
                gns.step(closure=closure if every is not None else None)
            grads.append([p.grad.clone() for p in ddp.parameters()])
            opt.step()
            opt.zero_grad(set_to_none=True)
        if gns is not None:
            gns.synchronize()
        runs[with_tracker] = {
            "grads": grads,
            "params": [p.detach().clone() for p in ddp.parameters()],
            "b_simple": gns.b_simple if gns else None,
            "b_noise": gns.b_noise if gns else None,
            "draws": [
                (r["gHg_draw"], r["trace_h_sigma_draw"], r["g2_draw"])
                for r in (gns.history if gns else [])
                if "gHg_draw" in r
            ],
            "local": local,
        }
        if gns is not None:
            gns.close()
    same = all(torch.equal(a, b) for ga, gb in zip(runs[False]["grads"], runs[True]["grads"]) for a, b in zip(ga, gb))
    same_p = all(torch.equal(a, b) for a, b in zip(runs[False]["params"], runs[True]["params"]))
    t = runs[True]
    return {
        "grads_equal": same,
        "params_equal": same_p,
        "b_simple": t["b_simple"],
        "b_noise": t["b_noise"],
        "draws": t["draws"],
        "local": t["local"],
    }


def _fsdp_model(kind: str, cfg: dict[str, Any], world: int) -> nn.Module:
    model = Net(cfg.get("hidden", 16), seed=cfg["seed"])
    if kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model.fc1, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FSDP(
        model,
        device_id=torch.device("cpu"),
        use_orig_params=cfg.get("use_orig_params", True),
        auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
    )


def fsdp_exact(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """FSDP1/FSDP2 at fixed parameters; ``no_sync`` accumulation optional."""
    kind = cfg["kind"]
    model = _fsdp_model(kind, cfg, world)
    gns = ns.GradientNoiseScale(model, beta=1.0)
    sizes = cfg["sizes"][rank]
    k = len(sizes)
    for t in range(cfg["steps"]):
        for j, m in enumerate(sizes):
            x, y = batch(cfg["seed"], t, rank, j, m)
            last = j == k - 1
            if cfg.get("no_sync"):
                if kind == "fsdp2":
                    model.set_requires_gradient_sync(last)
                    micro_loss(model, x, y, "mean", k, sum(sizes)).backward()
                else:
                    with model.no_sync() if not last else _null():
                        micro_loss(model, x, y, "mean", k, sum(sizes)).backward()
            else:
                micro_loss(model, x, y, "mean", k, sum(sizes)).backward()
        gns.step()
        model.zero_grad(set_to_none=True)
    res = _tracker_summary(gns)
    gns.close()
    return res


def fsdp_inert(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    kind = cfg["kind"]
    runs = {}
    for with_tracker in (False, True):
        model = _fsdp_model(kind, cfg, world)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        gns = ns.GradientNoiseScale(model) if with_tracker else None
        grads = []
        for t in range(cfg["steps"]):
            x, y = batch(cfg["seed"], t, rank, 0, 8)
            F.cross_entropy(model(x), y).backward()
            if gns is not None:
                gns.step()
            grads.append([_local(p.grad).clone() for p in model.parameters()])
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs[with_tracker] = {"grads": grads, "params": [_local(p.detach()).clone() for p in model.parameters()]}
        if gns is not None:
            gns.close()
    same = all(torch.equal(a, b) for ga, gb in zip(runs[False]["grads"], runs[True]["grads"]) for a, b in zip(ga, gb))
    same_p = all(torch.equal(a, b) for a, b in zip(runs[False]["params"], runs[True]["params"]))
    return {"grads_equal": same, "params_equal": same_p}


def _clip(model: nn.Module, kind: str, max_norm: float) -> None:
    if kind == "fsdp1":
        model.clip_grad_norm_(max_norm)  # FSDP1's own: the norm over every rank's shards
    else:  # DDP: replicated .grad; FSDP2: DTensor gradients (the norm is reduced over the mesh)
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_norm)


def clip_survival(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """The same seeded training (SGD, real updates, k micro-batches under no_sync) twice: gns.step()
    before and after clip_grad_norm_(params, clip). The step gradient's norm is captured when the
    last backward ends, so both runs record the same numbers.

    With ``refusals`` (FSDP), first check that groups= and preconditioner= are refused.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    kind, k = cfg["kind"], cfg.get("k", 2)
    out: dict[str, Any] = {}
    if cfg.get("refusals"):
        model = _fsdp_model(kind, cfg, world)
        errors = {}
        for name, kwargs in (
            ("groups", {"groups": "layers"}),
            ("preconditioner", {"preconditioner": torch.optim.AdamW(model.parameters())}),
        ):
            try:
                ns.GradientNoiseScale(model, **kwargs).close()
                errors[name] = None
            except NotImplementedError as e:
                errors[name] = str(e)
        out["refusals"] = errors
        del model
    for clip_first in (False, True):
        model = DDP(Net(16, seed=cfg["seed"])) if kind == "ddp" else _fsdp_model(kind, cfg, world)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gns = ns.GradientNoiseScale(model, beta=1.0, groups="layers" if kind == "ddp" else None)
        for t in range(cfg["steps"]):
            for j in range(k):
                x, y = batch(cfg["seed"], t, rank, j, 8)
                last = j == k - 1
                if kind == "fsdp2":
                    model.set_requires_gradient_sync(last)
                    ctx: Any = _null()
                else:
                    ctx = model.no_sync() if not last else _null()
                with ctx:
                    (F.cross_entropy(model(x), y) / k).backward()
            if clip_first:
                _clip(model, kind, cfg["clip"])
                gns.step()
            else:
                gns.step()
                _clip(model, kind, cfg["clip"])
            opt.step()
            opt.zero_grad(set_to_none=True)
        gns.synchronize()
        out[clip_first] = {
            "history": list(gns.history),
            "params": [_local(p.detach()).clone() for p in model.parameters()],
        }
        gns.close()
    return out


def _local(t: torch.Tensor | None) -> torch.Tensor:
    if t is None:  # FSDP1 with use_orig_params: a parameter with no elements in this rank's shard
        return torch.empty(0)
    return t.to_local() if hasattr(t, "to_local") else t


def ddp_bad(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """A rank that raises in step() (wrong sizes) does not hang the others; both go on consistently."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = Net(16, seed=cfg["seed"])
    ddp = DDP(model)
    gns = ns.GradientNoiseScale(ddp, beta=1.0)
    errors = []
    for t in range(4):
        x, y = batch(cfg["seed"], t, rank, 0, 8)
        F.cross_entropy(ddp(x), y).backward()
        try:
            if t == 1 and rank == 1:
                gns.step(sizes=[4, 4])  # wrong: one backward pass on this rank
            else:
                gns.step()
        except ValueError as e:
            errors.append(str(e))
        ddp.zero_grad(set_to_none=True)
    gns.synchronize()
    out = {
        "errors": errors,
        "measured": gns.measured,
        "skipped": gns.skipped,
        "b_simple": gns.b_simple,
        "last_reason": gns.history[1].get("reason"),
        "steps": gns.steps,
        "examples": gns.examples,
    }
    # An explicit non-distributed method on a DDP model is refused on every rank.
    try:
        ns.GradientNoiseScale(ddp, method="microbatch")
        out["microbatch_error"] = None
    except ValueError as e:
        out["microbatch_error"] = str(e)
    gns.close()
    return out


def _train_step(ddp: nn.Module, gns: ns.GradientNoiseScale, seed: int, t: int, rank: int) -> None:
    """Step ``t`` of one seeded 8-example batch per rank: forward, backward, ``gns.step()``, ``zero_grad``."""
    x, y = batch(seed, t, rank, 0, 8)
    F.cross_entropy(ddp(x), y).backward()
    gns.step()
    ddp.zero_grad(set_to_none=True)


def _joined_run(seed: int, rank: int, steps: int, **tracker: Any) -> ns.GradientNoiseScale:
    """A tracker on a fresh DDP ``Net(16)`` trained ``steps`` steps (this rank's count) under
    ``Join([ddp, joinable(gns)])``: uneven inputs."""
    from torch.distributed.algorithms.join import Join
    from torch.nn.parallel import DistributedDataParallel as DDP

    from noisescale.probes.distributed import joinable

    ddp = DDP(Net(16, seed=seed))
    gns = ns.GradientNoiseScale(ddp, beta=1.0, **tracker)
    with Join([ddp, joinable(gns)]):
        for t in range(steps):
            _train_step(ddp, gns, seed, t, rank)
    return gns


def ddp_join(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Uneven inputs: rank 1 has fewer steps; Join shadows the tracker's all-reduce."""
    gns = _joined_run(cfg["seed"], rank, cfg["steps"][rank])
    res = _tracker_summary(gns)
    gns.close()
    return res


def ddp_scaler(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """GradScaler: local norms from scaled hooks, global after unscale_; same numbers as without a scaler."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for use_scaler in (False, True):
        model = Net(16, seed=cfg["seed"])
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.0)  # lr 0: fixed parameters, real optimizer calls
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if use_scaler else None
        gns = ns.GradientNoiseScale(ddp, beta=1.0, scaler=scaler)
        k = 2
        for t in range(cfg["steps"]):
            for j in range(k):
                x, y = batch(cfg["seed"], t, rank, j, 8)
                loss = F.cross_entropy(ddp(x), y) / k
                with ddp.no_sync() if j < k - 1 else _null():
                    (scaler.scale(loss) if scaler else loss).backward()
            if scaler is not None:
                scaler.unscale_(opt)
            gns.step()
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
        out[use_scaler] = _tracker_summary(gns)
        gns.close()
    return out


def many(rank: int, world: int, cfg: dict[str, Any]) -> list[Any]:
    """Run several scenarios in one process group (saves process start-ups)."""
    out = []
    for name, sub in cfg["items"]:
        out.append(SCENARIOS[name](rank, world, sub))
        dist.barrier()
    return out


def ddp_reduce_every(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """The same seeded steps with reduce_every=1 and reduce_every=K: noisescale's collectives counted
    (every call of torch.distributed.all_reduce from the probe), what is folded before and after each
    reduction, state_dict between reductions, close() with steps queued, Join with uneven inputs."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import noisescale.probes.distributed as D

    calls = [0]
    real = D.dist.all_reduce

    def counting(*a: Any, **kw: Any) -> Any:
        calls[0] += 1
        return real(*a, **kw)

    out: dict[str, Any] = {}
    steps, K = cfg["steps"], cfg["K"]
    for every in (1, K):
        model = Net(16, seed=cfg["seed"])
        ddp = DDP(model)
        gns = ns.GradientNoiseScale(ddp, beta=1.0, reduce_every=every)
        calls[0] = 0
        D.dist.all_reduce = counting
        seen: list[tuple[int, int, int]] = []  # after each step: (steps, measured + skipped, unreduced)
        try:
            for t in range(steps):
                _train_step(ddp, gns, cfg["seed"], t, rank)
                seen.append((gns.steps, gns.measured + gns.skipped, gns.unreduced))
            n_calls = calls[0]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                state = gns.state_dict()  # on one rank only: not a collective, never hangs
            res = {
                "calls": n_calls,
                "seen": seen,
                "state": state,
                "state_warnings": [str(w.message) for w in caught],
                "summary": gns.summary(),
            }
            gns.close()  # the queued steps are recorded as skipped, with the reason
            res["closed_history"] = list(gns.history)
            res["closed_skipped"] = gns.skipped
        finally:
            D.dist.all_reduce = real
        out[every] = res
    # the same steps reduced at the end by synchronize() (every rank): the same numbers as every=1
    model = Net(16, seed=cfg["seed"])
    ddp = DDP(model)
    gns = ns.GradientNoiseScale(ddp, beta=1.0, reduce_every=K)
    for t in range(steps):
        _train_step(ddp, gns, cfg["seed"], t, rank)
    out["synchronized"] = _tracker_summary(gns)
    gns.close()
    # Join: rank 1 runs out after `short` steps and shadows the rest, across a reduction
    gns = _joined_run(cfg["seed"], rank, steps if rank == 0 else cfg["short"], reduce_every=K)
    out["join"] = {
        "steps": gns.steps,
        "unreduced": gns.unreduced,
        "b_simple": gns.b_simple,
        "measured": gns.measured,
        "skipped": gns.skipped,
        "history": list(gns.history),
    }
    gns.close()
    return out


SCENARIOS = {
    f.__name__: f
    for f in (
        ddp_scaler,
        ddp_exact,
        ddp_brute,
        ddp_inert,
        fsdp_exact,
        fsdp_inert,
        ddp_bad,
        ddp_join,
        ddp_reduce_every,
        clip_survival,
        many,
    )
}
