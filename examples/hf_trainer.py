"""The noise scale of a Hugging Face ``Trainer`` run: a character GPT-2 built from a config.

    python examples/hf_trainer.py --data ../shared/data/tinyshakespeare.txt
    python examples/hf_trainer.py                           # without --data: a synthetic token chain

The trainer clips the gradient (``max_grad_norm=1.0``) before its callbacks see the step; the callback
is right anyway (the norm is captured at the end of backward). ``gns/*`` go through ``trainer.log``
(every ``report_to`` target, and ``trainer.state.log_history``) and the state into each checkpoint.
"""

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from noisescale.integrations.transformers import NoiseScaleCallback

SEQ = 64


class Chunks(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids[: len(ids) // SEQ * SEQ].view(-1, SEQ)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tokens(path: str | None) -> tuple[torch.Tensor, int]:
    if path:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(vocab)}
        return torch.tensor([index[c] for c in text]), len(vocab)
    g = torch.Generator().manual_seed(0)  # a random bigram chain: something to learn, no file needed
    trans = torch.softmax(3 * torch.randn(32, 32, generator=g), 1)
    ids = [0]
    for _ in range(20_000 - 1):
        ids.append(int(torch.multinomial(trans[ids[-1]], 1, generator=g)))
    return torch.tensor(ids), 32


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", help="a text file (characters are the tokens)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default="hf-noisescale")
    args = ap.parse_args()
    torch.set_num_threads(1)  # a tiny model on a shared CPU (README)

    ids, vocab = tokens(args.data)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    training = TrainingArguments(
        output_dir=args.out,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=4,
        max_steps=args.steps,
        learning_rate=1e-3,
        max_grad_norm=1.0,
        logging_steps=25,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training, train_dataset=Chunks(ids))
    gns_cb = NoiseScaleCallback(trainer)  # the one noisescale line (it adds itself to the trainer)
    trainer.train()
    print(gns_cb.gns.summary())
    print(gns_cb.advice())


if __name__ == "__main__":
    main()
