"""The BatchSizeController under DDP on a 2-process gloo group (spawned by tests/test_controller.py)."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
import warnings
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import noisescale as ns
from dist_workers import Net, data

__all__ = ["Net", "data", "entry", "run"]


def run(rank: int, world: int, steps: int = 120) -> dict[str, Any]:
    """DDP with no_sync accumulation; each rank draws its own examples; the controller decides."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    X, y = data()
    model = DDP(Net(seed=0))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    gns = ns.GradientNoiseScale(model)  # method="auto" -> "ddp"
    ctl = ns.BatchSizeController(gns, opt, batch_size=16, micro_batch_size=8, max_batch_size=512, patience=20, every=5)
    gen = torch.Generator().manual_seed(100 + rank)  # the ranks see different data
    out: dict[str, Any] = {"batch": [], "lr": [], "method": gns.method}
    for t in range(steps):
        acc = ctl.accumulation
        for j in range(acc):
            idx = torch.randint(0, len(y), (8,), generator=gen)
            ctx = model.no_sync() if j < acc - 1 else contextlib.nullcontext()
            with ctx:
                loss = F.cross_entropy(model(X[idx]), y[idx]) / acc
                loss.backward()
            if t == 0 and j == 0:
                out["first_loss"] = float(loss)
        gns.step()
        out["batch"].append(ctl.batch_size)
        out["lr"].append(ctl.lrs()[0])
        opt.step()
        opt.zero_grad()
        ctl.step()
    out["changes"] = ctl.changes
    gns.close()
    return out


def entry(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        result = run(rank, world)
    except BaseException:
        torch.save({"error": traceback.format_exc()}, os.path.join(out_dir, f"rank{rank}.pt"))
        os._exit(3)  # peers blocked in a collective see the closed connection at once
    dist.barrier()
    dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    sys.stdout.flush()
    os._exit(0)
