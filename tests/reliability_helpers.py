"""Tiny models, trainers and state comparisons shared by the DDP, resume and guard tests.

Everything here is defined at module level so that ddp_spawn can pickle it.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_ebm import EBM
from lightning_ebm.callbacks import AtomicCheckpointIO
from lightning_ebm.data import Toy2DDataModule
from lightning_ebm.energies import MLPEnergy
from lightning_ebm.latents import ReplayBuffer, Uniform
from lightning_ebm.samplers import Langevin


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: on a busy 2-core machine torch's thread pool makes tiny ops 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_ebm(lr: float = 1e-2, **kwargs: Any) -> EBM:
    """Every random stream in play: replay buffer (draws, re-inits), Langevin noise, data jitter."""
    defaults: dict[str, Any] = dict(
        energy=MLPEnergy(dim=2, hidden=16, num_layers=2),
        sampler=Langevin(steps=4, step_size=0.05, noise_std=0.05),
        latent=ReplayBuffer(Uniform((2,), low=-4.0, high=4.0), capacity=64, reinit_prob=0.2),
        data_noise=0.05,
        optimizer=partial(torch.optim.Adam, lr=lr, betas=(0.5, 0.999)),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=4, gamma=0.7),
        val_max_samples=64,
    )
    defaults.update(kwargs)
    return EBM(**defaults)


def tiny_data(**kwargs: Any) -> Toy2DDataModule:
    return Toy2DDataModule(**{"batch_size": 32, "batches_per_epoch": 5, "num_val": 64, **kwargs})


def tiny_trainer(root: Path, **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        inference_mode=False, limit_val_batches=1, val_check_interval=3, check_val_every_n_epoch=None,
        plugins=[AtomicCheckpointIO()], default_root_dir=root,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class InjectFault(L.Callback):
    """Break training on purpose at the given global steps (counted before the step), on the given ranks.

    ``nan_weight``: a NaN in the first weight before the step's forward (NaN loss);
    ``huge_energy``: +1e6 on the energy's output bias before the forward (finite but exploding energies);
    ``huge_grad``: gradients times 1e12 after backward (exploding gradient norm);
    ``inf_grad``: an inf gradient after backward (what an fp16 overflow looks like);
    ``nan_after_step``: a NaN in the first weight after the optimizer step (seen only by the
    parameter check, and only on the poisoned ranks).
    """

    def __init__(self, kind: str, steps: list[int], ranks: list[int] | None = None) -> None:
        assert kind in ("nan_weight", "huge_energy", "huge_grad", "inf_grad", "nan_after_step"), kind
        self.kind, self.steps, self.ranks = kind, set(steps), ranks
        self.fired: list[int] = []

    def _due(self, trainer: L.Trainer, step: int) -> bool:
        return step in self.steps and (self.ranks is None or trainer.global_rank in self.ranks)

    @torch.no_grad()
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step
        if self._due(trainer, self._step) and self.kind in ("nan_weight", "huge_energy"):
            self.fired.append(self._step)
            if self.kind == "nan_weight":
                next(pl_module.energy.parameters()).view(-1)[0] = float("nan")
            else:
                pl_module.energy.net[-1].bias += 1e6

    @torch.no_grad()
    def on_after_backward(self, trainer, pl_module):
        if self._due(trainer, self._step) and self.kind in ("huge_grad", "inf_grad"):
            self.fired.append(self._step)
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            if self.kind == "inf_grad":
                grads[0].view(-1)[0] = float("inf")
            for g in grads:
                g.mul_(1e12)

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._due(trainer, self._step) and self.kind == "nan_after_step":
            self.fired.append(self._step)
            next(pl_module.energy.parameters()).view(-1)[0] = float("nan")


class RecordStates(L.Callback):
    """Keep, after every training step, what a rollback would restore (weights, chains, learning rate)."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, Any]] = {}

    def on_train_start(self, trainer, pl_module):
        self.on_train_batch_end(trainer, pl_module, None, None, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states[trainer.global_step] = {
            "model": {k: v.clone() for k, v in pl_module.state_dict().items() if isinstance(v, torch.Tensor)},
            "replay_buffer": None if pl_module.latent.buffer is None else pl_module.latent.buffer.clone(),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        }


def training_state(trainer: L.Trainer, model: EBM) -> dict[str, Any]:
    """Everything that decides how training continues: weights, chains, optimiser, schedule, streams."""
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
        "replay_buffer": model.latent.buffer.clone(),
        "optimizer": trainer.optimizers[0].state_dict(),
        "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        "rng": model.rng.get_state().clone(),
        "data": trainer.datamodule.train_dataloader().state_dict(),
        "global_step": trainer.global_step,
    }


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Paths at which two nested states differ (tensors compared bitwise)."""
    if a is None or b is None:
        return [] if a is b else [f"{where}: {type(a).__name__} vs {type(b).__name__}"]
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
            return [f"{where}: {type(a).__name__} vs {type(b).__name__}"]
        if torch.equal(a, b):
            return []
        diff = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "n/a"
        return [f"{where}: max |diff| {diff}"]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} vs {len(b)}"]
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


class CheckRestored(L.Callback):
    """On every rank, at the start of a resumed fit: are its chains and stream the ones saved for it?

    Writes ``rank<r>.json`` to ``out_dir`` (the parent process reads them).
    """

    def __init__(self, ckpt_path: str, out_dir: str) -> None:
        self.ckpt_path, self.out_dir = ckpt_path, out_dir

    def on_train_start(self, trainer, pl_module):
        ranks = torch.load(self.ckpt_path, weights_only=False)["lightning_ebm"]["ranks"]
        buffer, rng = pl_module.latent.buffer, pl_module.rng.get_state()
        result = {
            "world_size": trainer.world_size,
            "buffer_is_mine": torch.equal(buffer, ranks[trainer.global_rank]["replay_buffers"]["latent"]),
            "rng_is_mine": torch.equal(rng, ranks[trainer.global_rank]["rng_state"]),
            "buffer_is_another_ranks": any(
                torch.equal(buffer, r["replay_buffers"]["latent"]) for i, r in enumerate(ranks)
                if i != trainer.global_rank),
        }
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


class DumpRankState(L.Callback):
    """Save every rank's weights, chains and guard counter at the end of training (``rank<r>.pt``)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        guards = [c for c in trainer.callbacks if type(c).__name__ == "DivergenceGuard"]
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        torch.save({
            "model": {k: v.clone() for k, v in pl_module.state_dict().items() if isinstance(v, torch.Tensor)},
            "replay_buffer": pl_module.latent.buffer.clone(),
            "rollbacks": guards[0].rollbacks if guards else None,
        }, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")
