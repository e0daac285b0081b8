"""Per-example squared gradient norms: noisescale against peers, side by side in one process.

For each model (an MLP on the digits, a small CNN, a character-level transformer LM on
tinyshakespeare at sequence lengths 64 and 256) and each method, one training step is a forward
pass, a backward pass that fills ``.grad``, and whatever the method needs to have the per-example
squared gradient norms (or, for gns-pytorch, its noise-scale estimate):

- ``plain``: forward + backward, nothing else (the reference, 1.00x);
- ``noisescale``: ``PerExampleProbe`` (default: bit-identical gradients);
- ``noisescale fused``: ``PerExampleProbe(fused=True)`` (weight gradients of sequence Linear and
  conv layers summed from the per-example gradients; equal up to rounding);
- ``noisescale layers=norm``: ``PerExampleProbe(layers="norm")``: normalisation layers only (Gray
  et al. 2024, arXiv:2411.00999); its norms cover fewer parameters, so they are not compared;
- ``noisescale groups=layers``: the default probe with one group per layer (``groups=`` of the
  tracker, ``Groups`` from ``resolve_groups(model, params, "layers")``); its groups must add up to
  the reference;
- ``plain AdamW``: ``plain`` followed by an AdamW step (the reference of the next two rows);
- ``noisescale AdamW``: the default probe, then the AdamW step;
- ``noisescale preconditioner``: ``PerExampleProbe(preconditioner=Preconditioner(opt, params))``
  (the tracker's ``preconditioner=opt``: every squared norm of ``g / (sqrt(v_hat) + eps)``), then
  the step of that AdamW ``opt``. A weight makes sequence Linear layers materialise per-example
  gradients instead of taking the ghost norm, so these three rows are reported separately, as
  ratios to ``plain AdamW`` (their norms are not comparable with the others: the weights differ);
- ``vmap(grad)``: ``torch.func`` per-sample gradients, then the ordinary backward for ``.grad``;
- ``BackPACK BatchL2Grad``: ``extend(model)`` + ``with backpack(BatchL2Grad())``;
- ``Opacus ghost (1 bwd)``: ``GradSampleModuleFastGradientClipping(use_ghost_clipping=True)``,
  first backward only (the second, clipped backward of DP-SGD is not needed for the GNS);
- ``gns-pytorch 0.1.5``: ``compute_gns`` (default settings: a random 1% of the parameter tensors,
  at least 10, and 25% of the batch, one ``autograd.grad`` per example), then the ordinary backward.

Timing: all methods run in rounds, interleaved in a shuffled order, each on its own copy of the
model; the table gives
the median over rounds of each method's time divided by ``plain``'s time in the same round, and
the ratio of the fastest rounds (best of N, the least disturbed by other load on a shared machine).
Memory: the peak of live CPU tensor bytes allocated during one step (PyTorch profiler memory
events), divided by ``plain``'s. Each method's per-example norms are checked against noisescale's.

Peers are optional and never dependencies of noisescale. Install them (same torch) with::

    python benchmarks/per_example.py --install-peers

Run (about 5-10 minutes on 2 CPU cores)::

    python benchmarks/per_example.py --threads 1 --rounds 15 --markdown
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from noisescale.estimators import HEAD, SUM_A2
from noisescale.probes.base import Preconditioner, StepContext, resolve_groups
from noisescale.probes.per_example import PerExampleProbe

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from models import CharTransformer, SmallCNN, char_batches, char_data, mlp

HERE = os.path.dirname(os.path.abspath(__file__))
SHAKESPEARE = os.path.join(HERE, "..", "..", "shared", "data", "tinyshakespeare.txt")


def install_peers() -> None:
    """Install the peers into this interpreter, with torch pinned to the installed version."""
    pin = f"torch=={torch.__version__.split('+')[0]}"
    pip = [sys.executable, "-m", "pip", "install"]
    subprocess.check_call(pip + [pin, "opacus", "gns-pytorch==0.1.5", "einops", "unfoldNd"])
    # backpack-for-pytorch declares torchvision, which would pull another torch; it is only used
    # by its examples, so install without dependencies (einops and unfoldNd above).
    subprocess.check_call(pip + ["--no-deps", pin, "backpack-for-pytorch"])


# -- models and batches ------------------------------------------------------------------


def make_cases(names: list[str]) -> list[dict[str, Any]]:
    cases = []
    for name in names:
        if name == "mlp":
            from noisescale.data import load_digits

            X, y, _, _ = load_digits()
            g = torch.Generator().manual_seed(0)
            idx = torch.randint(0, len(y), (256,), generator=g)
            cases.append(
                dict(
                    name="MLP 64-512-512-10, B=256 (digits)",
                    model=mlp(64, 512, 10, depth=2),
                    x=X[idx],
                    y=y[idx],
                    loss="ce",
                )
            )
        elif name == "cnn":
            g = torch.Generator().manual_seed(0)
            cases.append(
                dict(
                    name="CNN conv32-GN-conv64-GN, 32x32x3, B=64",
                    model=SmallCNN(inplace=False),
                    x=torch.randn(64, 3, 32, 32, generator=g),
                    y=torch.randint(0, 10, (64,), generator=g),
                    loss="ce",
                )
            )
        elif name.startswith("tf"):  # tf<T> or tf<T>d<width>
            T, _, d = name[2:].partition("d")
            T, d = int(T), int(d or 128)
            data, vocab = char_data(SHAKESPEARE)
            ((x, y),) = char_batches(data, 16, T, 1, seed=0)
            cases.append(
                dict(
                    name=f"char transformer d={d} L=2, B=16, T={T}",
                    model=CharTransformer(len(vocab), d=d, heads=4, layers=2, block=max(256, T)),
                    x=x,
                    y=y,
                    loss="lm",
                )
            )
        else:
            raise SystemExit(f"unknown model {name!r}")
    return cases


def loss_fn(kind: str, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean over examples; for the LM the token-mean (equal lengths, so also the mean of per-sequence means)."""
    if kind == "ce":
        return F.cross_entropy(out, y, reduction=reduction)
    if reduction == "none":  # per-sequence token-mean
        return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


