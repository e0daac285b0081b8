"""What clipping before the callback does to a naive measurement in the Hugging Face ``Trainer``.

The trainer clips the gradient (``max_grad_norm``) and then calls ``on_pre_optimizer_step``. A
callback that reads the step gradient's norm from ``.grad`` there measures the *clipped* big batch
against unclipped micro-batches. This script trains a character GPT-2 (built from a config) with
``gradient_accumulation_steps=4`` and ``max_grad_norm=1.0`` and reports, from the same run:

- ``noisescale``: :class:`noisescale.integrations.transformers.NoiseScaleCallback` (norm captured at
  the end of backward, before clipping);
- ``naive``: the same per-micro-batch norms, with the step's norm read from ``.grad`` in
  ``on_pre_optimizer_step`` (after clipping), averaged the same way (App. A.1, ratio of averages).

    python benchmarks/hf_clipping.py --data ../shared/data/tinyshakespeare.txt --steps 100
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from noisescale import estimate
from noisescale.integrations.transformers import NoiseScaleCallback

# the example's data: characters as tokens, cut into SEQ-long training sequences
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from hf_trainer import SEQ, Chunks, tokens


class ClippedNorm(TrainerCallback):
    """What a hand-written callback sees in on_pre_optimizer_step: the clipped .grad."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.sq = model, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.sq.append(
            float(sum(p.grad.double().square().sum() for p in self.model.parameters() if p.grad is not None))
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a text file (characters are the tokens)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    ids, vocab = tokens(args.data)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=vocab, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    )
    training = TrainingArguments(
        output_dir="hf-clipping",
        per_device_train_batch_size=8,
        gradient_accumulation_steps=4,
        max_steps=args.steps,
        learning_rate=1e-3,
        max_grad_norm=args.max_grad_norm,
        logging_steps=10**9,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    naive = ClippedNorm(model)
    trainer = Trainer(model=model, args=training, train_dataset=Chunks(ids), callbacks=[naive])
    gns_cb = NoiseScaleCallback(trainer, method="microbatch", beta=1.0)  # beta=1: a plain mean over the run
    trainer.train()
    hist = [r for r in gns_cb.gns.history if r["status"] == "measured"]
    g2 = np.array([r["g2_step"] for r in hist])
    ts = np.array([r["trace_sigma_step"] for r in hist])
    sq_small = np.array([r["sq_small"] for r in hist])
    b_small = np.array([r["b_small"] for r in hist])
    b_big = np.array([r["b_big"] for r in hist])
    clipped = np.array([naive.sq[r["step"] - 1] for r in hist])
    pairs = [estimate(a, b, c, d) for a, b, c, d in zip(sq_small, b_small, clipped, b_big)]
    g2_n, ts_n = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    frac = float(np.mean(np.sqrt([r["sq_big"] for r in hist]) > args.max_grad_norm))
    print(f"{len(hist)} steps, max_grad_norm={args.max_grad_norm}: clipping acted on {frac:.0%} of them")
    print(f"noisescale callback: B_simple = {ts.mean() / g2.mean():.4g} examples")
    print(f"naive (clipped .grad in on_pre_optimizer_step): B_simple = {ts_n.mean() / g2_n.mean():.4g} examples")


if __name__ == "__main__":
    main()
