"""Step-time overhead of GradientNoiseScale (micro-batch probe) versus plain training.

Side by side in one process: identical copies of each model train on the same batches; in every
round each copy takes one step, in a random order, so that drift of the machine hits all alike.
Each optimizer step is ``--micro-batches`` forward/backward passes (gradient accumulation, which
the micro-batch probe needs) plus an SGD step. We report the median step time of each and their
ratio, and check that gradients stay bit-identical (inertness).

``--variants`` adds tracked copies with the tracker's options, in the same rounds:

- ``default``: ``GradientNoiseScale(model, method="microbatch")`` (SGD; against plain SGD);
- ``floor``: no noisescale, one BLAS dot of each micro-batch gradient in a hook and one of each
  accumulated gradient at the step: the reads any exact measurement needs (SGD; against plain SGD);
- ``groups``: the same with ``groups="layers"`` (SGD; against plain SGD);
- ``preconditioner``: ``preconditioner=opt`` with ``opt`` an AdamW optimizer that trains that copy,
  against a plain copy trained by AdamW too (``plain AdamW``, added automatically).

    python benchmarks/overhead.py                 # both models, markdown table
    python benchmarks/overhead.py --steps 60 --json out.json
    python benchmarks/overhead.py --models mlp --variants default groups preconditioner
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from typing import Any

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


VARIANTS = ("default", "floor", "groups", "preconditioner")


class Floor:
    """The physical limit, without noisescale: one BLAS dot of each micro-batch gradient in a tensor
    hook (the one read per micro-batch that the small-batch norms need) and one dot of each
    accumulated gradient at ``step()`` (the big batch's). No bookkeeping."""

    b_simple = None

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.norms: list[float] = []
        self.handles = [p.register_hook(self._hook) for p in self.params]

    def _hook(self, g: torch.Tensor) -> None:
        flat = g.detach().reshape(-1)
        self.norms.append(float(torch.dot(flat, flat)))

    def step(self) -> None:
        for p in self.params:
            if p.grad is not None:
                flat = p.grad.detach().reshape(-1)
                self.norms.append(float(torch.dot(flat, flat)))
        self.norms.clear()

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def bench(
    name: str,
    steps: int,
    warmup: int,
    k: int,
    micro: int,
    variants: tuple[str, ...] = ("default",),
    method: str = "microbatch",
) -> dict:
    build, data, loss_fn = make_case(name, micro)
    # copies: key -> (model, optimizer, tracker, key of the plain copy it is compared with)
    copies: dict[str, tuple] = {}

    def add(key: str, adamw: bool, tracker_kw: dict | None, ref: str | None) -> None:
        torch.manual_seed(0)
        model = build()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if adamw else torch.optim.SGD(model.parameters(), lr=1e-3)
        gns: Any = None
        if tracker_kw is not None and tracker_kw.get("floor"):
            gns = Floor(model)
        elif tracker_kw is not None:
            kw = dict(tracker_kw)
            if kw.pop("preconditioner", False):
                kw["preconditioner"] = opt  # the optimizer that trains this copy
            gns = ns.GradientNoiseScale(model, method=method, beta=0.99, **kw)
        copies[key] = (model, opt, gns, ref)

    add("plain", False, None, None)
    if "default" in variants:
        add("noisescale", False, {}, "plain")
    if "floor" in variants:
        add("floor", False, {"floor": True}, "plain")
    if "groups" in variants:
        add("groups", False, {"groups": "layers"}, "plain")
    if "preconditioner" in variants:
        add("plain_adamw", True, None, None)
        add("preconditioner", True, {"preconditioner": True}, "plain_adamw")
    times: dict[str, list[float]] = {key: [] for key in copies}
    identical = {key: True for key, c in copies.items() if c[3] is not None}

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
        order = list(copies)
        rng.shuffle(order)
        for key in order:
            model, opt, tr, _ = copies[key]
            dt = one_step(model, opt, batches, tr)
            if step >= warmup:
                times[key].append(dt)
        for key in identical:
            model, _, _, ref = copies[key]
            identical[key] &= all(
                torch.equal(p.grad, q.grad) for p, q in zip(copies[ref][0].parameters(), model.parameters())
            )
        for _, opt, _, _ in copies.values():
            opt.zero_grad()
    row = {
        "model": name,
        "params": sum(p.numel() for p in copies["plain"][0].parameters()),
        "micro_batch": micro,
        "micro_batches": k,
        "steps": steps,
        "method": method,
        "plain_ms": 1e3 * statistics.median(times["plain"]),
    }
    for key, (_, _, gns, ref) in copies.items():
        if ref is None:
            row[f"{key}_ms"] = 1e3 * statistics.median(times[key])
            continue
        mt, mp = statistics.median(times[key]), statistics.median(times[ref])
        row[f"{key}_ms"] = 1e3 * mt
        row[f"{key}_ratio"] = statistics.median(t / p for p, t in zip(times[ref], times[key]))
        row[f"{key}_ratio_of_medians"] = mt / mp
        row[f"{key}_bit_identical"] = identical[key]
        row[f"{key}_b_simple"] = gns.b_simple  # read once at the end (the tracker syncs lazily)
        gns.close()
    if "noisescale" in copies:  # the keys of the original table
        row.update(
            ratio=row["noisescale_ratio"],
            ratio_of_medians=row["noisescale_ratio_of_medians"],
            bit_identical=row["noisescale_bit_identical"],
            b_simple=row["noisescale_b_simple"],
        )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mlp", "transformer"], choices=["mlp", "transformer"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--mlp-micro", type=int, default=256)
    ap.add_argument("--transformer-micro", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--variants",
        nargs="+",
        default=["default"],
        choices=list(VARIANTS),
        help="tracked copies to time against plain training (default: default); 'preconditioner' "
        "trains with AdamW and is compared with a plain AdamW copy",
    )
    ap.add_argument(
        "--method",
        default="microbatch",
        choices=["microbatch", "per_example", "auto"],
        help="the tracker's method (default: microbatch, the probe this benchmark is about)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        micro = args.mlp_micro if name == "mlp" else args.transformer_micro
        rows.append(bench(name, args.steps, args.warmup, args.micro_batches, micro, tuple(args.variants), args.method))
    print(
        f"torch {torch.__version__}, noisescale {ns.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, {args.steps} steps after {args.warmup} warm-up, {args.micro_batches} micro-batches/step, "
        f"method={args.method}\n"
    )
    if "default" in args.variants:
        print(
            "| model | parameters | micro-batch | plain step (ms) | with noisescale (ms) | ratio (median paired) | ratio of medians | gradients bit-identical |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        for r in rows:
            print(
                f"| {r['model']} | {r['params']:,} | {r['micro_batch']} | {r['plain_ms']:.1f} | {r['noisescale_ms']:.1f} | "
                f"{r['ratio']:.3f}x | {r['ratio_of_medians']:.3f}x | {'yes' if r['bit_identical'] else 'NO'} |"
            )
    if set(args.variants) - {"default"}:
        # one row per tracked copy: ratio against its plain copy (SGD, or AdamW for preconditioner=)
        labels = {
            "noisescale": ("default", "plain"),
            "floor": ("floor: a dot per gradient, no noisescale", "plain"),
            "groups": ('groups="layers"', "plain"),
            "preconditioner": ("preconditioner=AdamW", "plain_adamw"),
        }
        print(
            f"\n{args.threads} threads; ratio: median over rounds of (tracked step / its plain copy's step in the same round)\n"
        )
        print(
            "| model | micro-batch | tracker options | optimizer | plain step (ms) | tracked step (ms) | ratio (median paired) | ratio of medians | gradients bit-identical |"
        )
        print("|---|---:|---|---|---:|---:|---:|---:|---|")
        for r in rows:
            for key, (label, ref) in labels.items():
                if f"{key}_ratio" not in r:
                    continue
                print(
                    f"| {r['model']} | {r['micro_batch']} | {label} | {'AdamW' if ref == 'plain_adamw' else 'SGD'} | "
                    f"{r[ref + '_ms']:.1f} | {r[key + '_ms']:.1f} | {r[key + '_ratio']:.3f}x | "
                    f"{r[key + '_ratio_of_medians']:.3f}x | {'yes' if r[key + '_bit_identical'] else 'NO'} |"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
