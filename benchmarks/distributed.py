"""Step-time overhead of the distributed (DDP) probe: 2 processes, gloo, CPU.

Two identical DDP replicas of the same model live in each process, one with a
``GradientNoiseScale`` attached and one without; training steps alternate between them (A, B, A,
B, ...) so that both see the same machine load, and the ratio of median step times is reported.
A step is forward + backward (DDP all-reduce) [+ ``gns.step()``] + SGD step + ``zero_grad``; the
tracker's lazy read of the all-reduced numbers (every ``max_pending`` = 64 steps) is included.

    python benchmarks/distributed.py                     # the table in docs/benchmarks.md
    python benchmarks/distributed.py --steps 100 --quick
"""

from __future__ import annotations

import argparse
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

CONFIGS = {
    # name: (layer widths, per-rank micro-batch, micro-batches per step)
    "MLP 784-1024-1024-1024-10, B=64/rank": ([784, 1024, 1024, 1024, 10], 64, 1),
    "same, 4 micro-batches of 16 (no_sync)": ([784, 1024, 1024, 1024, 10], 16, 4),
    "MLP 64-128-128-10 (tiny), B=32/rank": ([64, 128, 128, 10], 32, 1),
}


def mlp(widths: list[int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def worker(rank: int, world: int, init: str, steps: int, warmup: int, out: str, threads: int) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    results = {}
    for name, (widths, m, k) in CONFIGS.items():
        replicas = []
        for with_tracker in (False, True):
            ddp = DDP(mlp(widths, seed=0))
            opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
            gns = ns.GradientNoiseScale(ddp, method="ddp") if with_tracker else None
            replicas.append((ddp, opt, gns))
        g = torch.Generator().manual_seed(rank)
        xs = [torch.randn(m, widths[0], generator=g) for _ in range(k)]
        ys = [torch.randint(0, widths[-1], (m,), generator=g) for _ in range(k)]
        times: list[list[float]] = [[], []]
        for it in range(warmup + steps):
            for idx in (0, 1) if it % 2 == 0 else (1, 0):  # alternate the order too
                ddp, opt, gns = replicas[idx]
                dist.barrier()
                t0 = time.perf_counter()
                for j in range(k):
                    if j < k - 1:
                        with ddp.no_sync():
                            (F.cross_entropy(ddp(xs[j]), ys[j]) / k).backward()
                    else:
                        (F.cross_entropy(ddp(xs[j]), ys[j]) / k).backward()
                if gns is not None:
                    gns.step()
                opt.step()
                opt.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                if it >= warmup:
                    times[idx].append(dt)
        b = replicas[1][2].b_simple
        for _, _, gns in replicas:
            if gns is not None:
                gns.close()
        results[name] = {"plain": times[0], "tracked": times[1], "b_simple": b}
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400, help="timed steps per replica and config")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    p.add_argument("--quick", action="store_true", help="only the first config")
    args = p.parse_args(argv)
    if args.quick:
        for key in list(CONFIGS)[1:]:
            CONFIGS.pop(key)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res.pt")
        mp.start_processes(worker, args=(2, os.path.join(d, "init"), args.steps, args.warmup, out, args.threads),
                           nprocs=2, join=True, start_method="spawn")
        results = torch.load(out, weights_only=False)
    print(f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, 2 processes x {args.threads} thread(s), gloo; "
          f"{args.steps} timed steps per replica (A/B interleaved), rank 0")
    print()
    print("| model, batch | plain DDP step (median) | with tracker (median) | ratio |")
    print("|---|---|---|---|")
    for name, r in results.items():
        a, b = statistics.median(r["plain"]), statistics.median(r["tracked"])
        print(f"| {name} | {a * 1e3:.2f} ms | {b * 1e3:.2f} ms | {b / a:.3f}x |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
