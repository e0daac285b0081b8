"""Cost of one B_noise draw (Hessian-vector products) against one training step.

A training step here is ``--micro-batches`` forward/backward passes of ``--micro-batch`` examples and
an optimizer step. A draw (``GradientNoiseScale(hessian_every=K)``, ``hessian_parts=2``) is two
gradient passes and one double-backward graph with two Hessian-vector products on micro-batches of
the same size. Steps and draws alternate in random order (drift of the machine hits both alike);
we report medians, the ratio draw/step, and the overhead per step amortised over ``K`` steps.

    python benchmarks/hessian_cost.py                 # digits MLP and char transformer, markdown table
    python benchmarks/hessian_cost.py --quick         # a few repetitions (CI smoke run)
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import noisescale as ns
from models import CharTransformer, char_batches, char_data
from noisescale.data import digits_mlp, load_digits
from noisescale.hessian import hessian_draw

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare.txt")


def tasks(quick: bool):
    X, y, _, _ = load_digits(seed=0)
    gen = torch.Generator().manual_seed(0)

    def digits_batch(b):
        i = torch.randint(len(y), (b,), generator=gen)
        return X[i], y[i]

    mlp = digits_mlp(hidden=128)
    yield "digits MLP 64-128-128-10", mlp, digits_batch, lambda m, b: F.cross_entropy(m(b[0]), b[1]), 32
    data, _ = char_data(DATA)
    data = data[:200_000]
    lm = CharTransformer(d=64 if quick else 128, heads=4, layers=2, block=64, seed=0)

    def char_batch(b):
        return char_batches(data, b, 64, 1, seed=int(torch.randint(1 << 30, (1,), generator=gen)))[0]

    yield (
        f"char transformer d={64 if quick else 128} L=2 T=64",
        lm,
        char_batch,
        lambda m, b: CharTransformer.loss(m(b[0]), b[1]),
        8,
    )


def time_task(model, batch, loss_fn, mb: int, k: int, reps: int) -> tuple[float, float]:
    """Median seconds of a training step and of a draw, alternating in random order."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    params = [p for p in model.parameters() if p.requires_grad]
    gns = ns.GradientNoiseScale(model, "microbatch")  # the tracker the draws run beside
    step_t: list[float] = []
    draw_t: list[float] = []

    def step() -> None:
        t0 = time.perf_counter()
        for _ in range(k):
            (loss_fn(model, batch(mb)) / k).backward()
        gns.step()
        opt.step()
        opt.zero_grad()
        step_t.append(time.perf_counter() - t0)

    def draw() -> None:
        t0 = time.perf_counter()
        hessian_draw(model, params, lambda: loss_fn(model, batch(mb)), parts=2)
        draw_t.append(time.perf_counter() - t0)

    step()
    draw()  # warm-up of both
    step_t.clear()
    draw_t.clear()
    for _ in range(reps):
        order = [step, draw]
        random.shuffle(order)
        for f in order:
            f()
    gns.close()
    return statistics.median(step_t), statistics.median(draw_t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps = 3 if args.quick else args.reps
    print(f"torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s), {reps} repetitions\n")
    print("| model | micro-batch | step (ms) | draw (ms) | draw / step | per step, K=10 | per step, K=100 |")
    print("|---|---|---|---|---|---|---|")
    for name, model, batch, loss_fn, mb in tasks(args.quick):
        s, d = time_task(model, batch, loss_fn, mb, args.micro_batches, reps)
        print(
            f"| {name} | {mb} | {1e3 * s:.1f} | {1e3 * d:.1f} | {d / s:.2f} | "
            f"{100 * d / s / 10:.1f}% | {100 * d / s / 100:.2f}% |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
