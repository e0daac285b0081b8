"""The GPU benchmark's dry run: on the CPU with tiny sizes, every check and the timing code run
(`benchmarks/gpu.py --dry-run`), so the script a lent GPU runs is known to work before it gets there."""

import importlib.util
import os

import pytest


def _benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module."""
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_benchmark_dry_run(capsys):
    mod = _benchmark("gpu")
    assert mod.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 7 and "FAIL" not in out
    assert "PASS: microbatch: one read of the step gradient per step" in out


def test_hessian_cost_benchmark_quick(capsys):
    """benchmarks/hessian_cost.py --quick: both rows, positive times, the amortised columns consistent."""
    mod = _benchmark("hessian_cost")
    assert mod.main(["--quick"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and "ms" not in r]
    assert len(rows) == 2
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        step, draw, ratio = float(cells[2]), float(cells[3]), float(cells[4])
        # the times are printed to 0.1 ms, the ratio from the unrounded times
        lo, hi = max(draw - 0.05, 0.0) / (step + 0.05), (draw + 0.05) / max(step - 0.05, 1e-9)
        assert step > 0 and draw > 0 and lo - 0.01 <= ratio <= hi + 0.01
        assert float(cells[5].rstrip("%")) == pytest.approx(10 * ratio, abs=0.11)  # (both rounded)


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
