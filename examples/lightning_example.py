"""The noise scale of a Lightning run: one callback.

    python examples/lightning_example.py                   # digits MLP, SGD, 4 micro-batches per step
    python examples/lightning_example.py --controller      # and let the batch grow with B_simple

The callback measures with the trainer's gradient accumulation (clipping included), logs ``gns/*``
through the trainer's loggers (here a CSV file), and keeps its averages in the trainer's checkpoints.
"""

import argparse
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

from noisescale.data import digits_mlp, load_digits
from noisescale.integrations.lightning import NoiseScaleCallback


class Digits(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = digits_mlp()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="lightning-noisescale")
    ap.add_argument("--controller", action="store_true", help="grow the batch (accumulation) with B_simple")
    args = ap.parse_args()
    torch.set_num_threads(1)  # a tiny model on a shared CPU (README)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    torch.manual_seed(0)
    X, y, _, _ = load_digits()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=32, shuffle=True)
    controller = dict(max_batch_size=1024, patience=20) if args.controller else None
    gns_cb = NoiseScaleCallback(controller=controller)  # the one noisescale line
    trainer = pl.Trainer(
        max_steps=args.steps,
        accumulate_grad_batches=4,
        gradient_clip_val=1.0,
        callbacks=[gns_cb],
        logger=CSVLogger(args.out),
        log_every_n_steps=25,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(Digits(), loader)
    print(f"after {trainer.global_step} steps: {gns_cb.gns.summary()}")
    if gns_cb.controller is not None:
        print(f"batch now {gns_cb.controller.batch_size} examples (accumulation {trainer.accumulate_grad_batches})")
    print(f"gns/* logged to {trainer.logger.log_dir}/metrics.csv")


if __name__ == "__main__":
    main()
