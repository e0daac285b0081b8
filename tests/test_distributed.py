"""Distributed probe on real 2-process gloo groups (DDP, DDP + accumulation, FSDP2, FSDP1).

Each test spawns processes (``torch.multiprocessing``, spawn start method) that run a scenario
from ``dist_workers.py`` and save their results; the checks run here, against a single-process
recomputation on the same data split. Every spawn has a deadline: a hang fails the test.
"""

from __future__ import annotations

import math
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import noisescale as ns
from noisescale.ema import NoiseScaleEMA
from noisescale.estimators import estimate

sys.path.insert(0, os.path.dirname(__file__))
import dist_workers as W
from helpers import pooled

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
SPAWN_TIMEOUT = 150.0


def spawn(tmp_path, scenario: str, cfg: dict, world: int = WORLD, timeout: float = SPAWN_TIMEOUT) -> list:
    """Run ``scenario`` on ``world`` gloo processes; return each rank's result (fails on error or hang)."""
    out = tmp_path / scenario
    out.mkdir(exist_ok=True)
    digits = tmp_path / "digits.pt"
    if not digits.exists():
        torch.save(W.data(), digits)
    os.environ["NOISESCALE_TEST_DIGITS"] = str(digits)
    init = out / "init"
    ctx = mp.start_processes(
        W.entry, args=(world, str(init), str(out), scenario, cfg), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    crash = None
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"distributed scenario {scenario!r} did not finish in {timeout:.0f} s (hang?)")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        crash = e
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = []
    for r in range(world):
        f = out / f"{scenario}.{r}.pt"
        results.append(torch.load(f, weights_only=False) if f.exists() else {"error": f"no result ({crash})"})
    for r, res in enumerate(results):
        if isinstance(res, dict) and "error" in res:
            pytest.fail(f"rank {r} of {scenario!r} raised:\n{res['error']}")
    if crash is not None:
        pytest.fail(f"{scenario!r}: {crash}")
    return results


def _items(results: list, i: int) -> list[dict]:
    per_rank = [res[i] for res in results]
    for r, res in enumerate(per_rank):
        if "error" in res:
            pytest.fail(f"rank {r} raised:\n{res['error']}")
    return per_rank


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def replay_b_simple(history: list[dict]) -> float | None:
    """The single-process estimator (estimate + EMA, beta=1) fed the numbers the probe measured."""
    ema = NoiseScaleEMA(1.0)
    for h in history:
        if h["status"] == "measured":
            ema.update(*estimate(h["sq_small"], h["b_small"], h["sq_big"], h["b_big"]))
    return ema.b_simple


