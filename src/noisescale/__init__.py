"""noisescale: the gradient noise scale of PyTorch training, measured correctly and almost for free.

    import noisescale as ns
    gns = ns.GradientNoiseScale(model)          # method="auto": per-example, micro-batch or DDP/FSDP
    ...                                         # backward passes of one optimizer step
    gns.step()                                  # after unscale_, before optimizer.step()
    gns.b_simple, gns.interval(0.95), gns.by_group()

Implements McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training"
(arXiv:1812.06162). ``import noisescale`` imports torch and numpy only; plotting
(:mod:`noisescale.plot`) imports matplotlib when used.
"""

from .controller import BatchSizeController
from .critical import CriticalBatchFit, RunRecord, fit_critical_batch, fit_sweep, frontier
from .ema import EMAState, Estimate, NoiseScaleEMA
from .estimators import (
    E,
    S,
    StepStats,
    b_crit,
    b_simple,
    dL_opt,
    eps_opt,
    estimate,
    examples_to_target,
    make_step_stats,
    optimal_batch_for_exchange_rate,
    step_estimates,
    steps_to_target,
)
from .lr_rules import (
    LRRule,
    adam_sqrt_hyperparameters,
    eps_central,
    eps_saturating,
    fit_power_law,
    linear_scale,
    lr_scaling,
    power_scale,
    saturating_scale,
    sqrt_scale,
)
from .lr_sweep import LRSweepFit, fit_lr_sweep, fit_lr_sweeps
from .measure import MeasureResult, measure
from .runlog import RunLog, RunLogError, read_run_log
from .schedules import ExamplesSchedule
from .sweeps import local_critical_batch, lr_grid, sweep
from .tracker import GradientNoiseScale, Subscription, Update

__version__ = "0.1.0"

__all__ = [
    "GradientNoiseScale",
    "measure",
    "MeasureResult",
    "Update",
    "Subscription",
    "Estimate",
    "StepStats",
    "make_step_stats",
    "step_estimates",
    "estimate",
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
    "fit_lr_sweep",
    "fit_lr_sweeps",
    "LRSweepFit",
    "BatchSizeController",
    "ExamplesSchedule",
    "LRRule",
    "linear_scale",
    "sqrt_scale",
    "power_scale",
    "saturating_scale",
    "eps_saturating",
    "adam_sqrt_hyperparameters",
    "fit_power_law",
    "lr_scaling",
    "__version__",
]
