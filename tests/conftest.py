import os

import pytest
import torch

# Deterministic, quiet, and fair to a 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("MPLBACKEND", "Agg")

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")


@pytest.fixture
def shakespeare_path():
    path = os.path.abspath(os.path.join(SHARED, "data", "tinyshakespeare.txt"))
    if not os.path.exists(path):
        pytest.skip(f"{path} not found (../shared beside the repository)")
    return path