def check_against_reference(per_rank: list[dict], cfg: dict) -> None:
    ref = W.reference(cfg)
    world = cfg["world"]
    h0 = per_rank[0]["history"]
    assert len(h0) == cfg["steps"]
    for res in per_rank:
        assert res["method"] in ("ddp", "fsdp", "ddp_per_example")
        assert res["history"] == h0, "ranks disagree on the reduced statistics"
        assert res["b_simple"] == per_rank[0]["b_simple"], "ranks report different b_simple"
        assert res["state"]["ema"] == per_rank[0]["state"]["ema"]
        assert res["state"]["counters"] == per_rank[0]["state"]["counters"]
        # examples: the sum over ranks of their own (possibly unequal) batches, on every rank
        assert res["state"]["counters"]["examples"] == cfg["steps"] * sum(map(sum, cfg["sizes"]))
    for h, r in zip(h0, ref):
        # local (sum over every rank and micro-batch) and global squared norms vs one process
        assert rel(h["sq_parts"] * world**2, sum(r["parts"])) < 1e-5  # parts enter V at 1/world
        assert rel(h["sq_big"], r["big"]) < 1e-5
        assert h["parts"] == len(r["parts"]) and h["ranks"] == world
        # effective sizes from the pooling weights (mean across ranks)
        a2 = sum(a * a for a in r["alphas"])
        a2b = sum(a * a / b for a, b in zip(r["alphas"], r["sizes"]))
        assert rel(h["b_small"], a2 / a2b) < 1e-12
        assert rel(h["b_big"], world * world / a2b) < 1e-12
        assert rel(h["sq_small"], sum(r["parts"]) / a2) < 1e-5
        if (
            cfg.get("reduction", "mean") == "mean"
            and len({len(s) for s in cfg["sizes"]}) == 1
            and cfg.get("method") != "ddp_per_example"
        ):
            # equal weights per part: the generic pooled estimator applies directly
            m = pooled([p / world**2 for p in r["parts"]], r["sizes"], r["big"], reduction="mean")
            assert rel(h["b_small"], m.b_small) < 1e-9 and rel(h["b_big"], m.b_big) < 1e-9
            assert rel(h["sq_small"], m.sq_small) < 1e-5
    # b_simple is exactly the single-process estimator fed the same numbers
    assert per_rank[0]["b_simple"] == replay_b_simple(h0)
    # ... and close to the estimator fed the single-process numbers
    ema = NoiseScaleEMA(1.0)
    for r in ref:
        a2 = sum(a * a for a in r["alphas"])
        a2b = sum(a * a / b for a, b in zip(r["alphas"], r["sizes"]))
        ema.update(*estimate(sum(r["parts"]) / a2, a2 / a2b, r["big"], world * world / a2b))
    assert math.isclose(per_rank[0]["trace_sigma"], ema.trace_sigma, rel_tol=1e-4)
    assert math.isclose(per_rank[0]["g2"], ema.g2, rel_tol=1e-4, abs_tol=1e-5)
    if ema.b_simple is not None and ema.b_simple > 0:
        assert rel(per_rank[0]["b_simple"], ema.b_simple) < 1e-3


DDP_CASES = {
    "plain": dict(sizes=[[8], [8]]),
    "accumulation": dict(sizes=[[4, 4, 4], [4, 4, 4]]),
    "unequal_sizes": dict(sizes=[[6, 6], [10, 10]]),
    "unequal_sum": dict(sizes=[[3, 5], [10, 6]], reduction="sum"),
    "unequal_parts": dict(sizes=[[4, 4, 4], [12]], reduction="sum"),
    "bucket_view": dict(sizes=[[4, 4], [4, 4]], ddp=dict(gradient_as_bucket_view=True)),
    "find_unused": dict(sizes=[[8], [8]], unused=True, ddp=dict(find_unused_parameters=True)),
    # static_graph + no_sync fails in plain DDP too (torch 2.13 reducer assert), so no accumulation here
    "static_graph": dict(sizes=[[8], [8]], ddp=dict(static_graph=True)),
    "explicit_method": dict(sizes=[[8], [8]], method="ddp", max_pending=2),
    "explicit_group": dict(sizes=[[4, 4], [4, 4]], method="ddp", own_group=True),
}


def _cfg(name: str, case: dict, seed: int) -> dict:
    return dict(case, seed=seed, world=WORLD, steps=4)


def _check_cases(results, cfgs, method=None):
    """Each case's per-rank results against the single-process reference, naming the failing case."""
    for i, (name, cfg) in enumerate(cfgs.items()):
        per_rank = _items(results, i)
        try:
            if method is not None:
                assert per_rank[0]["method"] == method, per_rank[0]["method"]
            check_against_reference(per_rank, cfg)
        except AssertionError as e:
            raise AssertionError(f"case {name!r}: {e}") from e


def test_ddp_norms_match_single_process(tmp_path):
    """DDP with/without no_sync accumulation, unequal sizes, bucket views, unused params, static graph."""
    cfgs = {name: _cfg(name, case, seed) for seed, (name, case) in enumerate(DDP_CASES.items())}
    results = spawn(tmp_path, "many", {"items": [("ddp_exact", c) for c in cfgs.values()]})
    _check_cases(results, cfgs)


