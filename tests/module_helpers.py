"""A tiny 2-D EBM, trainer and data shared by the module and callback tests."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import CSVLogger

from lightning_ebm import EBM
from lightning_ebm.data import Toy2DDataModule
from lightning_ebm.energies import MLPEnergy
from lightning_ebm.latents import Uniform
from lightning_ebm.samplers import GradientDescent


def make_model(latent=None, **kwargs) -> EBM:
    return EBM(
        energy=MLPEnergy(dim=2, hidden=32, num_layers=2),
        sampler=GradientDescent(steps=5, step_size=0.05),
        latent=latent or Uniform((2,), low=-4.0, high=4.0),
        **kwargs,
    )


def make_trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, max_steps=6, logger=CSVLogger(tmp_path, name="run"),
        enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
        log_every_n_steps=1, val_check_interval=3, check_val_every_n_epoch=None,
    )
    defaults.update(kwargs)
    return L.Trainer(default_root_dir=tmp_path, **defaults)


def tiny_data(**kwargs) -> Toy2DDataModule:
    return Toy2DDataModule(**{"batch_size": 32, "batches_per_epoch": 4, "num_val": 64, **kwargs})
