"""Problems shared by the trainer-integration tests, and their multi-process (gloo) workers.

Everything is deterministic from a seed: a teacher-labelled classification problem (a real signal, so
``B_simple`` is defined after a few steps), a small MLP, and the plain-loop reference that each
integration must equal. Workers run as ``python tests/integration_workers.py SCENARIO CFG_JSON OUT``
with the torchrun environment variables set by the test (RANK, WORLD_SIZE, MASTER_ADDR, ...).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

D_IN, D_OUT = 16, 4


def problem(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples labelled by a fixed random teacher with 20% of the labels resampled (noise)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(D_IN, D_OUT, generator=g)
    X = torch.randn(n, D_IN, generator=g)
    y = (X @ teacher).argmax(1)
    flip = torch.rand(n, generator=g) < 0.2
    y[flip] = torch.randint(0, D_OUT, (int(flip.sum()),), generator=g)
    return X, y


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, 32), nn.Tanh(), nn.Linear(32, D_OUT))


def plain_loop(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    k: int,
    *,
    lr: float = 0.1,
    clip: float | None = None,
    gns: Any = None,
    ddp: Any = None,
) -> None:
    """The hand-written loop each trainer must equal: ``k`` micro-batches of mean loss ``/ k`` per step,
    clipping, SGD. ``batches`` in order; under DDP (``ddp`` the wrapper) all but the last pass in no_sync."""
    net = ddp if ddp is not None else model
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for s in range(len(batches) // k):
        for j in range(k):
            x, y = batches[s * k + j]
            ctx = ddp.no_sync() if ddp is not None and j < k - 1 else _Null()
            with ctx:
                (F.cross_entropy(net(x), y) / k).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if gns is not None:
            gns.step()
        opt.step()
        opt.zero_grad(set_to_none=True)


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# -- launching workers: the torchrun environment, set by hand -------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(tmp_path: Path, scenario: str, cfg: dict, world: int = 2, timeout: float = 240) -> list[dict]:
    port = _free_port()
    procs = []
    out = tmp_path / scenario
    for rank in range(world):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            NODE_RANK="0",
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(Path(__file__)), scenario, json.dumps(cfg), str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for rank in range(world):
        path = Path(f"{out}.{rank}.pt")
        assert path.exists(), f"rank {rank} left no result:\n{logs[rank][-3000:]}"
        res = torch.load(path, weights_only=False)
        assert "error" not in res, res.get("error")
        results.append(res)
    return results


# -- Lightning ----------------------------------------------------------------------------


def lightning_module(seed: int = 0, lr: float = 0.1, call_forward: bool = False) -> Any:
    import lightning.pytorch as pl

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(seed)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            # self(x) runs the module's forward (and its hooks); self.net(x) does not
            return F.cross_entropy(self(x) if call_forward else self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=lr)

    return Classifier()


def lightning_trainer(callbacks: list, **kw: Any) -> Any:
    import lightning.pytorch as pl

    opts: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    opts.update(kw)
    return pl.Trainer(callbacks=callbacks, **opts)


def loader(X: torch.Tensor, y: torch.Tensor, batch: int, sampler: Any = None) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=batch, sampler=sampler)


def lightning_ddp(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Lightning's DDP strategy (processes created by the test, gloo) with and without the callback, and
    the plain DDP loop with a tracker on the same per-rank batches."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data.distributed import DistributedSampler

    from noisescale import GradientNoiseScale
    from noisescale.integrations.lightning import NoiseScaleCallback

    k, m, steps = cfg["k"], cfg["m"], cfg["steps"]
    X, y = problem(world * k * m * steps, seed=cfg["seed"])
    out: dict[str, Any] = {}
    for with_cb in (False, True):
        cb = NoiseScaleCallback(method="ddp", log_every_n_steps=0) if with_cb else None
        module = lightning_module(cfg["seed"])
        trainer = lightning_trainer(
            [cb] if cb else [],
            strategy="ddp",
            devices=world,
            max_steps=steps,
            accumulate_grad_batches=k,
            gradient_clip_val=cfg["clip"],
            use_distributed_sampler=False,
        )
        trainer.fit(module, loader(X, y, m, DistributedSampler(range(len(y)), world, rank, shuffle=False)))
        out["params_cb" if with_cb else "params"] = params_of(module.net)
        if cb is not None:
            assert cb.gns is not None
            out["b_simple"] = cb.gns.b_simple
            out["method"] = cb.gns.method
            out["history"] = [r.get("g2_step") for r in cb.gns.history]
    assert dist.is_initialized()
    net = mlp(cfg["seed"])
    ddp = DDP(net)
    gns = GradientNoiseScale(ddp, method="ddp")
    idx = list(DistributedSampler(range(len(y)), world, rank, shuffle=False))
    batches = [(X[idx[i : i + m]], y[idx[i : i + m]]) for i in range(0, len(idx), m)]
    plain_loop(net, batches, k, clip=cfg["clip"], gns=gns, ddp=ddp)
    gns.synchronize()  # every rank: the steps since the last multiple of reduce_every
    out["plain_b_simple"] = gns.b_simple
    out["plain_history"] = [r.get("g2_step") for r in gns.history]
    out["plain_params"] = params_of(net)
    gns.close()
    return out


# -- Hugging Face ---------------------------------------------------------------------------

VOCAB, SEQ = 32, 8


def tiny_gpt2(seed: int = 0) -> Any:
    """A 1-layer GPT-2 built from a config (nothing downloaded), without dropout (deterministic), initialised
    wide enough that its gradient norm is above 1 (so that max_grad_norm=1.0 clips)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=0.5,
        bos_token_id=0,
        eos_token_id=0,
        loss_type="ForCausalLM",
    )
    return GPT2LMHeadModel(cfg)


