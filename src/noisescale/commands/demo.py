"""Train a small MLP on the embedded digits dataset and watch its noise scale grow.

The dataset is the UCI handwritten digits that ship with scikit-learn (no download). Each
optimizer step takes a batch drawn with replacement, split into micro-batches (gradient
accumulation); noisescale compares the micro-batch gradients with the accumulated step. The
paper's prediction (McCandlish et al. 2018, Sec. 3.1): as the loss falls, |G|^2 shrinks faster
than tr(Sigma), so B_simple grows, often by an order of magnitude over a run.

Writes DIR/run.jsonl (the run log) and DIR/noise_scale.png (the figure).

With --adaptive, a BatchSizeController grows the batch with the measured noise scale (in whole
micro-batches, from --batch-size up to --max-batch-size) and rescales the learning rate by the
paper's saturating rule eps(B) = eps_max/(1 + B_noise/B) (Eq. 2.6); every line shows the batch
and the learning rate in use (docs/adaptive-batch.md).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..controller import BatchSizeController
    from ..tracker import GradientNoiseScale

HELP = "train a small model on an embedded real dataset and show its noise scale (CPU, < 3 min)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 2000; with --adaptive 1000)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="examples per optimizer step (default: 512; with --adaptive the first batch, default 128)",
    )
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step (default: 4)")
    p.add_argument("--lr", type=float, default=0.02, help="SGD learning rate, momentum 0.9 (default: 0.02)")
    p.add_argument("--beta", type=float, default=0.995, help="EMA decay per step (default: 0.995)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("noisescale-demo"), help="output folder (default: noisescale-demo)")
    p.add_argument("--print-every", type=int, default=200, help="print a line every N steps (default: 200)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument(
        "--adaptive",
        action="store_true",
        help="grow the batch with the measured noise scale (BatchSizeController) and print it as it grows",
    )
    p.add_argument(
        "--max-batch-size", type=int, default=2048, help="with --adaptive: the largest batch (default: 2048)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default: 1; a model this small runs fastest on one, and more collapse under load)",
    )


def _check(args: argparse.Namespace) -> None:
    from ..cli import CLIError

    if args.batch_size is None:
        args.batch_size = 128 if args.adaptive else 512
    if args.steps is None:  # the adaptive run's batches grow to 16x: half the steps is still 5x the examples
        args.steps = 1000 if args.adaptive else 2000
    if args.steps < 10:
        raise CLIError(f"--steps must be at least 10, got {args.steps}")
    if args.threads < 1:
        raise CLIError(f"--threads must be at least 1, got {args.threads}")
    if args.micro_batches < 2:
        raise CLIError(
            f"--micro-batches must be at least 2 (the demo measures from gradient accumulation), "
            f"got {args.micro_batches}"
        )
    if args.batch_size < args.micro_batches:
        raise CLIError(f"--batch-size ({args.batch_size}) must be at least --micro-batches ({args.micro_batches})")
    if args.adaptive and args.batch_size % args.micro_batches:
        raise CLIError(
            f"with --adaptive, --batch-size ({args.batch_size}) must be a multiple of --micro-batches "
            f"({args.micro_batches}): the batch grows in whole micro-batches of batch-size/micro-batches examples"
        )
    if args.adaptive and args.max_batch_size < args.batch_size:
        raise CLIError(f"--max-batch-size ({args.max_batch_size}) must be at least --batch-size ({args.batch_size})")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise CLIError(f"--lr must be a positive number, got {args.lr}")
    if args.print_every < 1:
        raise CLIError(f"--print-every must be positive, got {args.print_every}")
    if args.out.exists() and not args.out.is_dir():
        raise CLIError(f"--out {args.out} is a file; give a directory (the demo writes run.jsonl and a PNG into it)")


def _fmt(gns: GradientNoiseScale) -> str:
    b = gns.b_simple
    if b is None:
        return "B_simple not resolved yet (|G|^2 not above its noise: B_simple >> batch size)"
    iv = gns.interval(0.95)
    return f"B_simple {b:7.1f} [95%: {iv[0]:6.1f}, {iv[1]:7.1f}] {gns.unit}" if iv else f"B_simple {b:7.1f}"


def _controller(gns: GradientNoiseScale, opt: Any, args: argparse.Namespace) -> BatchSizeController:
    """The controller with its defaults (signal B_simple, factor 1, lr_rule "auto": the saturating
    rule of Eq. 2.6 for SGD); the micro-batch size is the first batch over --micro-batches."""
    from ..controller import BatchSizeController

    micro = args.batch_size // args.micro_batches
    top = args.max_batch_size // micro * micro
    return BatchSizeController(gns, opt, batch_size=args.batch_size, micro_batch_size=micro, max_batch_size=top)


def _change_line(ctl: BatchSizeController) -> str:
    c = ctl.changes[-1]
    return (
        f"step {int(c['step']):5d}  batch {int(c['from'])} -> {int(c['batch_size'])} "
        f"(B_simple {c['estimate']:.0f}), lr x{c['lr_scale']:.2f} of the first batch's"
    )


def run(args: argparse.Namespace) -> int:
    _check(args)
    import torch

    # Tiny models on few shared cores: torch's default thread count made this demo take 406 s under
    # load against 28 s on one thread (the threads wait for each other on every small op).
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous)


def _run(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from ..data import digits_mlp, load_digits
    from ..runlog import read_run_log
    from ..tracker import GradientNoiseScale

    torch.manual_seed(args.seed)
    X, y, X_test, y_test = load_digits(seed=args.seed)
    model = digits_mlp(seed=args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "run.jsonl"
    gen = torch.Generator().manual_seed(args.seed)

    progress = None
    if not args.no_progress:
        try:
            from tqdm import tqdm

            progress = tqdm(total=args.steps, desc="demo", unit="step", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            progress = None
    say = progress.write if progress is not None else print

    say(
        f"noisescale demo: MLP on scikit-learn digits ({len(y)} training images), SGD lr={args.lr}, "
        f"batch {args.batch_size} = {args.micro_batches} micro-batches, {args.steps} steps"
        + (f"; --adaptive: the batch grows with B_simple up to {args.max_batch_size}" if args.adaptive else "")
    )
    t0 = time.perf_counter()
    checkpoints: list[tuple[int, float, float | None, tuple[float, float] | None]] = []
    running_loss = float("nan")
    batch, parts = args.batch_size, args.micro_batches  # the controller changes both with --adaptive
    with GradientNoiseScale(model, "microbatch", beta=args.beta, log=log_path) as gns:
        ctl = _controller(gns, opt, args) if args.adaptive else None
        for step in range(1, args.steps + 1):
            idx = torch.randint(len(y), (batch,), generator=gen)  # with replacement: i.i.d. draws
            total = 0.0
            for xb, yb in zip(X[idx].tensor_split(parts), y[idx].tensor_split(parts)):
                loss = F.cross_entropy(model(xb), yb)
                (loss / parts).backward()
                total += loss.item() * len(yb)
            step_loss = total / batch
            running_loss = step_loss if math.isnan(running_loss) else 0.98 * running_loss + 0.02 * step_loss
            gns.step(loss=step_loss)  # once per optimizer step, after its backward passes
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ctl is not None:
                step_batch, lr_used = batch, ctl.lrs()[0]  # the scale is applied inside opt.step() only
                if ctl.step():  # after opt.step() and gns.step(): decides the next step's batch
                    say(_change_line(ctl))
                batch, parts = ctl.batch_size, ctl.accumulation
            if progress is not None:
                progress.update(1)
            if step % args.print_every == 0 or step == args.steps:
                extra = f"  batch {step_batch:5d}  lr {lr_used:.4f}" if ctl is not None else ""
                say(f"step {step:5d}  loss {running_loss:.4f}{extra}  {_fmt(gns)}")
                checkpoints.append((step, running_loss, gns.b_simple, gns.interval(0.95)))
        summary = gns.summary().split("\n")[0]  # its advice line is printed below, with the dataset size
        advice = gns.advice(dataset_size=len(y)).line()
        if ctl is not None:
            ctl.close()
    if progress is not None:
        progress.close()
    with torch.no_grad():
        acc = (model(X_test).argmax(1) == y_test).float().mean().item()
    elapsed = time.perf_counter() - t0

    print(f"\nfinished {args.steps} steps in {elapsed:.1f} s; test accuracy {acc:.3f}")
    print(f"final: {summary}")
    print(advice)
    measured = [(s, loss, b) for s, loss, b, _ in checkpoints if b is not None]
    if len(measured) >= 2:
        (s0, l0, b0), (s1, l1, b1) = measured[0], measured[-1]
        verdict = "grew" if b1 > b0 else "did not grow"
        print(
            f"as the loss fell from {l0:.3f} (step {s0}) to {l1:.3f} (step {s1}), B_simple {verdict} "
            f"from {b0:.1f} to {b1:.1f} examples (x{b1 / b0:.1f}); the paper predicts growth (Sec. 3.1)"
        )
    if ctl is not None:
        print(
            f"the controller changed the batch {len(ctl.changes)} times: {args.batch_size} -> {ctl.batch_size} "
            f"examples (largest allowed {ctl.max_accumulation * ctl.quantum}), learning rate x{ctl.lr_scale:.2f} "
            f"of the first batch's ({ctl.lr_rule_name} rule); {ctl.examples:.0f} examples in {ctl.steps} steps"
        )
    print(f"run log: {log_path}")
    if not args.no_plot:
        try:
            from ..plot import plot_run

            png = args.out / "noise_scale.png"
            plot_run(read_run_log(log_path), png)
            print(f"figure:  {png}")
        except ImportError as e:
            print(f"(no figure: {e})")
    return 0
