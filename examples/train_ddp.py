"""Data-parallel training with the gradient noise scale measured for free, checkpointed and restartable.

Run on CPU with 2 processes (gloo), or on GPUs (one process per GPU, NCCL)::

    torchrun --standalone --nproc-per-node 2 examples/train_ddp.py --steps 300
    torchrun --standalone --nproc-per-node 4 examples/train_ddp.py --accum 2 --ckpt /tmp/ckpt

Every rank's gradient before DDP's all-reduce is a small-batch sample, the averaged gradient is
the big batch (McCandlish et al. 2018, App. A.1); ``GradientNoiseScale(ddp_model)`` picks that
probe by itself (``method="auto"`` -> ``"ddp"``) and costs one all-reduce of 8 numbers per step.
With ``--accum K`` each rank accumulates K micro-batches under ``no_sync()``: the small batch is
then one micro-batch on one rank.

Restart: the tracker's state is part of the checkpoint. Under ``torchrun --max-restarts N`` a job
whose worker dies restarts every worker, which reload the latest checkpoint and continue with the
same averages. Try it (one worker kills itself at step 150 on the first attempt)::

    torchrun --standalone --nproc-per-node 2 --max-restarts 1 examples/train_ddp.py \\
        --steps 300 --ckpt /tmp/ckpt --ckpt-every 50 --die-at-step 150

Data: the UCI digits shipped with scikit-learn (``pip install 'noisescale[demo]'``); batch ``t``
of rank ``r`` is drawn from a generator seeded by ``(seed, t, r)``, so a restarted run sees exactly
the data the uninterrupted run would have seen.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import noisescale as ns
from noisescale.data import digits_mlp, load_digits


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="examples per micro-batch per rank")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step per rank (no_sync)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beta", type=float, default=0.95, help="EMA decay of the noise-scale averages")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--ckpt", default=None, help="checkpoint directory (resume from it if it has one)")
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument(
        "--die-at-step",
        type=int,
        default=None,
        help="demo: the last rank exits abruptly at this step on the first attempt",
    )
    p.add_argument("--out", default=None, help="rank 0 writes the final tracker state here (JSON)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    return p.parse_args(argv)


def setup() -> tuple[int, int, torch.device]:
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    backend, timeout = ("nccl" if cuda else "gloo"), timedelta(seconds=120)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt not in (None, "0") and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # After a restart the agent's store still holds the dead workers' addresses under the same
        # keys (gloo then dials ports that no longer exist; seen with torch 2.13): give each
        # attempt its own key space.
        store = dist.PrefixStore(
            f"attempt_{attempt}/",
            dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout),
        )
        dist.init_process_group(
            backend,
            store=store,
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=timeout,
        )
    else:
        dist.init_process_group(backend, timeout=timeout)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def save_checkpoint(path: str, step: int, ddp: DDP, opt: torch.optim.Optimizer, gns: ns.GradientNoiseScale) -> None:
    """Rank 0 writes atomically (a crash mid-write leaves the previous checkpoint intact).

    Everything saved is tensors, numbers, strings, lists and dicts, so that the checkpoint loads
    with ``torch.load(..., weights_only=True)``: no pickle, a planted file cannot run code.
    """
    state = {
        "step": step,
        "model": ddp.module.state_dict(),
        "optimizer": opt.state_dict(),
        "noisescale": gns.state_dict(),
    }  # numbers only: identical on every rank
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rank, world, device = setup()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    X, y, _, _ = load_digits(seed=0)
    X, y = X.to(device), y.to(device)

    model = digits_mlp(args.hidden, seed=args.seed).to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    gns = ns.GradientNoiseScale(ddp, beta=args.beta)  # auto -> "ddp" (world > 1)

    start = 0
    ckpt = os.path.join(args.ckpt, "last.pt") if args.ckpt else None
    if args.ckpt:
        os.makedirs(args.ckpt, exist_ok=True)  # a new directory: no crash at the first save
    if ckpt and os.path.exists(ckpt):
        state = torch.load(ckpt, map_location=device, weights_only=True)  # tensors and plain data, no pickle
        ddp.module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gns.load_state_dict(state["noisescale"])
        start = state["step"]
        if rank == 0:
            print(f"[attempt {attempt}] resumed from step {start}: {gns.summary()}", flush=True)

    t0 = time.perf_counter()
    for step in range(start, args.steps):
        if args.die_at_step is not None and step == args.die_at_step and attempt == 0 and rank == world - 1:
            print(f"[attempt {attempt}] rank {rank} dies at step {step}", flush=True)
            os._exit(1)  # an abrupt worker failure: torchrun restarts the whole group
        for j in range(args.accum):
            g = torch.Generator().manual_seed(1_000_003 * args.seed + 10_007 * step + 101 * rank + j)
            idx = torch.randint(0, len(y), (args.batch_size,), generator=g).to(device)
            sync = j == args.accum - 1
            with ddp.no_sync() if not sync else _nullcontext():
                loss = F.cross_entropy(ddp(X[idx]), y[idx]) / args.accum
                loss.backward()
        gns.step(loss=loss)  # after the backward passes; before or after clipping
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if ckpt and done % args.ckpt_every == 0:
            if rank == 0:
                save_checkpoint(ckpt, done, ddp, opt, gns)
            dist.barrier()  # nobody runs ahead of a checkpoint being written
        if rank == 0 and (done % args.log_every == 0 or done == args.steps):
            m = gns.metrics()
            print(
                f"step {done:5d}  loss {loss.item() * args.accum:.3f}  B_simple {m['gns/b_simple']:.1f} "
                f"[{m['gns/b_simple_low']:.1f}, {m['gns/b_simple_high']:.1f}] examples "
                f"(b_small {args.batch_size}, b_big {args.batch_size * args.accum * world})",
                flush=True,
            )
    # every rank: the steps since the last multiple of reduce_every (default 10) are reduced now
    gns.synchronize()
    elapsed = time.perf_counter() - t0
    result = {
        "state": gns.state_dict(),
        "b_simple": gns.b_simple,
        "attempt": attempt,
        "world": world,
        "params_sum": float(sum(p.detach().double().sum() for p in ddp.module.parameters())),
        "seconds": elapsed,
    }
    if rank == 0:
        print(gns.summary(), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    gns.close()
    dist.destroy_process_group()
    return result


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    main()
