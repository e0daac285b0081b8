"""``import noisescale`` (and the integrations package itself) imports no training framework."""

import subprocess
import sys

FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate", "dask", "distributed")


def test_import_noisescale_imports_no_framework():
    code = (
        f"import sys, noisescale, noisescale.integrations\nprint(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