def test_ddp_per_example_composition(tmp_path):
    """method='ddp_per_example': every rank's per-example norms pooled with the global norm."""
    if "per_example" not in _probes():
        pytest.skip("the per-example probe is not available")
    cases = {
        "per_example": dict(sizes=[[8], [8]]),
        "per_example_accumulation_unequal": dict(sizes=[[4, 4], [6, 6]]),
        "per_example_sum": dict(sizes=[[5, 3], [8]], reduction="sum"),
    }
    cfgs = {
        n: dict(c, seed=30 + i, world=WORLD, steps=3, method="ddp_per_example")
        for i, (n, c) in enumerate(cases.items())
    }
    results = spawn(tmp_path, "many", {"items": [("ddp_exact", c) for c in cfgs.values()]})
    _check_cases(results, cfgs, method="ddp_per_example")


def test_fsdp_norms_match_single_process(tmp_path):
    """FSDP2 (fully_shard) and FSDP1: local unsharded norm before the reduce-scatter, global from shards."""
    cases = {
        "fsdp2": dict(kind="fsdp2", sizes=[[8], [8]]),
        "fsdp2_accumulation_sync_each": dict(kind="fsdp2", sizes=[[4, 4], [4, 4]]),
        "fsdp2_unequal": dict(kind="fsdp2", sizes=[[6], [10]]),
        "fsdp1": dict(kind="fsdp1", sizes=[[8], [8]]),
        "fsdp1_flat_params": dict(kind="fsdp1", sizes=[[4, 4], [4, 4]], use_orig_params=False),
    }
    cfgs = {n: dict(c, seed=20 + i, world=WORLD, steps=3) for i, (n, c) in enumerate(cases.items())}
    results = spawn(tmp_path, "many", {"items": [("fsdp_exact", c) for c in cfgs.values()]})
    _check_cases(results, cfgs)


def test_fsdp_no_sync_accumulation(tmp_path):
    """Under no_sync / set_requires_gradient_sync(False) the local part is the rank's whole step."""
    cases = [
        dict(kind="fsdp2", sizes=[[4, 4], [4, 4]], no_sync=True),
        dict(kind="fsdp1", sizes=[[4, 4], [4, 4]], no_sync=True),
    ]
    cfgs = [dict(c, seed=40 + i, world=WORLD, steps=3) for i, c in enumerate(cases)]
    results = spawn(tmp_path, "many", {"items": [("fsdp_exact", c) for c in cfgs]})
    for i, cfg in enumerate(cfgs):
        per_rank = _items(results, i)
        ref = W.reference(cfg)
        for h, r in zip(per_rank[0]["history"], ref):
            local = [float(g.square().sum()) for g in r["rank_grads"]]  # accumulated per rank
            assert h["parts"] == WORLD
            assert rel(h["sq_parts"] * WORLD**2, sum(local)) < 1e-5, cfg["kind"]  # parts enter V at 1/world
            assert rel(h["sq_big"], r["big"]) < 1e-5
            assert h["b_small"] == 8.0 and h["b_big"] == 16.0
        assert per_rank[0]["b_simple"] == per_rank[1]["b_simple"] == replay_b_simple(per_rank[0]["history"])


def _brute_force(
    seed: int,
    groups: dict[str, list[str]] | None = None,
    params: dict | None = None,
    weights: dict | None = None,
    standardized: bool = False,
) -> dict[str, tuple[float, float]]:
    """Brute force: per-example gradients of the whole data set (torch.func), ``{group: (g2, trace_sigma)}``.

    ``groups``: ``{name: [parameter names of Net]}`` (default: one group ``"all"``), each restricted to
    its parameters' elements; ``params``: the parameters to use (default: Net's initial ones);
    ``weights``: ``{parameter name: P}`` multiplies every per-example gradient elementwise (the
    preconditioner). ``"<total>"``: the sums over groups. Batches are drawn with replacement from
    the data set, so the truth is its population statistics.
    """
    from torch.func import functional_call, grad, vmap

    model = W.Net(16, seed=seed)
    if params is not None:
        model.load_state_dict(params)
    X, y = W.std_data() if standardized else W.data()
    ps = {k: v.detach() for k, v in model.named_parameters()}

    def loss1(p, x, t):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x[None],)), t[None])

    per = vmap(grad(loss1), in_dims=(None, 0, 0))(ps, X, y)
    out = {}
    for name, names in (groups or {"all": list(ps)}).items():
        flat = torch.cat([(per[k] * (weights[k] if weights else 1.0)).reshape(len(y), -1).double() for k in names], 1)
        G = flat.mean(0)
        out[name] = (float(G.square().sum()), float((flat - G).square().sum(1).mean()))  # population covariance
    out["<total>"] = (sum(v[0] for v in out.values()), sum(v[1] for v in out.values()))
    return out


