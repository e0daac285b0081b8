"""CUDA checks and a GPU timing table in one command (a few minutes on one GPU).

    python benchmarks/gpu.py                 # on a CUDA machine: checks, then the timing table
    python benchmarks/gpu.py --dry-run       # on the CPU with tiny sizes: the same code paths, no timings

Checks (each prints PASS/FAIL; the exit status is 1 if any fails):

1. *Device paths equal the CPU's.* The same seeded AdamW training (fp32, TF32 off) on the GPU and on
   the CPU, with ``groups="layers"`` and ``preconditioner=``: every step's summed statistics and the
   per-group averages agree to 1e-3 relative (micro-batch, per-example, per-example fused). This
   exercises the device-side group sums (``index_add_``), ``_foreach_norm``, the per-example
   accumulators and the preconditioner buffers on CUDA.
2. *Clipping before step() changes nothing* on the GPU (capture at the end of backward), to 1e-9.
3. *One read of the step gradient per step* (micro-batch): the same records as a read after every
   pass, over steps of 4, 4, 2, 4 micro-batches (a shorter step is read at ``step()``), to 1e-9.
4. *fp16 with a GradScaler*: the same run in fp16 autocast with a GradScaler gives per-step norms
   within 3% of the fp32 run's (the scale is divided out), with no step skipped that fp32 kept.

Timing: a character GPT (``tests/models.py``, d=768, 6 layers, T=512, batch 16, bf16 autocast,
AdamW) per optimizer step, each configuration against plain training with the same number of
backward passes, in interleaved rounds (median of CUDA-event step times); peak memory likewise.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import noisescale as ns
from models import CharTransformer

VOCAB = 65


def make_model(d: int, layers: int, T: int, device: str, seed: int = 0) -> CharTransformer:
    return CharTransformer(VOCAB, d=d, heads=max(1, d // 64), layers=layers, block=T, seed=seed).to(device)


def batches(n: int, B: int, T: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        w = torch.randint(VOCAB, (B, T + 1), generator=g)
        out.append((w[:, :-1].contiguous(), w[:, 1:].contiguous()))
    return out


def train(
    model: CharTransformer,
    data: list,
    k: int,
    device: str,
    *,
    make_gns: Callable[..., Any] | None = None,
    clip_first: bool = False,
    amp: torch.dtype | None = None,
    scaler: Any = None,
) -> Any:
    """A few AdamW steps of ``k`` micro-batches; returns the tracker (closed) or None."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gns = make_gns(model, opt) if make_gns else None
    for x, y in data:
        for xb, yb in zip(x.chunk(k), y.chunk(k)):
            with torch.autocast(device.split(":")[0], dtype=amp, enabled=amp is not None):
                loss = CharTransformer.loss(model(xb.to(device)), yb.to(device)) / k
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        if gns is not None and not clip_first:
            gns.step()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        if gns is not None and clip_first:
            gns.step()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    if gns is not None:
        gns.close()
    return gns


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def check_device_equals_cpu(device: str, size: dict, results: list) -> None:
    """One measured step on each device from the same parameters and AdamW state (warmed up on the CPU
    first, so the preconditioner is not the identity): training trajectories never get to diverge."""
    data = batches(3, size["B"], size["T"], seed=1)
    for method, k, opts in (("microbatch", 4, {}), ("per_example", 1, {}), ("per_example", 1, {"fused": True})):
        torch.manual_seed(0)
        model = make_model(size["d"], size["layers"], size["T"], "cpu")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for x, y in data[:2]:
            CharTransformer.loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        runs = {}
        for dev in ("cpu", device):
            m = copy.deepcopy(model).to(dev)
            o = torch.optim.AdamW(m.parameters(), lr=1e-3)
            o.load_state_dict(opt.state_dict())
            gns = ns.GradientNoiseScale(m, method, beta=1.0, groups="layers", preconditioner=o, **opts)
            x, y = data[2]
            for xb, yb in zip(x.chunk(k), y.chunk(k)):
                (CharTransformer.loss(m(xb.to(dev)), yb.to(dev)) / k).backward()
            gns.step()
            runs[dev] = gns
        a, b = runs["cpu"], runs[device]
        ra, rb = a.history[-1], b.history[-1]
        diffs = {key: rel(rb[key], ra[key]) for key in ("sq_parts", "sq_total", "g2_step", "trace_sigma_step")}
        diffs["groups"] = max(
            max(rel(b.by_group()[n].g2, e.g2), rel(b.by_group()[n].trace_sigma, e.trace_sigma))
            for n, e in a.by_group().items()
        )
        a.close()
        b.close()
        # fp32 on two devices: the sums agree to rounding; g2 and tr(Sigma) are differences of close sums
        # and P = 1/(sqrt(v)+eps) amplifies rounding where v is tiny, so 1e-3 (a routing or weighting
        # error would be O(1))
        label = f"{method}{' fused' if opts else ''}, groups + preconditioner, {device} vs cpu"
        info = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
        results.append((label, max(diffs.values()) < 1e-3, f"max rel diff: {info}"))


