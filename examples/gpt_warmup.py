"""A realistic small run: the noise scale of a character GPT trained the way people train.

4 layers, d=128, T=128, a tied output head used functionally (the GPT-2 pattern), AdamW with a
linear warm-up then cosine decay, gradient clipping at 1.0, 4 micro-batches per step, bf16
autocast, batch sizes in tokens. It prints the final B_simple next to the one computed without the
first 50 steps (replayed from the per-step estimates in ``gns.history``) and next to what a plain
EMA would say, and writes a run log and its figure.

    python examples/gpt_warmup.py                         # ~2-4 minutes on 2 CPU cores
    python examples/gpt_warmup.py --steps 60 --out /tmp/gpt   # a quick look

Data: tinyshakespeare from ``../shared/data`` beside the repository (``--data`` to point elsewhere).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import noisescale as ns
from noisescale.ema import RobustAverage

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data", "tinyshakespeare.txt")


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = (t.view(B, T, self.heads, d // self.heads).transpose(1, 2) for t in self.qkv(self.ln1(x)).split(d, 2))
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A small GPT whose output head is the token embedding, used functionally (as GPT-2 does)."""

    def __init__(self, vocab: int, d: int = 128, layers: int = 4, heads: int = 4, T: int = 128) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        for m in self.modules():  # GPT-2's initialisation
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        x = self.tok(ids) + self.pos(pos)
        for b in self.blocks:
            x = b(x)
        return F.linear(self.ln(x), self.tok.weight)  # the tied head


def lr_at(step: int, steps: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def replay(history: list[dict], first_step: int, beta: float, robust: bool) -> float | None:
    """The tracker's average recomputed from the per-step estimates of steps >= ``first_step``."""
    avg = RobustAverage(beta, robust=robust)
    for r in history:
        if r["step"] >= first_step and r.get("g2_step") is not None:
            avg.fold(r["g2_step"], r["trace_sigma_step"])
    return avg.ema.b_simple


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30, help="learning-rate warm-up steps")
    ap.add_argument("--micro", type=int, default=4, help="micro-batches per step")
    ap.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--out", default="noisescale-gpt")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not os.path.exists(args.data):
        raise SystemExit(f"tinyshakespeare not found at {args.data}; pass --data PATH")
    with open(args.data, encoding="utf-8") as f:
        text = f.read()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    data = torch.tensor([index[c] for c in text[:400_000]])
    T = 128
    model = GPT(len(vocab), T=T)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.out, "run.jsonl")
    gns = ns.GradientNoiseScale(model, unit="tokens", log=log)  # auto: the method is printed below
    gen = torch.Generator().manual_seed(1)
    t0 = time.time()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.warmup, args.lr)
        total = 0.0
        for _ in range(args.micro):
            start = torch.randint(0, len(data) - T - 1, (args.batch,), generator=gen)
            w = data[start.unsqueeze(1) + torch.arange(T + 1)]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(w[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1)) / args.micro
            loss.backward()
            total += float(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        gns.step(sizes=[args.batch * T] * args.micro, loss=total)  # after clipping: the norms were captured before
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0:
            print(f"step {step + 1:4d}  loss {total:.3f}  {gns.summary()}", flush=True)
    history = list(gns.history)
    final = gns.b_simple
    gns.close()
    late = replay(history, 51, 0.99, robust=True)
    plain = replay(history, 1, 0.99, robust=False)
    print(f"method {gns.method}; {time.time() - t0:.0f} s")

    def fmt(x: float | None) -> str:
        return "undefined" if x is None else f"{x:.4g}"

    ratio = f"{final / late:.3f}" if final is not None and late else "n/a"
    print(
        f"final B_simple {fmt(final)} tokens; without the first 50 steps {fmt(late)} (ratio {ratio}); "
        f"a plain EMA over every step would say {fmt(plain)}"
    )
    try:
        from noisescale.plot import plot_run

        plot_run(log, os.path.join(args.out, "gpt-warmup.png"))
        print(f"wrote {log} and {os.path.join(args.out, 'gpt-warmup.png')}")
    except ImportError:
        print(f"wrote {log} (pip install matplotlib for the figure)")
    return {"final": final, "late": late, "plain": plain, "method": gns.method}


if __name__ == "__main__":
    main()
