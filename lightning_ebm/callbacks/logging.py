"""One logger-agnostic way to log a picture: W&B, TensorBoard, or a PNG in the run directory."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .._checks import check_int

__all__ = ["log_image", "figure_to_array", "run_dir", "held_out_data", "EveryNSteps", "Evaluation"]


class EveryNSteps(L.Callback):
    """Base of the picture and diagnostic callbacks: ``log_now`` every ``every_n_steps`` training
    steps and once more at the end of training, at most once per global step (those steps are
    recorded in ``logged_steps``). ``log_now`` runs on every rank; it decides who logs."""

    def __init__(self, every_n_steps: int) -> None:
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ValueError(f"{type(self).__name__}: every_n_steps must be a positive integer, "
                             f"got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.logged_steps: list[int] = []

    def log_now(self, trainer: L.Trainer, pl_module: Any) -> None:
        raise NotImplementedError

    def _log_once(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.global_step not in self.logged_steps:
            self.logged_steps.append(trainer.global_step)
            self.log_now(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._log_once(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._log_once(trainer, pl_module)


class Evaluation(L.Callback):
    """Base of the callbacks that evaluate on held-out data (FID, calibration, OOD detection).

    They collect batches in ``on_validation_batch_end`` and compute in ``on_validation_epoch_end``;
    the test loop (``trainer.test``, ``lightning-ebm test``) runs the same hooks on the test
    split. ``due`` says whether this run evaluates: every test run, and every
    ``every_n_validations``-th validation run (never the sanity check); ``stage`` is the prefix of
    the logged names, ``val`` or ``test``.
    """

    def __init__(self, every_n_validations: int = 1) -> None:
        self.every_n_validations = check_int(type(self).__name__, "every_n_validations", every_n_validations,
                                             minimum=1)
        self.num_validations = 0  # validation runs finished, not counting the sanity check or tests

    @staticmethod
    def stage(trainer: L.Trainer) -> str:
        return "test" if trainer.testing else "val"

    def due(self, trainer: L.Trainer, finished: bool = False) -> bool:
        """Whether the current run evaluates (``finished``: asked at its end, after it was counted)."""
        if trainer.sanity_checking:
            return False
        if trainer.testing:
            return True
        return (self.num_validations + (0 if finished else 1)) % self.every_n_validations == 0

    def count(self, trainer: L.Trainer) -> None:
        """Count a finished validation run (call at the start of ``on_validation_epoch_end``)."""
        if not trainer.sanity_checking and not trainer.testing:
            self.num_validations += 1

    def state_dict(self) -> dict[str, Any]:
        return {"num_validations": self.num_validations}  # a resumed run keeps the schedule

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_validations = int(state_dict.get("num_validations", 0))

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.on_validation_epoch_start(trainer, pl_module)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        self.on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.on_validation_epoch_end(trainer, pl_module)


def held_out_data(trainer: L.Trainer, n: int) -> Any:
    """Up to ``n`` held-out samples for a picture: the DataModule's ``val_data`` when it has one, else
    the first validation batches (of the DataModule, or the loaders given to ``fit``); ``None`` if none."""
    import torch

    datamodule = getattr(trainer, "datamodule", None)
    data = getattr(datamodule, "val_data", None)
    if data is None:
        loaders = None
        if datamodule is not None and hasattr(datamodule, "val_dataloader"):
            try:
                loaders = datamodule.val_dataloader()
            except NotImplementedError:  # a LightningDataModule without validation data
                loaders = None
        if loaders is None:
            loaders = getattr(trainer, "val_dataloaders", None)
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        batches, count = [], 0
        for batch in loaders if loaders is not None else ():
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            batches.append(x)
            count += x.shape[0]
            if count >= n:
                break
        data = torch.cat(batches) if batches else None
    return None if data is None else data[:n]


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a matplotlib figure (no pyplot, no display) to an ``(H, W, 3)`` uint8 array."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def run_dir(trainer: L.Trainer) -> Path:
    """The run's directory: the logger's versioned ``log_dir``, else ``default_root_dir``."""
    for logger in trainer.loggers:
        if isinstance(logger, (CSVLogger, TensorBoardLogger)) and logger.log_dir:
            return Path(logger.log_dir)
    return Path(trainer.default_root_dir)


def _as_array(image: Any) -> np.ndarray:
    if isinstance(image, Figure):
        return figure_to_array(image)
    arr = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)  # CHW -> HWC
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    return arr


@rank_zero_only
def log_image(trainer: L.Trainer, key: str, image: Any, step: int | None = None) -> Path | None:
    """Log ``image`` (a matplotlib Figure, or an HWC/CHW array in [0, 1] or uint8) under ``key``.

    W&B loggers receive a ``wandb.Image``; TensorBoard loggers an image summary. Unless W&B is
    the only logger, the picture is also written as
    ``<run dir>/images/<key>_step<global step>.png`` and that path is returned. Nothing is
    written under ``fast_dev_run`` (Lightning disables logging there).
    """
    if trainer.fast_dev_run:
        return None
    step = trainer.global_step if step is None else step
    arr = _as_array(image)
    wandb_only = bool(trainer.loggers) and all(isinstance(lg, WandbLogger) for lg in trainer.loggers)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[arr], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, arr, global_step=step, dataformats="HWC")
    if wandb_only:
        return None
    path = run_dir(trainer) / "images" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', key)}_step{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    from matplotlib.image import imsave

    imsave(path, arr)
    return path
