"""Branched local critical batch (Merrill et al. 2025) on the digits MLP, at checkpoints along a run.

A base run trains at batch B0 with SGD + momentum 0.9 at lr eps_central(B0) (the centre of
`noisescale sweep --task digits`); at each checkpoint, branches train at k*B0 with lr k*lr0
(the SGD rule) for the same number of examples (loss: the mean full training loss over the
second half of each branch, a smoothing like Merrill et al.'s loss EMA), and noisescale.local_critical_batch picks the
largest k whose full training loss stays within epsilon of every smaller k. B_simple of the base
run at the checkpoint is printed beside it.

    python benchmarks/critical_branched_digits.py            # about a minute on one core
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F

import noisescale as ns
from noisescale.data import digits_mlp, load_digits

torch.set_num_threads(1)
B0, EPS_STAR, B_STAR = 16, 1.0, 256.0
LR0 = ns.eps_central(B0, EPS_STAR, B_STAR)
CHECKPOINTS = (50, 200, 800)  # base-run steps
EXAMPLES = 64 * B0 * 4  # Delta: 4 steps at the largest branch (k = 64), 256 at k = 1
KS = (1, 2, 4, 8, 16, 32, 64)
REL_EPS = 0.05  # epsilon = 5% of the loss at the checkpoint

X, y, _, _ = load_digits(seed=0)


def full_loss(model):
    with torch.no_grad():
        return float(F.cross_entropy(model(X), y))


def main():
    t0 = time.perf_counter()
    model = digits_mlp(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=LR0, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    gns = ns.GradientNoiseScale(model, method="microbatch", beta=0.99)
    step = 0
    print(
        f"base run: B0={B0}, lr0={LR0:.4f}, SGD momentum 0.9; branches for {EXAMPLES} examples, "
        f"epsilon = {REL_EPS:.0%} of the checkpoint loss"
    )
    print(
        "| base step | loss | B_simple (base run) | branch losses k="
        + ",".join(map(str, KS))
        + " | local critical batch | Merrill geo-mean |"
    )
    print("|---|---|---|---|---|---|")
    for ck in CHECKPOINTS:
        while step < ck:
            step += 1
            idx = torch.randint(len(y), (B0,), generator=gen)
            for xb, yb in zip(X[idx].tensor_split(2), y[idx].tensor_split(2)):
                (F.cross_entropy(model(xb), yb) / 2).backward()
            gns.step()
            opt.step()
            opt.zero_grad(set_to_none=True)
        state = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
        L = full_loss(model)

        def branch(batch, lr, steps, seed, state=state):
            m = digits_mlp(seed=0)
            m.load_state_dict(state[0])
            o = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)
            o.load_state_dict(state[1])
            for g in o.param_groups:
                g["lr"] = lr
            gg = torch.Generator().manual_seed(1000 + seed)
            tail = []
            for i in range(steps):
                idx = torch.randint(len(y), (batch,), generator=gg)
                F.cross_entropy(m(X[idx]), y[idx]).backward()
                o.step()
                o.zero_grad(set_to_none=True)
                if i >= steps // 2:  # smoothed: mean full loss over the second half of the branch
                    tail.append(full_loss(m))
            loss = sum(tail) / len(tail)
            return loss if math.isfinite(loss) else math.inf

        r = ns.local_critical_batch(
            branch, B0, LR0, examples=EXAMPLES, epsilon=REL_EPS * L, ks=KS, optimizer="sgd", seeds=(0, 1, 2, 3)
        )
        geo = f"{r.b_star_geo:.0f}" if r.b_star_geo else ">"
        print(
            f"| {ck} | {L:.3f} | {gns.b_simple:.0f} | "
            + ", ".join(f"{v:.3f}" for v in r.losses)
            + f" | {r.b_star}{' (limit)' if r.at_limit else ''} | {geo} |"
        )
    gns.close()
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