def _exact_b_simple(seed: int) -> float:
    """Brute force: per-example gradients of the whole data set (torch.func), tr(Sigma)/|G|^2."""
    g2, ts = _brute_force(seed)["<total>"]
    return ts / g2


def test_ddp_b_simple_close_to_exact(tmp_path):
    """At fixed parameters, 2-process DDP b_simple is within 10% of the brute-force exact value."""
    cfg = dict(seed=7, steps=400, m=16)
    per_rank = spawn(tmp_path, "ddp_brute", cfg)
    exact = _exact_b_simple(7)
    b = per_rank[0]["b_simple"]
    assert per_rank[1]["b_simple"] == b
    assert per_rank[0]["measured"] == cfg["steps"]
    assert rel(b, exact) < 0.10, (b, exact, per_rank[0]["interval"])


# groups="layers" on DDP(Net) names the groups by the wrapper's module names; the dict case splits across layers
LAYERS = {"module.fc1": ["fc1.weight", "fc1.bias"], "module.fc2": ["fc2.weight", "fc2.bias"]}
BY_KIND = {"weight": ["fc1.weight", "fc2.weight"], "bias": ["fc1.bias", "fc2.bias"]}

# Per-rank batches of 128 (b_small 128, b_big 256, above every b_simple here): the 95% intervals of
# every group are within about +-7% after these steps (the small bias group needs more of them).
# The preconditioned cases train 20 AdamW steps first (real updates, the same on both ranks), then
# measure at fixed parameters on standardised inputs (see dist_workers.std_data).
BRUTE_CASES = {
    "layers": dict(seed=60, steps=400, m=128, groups="layers"),
    "dict": dict(seed=61, steps=1000, m=128, groups="kind"),
    "per_example_layers": dict(seed=62, steps=300, m=128, groups="layers", method="ddp_per_example"),
    "adam_update": dict(
        seed=63, steps=400, m=128, groups="layers", standardized=True, adam_steps=20, precondition="update"
    ),
    "adam_curvature": dict(
        seed=64, steps=400, m=128, groups="layers", standardized=True, adam_steps=20, precondition="curvature"
    ),
}


def _check_brute(per_rank: list[dict], cfg: dict) -> dict[str, float]:
    """Per-group and total b_simple within 10% of brute force; groups add up; ranks agree. Returns the errors."""
    r0 = per_rank[0]
    assert r0["method"] == cfg.get("method", "ddp") and r0["measured"] == cfg["steps"]
    for res in per_rank[1:]:  # the same reduced numbers on every rank (and the same state to measure)
        assert res["by_group"] == r0["by_group"], "ranks report different by_group() values"
        assert (res["b_simple"], res["g2"], res["trace_sigma"]) == (r0["b_simple"], r0["g2"], r0["trace_sigma"])
        assert all(torch.equal(res["params"][k], v) for k, v in r0["params"].items())
        assert all(torch.equal(res["P"][k], v) for k, v in r0.get("P", {}).items())
    groups = BY_KIND if cfg["groups"] == "kind" else LAYERS
    P = r0.get("P")
    weights = None if P is None else {k: (v.sqrt() if cfg["precondition"] == "curvature" else v) for k, v in P.items()}
    truth = _brute_force(cfg["seed"], groups, r0["params"], weights, cfg.get("standardized", False))
    est = r0["by_group"]
    assert set(est) == set(groups)
    errors = {name: rel(e["b_simple"], truth[name][1] / truth[name][0]) for name, e in est.items()}
    errors["<total>"] = rel(r0["b_simple"], truth["<total>"][1] / truth["<total>"][0])
    assert max(errors.values()) < 0.10, (errors, est, truth)
    # the groups add up to the total, exactly up to rounding
    assert math.isclose(sum(e["g2"] for e in est.values()), r0["g2"], rel_tol=1e-9)
    assert math.isclose(sum(e["trace_sigma"] for e in est.values()), r0["trace_sigma"], rel_tol=1e-9)
    if P is not None:  # a different number than without P: the test would notice P being ignored
        g2, ts = _brute_force(cfg["seed"], None, r0["params"], None, cfg.get("standardized", False))["all"]
        pre = truth["<total>"][1] / truth["<total>"][0]
        assert abs(pre - ts / g2) > 0.3 * pre, (pre, ts / g2)
    return errors