# -- methods: each returns step() -> sum over examples of squared per-example norms (or None) ----


def m_plain(model, case):
    def step():
        model.zero_grad(set_to_none=True)
        loss_fn(case["loss"], model(case["x"]), case["y"]).backward()
        return None

    return step


def sum_per_example(probe: PerExampleProbe, B: int) -> float:
    """One step's ``sum_i |grad l_i|^2`` (summed over the probe's groups) from ``probe.collect``."""
    st = probe.collect(StepContext(None))
    if st.reason is not None:
        raise RuntimeError(f"step not measurable: {st.reason}")
    v, G = st.read(), st.n_groups
    # sum_g sq_parts[g] / sum_a2 = mean_i |G_i|^2 (per-example gradients of the mean loss, G_i = B v_i)
    # -> sum_i |grad l_i|^2
    return float(v[HEAD : HEAD + G].sum() / v[SUM_A2]) * B


def m_noisescale(fused: bool, groups: Any = None, optimizer: str | None = None, layers: Any = None):
    """The per-example probe (``optimizer``: train with AdamW; ``"precondition"``: also weight by it;
    ``layers``: the probe's ``layers=``)."""

    def build(model, case):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if optimizer else None
        pre = Preconditioner(opt, params) if optimizer == "precondition" else None
        grp = resolve_groups(model, params, groups) if groups is not None else None
        probe = PerExampleProbe(model, fused=fused, groups=grp, preconditioner=pre, layers=layers)
        if layers is not None:  # a subset of the parameters: its norms are not comparable with the others
            NOTES[f"noisescale layers={layers}"] = f"{probe.coverage.fraction:.1%} of parameters (layers={layers})"
        B = case["x"].shape[0]

        def step():
            model.zero_grad(set_to_none=True)
            loss_fn(case["loss"], model(case["x"]), case["y"]).backward()
            value = sum_per_example(probe, B)
            if opt is not None:
                opt.step()
            return value if pre is None else None  # preconditioned norms: not comparable with the others

        return step

    return build


def m_plain_adamw(model, case):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        model.zero_grad(set_to_none=True)
        loss_fn(case["loss"], model(case["x"]), case["y"]).backward()
        opt.step()
        return None

    return step


