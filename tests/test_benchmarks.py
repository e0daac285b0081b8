"""The GPU benchmark's dry run: on the CPU with tiny sizes, every check and the timing code run
(`benchmarks/gpu.py --dry-run`), so the script a lent GPU runs is known to work before it gets there."""

import importlib.util
import os

import pytest


def test_gpu_benchmark_dry_run(capsys):
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu.py")
    spec = importlib.util.spec_from_file_location("gpu_benchmark", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 6 and "FAIL" not in out


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