def test_ddp_per_group_and_preconditioned_b_simple_close_to_exact(tmp_path):
    """2-process DDP at fixed parameters, groups= ("layers", a dict; also ddp_per_example) and preconditioner=
    (AdamW state, update and curvature forms): every group's b_simple within 10% of brute force (per-sample
    gradients of the whole data set restricted to the group, times P), groups adding up to the total, every
    rank reporting the same by_group()."""
    cases = {n: c for n, c in BRUTE_CASES.items() if c.get("method") != "ddp_per_example" or "per_example" in _probes()}
    results = spawn(tmp_path, "many", {"items": [("ddp_brute", c) for c in cases.values()]})
    for i, (name, cfg) in enumerate(cases.items()):
        try:
            errors = _check_brute(_items(results, i), cfg)
        except AssertionError as e:
            raise AssertionError(f"case {name!r}: {e}") from e
        print(name, {k: round(v, 4) for k, v in errors.items()})


CLIP = 1e-6
CLIP_ITEMS = [
    ("clip_survival", dict(kind="ddp", seed=50, steps=4, k=2, clip=CLIP)),
    ("clip_survival", dict(kind="fsdp2", seed=51, steps=4, k=2, clip=CLIP, refusals=True)),
    ("clip_survival", dict(kind="fsdp1", seed=52, steps=4, k=2, clip=CLIP, refusals=True)),
]


@pytest.fixture(scope="module")
def clip_results(tmp_path_factory):
    """One spawn for the clipping runs (DDP with groups, FSDP2, FSDP1) and the FSDP refusals."""
    return spawn(tmp_path_factory.mktemp("clip"), "many", {"items": CLIP_ITEMS})


def test_step_after_clipping_equals_step_before_ddp_fsdp(clip_results):
    """The step gradient's norm is captured when the last backward ends (after DDP's/FSDP's final callbacks):
    gns.step() after clip_grad_norm_(params, 1e-6) records what it records before it, under DDP (no_sync
    accumulation of 2 micro-batches, groups="layers"), FSDP2 and FSDP1 (no_sync accumulation)."""
    keys = ("sq_small", "sq_big", "g2_step", "sq_parts", "sq_total")
    for i, (_, cfg) in enumerate(CLIP_ITEMS):
        per_rank = _items(clip_results, i)
        for r, res in enumerate(per_rank):
            before, after = res[False], res[True]  # gns.step() before / after clipping
            where = f"{cfg['kind']} rank {r}"
            # the same training: clipping comes before opt.step() in both runs
            assert all(torch.equal(a, b) for a, b in zip(before["params"], after["params"])), where
            assert len(before["history"]) == len(after["history"]) == cfg["steps"], where
            for a, b in zip(before["history"], after["history"]):
                assert a["status"] == b["status"] == "measured", (where, a.get("reason"), b.get("reason"))
                assert a["parts"] == b["parts"] == WORLD * (cfg["k"] if cfg["kind"] == "ddp" else 1), where
                for key in keys + tuple(k for k in a if k.startswith("group/")):  # (a group's b_simple may be None)
                    assert a[key] == b[key] or rel(b[key], a[key]) <= 1e-9, (where, a["step"], key, a[key], b[key])
                # the clipped gradient's squared norm is CLIP**2: what was measured is the unclipped one
                assert b["sq_big"] > 1e6 * CLIP**2, (where, b["sq_big"])
            if cfg["kind"] == "ddp":
                assert any(k.startswith("group/module.fc1/") for k in after["history"][-1])
        assert per_rank[1][True]["history"] == per_rank[0][True]["history"], cfg["kind"]


