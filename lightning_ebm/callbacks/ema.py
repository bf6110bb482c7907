"""An exponential moving average of the weights, used for sampling and evaluation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging

from .._checks import check_bool, check_float, check_int, fail
from .._state import RAW_WEIGHTS_KEY, WEIGHT_KEYS

__all__ = ["EMA", "averaged_weights"]


class EMA(EMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging``, adjusted so that all evaluation sees the average.

    After every optimizer step ``ema = decay * ema + (1 - decay) * weights`` (the first step
    copies the weights). What changes from Lightning's callback:

    * the averaged weights stay in place for the whole validation run, until
      ``on_validation_end``, so every ``on_validation_epoch_end`` (the module's own metrics, the
      FID callback, whatever their order) evaluates the average, not only the callbacks that
      happen to run before this one;
    * ``averaged(pl_module)`` swaps them in for any other sampling (``SampleGrid`` uses it);
    * checkpoints hold the average as ``state_dict`` (so ``load_from_checkpoint`` and
      ``lightning-ebm sample`` use it) and the raw weights as ``current_model_state``, as in
      Lightning; state that is not averaged (a replay buffer's chains, kept as extra state) is
      taken from the live module, never from the stale copy inside the average.

    Args:
        decay: the EMA decay.
        update_every_n_steps: update the average every this many optimizer steps.
        update_starting_at_step: first optimizer step to update at.
        update_starting_at_epoch: first epoch to update at.
        device: where to keep the average (default: the module's device; ``"cpu"`` saves
            accelerator memory).
        use_buffers: also average the module's buffers.
    """

    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
        device: str | None = None,
        use_buffers: bool = True,
    ) -> None:
        if check_float("EMA", "decay", decay, minimum=0.0) >= 1.0:
            raise fail("EMA", "decay", "a finite number in [0, 1)", decay)
        update_every_n_steps = check_int("EMA", "update_every_n_steps", update_every_n_steps, minimum=1)
        update_starting_at_step = check_int("EMA", "update_starting_at_step", update_starting_at_step, minimum=0,
                                            allow_none=True)
        update_starting_at_epoch = check_int("EMA", "update_starting_at_epoch", update_starting_at_epoch,
                                             minimum=0, allow_none=True)
        use_buffers = check_bool("EMA", "use_buffers", use_buffers)
        super().__init__(device=device, use_buffers=use_buffers, decay=decay,
                         update_every_n_steps=update_every_n_steps,
                         update_starting_at_step=update_starting_at_step,
                         update_starting_at_epoch=update_starting_at_epoch)
        self.decay = decay
        self._swapped = False

    # ------------------------------------------------------------------ swapping
    def _swap(self, pl_module: L.LightningModule) -> None:
        if self._average_model is not None:
            self._swap_models(pl_module)
            self._swapped = not self._swapped

    @contextmanager
    def averaged(self, pl_module: L.LightningModule) -> Iterator[None]:
        """Within the block the module holds the averaged weights (no-op if it already does)."""
        if self._swapped or self._average_model is None:
            yield
            return
        self._swap(pl_module)
        try:
            yield
        finally:
            self._swap(pl_module)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._swapped:
            self._swap(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # swapped back in on_validation_end, after the module's own on_validation_epoch_end

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swapped:
            self._swap(pl_module)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self._swapped:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
        elif self._average_model is not None:
            # written mid-validation: the module holds the average already, the copy the raw weights
            state = self._average_model.state_dict()
            raw = {k.removeprefix("module."): v for k, v in state.items() if k.startswith("module.")}
            checkpoint[RAW_WEIGHTS_KEY] = raw
            checkpoint["averaging_state"] = {k: v for k, v in state.items() if not k.startswith("module.")}
        live = {k: v for k, v in pl_module.state_dict().items() if k.endswith("_extra_state")}
        for key in WEIGHT_KEYS:
            if key in checkpoint:
                checkpoint[key].update(live)


def averaged_weights(trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
    """A context in which ``pl_module`` holds its EMA weights when an ``EMA`` callback is in use."""
    for callback in trainer.callbacks:
        if isinstance(callback, EMA):
            return callback.averaged(pl_module)
    return nullcontext()
