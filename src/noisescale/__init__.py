"""noisescale: the gradient noise scale of PyTorch training, measured correctly and almost for free.

    import noisescale as ns
    gns = ns.GradientNoiseScale(model)          # gradient accumulation with >= 2 micro-batches
    ...                                         # backward passes of one optimizer step
    gns.step()                                  # after unscale_, before clipping
    gns.b_simple, gns.interval(0.95)

Implements McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training"
(arXiv:1812.06162). ``import noisescale`` imports torch and numpy only; plotting
(:mod:`noisescale.plot`) imports matplotlib when used.
"""

from .ema import EMAState, NoiseScaleEMA
from .estimators import (
    E,
    Measurement,
    S,
    b_crit,
    b_simple,
    dL_opt,
    eps_central,
    eps_opt,
    estimate,
    examples_to_target,
    optimal_batch_for_exchange_rate,
    pool_parts,
    steps_to_target,
)
from .measure import MeasureResult, measure
from .runlog import RunLog, RunLogError, read_run_log
from .tracker import GradientNoiseScale
from .critical import CriticalBatchFit, RunRecord, fit_critical_batch, fit_sweep, frontier
from .sweeps import local_critical_batch, lr_grid, sweep

__version__ = "0.1.0"

__all__ = [
    "GradientNoiseScale",
    "measure",
    "MeasureResult",
    "Measurement",
    "estimate",
    "pool_parts",
    "b_simple",
    "eps_opt",
    "dL_opt",
    "S",
    "E",
    "steps_to_target",
    "examples_to_target",
    "b_crit",
    "eps_central",
    "optimal_batch_for_exchange_rate",
    "NoiseScaleEMA",
    "EMAState",
    "RunLog",
    "RunLogError",
    "read_run_log",
    "sweep",
    "lr_grid",
    "local_critical_batch",
    "fit_critical_batch",
    "fit_sweep",
    "frontier",
    "RunRecord",
    "CriticalBatchFit",
    "__version__",
]