def test_fsdp_refuses_groups_and_preconditioner(clip_results):
    """Under FSDP (FSDP2 and FSDP1) groups= and preconditioner= raise NotImplementedError that says why."""
    for i, (_, cfg) in enumerate(CLIP_ITEMS):
        if not cfg.get("refusals"):
            continue
        for r, res in enumerate(_items(clip_results, i)):
            errors = res["refusals"]
            where = f"{cfg['kind']} rank {r}: {errors}"
            assert errors["groups"] is not None and errors["preconditioner"] is not None, where
            assert "groups=" in errors["groups"] and "FSDP" in errors["groups"], where
            assert "flat buffers" in errors["groups"], where  # the reason: whole FSDP units, not per group
            assert "preconditioner=" in errors["preconditioner"] and "FSDP" in errors["preconditioner"], where
            assert "sharded" in errors["preconditioner"], where  # the reason: the second moment is sharded


def test_inert_ddp_and_fsdp2(tmp_path):
    """Gradients and parameters bit-identical to plain DDP (also bucket views, accumulation) and FSDP2/FSDP1."""
    items = [
        ("ddp_inert", dict(seed=3, steps=4)),
        ("ddp_inert", dict(seed=4, steps=3, k=2, ddp=dict(gradient_as_bucket_view=True))),
        ("fsdp_inert", dict(seed=5, steps=3, kind="fsdp2")),
        ("fsdp_inert", dict(seed=6, steps=3, kind="fsdp1")),
        ("ddp_inert", dict(seed=7, steps=5, k=2, hessian_every=2)),
    ]
    results = spawn(tmp_path, "many", {"items": items})
    for i, (name, cfg) in enumerate(items):
        for r, res in enumerate(_items(results, i)):
            assert res["grads_equal"], f"{name} {cfg}: rank {r} gradients differ with the tracker attached"
            assert res["params_equal"], f"{name} {cfg}: rank {r} parameters differ with the tracker attached"
    # B_noise under DDP (hessian_every=2, the closure through the DDP wrapper): each rank draws its own
    # micro-batches; every rank folds the mean of the ranks' draws, so all agree
    ranks = _items(results, len(items) - 1)
    assert len(ranks[0]["draws"]) == 3 and ranks[0]["draws"] == ranks[1]["draws"]
    assert ranks[0]["b_noise"] == ranks[1]["b_noise"] or ranks[0]["b_noise"] is ranks[1]["b_noise"] is None
    for j, folded in enumerate(ranks[0]["draws"]):
        mean = (ranks[0]["local"][j] + ranks[1]["local"][j]) / 2
        assert folded == pytest.approx(tuple(mean), rel=1e-9)
        assert abs(ranks[0]["local"][j][0] - ranks[1]["local"][j][0]) > 0  # the ranks' draws differ