def check_clip(device: str, size: dict, results: list) -> None:
    data = batches(3, size["B"], size["T"], seed=2)
    for method, k in (("microbatch", 2), ("per_example", 1)):
        recs = []
        for clip_first in (False, True):
            model = make_model(size["d"], size["layers"], size["T"], device)
            g = train(
                model,
                data,
                k,
                device,
                clip_first=clip_first,
                make_gns=lambda m, o, method=method: ns.GradientNoiseScale(m, method, groups="layers"),
            )
            recs.append([(r["sq_small"], r["sq_big"]) for r in g.history])
        worst = max(rel(u, v) for a, b in zip(*recs) for u, v in zip(a, b))
        results.append((f"{method}: step() after clip_grad_norm_ = before", worst < 1e-9, f"max rel diff {worst:.1e}"))


def check_read_once(device: str, size: dict, results: list) -> None:
    """The micro-batch probe reads the step gradient once per step: at the end of the pass the previous
    step ended with, or at step() in a shorter step (on the device its sums stay tensors). Its records
    equal those of reading after every pass, over steps of 4, 4, 2, 4 micro-batches, with AdamW and its
    preconditioner."""
    data = batches(4, size["B"], size["T"], seed=4)
    recs = []
    for every_pass in (False, True):
        model = make_model(size["d"], size["layers"], size["T"], device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gns = ns.GradientNoiseScale(model, "microbatch", beta=1.0, groups="layers", preconditioner=opt)
        for (x, y), k in zip(data, (4, 4, 2, 4)):
            for xb, yb in zip(x.chunk(k), y.chunk(k)):
                (CharTransformer.loss(model(xb.to(device)), yb.to(device)) / k).backward()
            gns.step()
            if every_pass:
                gns.probe._expect = None  # (unknown: read after every pass, as in the first step)
            opt.step()
            opt.zero_grad(set_to_none=True)
        recs.append([(r["sq_small"], r["sq_big"]) for r in gns.history])
        gns.close()
    worst = max(rel(u, v) for a, b in zip(*recs) for u, v in zip(a, b))
    label = "microbatch: one read of the step gradient per step = a read after every pass (4, 4, 2, 4 passes)"
    results.append((label, worst < 1e-9, f"max rel diff {worst:.1e}"))


def check_fp16_scaler(device: str, size: dict, results: list) -> None:
    if not device.startswith("cuda"):
        results.append(("fp16 GradScaler vs fp32", True, "skipped: needs CUDA"))
        return
    data = batches(4, size["B"], size["T"], seed=3)
    runs = []
    for amp in (None, torch.float16):
        model = make_model(size["d"], size["layers"], size["T"], device)
        scaler = torch.amp.GradScaler("cuda") if amp else None
        runs.append(
            train(
                model,
                data,
                2,
                device,
                amp=amp,
                scaler=scaler,
                make_gns=lambda m, o, s=scaler: ns.GradientNoiseScale(m, "microbatch", scaler=s),
            )
        )
    kept = [(a, b) for a, b in zip(runs[0].history, runs[1].history) if b["status"] == "measured"]
    worst = max((rel(b[k], a[k]) for a, b in kept for k in ("sq_small", "sq_big")), default=float("inf"))
    ok = worst < 0.03 and len(kept) >= len(runs[0].history) - 1  # the scaler may skip its first step
    results.append(
        (
            "fp16 autocast + GradScaler vs fp32 (per-step norms)",
            ok,
            f"max rel diff {worst:.1e}; {len(kept)}/{len(runs[0].history)} steps measured",
        )
    )


# -- timing ---------------------------------------------------------------------------------

CONFIGS: list[tuple[str, int, dict | None]] = [
    ("plain, 1 backward", 1, None),
    ("per_example", 1, {"method": "per_example"}),
    ("per_example fused", 1, {"method": "per_example", "fused": True}),
    ("per_example layers=norm", 1, {"method": "per_example", "layers": "norm"}),
    ("per_example groups=layers", 1, {"method": "per_example", "groups": "layers"}),
    ("per_example preconditioner", 1, {"method": "per_example", "preconditioner": True}),
    ("plain, 4 micro-batches", 4, None),
    ("microbatch", 4, {"method": "microbatch"}),
    ("microbatch groups=layers", 4, {"method": "microbatch", "groups": "layers"}),
    ("microbatch preconditioner", 4, {"method": "microbatch", "preconditioner": True}),
]


def time_configs(
    device: str, size: dict, steps: int, warmup: int, rounds: int, only: set[str] | None = None
) -> list[tuple[str, float, float, float]]:
    configs = [c for c in CONFIGS if only is None or c[0] in only or c[2] is None]
    data = batches(4, size["B"], size["T"], seed=4)
    cuda = device.startswith("cuda")
    times: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    mem: dict[str, int] = {}
    for _ in range(rounds):
        for name, k, cfg in configs:
            model = make_model(size["d"], size["layers"], size["T"], device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            gns = None
            if cfg is not None:
                c = dict(cfg)
                if c.pop("preconditioner", False):
                    c["preconditioner"] = opt
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    gns = ns.GradientNoiseScale(model, max_pending=1 << 30, **c)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            for t in range(warmup + steps):
                x, y = data[t % len(data)]
                x, y = x.to(device), y.to(device)
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                for xb, yb in zip(x.chunk(k), y.chunk(k)):
                    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
                        loss = CharTransformer.loss(model(xb), yb) / k
                    loss.backward()
                if gns is not None:
                    gns.step()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if cuda and t >= warmup:
                    end.record()
                    torch.cuda.synchronize()
                    times[name].append(start.elapsed_time(end))
            if gns is not None:
                gns.close()
            if cuda:
                mem[name] = torch.cuda.max_memory_allocated()
            del model, opt, gns
    rows = []
    for name, k, _ in configs:
        base = "plain, 1 backward" if k == 1 else "plain, 4 micro-batches"
        t, t0 = statistics.median(times[name] or [0.0]), statistics.median(times[base] or [1.0])
        rows.append((name, t, t / t0 if t0 else float("nan"), mem.get(name, 0) / max(mem.get(base, 1), 1)))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: exercise the code, no timings")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the report (markdown) here")
    ap.add_argument("--configs", default=None, help="comma-separated configuration names to time (plain ones always)")
    ap.add_argument("--timing-only", action="store_true", help="skip the checks")
    args = ap.parse_args(argv)
    dry = args.dry_run or not torch.cuda.is_available()
    device = "cpu" if dry else "cuda"
    if not dry:
        torch.backends.cuda.matmul.allow_tf32 = False  # the checks compare with the CPU in fp32
        torch.backends.cudnn.allow_tf32 = False
    small = {"d": 32, "layers": 1, "T": 16, "B": 8} if dry else {"d": 128, "layers": 2, "T": 64, "B": 16}
    results: list = []
    checks = (check_device_equals_cpu, check_clip, check_read_once, check_fp16_scaler)
    for check in () if args.timing_only else checks:
        try:
            check(device, small, results)
        except Exception as e:  # report and go on: the table is still worth having
            results.append((check.__name__, False, f"raised {type(e).__name__}: {e}"))
    lines = [
        f"# noisescale GPU benchmark ({torch.cuda.get_device_name() if not dry else 'dry run on the CPU'}, "
        f"torch {torch.__version__})",
        "",
        "## Checks",
        "",
    ]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {label} ({info})" for label, ok, info in results]
    if not dry:
        torch.backends.cuda.matmul.allow_tf32 = True
        big = {"d": 768, "layers": 6, "T": 512, "B": 16}
        only = set(args.configs.split(",")) if args.configs else None
        rows = time_configs(device, big, args.steps, args.warmup, args.rounds, only)
        lines += [
            "",
            f"## Step time (d={big['d']}, {big['layers']} layers, T={big['T']}, batch {big['B']}, bf16 "
            f"autocast, AdamW; median of {args.rounds}x{args.steps} steps)",
            "",
            "| configuration | ms / step | time vs plain | peak memory vs plain |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {n} | {t:.2f} | {r:.3f}x | {m:.3f}x |" for n, t, r, m in rows]
    else:
        time_configs(device, {"d": 16, "layers": 1, "T": 8, "B": 4}, 1, 0, 1)  # the timing code runs too
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(report + "\n")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
