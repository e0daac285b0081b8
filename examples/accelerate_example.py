"""The noise scale of an Accelerate loop with gradient accumulation.

python examples/accelerate_example.py                  # digits MLP, SGD, 4 micro-batches per step
python examples/accelerate_example.py --controller     # and let the batch grow with B_simple
accelerate launch --num_processes 2 --cpu examples/accelerate_example.py   # DDP: measured across ranks
"""

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from noisescale.data import digits_mlp, load_digits
from noisescale.integrations.accelerate import AcceleratedNoiseScale


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--controller", action="store_true", help="grow gradient_accumulation_steps with B_simple")
    args = ap.parse_args()
    torch.set_num_threads(1)  # a tiny model on a shared CPU (README)

    accelerator = Accelerator(gradient_accumulation_steps=4, cpu=True)
    torch.manual_seed(0)
    X, y, _, _ = load_digits()
    model = digits_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=32, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    controller = dict(micro_batch_size=32, max_batch_size=1024, patience=20) if args.controller else None
    ns_acc = AcceleratedNoiseScale(accelerator, model, optimizer, controller=controller)  # after prepare()

    while ns_acc.gns.steps < args.steps:
        for x, t in loader:
            with accelerator.accumulate(model):
                accelerator.backward(F.cross_entropy(model(x), t))
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                ns_acc.step()  # every iteration: it records the ones that end an optimizer step
                optimizer.step()
                optimizer.zero_grad()
            if ns_acc.gns.steps >= args.steps:
                break
    ns_acc.close()
    accelerator.print(f"after {ns_acc.gns.steps} steps: {ns_acc.gns.summary()}")
    if ns_acc.controller is not None:
        accelerator.print(
            f"batch now {ns_acc.controller.batch_size} examples "
            f"(gradient_accumulation_steps={accelerator.gradient_accumulation_steps})"
        )


if __name__ == "__main__":
    main()
