"""Accelerate: :class:`AcceleratedNoiseScale` measures the noise scale of an ``accelerator.accumulate(...)`` loop.

::

    accelerator = Accelerator(gradient_accumulation_steps=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ns_acc = AcceleratedNoiseScale(accelerator, model, optimizer)      # after prepare()
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model, batch))
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            ns_acc.step()                 # every iteration; measures on the ones that end a step
            optimizer.step(); optimizer.zero_grad()

Why this is right:

- The tracker attaches to the prepared model, the module the loop calls: the
  ``DistributedDataParallel`` wrapper under a multi-process launch (``method="auto"`` then measures
  across ranks, App. A.1; FSDP through Accelerate gives ``"fsdp"``), the model itself on one process.
  The accelerator's ``GradScaler`` (fp16) is passed as ``scaler=``.
- ``accelerator.accumulate`` runs all but the last micro-batch of a step in ``no_sync`` and sets
  ``accelerator.sync_gradients`` on the last one, where the wrapped optimizer really steps.
  :meth:`AcceleratedNoiseScale.step` calls ``gns.step()`` exactly there, once per optimizer step, after
  all the step's backward passes; the step gradient's norm was captured when the last backward
  ended, so clipping before or after changes nothing.
- ``gns/*`` go to ``accelerator.log`` (the trackers of ``accelerator.init_trackers``) every
  ``log_every`` steps; the state is registered with ``accelerator.register_for_checkpointing`` and
  saved and restored by ``accelerator.save_state`` / ``load_state``.
- **Batch-size controller** (``controller=dict(...)``): after each real optimizer step (a post-hook
  on the optimizer) :class:`noisescale.controller.BatchSizeController` decides the next step's
  accumulation, set as ``accelerator.gradient_accumulation_steps`` with the accumulation counter
  restarted, so the next step has exactly that many micro-batches (``accelerator.backward`` divides
  each loss by it). The controller rescales the learning rate inside ``optimizer.step()``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..tracker import GradientNoiseScale
from ._common import check_every

__all__ = ["AcceleratedNoiseScale"]

STATE_FORMAT = "noisescale-accelerate"


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's ``AcceleratedOptimizer`` (which steps it only on sync)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch optimizer (or Accelerate's wrapper of one), got {type(inner).__name__}"
        )
    return inner


class AcceleratedNoiseScale:
    """The noise scale of an Accelerate training loop with gradient accumulation.

    Args:
        accelerator: the ``accelerate.Accelerator``.
        model: the prepared model (``accelerator.prepare(model)``).
        optimizer: the (prepared) optimizer; needed for ``controller=`` and for ``groups="optimizer"`` /
            ``preconditioner="optimizer"``.
        controller: keyword arguments of :class:`noisescale.controller.BatchSizeController` (without
            ``gns`` and ``optimizer``): it then sets ``accelerator.gradient_accumulation_steps``. Needs
            ``micro_batch_size`` (examples per micro-batch and process); ``batch_size`` defaults to
            ``micro_batch_size x gradient_accumulation_steps x num_processes`` and ``world_size`` to
            ``num_processes``.
        log_every: optimizer steps between ``accelerator.log(gns/*)`` calls (``None``: no logging).
        checkpoint: register with ``accelerator.register_for_checkpointing`` (saved by ``save_state``).
        prefix: prefix of the logged names.
        **tracker_options: options of :class:`noisescale.GradientNoiseScale`. A run log (``log=``) is written
            by the main process only.
    """

    def __init__(
        self,
        accelerator: Any,
        model: torch.nn.Module,
        optimizer: Any = None,
        *,
        controller: dict[str, Any] | None = None,
        log_every: int | None = None,
        checkpoint: bool = True,
        prefix: str = "gns/",
        **tracker_options: Any,
    ) -> None:
        if not all(hasattr(accelerator, a) for a in ("accumulate", "sync_gradients", "gradient_accumulation_steps")):
            raise TypeError(f"accelerator must be an accelerate.Accelerator, got {type(accelerator).__name__}")
        self.log_every = check_every("log_every", log_every)
        self.accelerator = accelerator
        self.prefix = prefix
        opts = dict(tracker_options)
        for key in ("groups", "preconditioner"):
            if isinstance(opts.get(key), str) and opts[key] == "optimizer":
                if optimizer is None:
                    raise ValueError(
                        f"{key}='optimizer' needs the optimizer: AcceleratedNoiseScale(accelerator, model, optimizer)"
                    )
                opts[key] = _inner(optimizer)
        if not accelerator.is_main_process:
            opts.pop("log", None)  # the same numbers on every process: one run log
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None:
            opts.setdefault("scaler", scaler)
        self.gns = GradientNoiseScale(model, **opts)
        self._sizes: list[float] = []
        self.controller: Any = None
        self._hook: Any = None
        if controller is not None:
            if optimizer is None:
                raise ValueError(
                    "controller= needs the optimizer: AcceleratedNoiseScale(accelerator, model, optimizer, ...)"
                )
            self.controller = self._make_controller(_inner(optimizer), dict(controller))
        if checkpoint:
            accelerator.register_for_checkpointing(self)

    def _make_controller(self, optimizer: torch.optim.Optimizer, opts: dict[str, Any]) -> Any:
        from ..controller import BatchSizeController

        for k in ("gns", "optimizer"):
            if k in opts:
                raise ValueError(f"controller={{... {k!r}: ...}}: AcceleratedNoiseScale passes {k} itself; remove it")
        if "micro_batch_size" not in opts:
            raise ValueError("controller= needs micro_batch_size (examples per micro-batch and process)")
        acc = self.accelerator
        opts.setdefault("world_size", acc.num_processes)
        opts.setdefault("batch_size", opts["micro_batch_size"] * acc.gradient_accumulation_steps * opts["world_size"])
        ctl = BatchSizeController(self.gns, optimizer, **opts)
        if ctl.accumulation != acc.gradient_accumulation_steps:
            raise ValueError(
                f"controller= starts at batch_size={ctl.batch_size}, i.e. accumulation {ctl.accumulation}, but the "
                f"accelerator has gradient_accumulation_steps={acc.gradient_accumulation_steps}; make them agree"
            )
        # after the controller's own post-hook (which restores the schedule's lr): decide the next step
        self._hook = optimizer.register_step_post_hook(self._after_optimizer_step)
        return ctl

    # -- the loop ----------------------------------------------------------------------

    def step(self, size: float | None = None, *, loss: Any = None) -> bool:
        """Call once per iteration of the ``accelerator.accumulate`` loop, after ``accelerator.backward``
        and before ``optimizer.step()``. Records the step on the iterations that end one (where
        ``accelerator.sync_gradients`` is True) and returns whether it did.

        Args:
            size: this micro-batch's size in the tracker's unit (default: inferred, in examples).
            loss: the step's loss, for the run log (passed on the iteration that ends the step).
        """
        if size is not None:
            self._sizes.append(float(size))
        if not self.accelerator.sync_gradients:
            return False
        sizes, self._sizes = self._sizes, []
        self.gns.step(sizes=sizes if sizes else None, loss=loss)
        if self.log_every is not None and self.gns.steps % self.log_every == 0:
            metrics = self.gns.metrics(self.prefix)
            if self.controller is not None:
                metrics.update(self.controller.metrics(self.prefix + "controller/"))
            self.accelerator.log(metrics, step=self.gns.steps)
        return True

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        ctl = self.controller
        if ctl.step():
            self._set_accumulation(ctl.accumulation)

    def _set_accumulation(self, accumulation: int) -> None:
        # The accelerator syncs when its micro-batch counter is a multiple of the accumulation; restarting
        # the counter at this step boundary gives the next step exactly `accumulation` micro-batches.
        acc = self.accelerator
        acc.gradient_accumulation_steps = int(accumulation)
        acc.step = 0

    def close(self) -> None:
        """Remove every hook (the tracker's, the controller's); the estimates stay readable."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.controller is not None:
            self.controller.close()
        self.gns.close()

    # -- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The tracker's (and controller's) state, numbers only (``accelerator.save_state`` saves it)."""
        out: dict[str, Any] = {"format": STATE_FORMAT, "tracker": self.gns.state_dict()}
        if self.controller is not None:
            out["controller"] = self.controller.state_dict()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; with a controller, also the accelerator's accumulation."""
        if not isinstance(state_dict, dict) or state_dict.get("format") != STATE_FORMAT:
            raise ValueError(
                "AcceleratedNoiseScale.load_state_dict: not a state saved by AcceleratedNoiseScale (format="
                f"{state_dict.get('format') if isinstance(state_dict, dict) else type(state_dict).__name__!r})"
            )
        if ("controller" in state_dict) != (self.controller is not None):
            raise ValueError(
                "AcceleratedNoiseScale.load_state_dict: the state was saved "
                f"{'with' if 'controller' in state_dict else 'without'} a controller= and this one has "
                f"{'one' if self.controller is not None else 'none'}; construct it as the saved one was"
            )
        self.gns.load_state_dict(state_dict["tracker"])
        if self.controller is not None:
            self.controller.load_state_dict(state_dict["controller"])
            self._set_accumulation(self.controller.accumulation)