def m_vmap(model, case):
    from torch.func import functional_call, grad, vmap

    names = [n for n, p in model.named_parameters()]

    def one(params, x, y):
        out = functional_call(model, params, (x.unsqueeze(0),))
        return loss_fn(case["loss"], out, y.unsqueeze(0))

    per = vmap(grad(one), in_dims=(None, 0, 0))

    def step():
        model.zero_grad(set_to_none=True)
        params = {n: p.detach() for n, p in model.named_parameters()}
        g = per(params, case["x"], case["y"])
        s = sum(g[n].reshape(g[n].shape[0], -1).pow(2).sum(1) for n in names).sum()
        loss_fn(case["loss"], model(case["x"]), case["y"]).backward()
        return float(s)

    return step


def m_backpack(model, case):
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    model = extend(model)

    def step():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(case["loss"], model(case["x"]), case["y"])
        with backpack(BatchL2Grad()):
            loss.backward()
        missing = [n for n, p in model.named_parameters() if not hasattr(p, "batch_l2")]
        if missing:  # layer types BatchL2Grad does not support: no value to compare
            NOTES["BackPACK BatchL2Grad"] = (
                f"partial: no per-example norms for {len(missing)} of "
                f"{len(list(model.parameters()))} parameter tensors (e.g. {missing[0]})"
            )
            return None
        B = case["x"].shape[0]
        # BackPACK returns |g_i / B|^2 for a mean loss
        return float(sum(p.batch_l2.sum() for p in model.parameters())) * B * B

    return step


def m_opacus(model, case):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(
        model, batch_first=True, loss_reduction="mean", use_ghost_clipping=True, max_grad_norm=1.0
    )

    def step():
        gsm.zero_grad(set_to_none=True)
        loss_fn(case["loss"], gsm(case["x"]), case["y"]).backward()
        return float(gsm.get_norm_sample().pow(2).sum())

    return step


def m_gns_pytorch(model, case):
    import random

    from gns_pytorch import compute_gns

    random.seed(0)

    def step():
        model.zero_grad(set_to_none=True)
        per = loss_fn(case["loss"], model(case["x"]), case["y"], reduction="none")
        compute_gns(per, model)  # a random subset of parameter tensors and of the batch
        per.mean().backward()
        return None

    return step


NOTES: dict[str, str] = {}

METHODS: list[tuple[str, Callable]] = [
    ("plain", m_plain),
    ("noisescale", m_noisescale(False)),
    ("noisescale fused", m_noisescale(True)),
    ("vmap(grad)", m_vmap),
    ("BackPACK BatchL2Grad", m_backpack),
    ("Opacus ghost (1 bwd)", m_opacus),
    ("gns-pytorch 0.1.5", m_gns_pytorch),
    ("noisescale layers=norm", m_noisescale(False, layers="norm")),
    ("noisescale groups=layers", m_noisescale(False, groups="layers")),
    ("plain AdamW", m_plain_adamw),
    ("noisescale AdamW", m_noisescale(False, optimizer="adamw")),
    ("noisescale preconditioner", m_noisescale(False, optimizer="precondition")),
]
# rows timed against "plain AdamW" instead of "plain" (they train with AdamW), in a table of their own
ADAMW_ROWS = ("plain AdamW", "noisescale AdamW", "noisescale preconditioner")


