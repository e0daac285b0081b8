"""Step-time overhead of GradientNoiseScale (micro-batch probe) versus plain training.

Side by side in one process: two identical copies of each model train on the same batches;
their steps alternate (plain, tracked, plain, ...) so that drift of the machine hits both
alike. Each optimizer step is ``--micro-batches`` forward/backward passes (gradient
accumulation, which the micro-batch probe needs) plus an SGD step. We report the median step
time of each and their ratio, and check that gradients stay bit-identical (inertness).

    python benchmarks/overhead.py                 # both models, markdown table
    python benchmarks/overhead.py --steps 60 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import noisescale as ns


class TinyGPT(nn.Module):
    """A small pre-norm transformer language model (character level)."""

    def __init__(self, vocab: int = 65, d: int = 256, layers: int = 4, heads: int = 4, seq: int = 128) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        h = self.tok(idx) + self.pos[:T]
        h = self.blocks(h, mask=self.mask[:T, :T], is_causal=True)
        return self.head(self.norm(h))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def make_case(name: str, micro: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if name == "mlp":
        def data():
            return torch.randn(micro, 784, generator=g), torch.randint(10, (micro,), generator=g)

        def loss_fn(model, batch):
            return F.cross_entropy(model(batch[0]), batch[1])

        return mlp, data, loss_fn
    if name == "transformer":
        seq = 128

        def data():
            x = torch.randint(65, (micro, seq + 1), generator=g)
            return x[:, :-1], x[:, 1:]

        def loss_fn(model, batch):
            logits = model(batch[0])
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))

        return TinyGPT, data, loss_fn
    raise ValueError(name)


def bench(name: str, steps: int, warmup: int, k: int, micro: int) -> dict:
    build, data, loss_fn = make_case(name, micro)
    torch.manual_seed(0)
    plain = build()
    torch.manual_seed(0)
    tracked = build()
    opt_p = torch.optim.SGD(plain.parameters(), lr=1e-3)
    opt_t = torch.optim.SGD(tracked.parameters(), lr=1e-3)
    gns = ns.GradientNoiseScale(tracked, beta=0.99)
    times = {"plain": [], "noisescale": []}
    identical = True

    def one_step(model, opt, batches, tracker):
        t0 = time.perf_counter()
        for b in batches:
            (loss_fn(model, b) / k).backward()
        if tracker is not None:
            tracker.step()
        opt.step()
        t1 = time.perf_counter()
        return t1 - t0

    rng = random.Random(0)
    for step in range(warmup + steps):
        batches = [data() for _ in range(k)]
        order = [("plain", plain, opt_p, None), ("noisescale", tracked, opt_t, gns)]
        rng.shuffle(order)
        for key, model, opt, tr in order:
            dt = one_step(model, opt, batches, tr)
            if step >= warmup:
                times[key].append(dt)
        identical &= all(torch.equal(p.grad, q.grad) for p, q in zip(plain.parameters(), tracked.parameters()))
        opt_p.zero_grad()
        opt_t.zero_grad()
    b = gns.b_simple  # read once at the end (the tracker syncs lazily)
    gns.close()
    mp, mt = statistics.median(times["plain"]), statistics.median(times["noisescale"])
    paired = statistics.median(t / p for p, t in zip(times["plain"], times["noisescale"]))
    return {"model": name, "params": sum(p.numel() for p in plain.parameters()), "micro_batch": micro,
            "micro_batches": k, "steps": steps, "plain_ms": 1e3 * mp, "noisescale_ms": 1e3 * mt,
            "ratio": paired, "ratio_of_medians": mt / mp, "bit_identical": identical, "b_simple": b}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mlp", "transformer"], choices=["mlp", "transformer"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--mlp-micro", type=int, default=256)
    ap.add_argument("--transformer-micro", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        micro = args.mlp_micro if name == "mlp" else args.transformer_micro
        rows.append(bench(name, args.steps, args.warmup, args.micro_batches, micro))
    print(f"torch {torch.__version__}, noisescale {ns.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, {args.steps} steps after {args.warmup} warm-up, {args.micro_batches} micro-batches/step\n")
    print("| model | parameters | micro-batch | plain step (ms) | with noisescale (ms) | ratio (median paired) | ratio of medians | gradients bit-identical |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params']:,} | {r['micro_batch']} | {r['plain_ms']:.1f} | {r['noisescale_ms']:.1f} | "
              f"{r['ratio']:.3f}x | {r['ratio_of_medians']:.3f}x | {'yes' if r['bit_identical'] else 'NO'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