class TokenData(torch.utils.data.Dataset):
    """Sequences from a fixed random bigram chain (learnable), labels = inputs (the model shifts them)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        trans = torch.softmax(3 * torch.randn(VOCAB, VOCAB, generator=g), 1)
        ids = torch.empty(n, SEQ, dtype=torch.long)
        ids[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
        for t in range(1, SEQ):
            ids[:, t] = torch.multinomial(trans[ids[:, t - 1]], 1, generator=g).squeeze(1)
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def hf_trainer(model: Any, out_dir: str, ds: Any, callbacks: list | None = None, lr: float = 0.05, **args: Any) -> Any:
    """A Trainer on the CPU with plain SGD at a constant learning rate (the plain loop can replay it)."""
    from transformers import Trainer, TrainingArguments

    opts: dict[str, Any] = dict(
        output_dir=out_dir,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=3,
        max_steps=8,
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    opts.update(args)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return Trainer(
        model=model, args=TrainingArguments(**opts), train_dataset=ds, callbacks=callbacks, optimizers=(opt, None)
    )


# -- Accelerate ------------------------------------------------------------------------------


def accelerate_loop(
    accelerator: Any,
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    lr: float = 0.1,
    clip: float | None = None,
    helper_opts: dict[str, Any] | None = None,
    ns_acc: Any = None,
    prepared: Any = None,
) -> Any:
    """The documented ``accelerator.accumulate`` loop over ``batches`` (micro-batches, in order), with an
    ``AcceleratedNoiseScale`` when ``helper_opts`` is given (or ``ns_acc``, already built). ``prepared``:
    the optimizer when ``model`` is already prepared (a resumed run)."""
    from noisescale.integrations.accelerate import AcceleratedNoiseScale

    if prepared is None:
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        model, opt = accelerator.prepare(model, opt)
    else:
        opt = prepared
    if helper_opts is not None:
        ns_acc = AcceleratedNoiseScale(accelerator, model, opt, **helper_opts)
    for x, y in batches:
        with accelerator.accumulate(model):
            accelerator.backward(F.cross_entropy(model(x), y))
            if clip is not None and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), clip)
            if ns_acc is not None:
                ns_acc.step()
            opt.step()
            opt.zero_grad()
    return ns_acc


def accelerate_ddp(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Accelerate on 2 gloo processes: the helper against the plain DDP loop with a tracker, and inertness."""
    from accelerate import Accelerator
    from torch.nn.parallel import DistributedDataParallel as DDP

    from noisescale import GradientNoiseScale

    k, m, steps = cfg["k"], cfg["m"], cfg["steps"]
    X, y = problem(world * k * m * steps, seed=cfg["seed"])
    mine = list(range(rank, len(y), world))  # this rank's examples
    batches = [(X[mine[i : i + m]], y[mine[i : i + m]]) for i in range(0, len(mine), m)]
    out: dict[str, Any] = {}
    accelerator = Accelerator(gradient_accumulation_steps=k, cpu=True)
    assert accelerator.num_processes == world
    for with_helper in (False, True):
        net = mlp(cfg["seed"])
        ns_acc = accelerate_loop(
            accelerator, net, batches, clip=cfg["clip"], helper_opts={"method": "ddp"} if with_helper else None
        )
        out["params_helper" if with_helper else "params"] = params_of(net)
        if ns_acc is not None:
            ns_acc.gns.synchronize()  # every rank
            out["b_simple"] = ns_acc.gns.b_simple
            out["method"] = ns_acc.gns.method
            out["history"] = [r.get("g2_step") for r in ns_acc.gns.history]
            ns_acc.close()
    net = mlp(cfg["seed"])
    ddp = DDP(net)
    gns = GradientNoiseScale(ddp, method="ddp")
    plain_loop(net, batches, k, clip=cfg["clip"], gns=gns, ddp=ddp)
    gns.synchronize()  # every rank: the steps since the last multiple of reduce_every
    out["plain_b_simple"] = gns.b_simple
    out["plain_history"] = [r.get("g2_step") for r in gns.history]
    out["plain_params"] = params_of(net)
    gns.close()
    return out


