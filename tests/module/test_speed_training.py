"""Training through the samplers' speed paths: compiled sampler, bf16-mixed precision, channels_last.

Three Trainer steps with ``compile=True`` end where the eager run ends; under ``bf16-mixed`` the
energy runs in bf16 while the state and its update stay float32; ``channels_last`` keeps the
memory format from the data through the sampler to ``generate``.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from sampler_helpers import TinyConv, x0
from torch.utils.data import DataLoader, TensorDataset

from lightning_ebm import EBM
from lightning_ebm.energies import MLPEnergy
from lightning_ebm.latents import Gaussian, Uniform
from lightning_ebm.samplers import GradientDescent, Langevin

CL = torch.channels_last
SHAPE = (256, 2)


def test_training_with_the_compiled_sampler_follows_the_eager_run(tmp_path):
    """Three Trainer steps with compile=True end at the same parameters as with the eager sampler."""
    data = DataLoader(TensorDataset(x0(seed=5)), batch_size=SHAPE[0])
    finals = []
    for compile in (False, True):
        torch.manual_seed(0)
        sampler = Langevin(steps=6, step_size=0.05, noise_std=0.1, grad_clip=0.5, clamp=(-2.0, 2.0), compile=compile)
        model = EBM(MLPEnergy(dim=2, hidden=32, num_layers=2), sampler, Uniform((2,), low=-2.0, high=2.0), rng_seed=0)
        initial = torch.cat([p.detach().flatten() for p in model.parameters()])
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(model, train_dataloaders=data)
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert (finals[0] - initial).abs().max() > 1e-4  # training moved them
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-5, atol=1e-6)


class RecordingSampler(GradientDescent):
    """GradientDescent that records the autocast state and dtypes it saw on every call."""

    def __call__(self, energy, x0, **kwargs):
        x = super().__call__(energy, x0, **kwargs)
        self.__dict__.setdefault("_calls", []).append(
            {"autocast": torch.is_autocast_enabled("cpu"), "x0": x0, "x": x,
             "energy_dtype": energy(x0[:2]).dtype})
        return x


def test_bf16_mixed_training_samples_and_updates_in_float32(tmp_path):
    torch.manual_seed(0)
    sampler = RecordingSampler(steps=4, step_size=0.05)
    model = EBM(MLPEnergy(dim=2, hidden=32), sampler, Uniform((2,), low=-2.0, high=2.0), rng_seed=0)
    data = DataLoader(TensorDataset(torch.randn(64, 2)), batch_size=32)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=data)
    calls = sampler._calls
    assert len(calls) == 2
    for call in calls:
        assert call["autocast"] and call["energy_dtype"] == torch.bfloat16
        assert call["x0"].dtype == call["x"].dtype == torch.float32
        assert torch.isfinite(call["x"]).all()
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_ebm_channels_last_trains_and_generates_in_channels_last(tmp_path):
    torch.manual_seed(0)
    sampler = RecordingSampler(steps=3, step_size=0.1)
    model = EBM(TinyConv(), sampler, Gaussian((3, 8, 8)), channels_last=True, rng_seed=0)
    assert model.energy.net[2].weight.is_contiguous(memory_format=CL)
    data = DataLoader(TensorDataset(torch.randn(16, 3, 8, 8)), batch_size=8)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=data)
    assert len(sampler._calls) == 2
    assert all(c["x0"].is_contiguous(memory_format=CL) and c["x"].is_contiguous(memory_format=CL)
               for c in sampler._calls)
    assert model._data((torch.randn(2, 3, 8, 8),), 0, "test").is_contiguous(memory_format=CL)
    assert model.generate(5).is_contiguous(memory_format=CL)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_channels_last_needs_image_samples():
    with pytest.raises(ValueError, match=r"channels_last=True needs image samples of shape \(C, H, W\).*\(2,\)"):
        EBM(MLPEnergy(dim=2), GradientDescent(steps=1, step_size=0.1), Uniform((2,)), channels_last=True)
    with pytest.raises(ValueError, match="channels_last must be True or False"):
        EBM(TinyConv(), GradientDescent(steps=1, step_size=0.1), Gaussian((3, 8, 8)), channels_last="yes")
