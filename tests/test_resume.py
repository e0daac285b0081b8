"""Kill and resume with real processes: a training run with ``log=`` is SIGKILLed between checkpoints
and resumed from the last one; the run log ends up with every measured step once, in order."""

import os
import signal
import subprocess
import sys
import textwrap

import noisescale as ns

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch, torch.nn.functional as F
    import noisescale as ns
    from noisescale.data import digits_mlp, load_digits

    torch.set_num_threads(1)
    out, steps, kill_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    X, y, _, _ = load_digits(seed=0)
    model = digits_mlp(hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gns = ns.GradientNoiseScale(model, "microbatch", log=os.path.join(out, "run.jsonl"), max_pending=4)
    ckpt = os.path.join(out, "ckpt.pt")
    start = 0
    if os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gns.load_state_dict(state["noisescale"])
        start = state["step"]
    for t in range(start, steps):
        for i in range(2):
            sl = slice(32 * t + 16 * i, 32 * t + 16 * (i + 1))
            (F.cross_entropy(model(X[sl]), y[sl]) / 2).backward()
        gns.step()
        opt.step()
        opt.zero_grad()
        if (t + 1) % 5 == 0:
            tmp = ckpt + ".tmp"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "noisescale": gns.state_dict(),
                        "step": t + 1}, tmp)
            os.replace(tmp, ckpt)
        if t + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash between checkpoints, the log ahead of them
    gns.close()
    """
)


def test_kill_and_resume_keeps_every_logged_step_once(tmp_path):
    run = [sys.executable, "-c", SCRIPT, str(tmp_path), "20"]
    killed = subprocess.run([*run, "13"], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    before = ns.read_run_log(tmp_path / "run.jsonl")
    assert [r["step"] for r in before.records] == list(range(1, 13))  # logged up to step 12, checkpoint at 10
    resumed = subprocess.run([*run, "0"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    log = ns.read_run_log(tmp_path / "run.jsonl")
    assert [r["step"] for r in log.records] == list(range(1, 21))
    assert all(r["status"] == "measured" for r in log.records)
    assert not os.path.exists(tmp_path / "run.jsonl.old")
