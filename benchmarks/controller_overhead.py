"""Cost of the BatchSizeController per training step (digits MLP, micro-batch probe, CPU).

Two identical copies of the digits MLP train on the same batches, in alternating order each round:

- ``gns``: a ``GradientNoiseScale`` only, SGD at lr 0.1;
- ``gns + controller``: the same plus a ``BatchSizeController`` whose batch is pinned
  (``max_batch_size = batch_size``) and whose learning-rate scale is set to 2 on an SGD at lr 0.05,
  so that its step pre/post hooks run on every step and the two copies take the same updates.

Reported: the median step time of each, their ratio, the median time of ``controller.step()`` alone
and of the ``optimizer.step()`` hooks (measured as the difference of ``optimizer.step()`` times);
and a check that the two copies' parameters are bit-identical at the end (lr 0.05 x 2 == 0.1).

    python benchmarks/controller_overhead.py                # 300 steps, 1 thread
    python benchmarks/controller_overhead.py --dry-run      # a few steps (what the test runs)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import noisescale as ns
from noisescale.data import digits_mlp, load_digits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256, help="examples per step (default 256)")
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--dry-run", action="store_true", help="a few steps: check that everything runs")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.steps = 12
    torch.set_num_threads(args.threads)
    X, y, _, _ = load_digits(seed=0)
    k, micro = args.micro_batches, args.batch // args.micro_batches

    copies = {}
    for name in ("gns", "gns + controller"):
        model = digits_mlp(seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1 if name == "gns" else 0.05, momentum=0.9)
        gns = ns.GradientNoiseScale(model, method="microbatch")
        ctl = None
        if name != "gns":
            ctl = ns.BatchSizeController(
                gns, opt, batch_size=micro * k, micro_batch_size=micro, max_batch_size=micro * k, patience=0, every=10
            )
            ctl.lr_scale = 2.0  # pinned batch, scaled learning rate: the hooks run on every step
        copies[name] = {"model": model, "opt": opt, "gns": gns, "ctl": ctl, "step": [], "opt_step": [], "ctl_step": []}

    gen = torch.Generator().manual_seed(0)
    for t in range(args.steps):
        idx = torch.randint(len(y), (micro * k,), generator=gen)
        order = list(copies.values()) if t % 2 == 0 else list(copies.values())[::-1]
        for c in order:
            t0 = time.perf_counter()
            for xb, yb in zip(X[idx].chunk(k), y[idx].chunk(k)):
                (F.cross_entropy(c["model"](xb), yb) / k).backward()
            c["gns"].step()
            t1 = time.perf_counter()
            c["opt"].step()
            t2 = time.perf_counter()
            c["opt"].zero_grad()
            t3 = time.perf_counter()
            if c["ctl"] is not None:
                c["ctl"].step()
            t4 = time.perf_counter()
            c["step"].append(t4 - t0)
            c["opt_step"].append(t2 - t1)
            if c["ctl"] is not None:
                c["ctl_step"].append(t4 - t3)
    same = all(
        torch.equal(a, b)
        for a, b in zip(copies["gns"]["model"].parameters(), copies["gns + controller"]["model"].parameters())
    )
    for c in copies.values():
        c["gns"].close()
        if c["ctl"] is not None:
            c["ctl"].close()

    med = {n: statistics.median(c["step"]) for n, c in copies.items()}
    hooks = statistics.median(copies["gns + controller"]["opt_step"]) - statistics.median(copies["gns"]["opt_step"])
    ctl_step = statistics.median(copies["gns + controller"]["ctl_step"])
    print(
        f"digits MLP, batch {micro * k} = {k} x {micro}, {args.steps} steps, torch {torch.__version__}, "
        f"{args.threads} thread(s), {platform.processor() or platform.machine()}"
    )
    print("| copy | median step (ms) | ratio |")
    print("|---|---|---|")
    for n, m in med.items():
        print(f"| {n} | {m * 1e3:.3f} | {m / med['gns']:.3f} |")
    print(f"controller.step(): {ctl_step * 1e6:.1f} us median ({ctl_step / med['gns']:.2%} of a step)")
    print(f"optimizer.step() hooks: {hooks * 1e6:+.1f} us median difference")
    print(f"parameters bit-identical (lr 0.05 x lr_scale 2 vs lr 0.1): {'PASS' if same else 'FAIL'}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
