"""``DivergenceGuard``: catch a diverging EBM, then stop with a good checkpoint or roll back.

EBM training is known to diverge (energies run away, the sampler's samples blow up). The guard
watches, after every training step, the loss, the energies, the parameters' gradient norm and
the parameters themselves. On divergence it restores the last state that passed every check
(an in-memory snapshot of the model, its replay buffer, the optimizers, the schedulers and any
weight average such as ``EMA``),
lowers the learning rate and reseeds the module's random stream; then it either continues
(``mode="rollback"``, up to ``max_rollbacks`` times) or saves that state as a checkpoint and
raises ``DivergenceError`` with what diverged, where, and how to resume (``mode="stop"``). A
diverged value is never replaced by anything: the state that produced it is thrown away.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from .logging import run_dir

__all__ = ["DivergenceGuard", "DivergenceError"]


class DivergenceError(RuntimeError):
    """Training diverged and ``DivergenceGuard`` stopped it (the message says how to resume)."""


def _to_cpu(obj: Any) -> Any:
    return apply_to_collection(obj, Tensor, lambda t: t.detach().to("cpu", copy=True))


def _averagers(trainer: L.Trainer) -> list[WeightAveraging]:
    """The weight-averaging callbacks (``EMA``, SWA-style) that hold an average to snapshot."""
    return [cb for cb in trainer.callbacks if isinstance(cb, WeightAveraging) and cb._average_model is not None]


def _norm(tensors: list[Tensor]) -> Tensor:
    norms = [torch.linalg.vector_norm(t.detach().float()) for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms))


class DivergenceGuard(L.Callback):
    """Stop or roll back a training run whose loss, energies or gradients blow up.

    Checked after every ``check_every_n_steps``-th training step, on every rank (the verdict is
    shared, so all ranks act together): the training loss and the logged ``energy_metrics`` are
    finite, ``|energy| <= max_abs_energy``, the parameters' gradient norm is finite and at most
    ``max_grad_norm``, and the parameters are finite. (Under fp16 mixed precision the gradient
    scaler skips steps with non-finite gradients by itself; those are not divergence.)

    Every ``snapshot_every_n_steps`` steps, and at the start of training, the guard copies the
    state to host memory; a copy becomes the last good state once a later step, which ran from
    it, has passed the checks (the loss and energies of a step are those of the weights before
    it). On divergence it restores the last good state, multiplies
    the learning rate by ``lr_factor`` and reseeds the module's ``rng``. In ``"rollback"`` mode
    training then continues (the step counter keeps counting: rolled-back steps count against
    ``max_steps``); after ``max_rollbacks`` rollbacks, or at once in ``"stop"`` mode, it saves
    the restored state to ``<dirpath>/last-good.ckpt`` and raises ``DivergenceError``.

    Args:
        mode: ``"stop"`` or ``"rollback"``.
        max_abs_energy: largest allowed ``|value|`` of the ``energy_metrics`` (``None``: only finiteness).
        max_grad_norm: largest allowed total 2-norm of the parameters' gradients (``None``: only finiteness).
        energy_metrics: logged metrics (``trainer.callback_metrics``) held to ``max_abs_energy``.
        check_every_n_steps: check one training step in this many (each check syncs the device once).
        snapshot_every_n_steps: refresh the last-good snapshot after this many steps that passed.
        lr_factor: learning-rate multiplier applied at every rollback, in ``(0, 1]``.
        max_rollbacks: rollbacks allowed over the whole run (saved in checkpoints) before stopping.
        dirpath: where ``last-good.ckpt`` goes; default: the ModelCheckpoint's directory, else
            ``<run dir>/checkpoints``.
    """

    def __init__(
        self,
        mode: Literal["stop", "rollback"] = "stop",
        max_abs_energy: float | None = 1e4,
        max_grad_norm: float | None = 1e4,
        energy_metrics: Sequence[str] = ("train/energy_data", "train/energy_gen"),
        check_every_n_steps: int = 1,
        snapshot_every_n_steps: int = 50,
        lr_factor: float = 0.5,
        max_rollbacks: int = 3,
        dirpath: str | None = None,
    ) -> None:
        if mode not in ("stop", "rollback"):
            raise ValueError(f"DivergenceGuard: mode must be 'stop' or 'rollback', got {mode!r}")
        for name, value in (("max_abs_energy", max_abs_energy), ("max_grad_norm", max_grad_norm)):
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ValueError(
                    f"DivergenceGuard: {name} must be a positive finite number or None, got {value!r}"
                )
        for name, value, low in (("check_every_n_steps", check_every_n_steps, 1),
                                 ("snapshot_every_n_steps", snapshot_every_n_steps, 1),
                                 ("max_rollbacks", max_rollbacks, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"DivergenceGuard: {name} must be an integer >= {low}, got {value!r}")
        if not (isinstance(lr_factor, (int, float)) and 0 < lr_factor <= 1):
            raise ValueError(f"DivergenceGuard: lr_factor must be in (0, 1], got {lr_factor!r}")
        self.mode, self.lr_factor, self.max_rollbacks = mode, float(lr_factor), max_rollbacks
        self.dirpath = dirpath
        self.max_abs_energy, self.max_grad_norm = max_abs_energy, max_grad_norm
        self.energy_metrics = tuple(energy_metrics)
        self.check_every_n_steps, self.snapshot_every_n_steps = check_every_n_steps, snapshot_every_n_steps
        self.rollbacks = 0
        self._snapshot: dict[str, Any] | None = None  # the last good state
        self._pending: dict[str, Any] | None = None  # a newer copy that no later step has vouched for yet
        self._lr_scale = 1.0  # learning-rate multiplier relative to the snapshot's
        self._active = False
        self._loss: Tensor | None = None
        self._grad_norm: Tensor | None = None
        self._warned_missing: set[str] = set()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks": self.rollbacks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rollbacks = int(state_dict.get("rollbacks", 0))

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not bool(torch.isfinite(_norm(list(pl_module.parameters())))):
            raise DivergenceError(
                f"DivergenceGuard: the parameters are not finite at the start of training (global step "
                f"{trainer.global_step}): the checkpoint or the initialisation is broken; resume from an "
                "earlier checkpoint"
            )
        self._snapshot, self._pending = self._take_snapshot(trainer, pl_module), None
        self._lr_scale = 1.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._active = trainer.global_step % self.check_every_n_steps == 0
        self._loss = self._grad_norm = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        if self._active:
            self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if not self._active:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            norm = _norm(grads)
            self._grad_norm = norm if self._grad_norm is None else torch.maximum(self._grad_norm, norm)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._active:
            return
        failure = self._check(trainer, pl_module)
        assert self._snapshot is not None  # taken in on_train_start
        if failure is None:
            if self._pending is not None:  # this step ran from it and passed
                self._snapshot, self._pending, self._lr_scale = self._pending, None, 1.0
            if trainer.global_step - self._snapshot["step"] >= self.snapshot_every_n_steps:
                self._pending = self._take_snapshot(trainer, pl_module)
            return
        where = (f"at global step {trainer.global_step} (epoch {trainer.current_epoch}, "
                 f"training batch {batch_idx})")
        if self.mode == "rollback" and self.rollbacks < self.max_rollbacks:
            self.rollbacks += 1
            lrs = self._restore(trainer, pl_module)
            rank_zero_warn(
                f"DivergenceGuard: {failure} {where}. Rolled back to the state of global step "
                f"{self._snapshot['step']}, multiplied the learning rate by {self.lr_factor} (now {lrs}) and "
                f"reseeded the module's random stream: rollback {self.rollbacks} of {self.max_rollbacks}."
            )
            pl_module.log("guard/rollbacks", float(self.rollbacks))
            return
        self._stop(trainer, pl_module, failure, where)

    # ------------------------------------------------------------------ internals
    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str | None:
        """Name the first failed check over all ranks, or ``None``; one device sync, one collective."""
        names: list[str] = []
        values: list[Tensor] = []
        if self._loss is not None:
            names.append("training loss")
            values.append(self._loss)
        for key in self.energy_metrics:
            value = trainer.callback_metrics.get(key)
            if value is None:
                if key not in self._warned_missing:
                    self._warned_missing.add(key)
                    rank_zero_warn(f"DivergenceGuard: metric {key!r} was not logged; it is not checked")
                continue
            names.append(key)
            values.append(torch.as_tensor(value))
        if self._grad_norm is not None:
            names.append("gradient norm")
            values.append(self._grad_norm)
        names.append("parameter norm")
        values.append(_norm(list(pl_module.parameters())))
        stacked = torch.stack([v.detach().float().reshape(()).to(pl_module.device) for v in values])
        if trainer.world_size > 1:
            stacked = trainer.strategy.all_gather(stacked).reshape(trainer.world_size, -1)
        else:
            stacked = stacked[None]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        for rank, row in enumerate(stacked.cpu().tolist()):
            on = f" on rank {rank}" if trainer.world_size > 1 else ""
            for name, value in zip(names, row, strict=True):
                if not math.isfinite(value):
                    if name == "gradient norm" and scaler is not None:
                        continue  # the fp16 gradient scaler skips this step itself
                    return f"{name} = {value}{on} is not finite"
                too_big = self.max_abs_energy is not None and abs(value) > self.max_abs_energy
                if name in self.energy_metrics and too_big:
                    return f"{name} = {value:.4g}{on} exceeds max_abs_energy={self.max_abs_energy:g}"
                if name == "gradient norm" and self.max_grad_norm is not None and value > self.max_grad_norm:
                    return f"{name} = {value:.4g}{on} exceeds max_grad_norm={self.max_grad_norm:g}"
        return None

    @staticmethod
    def _take_snapshot(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return {
            "step": trainer.global_step,
            "module": _to_cpu(pl_module.state_dict()),
            "optimizers": [_to_cpu(opt.state_dict()) for opt in trainer.optimizers],
            "schedulers": [_to_cpu(cfg.scheduler.state_dict()) for cfg in trainer.lr_scheduler_configs],
            # an EMA that ran before the guard in this step has already averaged the diverged weights in
            "averages": [(_to_cpu(cb._average_model.state_dict()), cb.state_dict())
                         for cb in _averagers(trainer)],
        }

    def _restore(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[float]:
        """Load the snapshot, lower the learning rate, reseed; returns the new learning rates."""
        assert self._snapshot is not None  # taken in on_train_start
        self._pending = None  # it led to the divergence
        pl_module.load_state_dict(self._snapshot["module"])
        for opt, state in zip(trainer.optimizers, self._snapshot["optimizers"], strict=True):
            opt.load_state_dict(state)
        for callback, (average, state) in zip(_averagers(trainer), self._snapshot["averages"], strict=True):
            callback._average_model.load_state_dict(average)
            callback.load_state_dict(state)
        self._lr_scale *= self.lr_factor
        for cfg, state in zip(trainer.lr_scheduler_configs, self._snapshot["schedulers"], strict=True):
            cfg.scheduler.load_state_dict(state)
            for attr in ("base_lrs", "_last_lr"):
                if isinstance(getattr(cfg.scheduler, attr, None), list):
                    setattr(cfg.scheduler, attr, [lr * self._lr_scale for lr in getattr(cfg.scheduler, attr)])
        lrs = []
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["lr"] * self._lr_scale
                if "initial_lr" in group:
                    group["initial_lr"] = group["initial_lr"] * self._lr_scale
                lrs.append(group["lr"])
        rng = getattr(pl_module, "rng", None)
        if isinstance(rng, torch.Generator):  # a fresh stream, different on every rank and rollback
            seed = rng.initial_seed() * 6_364_136_223_846_793_005 + self.rollbacks + 1
            rng.manual_seed(seed % (2**63 - 1))
        return lrs

    def _stop(self, trainer: L.Trainer, pl_module: L.LightningModule, failure: str, where: str) -> None:
        lrs = self._restore(trainer, pl_module)
        path = self._checkpoint_dir(trainer) / "last-good.ckpt"
        trainer.save_checkpoint(path)
        if self.mode == "stop":
            why, advice = "mode='stop'", "or let the guard do this by itself with DivergenceGuard(mode='rollback')."
        else:
            why = f"all {self.max_rollbacks} rollbacks are spent"
            advice = (f"Training diverged again after {self.max_rollbacks} rollbacks, so more of the same is unlikely "
                      "to help: lower the learning rate in the config, raise the regulariser `alpha`, clip the "
                      "sampler's gradients (`grad_clip`), or allow more rollbacks (`max_rollbacks`).")
        raise DivergenceError(
            f"DivergenceGuard stopped training ({why}): {failure} {where}.\n"
            f"The last good state (model, replay buffer, optimizer of global step {self._snapshot['step']}), "
            f"with the learning rate multiplied by {self.lr_factor} (now {lrs}), a reseeded random stream, "
            f"is saved to {path}.\n"
            f"Resume from it:  lightning-ebm fit --config <your config> --ckpt_path {path}\n"
            "(on resume the learning rate comes from the checkpoint's optimizer state, not from the config), "
            f"{advice}"
        )

    def _checkpoint_dir(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        callback = trainer.checkpoint_callback
        if callback is not None and getattr(callback, "dirpath", None):
            return Path(callback.dirpath)
        return run_dir(trainer) / "checkpoints"
