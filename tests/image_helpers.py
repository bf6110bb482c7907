"""Tiny image models and fits for the image-callback tests (EMA, SampleGrid)."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_ebm import EBM
from lightning_ebm.data import DigitsDataModule
from lightning_ebm.energies import ConvEnergy
from lightning_ebm.latents import Uniform
from lightning_ebm.samplers import GradientDescent


def tiny_model(latent=None) -> EBM:
    torch.manual_seed(0)
    return EBM(
        ConvEnergy(in_channels=1, width=2, image_size=8, activation="silu"),
        GradientDescent(steps=3, step_size=0.5),
        latent or Uniform((1, 8, 8)),
    )


def fit(tmp_path, model, callbacks, **kwargs) -> L.Trainer:
    defaults = dict(
        max_steps=4,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=CSVLogger(tmp_path),
        inference_mode=False,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer = L.Trainer(callbacks=callbacks, **{**defaults, **kwargs})
    trainer.fit(model, DigitsDataModule(batch_size=16))
    return trainer


def tile(png: np.ndarray, row: int, col: int, side: int, pad: int) -> np.ndarray:
    """Tile ``(row, col)`` of a grid picture of ``side``-pixel tiles separated by ``pad`` pixels."""
    top, left = pad + row * (side + pad), pad + col * (side + pad)
    return png[top : top + side, left : left + side, 0]
