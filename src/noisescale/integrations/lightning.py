"""Lightning: :class:`NoiseScaleCallback` measures the noise scale of a ``lightning.Trainer`` run.

Where it hooks in, and why each is right:

- **fit start** (``on_fit_start``, after the strategy has wrapped the model): the tracker attaches
  to ``trainer.strategy.model``, the module whose forward the trainer calls -- the
  ``DistributedDataParallel`` wrapper under the DDP strategies (so ``method="auto"`` measures across
  ranks, App. A.1), the ``LightningModule`` itself on one device. The trainer's ``GradScaler`` (16-bit
  mixed precision) is passed as ``scaler=``.
- **each backward pass** (``on_before_backward``): the size of the micro-batch whose loss is about to
  be back-propagated (``size_fn(batch)``, by default the batch's leading dimension). Lightning
  accumulates ``accumulate_grad_batches`` micro-batches per optimizer step and, under DDP, runs all
  but the last in ``no_sync``; the probes see each pass's gradient before it is added (and reduced).
- **the optimizer step** (``on_before_optimizer_step``): ``gns.step(sizes=...)``, once per optimizer
  step, after all its backward passes. Lightning clips after this hook; the tracker captured the
  step gradient's norm when the last backward pass ended, so clipping could come first as well.
- **logging**: every ``log_every_n_steps`` optimizer steps (the trainer's by default) ``gns/*``
  through ``pl_module.log_dict``, so every logger the trainer has (TensorBoard, W&B, CSV, ...) gets
  them at the trainer's cadence; the values are read from the device only then.
- **checkpoints**: the callback's ``state_dict()`` is saved in the trainer's checkpoint and
  ``load_state_dict`` restores it (``trainer.fit(..., ckpt_path=...)``): the averages continue exactly.
- **batch-size controller** (``controller=dict(...)``): after each optimizer step
  :class:`noisescale.controller.BatchSizeController` decides the next step's accumulation, applied as
  ``trainer.accumulate_grad_batches`` (see :class:`NoiseScaleCallback`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from ..tracker import GradientNoiseScale
from ._common import batch_size_of, check_every, checked_size

__all__ = ["NoiseScaleCallback"]

STATE_FORMAT = "noisescale-lightning-callback"


class NoiseScaleCallback(Callback):
    """Measures ``B_simple`` during ``trainer.fit`` and logs ``gns/*`` through the module's ``log``.

    Args:
        log_every_n_steps: optimizer steps between logged values (default: the trainer's
            ``log_every_n_steps``); ``0`` logs nothing (read :attr:`gns` instead).
        size_fn: ``batch -> size`` of a micro-batch in the tracker's ``unit`` (default: its leading
            dimension, in examples). Needed for ``unit="tokens"``, e.g.
            ``lambda batch: batch["attention_mask"].sum()``.
        controller: keyword arguments of :class:`noisescale.controller.BatchSizeController` (without
            ``gns`` and ``optimizer``, and without ``micro_batch_size``, which is the loader's batch
            size unless given): it then sets ``trainer.accumulate_grad_batches`` for the next steps.
            Only whole-step changes are made (see docs/integrations.md).
        prefix: prefix of the logged names.
        **tracker_options: options of :class:`noisescale.GradientNoiseScale` (``method``, ``beta``,
            ``unit``, ``groups``, ``log``, ...). ``groups="optimizer"`` and
            ``preconditioner="optimizer"`` name the trainer's optimizer. A run log (``log=``) is written
            by global rank 0 only.

    After (or during) ``fit``, :attr:`gns` is the tracker: ``callback.gns.b_simple``,
    ``callback.gns.summary()``. Under the DDP/FSDP strategies the ranks' statistics are reduced every
    ``reduce_every`` steps (a tracker option, default 10), at every checkpoint and when training ends
    (Lightning runs those hooks on every rank).
    """

    def __init__(
        self,
        *,
        log_every_n_steps: int | None = None,
        size_fn: Callable[[Any], Any] | None = None,
        controller: dict[str, Any] | None = None,
        prefix: str = "gns/",
        **tracker_options: Any,
    ) -> None:
        if log_every_n_steps != 0:
            check_every("log_every_n_steps", log_every_n_steps)
        if size_fn is not None and not callable(size_fn):
            raise TypeError(f"size_fn must be a callable batch -> size, got {type(size_fn).__name__}")
        if controller is not None and not isinstance(controller, dict):
            raise TypeError(
                f"controller must be a dict of BatchSizeController options, got {type(controller).__name__}"
            )
        for k in ("gns", "optimizer"):
            if controller is not None and k in controller:
                raise ValueError(f"controller={{... {k!r}: ...}}: the callback passes {k} itself; remove it")
        self.log_every_n_steps = log_every_n_steps
        self.size_fn = size_fn
        self.controller_options = controller
        self.prefix = prefix
        self.tracker_options = tracker_options
        self.gns: GradientNoiseScale | None = None
        self.controller: Any = None
        self._restored: dict[str, Any] | None = None
        self._batch_size: float | None = None
        self._sizes: list[float] = []
        self._losses: list[torch.Tensor] = []
        self._pending_accumulation: int | None = None
        self._forwards: list[int] | None = None  # forward calls of the LightningModule on the first step
        self._controller_state: dict[str, Any] | None = None  # restored, applied at train start
        self._scales: dict[int, float] = {}  # accumulation -> the learning-rate scale the controller gave it
        self._stepped = False  # the current batch ended an optimizer step
        self._forward_hook: Any = None

    # -- lifetime ----------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"NoiseScaleCallback measures the steps of one optimizer; this module has {len(trainer.optimizers)}. "
                "Measure with a GradientNoiseScale per optimizer (params=...) in your own hooks instead"
            )
        optimizer = trainer.optimizers[0]
        if self.gns is not None:  # a second fit with the same callback: continue where the last one ended
            if self._restored is None:
                self._restored = self.state_dict()
            self.gns.close()
        opts = dict(self.tracker_options)
        for key in ("groups", "preconditioner"):
            if isinstance(opts.get(key), str) and opts[key] == "optimizer":
                opts[key] = optimizer
        if not trainer.is_global_zero:
            opts.pop("log", None)  # the same numbers on every rank: one run log
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            opts.setdefault("scaler", scaler)
        model = trainer.strategy.model
        if model is None:  # pragma: no cover - the strategy sets it up before on_fit_start
            raise RuntimeError("NoiseScaleCallback: the trainer's strategy has no model at fit start")
        self._forwards = None
        if model is pl_module:
            # On one device the trainer calls training_step directly, not the module's forward; the
            # per-example probe needs that forward (self(x) in training_step) to see the micro-batches.
            # With accumulation, measure with the micro-batches, as the trainer accumulates them.
            if opts.get("method", "auto") == "auto" and trainer.accumulate_grad_batches >= 2:
                opts["method"] = "microbatch"
            self._forwards = [0]
            counter = self._forwards

            def count(module: Any, args: Any) -> None:
                counter[0] += 1

            self._forward_hook = pl_module.register_forward_pre_hook(count)
        self.gns = GradientNoiseScale(model, **opts)
        self._sizes, self._losses, self._batch_size = [], [], None
        self.controller = None
        restored, self._restored = self._restored, None
        if restored is not None:
            self.gns.load_state_dict(restored["tracker"])
            self._controller_state = restored.get("controller")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the training loader is set up now (not yet at fit start): the controller's micro-batch is its batch
        if self.controller_options is None or self.gns is None:
            if self._controller_state is not None:
                warnings.warn(
                    "noisescale: the checkpoint has a batch-size controller's state but this callback has no "
                    "controller=; it is ignored",
                    stacklevel=2,
                )
                self._controller_state = None
            return
        if self.controller is not None:
            self.controller.close()
        self.controller = self._make_controller(trainer, trainer.optimizers[0])
        self._scales = {int(self.controller.accumulation): 1.0}
        state, self._controller_state = self._controller_state, None
        if state is not None:
            self.controller.load_state_dict(state["controller"])
            self._scales = {int(a): float(v) for a, v in state["scales"]}
            # the trainer starts again from its constructor's accumulate_grad_batches
            self._pending_accumulation = int(self.controller.accumulation)
        self._hold_scale(trainer)

    def _check_forward_called(self, gns: GradientNoiseScale) -> None:
        assert self._forwards is not None
        if gns.method == "per_example" and self._forwards[0] == 0:
            warnings.warn(
                "noisescale: per-example norms need the LightningModule's forward, but training_step did not call "
                "it (it calls a submodule directly), so nothing is measured. Call self(x) in training_step, or "
                "use accumulate_grad_batches >= 2 (the callback then measures micro-batches), or pass "
                "method='microbatch'",
                stacklevel=2,
            )
        self._release_counter()

    def _release_counter(self) -> None:
        if self._forwards is not None:
            self._forward_hook.remove()
            self._forwards = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.gns is not None:
            self.gns.synchronize()  # every rank runs this hook: the last steps are reduced too

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release_counter()
        if self.controller is not None:
            self.controller.close()  # its learning-rate hooks removed
        if self.gns is not None:
            self.gns.close()  # hooks removed; the estimates stay readable

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "exception")

    # -- the loop ----------------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.gns is None:
            return
        # With manual optimization a batch may be back-propagated in several pieces: only a size_fn
        # the user gave is trusted there; otherwise the tracker infers sizes from forward passes.
        if self.size_fn is not None:
            self._batch_size = checked_size(self.size_fn, batch)
        elif pl_module.automatic_optimization and self.gns.unit == "examples":
            self._batch_size = batch_size_of(batch)
        else:
            self._batch_size = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self.gns is None:
            return
        # one size per backward pass (a skipped training_step has no backward and no size)
        if self._batch_size is not None:
            self._sizes.append(self._batch_size)
        if pl_module.automatic_optimization:
            self._losses.append(loss.detach())

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        gns = self.gns
        if gns is None:
            return
        self._stepped = True
        sizes, self._sizes = self._sizes, []
        losses, self._losses = self._losses, []
        # Lightning divides each micro-batch's loss by accumulate_grad_batches: the sum is the step's mean
        loss = torch.stack(losses).sum() if losses else None
        gns.step(sizes=sizes if sizes else None, loss=loss)
        if self._forwards is not None:
            self._check_forward_called(gns)
        every = getattr(trainer, "log_every_n_steps", 50) if self.log_every_n_steps is None else self.log_every_n_steps
        # global_step counts completed optimizer steps; the trainer writes its logs when
        # (steps completed + 1) % log_every_n_steps == 0, which is this step
        if every and (trainer.global_step + 1) % every == 0:
            metrics = gns.metrics(self.prefix)
            if self.controller is not None:
                metrics.update(self._controller_metrics())
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # After the optimizer step of this batch (if it had one): the controller decides the next one.
        if self.controller is None or self.gns is None:
            return
        if not self._stepped:
            return  # inside an accumulation: nothing may change before the step ends
        self._stepped = False
        if self.controller.step():
            self._scales[int(self.controller.accumulation)] = float(self.controller.lr_scale)
            self._pending_accumulation = int(self.controller.accumulation)
        self._apply_accumulation(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.controller is not None:
            self._apply_accumulation(trainer)

    # -- controller ----------------------------------------------------------------------

    def _make_controller(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> Any:
        from ..controller import BatchSizeController

        opts = dict(self.controller_options or {})
        if "micro_batch_size" not in opts:
            mb = getattr(trainer.train_dataloader, "batch_size", None)
            if not isinstance(mb, int):
                raise ValueError(
                    "controller=: could not read the training loader's batch_size; pass controller="
                    "dict(micro_batch_size=<examples per micro-batch and rank>, ...)"
                )
            opts["micro_batch_size"] = mb
        opts.setdefault("world_size", trainer.world_size)
        opts.setdefault("batch_size", opts["micro_batch_size"] * trainer.accumulate_grad_batches * trainer.world_size)
        ctl = BatchSizeController(self.gns, optimizer, **opts)
        if int(ctl.accumulation) != trainer.accumulate_grad_batches:
            raise ValueError(
                f"controller= starts at batch_size={ctl.batch_size}, i.e. accumulation {ctl.accumulation}, but the "
                f"trainer has accumulate_grad_batches={trainer.accumulate_grad_batches}; make them agree"
            )
        return ctl

    def _apply_accumulation(self, trainer: pl.Trainer) -> None:
        """At a step boundary (a batch that ended a step, or an epoch's start): sets ``accumulate_grad_batches``
        when the change starts a whole step.

        Lightning zeroes the gradients when ``batch_idx % accumulate_grad_batches == 0`` and steps when
        ``(batch_idx + 1) % accumulate_grad_batches == 0`` (batch_idx counted within the epoch). A new
        value ``a`` is therefore applied only when the batches done in this epoch are a multiple of
        ``a``; before that the old value finishes its steps (at most ``a / old - 1`` of them), so that
        no step mixes two accumulations or starts from an uncleared gradient.
        """
        a = self._pending_accumulation
        if a is None:
            return
        ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready  # batches done in this epoch
        if a == trainer.accumulate_grad_batches or ready % a == 0:
            trainer.accumulate_grad_batches = a
            self._pending_accumulation = None
        self._hold_scale(trainer)

    def _hold_scale(self, trainer: pl.Trainer) -> None:
        """The controller rescales the learning rate inside optimizer.step() by its ``lr_scale``, which it
        sets for the batch it decided; while that batch waits for a whole-step boundary, the steps still
        run with the old one, and use the old batch's scale."""
        ctl = self.controller
        scale = self._scales.get(int(trainer.accumulate_grad_batches))
        if scale is None:  # an accumulation the controller never chose (set by hand): the controller's own
            scale = float(ctl.lr_scale)
        ctl.lr_scale = scale

    def _controller_metrics(self) -> dict[str, float]:
        return dict(self.controller.metrics(self.prefix + "controller/"))

    # -- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The tracker's (and controller's) state: numbers only, saved in the trainer's checkpoint."""
        if self.gns is None:
            return dict(self._restored) if self._restored is not None else {}
        # Lightning calls this on every rank (Trainer.save_checkpoint is collective): under DDP/FSDP the
        # steps since the last reduction across ranks are reduced now, so that the checkpoint has them
        self.gns.synchronize()
        if self.controller is None and self._controller_state is not None:
            return {"format": STATE_FORMAT, "tracker": self.gns.state_dict(), "controller": self._controller_state}
        out: dict[str, Any] = {"format": STATE_FORMAT, "tracker": self.gns.state_dict()}
        if self.controller is not None:
            # the controller's accumulation, and the learning-rate scale of every accumulation it chose
            # (the one in use may lag the decision: see _apply_accumulation)
            out["controller"] = {
                "controller": self.controller.state_dict(),
                "scales": [[a, v] for a, v in sorted(self._scales.items())],
            }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (applied when the tracker attaches at fit start)."""
        if not state_dict:
            return  # saved before the tracker existed: nothing to restore
        if not isinstance(state_dict, dict) or state_dict.get("format") != STATE_FORMAT:
            raise ValueError(
                "NoiseScaleCallback.load_state_dict: not a state saved by this callback "
                f"(format={state_dict.get('format') if isinstance(state_dict, dict) else type(state_dict).__name__!r})"
            )
        if self.gns is None:
            self._restored = dict(state_dict)
        else:  # strategies that restore after setup (restore_checkpoint_after_setup) call this after fit start
            self.gns.load_state_dict(state_dict["tracker"])
            self._controller_state = state_dict.get("controller")
