"""Hugging Face ``transformers.Trainer``: :class:`NoiseScaleCallback` measures the noise scale of ``trainer.train()``.

Where it hooks in, and why each is right:

- **training start** (``on_train_begin``, after the trainer has prepared the model): the tracker
  attaches to ``trainer.model_wrapped``, the module the trainer calls -- the
  ``DistributedDataParallel`` wrapper when training on several processes (``method="auto"`` then
  measures across ranks, App. A.1), the model itself on one. The trainer's ``GradScaler`` (fp16) is
  passed as ``scaler=``. The trainer runs all but the last micro-batch of a step in ``no_sync``; the
  probes see every backward pass's gradient before it is added and reduced.
- **the step's start** (``on_step_begin``, before its first forward pass): the trainer has fetched
  the step's micro-batches, ``trainer.current_gradient_accumulation_steps`` of them (fewer in an
  epoch's last step); ``gns.expect_passes(n)`` tells the tracker which backward pass is the last.
- **the optimizer step** (``on_pre_optimizer_step``): ``gns.step()``, once per optimizer step. The
  trainer clips *before* this event (the order that gave a wrong 8.06 instead of 2.89 to a tracker
  reading ``.grad`` there); the tracker read the step gradient's norm when the step's last backward
  pass ended, before clipping, so the value is right, in the short last step of an epoch too.
- **logging** (``on_step_end`` when the trainer logs, every ``logging_steps``): ``gns/*`` through
  ``trainer.log``, so the ``report_to`` integrations (TensorBoard, W&B, ...) and
  ``trainer.state.log_history`` get them.
- **checkpoints** (``on_step_end`` / ``on_epoch_end`` when the trainer is about to save): the state is
  written into ``trainer.state.stateful_callbacks["noisescale"]``, which the trainer saves in
  ``trainer_state.json`` in every checkpoint; ``trainer.train(resume_from_checkpoint=...)`` loads it back
  and the callback restores the averages at training start.

**No batch-size controller.** The trainer fixes ``gradient_accumulation_steps`` for the whole run:
the number of update steps per epoch, ``max_steps``, the learning-rate schedule and the sync points
(``(step + 1) % gradient_accumulation_steps == 0``, counted within the epoch) are computed from it
before training, and a change in the middle would put optimizer steps and ``no_sync`` passes in the
wrong places. :meth:`NoiseScaleCallback.advice` says which batch to train with next time instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from ..probes.base import Hook
from ..tracker import GradientNoiseScale
from ._common import checked_size, json_safe

__all__ = ["NoiseScaleCallback"]

STATE_KEY = "noisescale"  # in TrainerState.stateful_callbacks (not a class name: see _load_callback_state)
STATE_FORMAT = "noisescale-transformers-callback"


class NoiseScaleCallback(TrainerCallback):
    """Measures ``B_simple`` during ``trainer.train()``; it adds itself to ``trainer``'s callbacks::

        trainer = Trainer(model=model, args=args, train_dataset=ds)
        gns_cb = NoiseScaleCallback(trainer)
        trainer.train()
        gns_cb.gns.summary(), gns_cb.advice()

    Args:
        trainer: the ``transformers.Trainer`` (its wrapped model, scaler, ``log`` and state are used).
        size_fn: ``inputs -> size``: the size of a micro-batch in the tracker's ``unit`` from the keyword
            inputs of the model's forward (default: the tracker infers examples). For tokens:
            ``unit="tokens", size_fn=lambda inputs: (inputs["labels"] != -100).sum()``.
        prefix: prefix of the logged names.
        **tracker_options: options of :class:`noisescale.GradientNoiseScale` (``method``, ``beta``,
            ``unit``, ``groups``, ``log``, ...); ``groups="optimizer"`` and ``preconditioner="optimizer"``
            name the trainer's optimizer. ``reduction`` defaults to ``"sum"`` when the trainer normalises
            the loss by the step's number of items (``num_items_in_batch``: every item weighs the same),
            else ``"mean"``. A run log (``log=``) is written by the main process only.
    """

    def __init__(
        self,
        trainer: Trainer,
        *,
        size_fn: Callable[[dict[str, Any]], Any] | None = None,
        prefix: str = "gns/",
        **tracker_options: Any,
    ) -> None:
        if not isinstance(trainer, Trainer):
            raise TypeError(
                f"NoiseScaleCallback(trainer, ...) needs the transformers.Trainer, got {type(trainer).__name__}"
            )
        if size_fn is not None and not callable(size_fn):
            raise TypeError(f"size_fn must be a callable inputs -> size, got {type(size_fn).__name__}")
        self.trainer = trainer
        self.size_fn = size_fn
        self.prefix = prefix
        self.tracker_options = tracker_options
        self.gns: GradientNoiseScale | None = None
        self._sizes: list[float] = []
        self._size_hook: Any = None
        trainer.add_callback(self)

    # -- lifetime ----------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        # a callback added twice (by the constructor and trainer.add_callback) would step twice
        cbs = trainer.callback_handler.callbacks
        while sum(c is self for c in cbs) > 1:
            cbs.reverse()
            cbs.remove(self)
            cbs.reverse()
        if self.gns is not None:
            self.gns.close()
        opts = dict(self.tracker_options)
        for key in ("groups", "preconditioner"):
            if isinstance(opts.get(key), str) and opts[key] == "optimizer":
                opts[key] = trainer.optimizer
        if not state.is_world_process_zero:
            opts.pop("log", None)  # the same numbers on every process: one run log
        scaler = getattr(trainer.accelerator, "scaler", None)
        if scaler is not None:
            opts.setdefault("scaler", scaler)
        if "reduction" not in opts:
            opts["reduction"] = "sum" if getattr(trainer, "model_accepts_loss_kwargs", False) else "mean"
        model = trainer.model_wrapped
        self.gns = GradientNoiseScale(model, **opts)
        self._sizes = []
        if self.size_fn is not None:
            self._size_hook = model.register_forward_pre_hook(Hook(self._record_size), with_kwargs=True)
        saved = (state.stateful_callbacks or {}).get(STATE_KEY)
        if saved is not None:  # trainer.train(resume_from_checkpoint=...): trainer_state.json had it
            self.load_state_dict(saved)

    def _record_size(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled() and self.size_fn is not None:
            inputs = kwargs if kwargs else (args[0] if len(args) == 1 else args)
            self._sizes.append(checked_size(self.size_fn, inputs))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.gns is None:
            return
        self.gns.synchronize()  # every rank runs this: under DDP the last steps are reduced too
        state.stateful_callbacks[STATE_KEY] = json_safe(self.state_dict())  # for trainer.save_state()
        self._close()

    def _close(self) -> None:
        if self._size_hook is not None:
            self._size_hook.remove()
            self._size_hook = None
        if self.gns is not None:
            self.gns.close()  # hooks removed; the estimates stay readable

    # -- the loop ----------------------------------------------------------------------

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # The trainer has fetched this step's micro-batches (fewer at an epoch's end) and called back
        # before the first forward pass: tell the tracker how many, so that the step gradient is read
        # at the end of the last one even in the short step it clips before on_pre_optimizer_step.
        n = getattr(self.trainer, "current_gradient_accumulation_steps", None)
        if self.gns is not None and isinstance(n, int) and n >= 1:
            self.gns.expect_passes(n)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.gns is None:
            return
        sizes, self._sizes = self._sizes, []
        self.gns.step(sizes=sizes if self.size_fn is not None else None)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.gns is None:
            return
        # DefaultFlowCallback (first in the list) has just decided whether the trainer logs and saves now
        if control.should_log:
            self.trainer.log(self.gns.metrics(self.prefix))
        if control.should_save:
            self.gns.synchronize()  # every rank decides to save at the same step: reduce what is queued
            state.stateful_callbacks[STATE_KEY] = json_safe(self.state_dict())

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.gns is not None and control.should_save:
            self.gns.synchronize()
            state.stateful_callbacks[STATE_KEY] = json_safe(self.state_dict())

    # -- advice --------------------------------------------------------------------------

    def batch_size(self) -> int:
        """Examples per optimizer step over all processes: per-device batch x accumulation x processes."""
        a = self.trainer.args
        return int(a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size)

    def advice(self, level: float = 0.95) -> str:
        """One line: ``B_simple`` against the run's batch, and the ``gradient_accumulation_steps`` whose batch
        is nearest ``B_simple`` (the paper's ``B ~ B_crit``: about twice the minimal steps and examples,
        Eq. 2.11 with ``B_crit ~ B_simple``). Advice only: the trainer cannot change its batch while training."""
        if self.gns is None:
            return "no measurement yet: train first"
        b = self.gns.b_simple
        if b is None:
            return f"B_simple undefined: {self.gns.reason}"
        a = self.trainer.args
        per_step = a.per_device_train_batch_size * a.world_size
        iv = self.gns.interval(level)
        ivs = f" [{level:.0%}: {iv[0]:.3g}, {iv[1]:.3g}]" if iv else ""
        unit = self.gns.unit
        if unit != "examples":
            return (
                f"B_simple = {b:.4g}{ivs} {unit}; the batch is {self.batch_size()} examples per step: convert with "
                f"your {unit} per example to choose gradient_accumulation_steps"
            )
        acc = max(1, round(b / per_step))
        acc = 2 ** round(math.log2(acc))  # powers of two: B_simple is an order-of-magnitude guide
        return (
            f"B_simple = {b:.4g}{ivs} examples, the batch is {self.batch_size()}: "
            f"gradient_accumulation_steps={acc} gives {acc * per_step} examples per step"
        )

    # -- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The tracker's state (numbers only, JSON-safe)."""
        if self.gns is None:
            return {}
        return {"format": STATE_FORMAT, "tracker": self.gns.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (called at training start when resuming)."""
        if not isinstance(state_dict, dict) or state_dict.get("format") != STATE_FORMAT:
            raise ValueError(
                "NoiseScaleCallback.load_state_dict: not a state saved by this callback (format="
                f"{state_dict.get('format') if isinstance(state_dict, dict) else type(state_dict).__name__!r})"
            )
        if self.gns is None:
            raise RuntimeError("NoiseScaleCallback.load_state_dict: the tracker attaches at training start")
        self.gns.load_state_dict(state_dict["tracker"])