def hf_ddp(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """The HF Trainer under a 2-process launch (gloo): with and without the callback, and a replay of this
    rank's exact inputs in a plain DDP loop with a tracker."""
    import tempfile

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from noisescale import GradientNoiseScale
    from noisescale.integrations.transformers import NoiseScaleCallback

    out: dict[str, Any] = {}
    k = 3
    for with_cb in (False, True):
        model = tiny_gpt2()
        calls: list[dict[str, Any]] = []

        def hook(module: Any, args: Any, kwargs: Any, calls: list = calls) -> None:
            if torch.is_grad_enabled():
                calls.append({n: (v.clone() if isinstance(v, torch.Tensor) else v) for n, v in kwargs.items()})

        h = model.register_forward_pre_hook(hook, with_kwargs=True)
        init = [p.detach().clone() for p in model.parameters()]
        trainer = hf_trainer(model, tempfile.mkdtemp(), TokenData(256), max_steps=cfg["steps"])
        cb = NoiseScaleCallback(trainer, method="ddp") if with_cb else None
        trainer.train()
        h.remove()
        out["params_cb" if with_cb else "params"] = params_of(model)
        if cb is not None:
            assert cb.gns is not None
            out["b_simple"], out["method"] = cb.gns.b_simple, cb.gns.method
    assert dist.is_initialized() and dist.get_world_size() == world
    model = tiny_gpt2()
    with torch.no_grad():
        for p, q in zip(model.parameters(), init):
            p.copy_(q)
    ddp = DDP(model)
    gns = GradientNoiseScale(ddp, method="ddp", reduction="sum")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for s in range(len(calls) // k):
        for j, kw in enumerate(calls[s * k : (s + 1) * k]):
            with ddp.no_sync() if j < k - 1 else _Null():
                loss = ddp(**kw).loss
                # the trainer's scaling: items counted over all ranks, so the loss is multiplied back by the world
                loss = loss * world if kw.get("num_items_in_batch") is not None else loss / k
                loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        gns.step()
        opt.step()
        model.zero_grad()
    gns.synchronize()
    out["plain_b_simple"] = gns.b_simple
    out["plain_params"] = params_of(model)
    gns.close()
    return out


SCENARIOS = {"lightning_ddp": lightning_ddp, "accelerate_ddp": accelerate_ddp, "hf_ddp": hf_ddp}


def main() -> None:
    scenario, cfg_json, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        result = SCENARIOS[scenario](rank, world, json.loads(cfg_json))
    except BaseException:
        torch.save({"error": traceback.format_exc()}, f"{out_path}.{rank}.pt")
        sys.stdout.flush()
        os._exit(3)
    torch.save(result, f"{out_path}.{rank}.pt")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter finalization (process groups torn down by the OS)


if __name__ == "__main__":
    main()
