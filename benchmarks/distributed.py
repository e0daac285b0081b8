"""Step-time overhead of the distributed (DDP) probe: 2 processes, gloo, CPU.

Two identical DDP replicas of the same model live in each process, one with a
``GradientNoiseScale`` attached and one without; training steps alternate between them (A, B, A,
B, ...) so that both see the same machine load, and the ratio of median step times is reported.
A step is forward + backward (DDP all-reduce) [+ ``gns.step()``] + SGD step + ``zero_grad``; the
tracker's lazy read of the all-reduced numbers (every ``max_pending`` = 64 steps) is included.

``--variants`` adds tracked replicas with the tracker's options, in the same alternating rounds:
``default`` (``method="ddp"``, one all-reduce of the statistics per ``reduce_every`` = 10 steps),
``every1`` (``reduce_every=1``: one all-reduce per step, the behaviour before issue 14),
``floor`` (no noisescale: one BLAS dot of each local gradient in a hook and one of the rank's share
of the synchronized gradient, the reads any exact measurement needs), ``groups`` (``groups="layers"``),
all trained with SGD and compared with the plain SGD replica; ``preconditioner`` (``preconditioner=opt``, ``opt`` the AdamW
optimizer that trains that replica), compared with a plain replica trained by AdamW (added).

    python benchmarks/distributed.py                     # the table in docs/benchmarks.md
    python benchmarks/distributed.py --steps 100 --configs lm
    python benchmarks/distributed.py --configs mlp --variants default groups preconditioner
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import noisescale as ns

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "tinyshakespeare.txt")

CONFIGS = {
    # key: (description, model kind, size, per-rank micro-batch, micro-batches per step)
    "lm": ("char transformer LM d=256 L=4, 8x128 tokens/rank (tinyshakespeare)", "lm", 256, 8, 1),
    "lm_accum": ("same LM, 2 micro-batches of 4x128 (no_sync)", "lm", 256, 4, 2),
    "mlp": ("MLP 784-1024-1024-1024-10, B=64/rank", "mlp", [784, 1024, 1024, 1024, 10], 64, 1),
    "mlp_accum": ("same MLP, 4 micro-batches of 16 (no_sync)", "mlp", [784, 1024, 1024, 1024, 10], 16, 4),
    "tiny": ("MLP 64-128-128-10 (tiny), B=32/rank", "mlp", [64, 128, 128, 10], 32, 1),
}


def mlp(widths: list[int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def make_case(kind: str, size, m: int, k: int, rank: int, path: str = DATA):
    """``(model factory, micro-batches [(x, y)], loss)``: each rank gets its own data."""
    if kind == "lm":
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from models import CharTransformer, char_batches, char_data  # the test suite's models

        data, vocab = char_data(path)
        batches = char_batches(data, m, 128, k, seed=rank)
        return (
            lambda: CharTransformer(vocab=len(vocab), d=size, heads=4, layers=4, block=128, seed=0),
            batches,
            lambda out, y: CharTransformer.loss(out, y),
        )
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(m, size[0], generator=g), torch.randint(0, size[-1], (m,), generator=g)) for _ in range(k)]
    return (lambda: mlp(size, seed=0)), batches, F.cross_entropy


VARIANTS = ("default", "every1", "floor", "groups", "preconditioner")


def replica_specs(variants: tuple[str, ...]) -> list[tuple[str, bool, dict | None, str | None]]:
    """``(key, AdamW?, tracker options or None, key of the plain replica it is compared with)``."""
    specs: list[tuple[str, bool, dict | None, str | None]] = [("plain", False, None, None)]
    if "default" in variants:
        specs.append(("tracked", False, {}, "plain"))
    if "every1" in variants:
        specs.append(("every1", False, {"reduce_every": 1}, "plain"))
    if "floor" in variants:
        specs.append(("floor", False, {"floor": True}, "plain"))
    if "groups" in variants:
        specs.append(("groups", False, {"groups": "layers"}, "plain"))
    if "preconditioner" in variants:
        specs.append(("plain_adamw", True, None, None))
        specs.append(("preconditioner", True, {"preconditioner": True}, "plain_adamw"))
    return specs


class Floor:
    """The physical limit of the measurement, without noisescale: one numpy BLAS dot of every local
    gradient in a tensor hook (the one read each backward pass needs) and, at ``step()``, one dot of
    this rank's 1/world share of the synchronized gradient. No bookkeeping, no collective."""

    def __init__(self, ddp: DDP, rank: int) -> None:
        import numpy as np

        from noisescale.probes.distributed import _share

        self._np = np
        self.norms: list[float] = []
        params = [p for p in ddp.parameters() if p.requires_grad]
        self.handles = [p.register_hook(self._hook) for p in params]
        self.pieces = _share(params, rank, dist.get_world_size())

    def _hook(self, g: torch.Tensor) -> None:
        a = g.detach().numpy().reshape(-1)
        self.norms.append(float(self._np.dot(a, a)))

    def step(self) -> None:
        for p, lo, hi, _ in self.pieces:
            if p.grad is not None:
                a = p.grad.detach().numpy().reshape(-1)[lo:hi]
                self.norms.append(float(self._np.dot(a, a)))
        self.norms.clear()

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def worker(
    rank: int,
    world: int,
    init: str,
    steps: int,
    warmup: int,
    out: str,
    threads: int,
    keys: list[str],
    path: str,
    variants: tuple[str, ...] = ("default",),
) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    results = {}
    for key in keys:
        name, kind, size, m, k = CONFIGS[key]
        factory, batches, loss_fn = make_case(kind, size, m, k, rank, path)
        specs = replica_specs(variants)
        replicas = []
        for _, adamw, tracker_kw, _ in specs:
            ddp = DDP(factory())
            opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4) if adamw else torch.optim.SGD(ddp.parameters(), lr=1e-3)
            gns = None
            if tracker_kw is not None and tracker_kw.get("floor"):
                gns = Floor(ddp, rank)
            elif tracker_kw is not None:
                kw = dict(tracker_kw)
                if kw.pop("preconditioner", False):
                    kw["preconditioner"] = opt  # the optimizer that trains this replica
                gns = ns.GradientNoiseScale(ddp, method="ddp", **kw)
            replicas.append((ddp, opt, gns))
        n = len(replicas)
        times: list[list[float]] = [[] for _ in range(n)]
        for it in range(warmup + steps):
            for idx in range(n) if it % 2 == 0 else reversed(range(n)):  # alternate the order too
                ddp, opt, gns = replicas[idx]
                dist.barrier()
                t0 = time.perf_counter()
                for j, (x, y) in enumerate(batches):
                    if j < k - 1:
                        with ddp.no_sync():
                            (loss_fn(ddp(x), y) / k).backward()
                    else:
                        (loss_fn(ddp(x), y) / k).backward()
                if gns is not None:
                    gns.step()
                opt.step()
                opt.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                if it >= warmup:
                    times[idx].append(dt)
        res: dict = {"b_simple": None}
        for _, _, gns in replicas:
            if isinstance(gns, ns.GradientNoiseScale):
                gns.synchronize()  # every rank: the steps since the last multiple of reduce_every
        for (key, _, _, ref), (_, _, gns), t in zip(specs, replicas, times):
            res[key] = t
            if gns is not None:
                res[f"{key}_ref"] = ref
                res[f"{key}_b_simple"] = getattr(gns, "b_simple", None)
                gns.close()
        res["b_simple"] = res.get("tracked_b_simple")
        results[name] = res
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


