"""The generator loss through the sampler's unrolled last steps, for ``E_theta(x) = theta/2 |x|^2``.

Gradient descent: ``x_K = (1 - s theta)^K z``; unrolling the last ``k`` steps (the state before
them detached) gives ``d x_K / d theta = -s k (1 - s theta)^(K-1) z``, so the generator loss
``mean E_theta0(x_K)`` with the critic frozen has a closed-form gradient in ``theta``.
"""

from __future__ import annotations

import copy
import math
import warnings
from unittest import mock

import lightning as L
import pytest
import torch
from sampler_helpers import ScaledSquare, z_batch

from lightning_ebm import EBM
from lightning_ebm.cli import EBMCLI
from lightning_ebm.energies import MLPEnergy
from lightning_ebm.latents import Gaussian
from lightning_ebm.samplers import GradientDescent

THETA, S, K = 1.3, 0.1, 8


def test_generator_loss_arguments_are_checked():
    energy = ScaledSquare(THETA)
    with pytest.raises(ValueError, match="generator_loss_weight"):
        EBM(energy, GradientDescent(K, S), Gaussian((3,)), generator_loss_weight=-1.0)
    with pytest.raises(ValueError, match="generator_loss_steps"):
        EBM(energy, GradientDescent(K, S), Gaussian((3,)), generator_loss_steps=0)


def test_generator_loss_holds_the_critic_fixed():
    model = EBM(ScaledSquare(THETA), GradientDescent(K, S), Gaussian((3,)))
    z = z_batch()
    # detached samples: no path to the parameters at all
    assert not model.generator_loss(model.sampler(model.energy, z)).requires_grad
    x = model.sampler(model.energy, z, differentiable_steps=2)
    (g,) = torch.autograd.grad(model.generator_loss(x), model.energy.theta)
    # L = mean theta0/2 |x_K|^2 with theta0 frozen: dL/dtheta = theta0 * mean <x_K, dx_K/dtheta>
    c = 1 - S * THETA
    expected = THETA * (c**K * z * (-S * 2 * c ** (K - 1)) * z).sum(1).mean()
    assert math.isclose(float(g), float(expected), rel_tol=1e-10)
    # a spectrally normalised MLP, against a frozen deep copy of the critic as the reference
    sn = EBM(MLPEnergy(3, hidden=8, num_layers=2, spectral_norm=True), GradientDescent(3, 0.1),
             Gaussian((3,)))
    sn.eval()
    params = list(sn.energy.parameters())
    x = sn.sampler(sn.energy, z.float(), differentiable_steps=2)
    grads = torch.autograd.grad(sn.generator_loss(x), params, allow_unused=True)
    frozen = copy.deepcopy(sn.energy).requires_grad_(False)
    x = sn.sampler(sn.energy, z.float(), differentiable_steps=2)
    ref = torch.autograd.grad(frozen(x).mean(), params, allow_unused=True)
    assert sum(g is not None for g in grads) == len(params) - 1  # all but the last bias, which grad E ignores
    for g, r in zip(grads, ref, strict=True):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r)


def _training_grad(weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    model = EBM(ScaledSquare(THETA), GradientDescent(K, S), Gaussian((3,)), rng_seed=5, alpha=0.1,
                generator_loss_weight=weight, generator_loss_steps=2).double()
    batch = torch.randn(16, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        loss = model.training_step(batch, 0)
    (g,) = torch.autograd.grad(loss, model.energy.theta)
    z = Gaussian((3,)).sample(16, generator=torch.Generator().manual_seed(5 * 1_000_003), dtype=torch.float64)
    return g, z


def test_training_step_adds_the_weighted_generator_gradient():
    g0, _ = _training_grad(0.0)
    w = 0.7
    g1, z = _training_grad(w)
    c = 1 - S * THETA
    gen_grad = THETA * (c**K * z * (-S * 2 * c ** (K - 1)) * z).sum(1).mean()
    assert math.isclose(float(g1 - g0), w * float(gen_grad), rel_tol=1e-8)


def test_generator_loss_under_trainer_and_from_yaml(tmp_path):
    model = EBM(MLPEnergy(2, hidden=16, num_layers=2), GradientDescent(5, 0.05), Gaussian((2,)),
                generator_loss_weight=0.5, generator_loss_steps=2)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 2)), batch_size=32)
    trainer = L.Trainer(max_steps=2, logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        limit_val_batches=0)
    trainer.fit(model, data)
    assert "train/generator_loss" in trainer.callback_metrics
    args = ["--config", "configs/toy2d.yaml", "--model.init_args.generator_loss_weight=0.25",
            "--model.init_args.generator_loss_steps=3", "--trainer.logger=false"]
    with mock.patch("sys.argv", ["lightning-ebm"]):
        cli = EBMCLI(args=args, run=False)
    assert cli.model.generator_loss_weight == 0.25 and cli.model.generator_loss_steps == 3