def peak_bytes(step: Callable[[], Any]) -> int:
    """Peak of CPU tensor bytes allocated (and not yet freed) during ``step()``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    # largest rise of the live bytes over the step (frees of memory allocated before it, such as
    # the previous step's gradients released by zero_grad, must not lower the baseline)
    cur = low = peak = 0
    for e in events:
        cur += e.nbytes()
        low = min(low, cur)
        peak = max(peak, cur - low)
    return peak


def run_case(case: dict[str, Any], rounds: int, warmup: int) -> dict[str, dict[str, Any]]:
    NOTES.clear()
    steps: dict[str, Callable] = {}
    res: dict[str, dict[str, Any]] = {}
    for name, build in METHODS:
        try:
            steps[name] = build(copy.deepcopy(case["model"]), case)
            for _ in range(warmup):
                v = steps[name]()
            res[name] = {"value": v}
        except Exception as e:  # a peer that cannot be installed or does not run: say so
            steps.pop(name, None)
            msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
            res[name] = {"error": msg[:160]}
    times: dict[str, list[float]] = {n: [] for n in steps}
    order = list(steps)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)  # no method always runs right after another (cache, allocator effects)
        for n in order:
            t = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - t)

    def base(n: str) -> str:
        return "plain AdamW" if n in ADAMW_ROWS and "plain AdamW" in steps else "plain"

    for n in steps:
        base_t = times[base(n)]
        res[n]["time_ms"] = statistics.median(times[n]) * 1e3
        res[n]["ratio"] = statistics.median(t / b for t, b in zip(times[n], base_t))
        res[n]["ratio_min"] = min(times[n]) / min(base_t)  # best of N: least disturbed by other load
        if base(n) != "plain":
            res[n]["ratio_plain"] = statistics.median(t / b for t, b in zip(times[n], times["plain"]))
    base_mem = {b: peak_bytes(steps[b]) for b in {base(n) for n in steps}}
    for n, st in steps.items():
        res[n]["mem"] = peak_bytes(st) / base_mem[base(n)]
    ref = res.get("noisescale", {}).get("value")
    for n in steps:
        v = res[n].get("value")
        if v is not None and ref:
            res[n]["agree"] = abs(v - ref) / abs(ref)
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--models",
        default="mlp,cnn,tf64,tf256",
        help="comma-separated: mlp, cnn, tf<T> (d=128) or tf<T>d<width>, e.g. tf64d512",
    )
    ap.add_argument(
        "--methods", default=None, help="comma-separated subset of the methods (default: all); plain always runs"
    )
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    ap.add_argument("--install-peers", action="store_true", help="pip-install the peers, then exit")
    a = ap.parse_args(argv)
    if a.install_peers:
        install_peers()
        return
    warnings.simplefilter("ignore")
    torch.set_num_threads(a.threads)
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for _mod, dist in (("opacus", "opacus"), ("backpack", "backpack-for-pytorch"), ("gns_pytorch", "gns-pytorch")):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:
            versions[dist] = "not installed"
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads={a.threads}, "
        f"rounds={a.rounds}; " + ", ".join(f"{k} {v}" for k, v in versions.items())
    )
    if a.methods:
        keep = {"plain"} | {m.strip() for m in a.methods.split(",")}
        unknown = keep - {n for n, _ in METHODS}
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {[n for n, _ in METHODS]}")
        if keep & set(ADAMW_ROWS):
            keep.add("plain AdamW")  # their reference
        METHODS[:] = [(n, b) for n, b in METHODS if n in keep]
    for case in make_cases(a.models.split(",")):
        res = run_case(case, a.rounds, a.warmup)
        for adamw in (False, True):
            names = [n for n, _ in METHODS if (n in ADAMW_ROWS) == adamw]
            if adamw and not names:
                continue
            if a.markdown:
                if not adamw:
                    print(f"\n**{case['name']}** (plain step {res['plain']['time_ms']:.1f} ms, threads={a.threads})\n")
                    print(
                        "| method | time ratio (median) | time ratio (best of N) | peak memory ratio | "
                        "per-example norms vs noisescale |"
                    )
                    print("|---|---|---|---|---|")
                else:
                    r0 = res["plain AdamW"]
                    print(
                        f"\nWith an AdamW step (preconditioner=), against plain AdamW "
                        f"({r0.get('time_ms', float('nan')):.1f} ms, threads={a.threads}):\n"
                    )
                    print(
                        "| method | time ratio (median) | time ratio (best of N) | peak memory ratio | "
                        "vs plain (no optimizer step) |"
                    )
                    print("|---|---|---|---|---|")
            else:
                print(f"\n{case['name']}" if not adamw else "  -- with AdamW, ratios to plain AdamW:")
            for n in names:
                r = res[n]
                if "error" in r:
                    cells = ("did not run", "-", "-", r["error"])
                elif adamw:
                    cells = (
                        f"{r['ratio']:.2f}x",
                        f"{r['ratio_min']:.2f}x",
                        f"{r['mem']:.2f}x",
                        f"{r['ratio_plain']:.2f}x" if "ratio_plain" in r else "-",
                    )
                else:
                    ag = r.get("agree")
                    cells = (
                        f"{r['ratio']:.2f}x",
                        f"{r['ratio_min']:.2f}x",
                        f"{r['mem']:.2f}x",
                        NOTES.get(n)
                        or ("-" if ag is None else ("reference" if n == "noisescale" else f"rel. diff {ag:.1e}")),
                    )
                print(f"| {n} | " + " | ".join(cells) + " |" if a.markdown else f"  {n:26s} " + "  ".join(cells))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
