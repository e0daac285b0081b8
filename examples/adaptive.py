"""Adaptive batch size: grow the batch with the measured noise scale, and the learning rate with it.

    python examples/adaptive.py                 # digits MLP, SGD + momentum, warm-up + cosine decay
    python examples/adaptive.py --steps 200     # shorter

The batch starts at 64 examples (2 micro-batches of 32) and grows, in whole micro-batches, to the
balance point B ~ B_simple of McCandlish et al. (2018), at most 2x per change and only when the
95% interval of B_simple lies above the batch in use. Each change rescales the learning rate by
the paper's saturating rule eps(B) = eps_max/(1 + B_noise/B) (Eq. 2.6; "auto" for SGD). The
warm-up and decay are indexed by examples seen (ExamplesSchedule), so they end where they would
at a fixed batch of 64 however the batch grows.

The controller adds three lines to the loop, marked (1)-(3).
"""

import argparse
import math

import torch
import torch.nn.functional as F

import noisescale as ns
from noisescale.data import digits_mlp, load_digits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--max-batch-size", type=int, default=2048)
    args = ap.parse_args()
    torch.set_num_threads(1)  # a tiny model on a shared CPU: one thread is fastest

    torch.manual_seed(0)
    X, y, X_test, y_test = load_digits()
    model = digits_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    micro = 32
    # warm-up over the first 3,200 examples (50 steps at batch 64), then a cosine decay to 10% at
    # 64 x args.steps examples: a function of examples seen, not of steps
    total = 64 * args.steps

    def warmup_cosine(examples: float) -> float:
        if examples < 3200:
            return examples / 3200
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (examples - 3200) / (total - 3200))))

    schedule = ns.ExamplesSchedule(optimizer, warmup_cosine)
    gns = ns.GradientNoiseScale(model, method="microbatch", log="adaptive.jsonl")
    ctl = ns.BatchSizeController(  # (1) attach: decides each step's number of micro-batches
        gns, optimizer, batch_size=64, micro_batch_size=micro, max_batch_size=args.max_batch_size, schedule=schedule
    )
    gen = torch.Generator().manual_seed(0)
    step = 0
    while ctl.examples < total:
        step += 1
        for _ in range(ctl.accumulation):  # (2) this step's micro-batches
            idx = torch.randint(len(y), (micro,), generator=gen)
            (F.cross_entropy(model(X[idx]), y[idx]) / ctl.accumulation).backward()
        gns.step()
        optimizer.step()
        optimizer.zero_grad()
        if ctl.step():  # (3) after the optimizer step: the next step's batch and learning rate
            c = ctl.changes[-1]
            print(
                f"step {step:4d} ({ctl.examples:7.0f} examples): batch {c['from']:.0f} -> {c['batch_size']:.0f} "
                f"(B_simple {c['estimate']:.0f}), lr x{c['lr_scale']:.2f}"
            )
    gns.close()
    ctl.close()
    with torch.no_grad():
        acc = (model(X_test).argmax(1) == y_test).float().mean().item()
    print(f"\n{total} examples in {step} steps (a fixed batch of 64 would take {total // 64}); test accuracy {acc:.3f}")
    print(f"final: {gns.summary()}")
    print(f"controller: {ctl}")
    print("run log: adaptive.jsonl  (draw it, with the batch used, by: noisescale plot adaptive.jsonl)")


if __name__ == "__main__":
    main()