def paired(tracked: list[float], plain: list[float]) -> float:
    """Median over rounds of (tracked step / plain step of the same round): the replicas alternate,
    so each pair saw the same machine load."""
    return statistics.median(a / b for a, b in zip(tracked, plain))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400, help="timed steps per replica and config")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    p.add_argument(
        "--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="which models to run (default: all)"
    )
    p.add_argument("--data", default=DATA, help="tinyshakespeare.txt for the LM configs")
    p.add_argument(
        "--variants",
        nargs="+",
        default=["default"],
        choices=list(VARIANTS),
        help="tracked replicas to time against plain DDP (default: default); 'preconditioner' trains "
        "with AdamW and is compared with a plain AdamW replica",
    )
    args = p.parse_args(argv)
    if any(CONFIGS[key][1] == "lm" for key in args.configs) and not os.path.exists(args.data):
        p.error(
            f"the LM configs read {args.data}, which does not exist; pass --data PATH or choose "
            "--configs mlp mlp_accum tiny"
        )
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res.pt")
        mp.start_processes(
            worker,
            args=(
                2,
                os.path.join(d, "init"),
                args.steps,
                args.warmup,
                out,
                args.threads,
                args.configs,
                args.data,
                tuple(args.variants),
            ),
            nprocs=2,
            join=True,
            start_method="spawn",
        )
        results = torch.load(out, weights_only=False)
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, 2 processes x {args.threads} thread(s), gloo; "
        f"{args.steps} timed steps per replica (replicas interleaved), rank 0"
    )
    print()
    if "default" in args.variants:
        print(
            "| model, batch | plain DDP step (median) | with tracker (median) | ratio of medians "
            "| median of paired ratios |"
        )
        print("|---|---|---|---|---|")
        for name, r in results.items():
            a, b = statistics.median(r["plain"]), statistics.median(r["tracked"])
            print(
                f"| {name} | {a * 1e3:.2f} ms | {b * 1e3:.2f} ms | {b / a:.3f}x "
                f"| {paired(r['tracked'], r['plain']):.3f}x |"
            )
    if set(args.variants) - {"default"}:
        labels = {
            "tracked": "default (reduce_every=10)",
            "every1": "reduce_every=1",
            "floor": "floor: a dot per gradient, no noisescale",
            "groups": 'groups="layers"',
            "preconditioner": "preconditioner=AdamW",
        }
        print(
            f"\n2 processes x {args.threads} thread(s); ratio of median step times, each tracked replica against "
            "the plain replica with the same optimizer\n"
        )
        print(
            "| model, batch | tracker options | optimizer | plain DDP step (median) | with tracker (median) "
            "| ratio of medians | median of paired ratios |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, r in results.items():
            for key, label in labels.items():
                if key not in r:
                    continue
                ref = r[f"{key}_ref"]
                a, b = statistics.median(r[ref]), statistics.median(r[key])
                print(
                    f"| {name} | {label} | {'AdamW' if ref == 'plain_adamw' else 'SGD'} | {a * 1e3:.2f} ms | "
                    f"{b * 1e3:.2f} ms | {b / a:.3f}x | {paired(r[key], r[ref]):.3f}x |"
                )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