def test_bad_inputs_consistent_on_all_ranks(tmp_path):
    """Non-finite gradient on one rank; a rank raising in step(); a non-distributed method on DDP."""
    nan_cfg = dict(seed=11, world=WORLD, steps=4, sizes=[[32], [32]], nan_at=(2, 1))
    results = spawn(
        tmp_path,
        "many",
        {"items": [("ddp_exact", nan_cfg), ("ddp_bad", dict(seed=12)), ("ddp_join", dict(seed=13, steps=[5, 3]))]},
    )
    nan_runs = _items(results, 0)
    for res in nan_runs:  # the NaN on rank 1 reaches every rank through the all-reduce: all skip step 2
        assert res["skipped"] == 1 and res["measured"] == 3
        assert res["b_simple"] == nan_runs[0]["b_simple"] and res["state"] == nan_runs[0]["state"]
    assert math.isnan(nan_runs[0]["history"][2]["sq_small"]) and nan_runs[0]["history"][2]["status"] == "skipped"
    bad = _items(results, 1)
    assert len(bad[1]["errors"]) == 1 and "sizes" in bad[1]["errors"][0]
    assert bad[0]["errors"] == []
    # rank 1 raised (its step() is not recorded); rank 0 skipped the same step; no hang; same averages
    assert bad[0]["skipped"] == 1 and bad[0]["measured"] == 3
    assert "raised an error" in bad[0]["last_reason"]  # the real reason, not "non-finite"
    # the rank that raised records the same skipped step: counters agree on every rank
    assert bad[1]["skipped"] == 1 and bad[1]["measured"] == 3
    assert bad[0]["steps"] == bad[1]["steps"] == 4 and bad[0]["examples"] == bad[1]["examples"]
    for res in bad:
        assert res["microbatch_error"] is not None and "method='auto'" in res["microbatch_error"]
    assert bad[0]["b_simple"] == bad[1]["b_simple"]
    join = _items(results, 2)
    # rank 1 ran out after 3 steps; rank 0 measured its last 2 steps alone (1 rank, 1 part: skipped);
    # rank 1 counted the 2 steps it shadowed: the same counters and records on both ranks
    assert join[1]["measured"] == 3 and join[0]["measured"] == 3 and join[0]["skipped"] == 2
    assert join[1]["skipped"] == 2 and join[0]["history"] == join[1]["history"]


def test_ddp_grad_scaler_units(tmp_path):
    """Under a GradScaler the hook norms (scaled by S) and the global norm (after unscale_) are brought to
    the same units: the measurements equal those of the same run without a scaler."""
    per_rank = spawn(tmp_path, "ddp_scaler", dict(seed=17, steps=4))
    for res in per_rank:
        plain, scaled = res[False], res[True]
        assert len(scaled["history"]) == 4 and scaled["skipped"] == 0
        for a, b in zip(plain["history"], scaled["history"]):
            for key in ("sq_small", "sq_big", "b_small", "b_big"):
                assert rel(b[key], a[key]) < 1e-6, (key, a[key], b[key])
        assert rel(scaled["trace_sigma"], plain["trace_sigma"]) < 1e-5
    assert per_rank[0][True]["b_simple"] == per_rank[1][True]["b_simple"]


def test_world_size_one_rejected(tmp_path):
    """A DDP method on a 1-process group is refused with a clear message; auto falls back to microbatch."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init1'}", rank=0, world_size=1)
    try:
        ddp = DDP(W.Net(8))
        with pytest.raises(ValueError, match="world size 1"):
            ns.GradientNoiseScale(ddp, method="ddp")
        with pytest.raises(ValueError, match="world size 1"):
            ns.GradientNoiseScale(ddp, method="ddp_per_example") if "per_example" in _probes() else (
                ns.GradientNoiseScale(ddp, method="ddp")
            )
        gns = ns.GradientNoiseScale(ddp)
        assert gns.method not in ("ddp", "ddp_per_example", "fsdp")  # one process: a single-process probe
        gns.close()
        with pytest.raises(TypeError, match="DistributedDataParallel"):
            ns.GradientNoiseScale(W.Net(8), method="ddp")
    finally:
        dist.destroy_process_group()


def _probes():
    from noisescale.probes import PROBES

    return PROBES


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_global_norm_shares_cover_every_element_once(world):
    """The ranks' slices of the synchronized gradient partition it exactly, for any world size,
    with exactly one owner of each tensor's element 0 (it takes unsliceable gradients whole)."""
    from noisescale.probes.distributed import _share

    params = [torch.nn.Parameter(torch.zeros(n)) for n in (5, 0, 1000, 3, 7)]
    owner: dict[tuple[int, int], int] = {}
    firsts: dict[int, int] = {}
    sizes = []
    for r in range(world):
        share = _share(params, r, world)
        sizes.append(sum(hi - lo for _, lo, hi, _ in share))
        for p, lo, hi, first in share:
            for i in range(lo, hi):
                assert (id(p), i) not in owner
                owner[(id(p), i)] = r
            firsts[id(p)] = firsts.get(id(p), 0) + first
    assert len(owner) == sum(p.numel() for p in params)
    assert all(firsts.get(id(p)) == 1 for p in params if p.numel())
    assert max(sizes) - min(sizes) <= 1  # balanced to one element, even with one dominant tensor


