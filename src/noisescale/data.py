"""Embedded real data and small models for the demo, tests and benchmarks. Nothing is downloaded.

``load_digits``: the UCI optical handwritten digits (1,797 8x8 images, 10 classes) that ship
inside scikit-learn (``sklearn.datasets.load_digits`` reads a file in the package).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["load_digits", "digits_mlp"]


def load_digits(
    *, test_fraction: float = 0.2, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(X_train, y_train, X_test, y_test)``: pixels scaled to [0, 1], flattened to 64 features."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "the digits dataset ships with scikit-learn, which is not installed: "
            "pip install 'noisescale[demo]' (or pip install scikit-learn)"
        ) from None
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    d = _load()
    X = torch.tensor(d.data, dtype=dtype) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = round(test_fraction * len(y))
    test, train = perm[:n_test], perm[n_test:]
    return X[train], y[train], X[test], y[test]


def digits_mlp(hidden: int = 128, *, seed: int = 0) -> nn.Module:
    """A two-hidden-layer MLP for 8x8 digits (64 -> hidden -> hidden -> 10)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 10))
