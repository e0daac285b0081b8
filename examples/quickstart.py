"""Quickstart: measure the noise scale of an ordinary training loop with gradient accumulation.

    python examples/quickstart.py            # digits MLP, Adam, 4 micro-batches per step
    python examples/quickstart.py --amp      # the same with CPU autocast + GradScaler

Everything noisescale needs is the three marked lines.
"""

import argparse

import torch
import torch.nn.functional as F

import noisescale as ns
from noisescale.data import digits_mlp, load_digits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast with a GradScaler")
    args = ap.parse_args()

    torch.manual_seed(0)
    X, y, _, _ = load_digits()
    model = digits_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=args.amp)
    k = 4  # micro-batches per optimizer step

    gns = ns.GradientNoiseScale(model, scaler=scaler, log="quickstart.jsonl")  # (1) attach
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(y), (256,))
        losses = []
        for xb, yb in zip(X[idx].chunk(k), y[idx].chunk(k)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp):
                loss = F.cross_entropy(model(xb), yb) / k
            scaler.scale(loss).backward()
            losses.append(loss.detach())
        scaler.unscale_(optimizer)
        gns.step(loss=torch.stack(losses).sum())  # (2) once per optimizer step, before or after clipping
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        if step % 100 == 0:
            print(f"step {step}: {gns.summary()}")
    gns.close()  # (3) detach
    print("metrics:", {k: round(v, 4) for k, v in gns.metrics().items()})
    print("run log: quickstart.jsonl  (draw it with: noisescale plot quickstart.jsonl)")


if __name__ == "__main__":
    main()