def test_reduce_every_one_collective_per_k_steps(tmp_path):
    """reduce_every=K: one all-reduce per K steps (none between), the same numbers as reducing every step
    once reduced, values folded only up to the last reduction, state_dict/close between reductions
    counting the queued steps as skipped (with the reason), and Join across a reduction."""
    steps, K = 25, 10
    per_rank = spawn(tmp_path, "ddp_reduce_every", dict(seed=21, steps=steps, K=K, short=13))
    for res in per_rank:
        one, k = res[1], res[K]
        assert one["calls"] == steps  # reduce_every=1: one all-reduce per step, as before
        assert k["calls"] == steps // K  # steps 10 and 20 only: no collective on the other 23 steps
        for t, (n, folded, queued) in enumerate(k["seen"], start=1):
            assert n == t and folded == t // K * K and queued == t - t // K * K, (t, n, folded, queued)
        assert all(folded == t and queued == 0 for t, (_, folded, queued) in enumerate(one["seen"], start=1))
        # values folded through step 20 equal reduce_every=1's records of steps 1..20, bit for bit
        assert k["closed_history"][:20] == one["closed_history"][:20]
        # between reductions: 5 steps await the next one; state_dict saves them as skipped, says so
        assert "5 steps awaiting the next reduction across ranks" in k["summary"]
        assert k["state"]["counters"]["steps"] == steps and k["state"]["counters"]["skipped"] == 5
        assert one["state"]["counters"]["skipped"] == 0 and one["state_warnings"] == []
        assert len(k["state_warnings"]) == 1 and "reduce_every=10" in k["state_warnings"][0]
        assert "gns.synchronize()" in k["state_warnings"][0]
        # close() cannot reduce (not a collective): the 5 queued steps are recorded as skipped, with why
        assert k["closed_skipped"] == 5 and len(k["closed_history"]) == steps
        for r in k["closed_history"][20:]:
            assert r["status"] == "skipped" and "not reduced across ranks before close()" in r["reason"]
        # synchronize() on every rank: all 25 steps reduced, the same numbers as reduce_every=1
        sync = res["synchronized"]
        assert sync["history"] == one["closed_history"] and sync["measured"] == steps
        assert sync["b_simple"] == pytest.approx(per_rank[0]["synchronized"]["b_simple"], rel=0, abs=0)
    # Join: rank 1 stopped after 13 steps and shadowed 12 (a reduction at step 20 among them); the
    # context's end reduced steps 21..25: both ranks hold the same 25 records and estimates
    j0, j1 = per_rank[0]["join"], per_rank[1]["join"]
    assert j0["steps"] == j1["steps"] == steps and j0["unreduced"] == j1["unreduced"] == 0
    assert j0["history"] == j1["history"] and len(j0["history"]) == steps
    assert j0["b_simple"] == j1["b_simple"] is not None
    assert j0["measured"] == 13 and j0["skipped"] == 12  # one rank's one part per step: not measurable


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10", None])
def test_bad_reduce_every_is_one_clear_line(bad):
    """reduce_every= is checked before anything else (no process group needed): one line with the value."""
    from noisescale.probes.distributed import DDPProbe

    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=rf"reduce_every must be a positive integer number of steps, got {bad!r} "):
        DDPProbe(model, list(model.parameters()), reduce_every=bad)
