"""Objectives: MaximumLikelihood is today's loss, EBM builds it from its old arguments, a new
objective is one class (denoising score matching, defined only here, trained to its closed form)."""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import pytest
import torch
from conftest import random_spd
from module_helpers import make_model
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ebm import EBM
from lightning_ebm.cli import EBMCLI
from lightning_ebm.latents import Gaussian, ReplayBuffer, Uniform
from lightning_ebm.objectives import MaximumLikelihood, Objective, TrainingStep
from lightning_ebm.samplers import GradientDescent, Langevin


def test_default_objective_is_maximum_likelihood_built_from_the_old_arguments():
    model = make_model(alpha=0.3, generator_loss_weight=0.5, generator_loss_steps=2)
    assert isinstance(model.objective, MaximumLikelihood)
    assert (model.objective.alpha, model.objective.generator_loss_weight, model.objective.generator_loss_steps) == (
        0.3, 0.5, 2)
    assert model.hparams["objective"] is None  # the config keeps meaning what it meant


@pytest.mark.parametrize("kwargs", [dict(alpha=0.2), dict(generator_loss_weight=1.0), dict(generator_loss_steps=3)])
def test_an_objective_and_the_old_loss_arguments_together_are_an_error(kwargs):
    with pytest.raises(ValueError, match=r"EBM: give either objective=MaximumLikelihood\(.*\) or alpha"):
        make_model(objective=MaximumLikelihood(), **kwargs)


def test_objective_must_be_an_objective():
    with pytest.raises(TypeError, match=r"EBM: objective must be a lightning_ebm.objectives.Objective or None, "
                                        r"got str 'ml'"):
        make_model(objective="ml")


@pytest.mark.parametrize("latent", [Gaussian((2,)), ReplayBuffer(Uniform((2,)), capacity=64, reinit_prob=0.3)],
                         ids=["gaussian", "replay"])
@pytest.mark.parametrize("gen", [0.0, 0.7], ids=["critic", "with-generator-loss"])
def test_explicit_maximum_likelihood_trains_bit_identically_to_the_arguments(latent, gen):
    """The same draws in the same order: three steps with each give equal parameters, bit for bit."""
    import copy

    def run(**kwargs):
        torch.manual_seed(0)
        model = EBM(nn.Sequential(nn.Linear(2, 16), nn.SiLU(), nn.Linear(16, 1), nn.Flatten(0)),
                    Langevin(steps=3, step_size=0.05, noise_std=0.05), copy.deepcopy(latent), data_noise=0.1,
                    rng_seed=5, **kwargs)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        data = torch.randn(6, 16, 2, generator=torch.Generator().manual_seed(1))
        for x in data:
            opt.zero_grad()
            model.training_step(x, 0).backward()
            opt.step()
        return model.state_dict()

    objective = MaximumLikelihood(alpha=0.2, generator_loss_weight=gen, generator_loss_steps=2)
    a = run(alpha=0.2, generator_loss_weight=gen, generator_loss_steps=2)
    b = run(objective=objective)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], Tensor):
            assert torch.equal(a[key], b[key]), key
        else:  # the replay buffer's chains
            assert torch.equal(a[key]["buffer"], b[key]["buffer"]), key


def test_objective_is_selectable_from_yaml(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("""
model:
  class_path: lightning_ebm.EBM
  init_args:
    energy: {class_path: lightning_ebm.energies.MLPEnergy, init_args: {dim: 2}}
    sampler: {class_path: lightning_ebm.samplers.GradientDescent, init_args: {steps: 2, step_size: 0.1}}
    latent: {class_path: lightning_ebm.latents.Uniform, init_args: {shape: [2]}}
    objective:
      class_path: lightning_ebm.objectives.MaximumLikelihood
      init_args: {alpha: 0.25, generator_loss_weight: 0.5}
data:
  class_path: lightning_ebm.data.Toy2DDataModule
trainer: {logger: false, accelerator: cpu, enable_model_summary: false}
""")
    cli = EBMCLI(args=["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}",
                       "--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
                       "--model.init_args.sampler.init_args.steps=1", "--data.init_args.batches_per_epoch=2"])
    objective = cli.model.objective
    assert type(objective) is MaximumLikelihood
    assert (objective.alpha, objective.generator_loss_weight, objective.generator_loss_steps) == (0.25, 0.5, 1)
    assert "train/generator_loss" in cli.trainer.callback_metrics
    # the CLI's checkpoint holds the objective as plain config: it loads with weights_only=True
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    loaded = EBM.load_from_checkpoint(ckpt, weights_only=True)
    assert type(loaded.objective) is MaximumLikelihood and loaded.objective.alpha == 0.25


# ------------------------------------------------------------------ a new objective in one class
class DenoisingScoreMatching(Objective):
    """``E || -grad E(x + s eps) + eps / s ||^2``: the model's score matches the noisy data's (Vincent 2011).

    Needs no negatives. Its optimum for Gaussian data ``N(mu, Sigma)`` and a quadratic energy
    ``0.5 (x - m)^T P (x - m)`` is ``P = (Sigma + s^2 I)^-1``, ``m = mu``.
    """

    needs_negatives = False

    def __init__(self, sigma: float) -> None:
        self.sigma = sigma

    def __call__(self, step: TrainingStep) -> tuple[Tensor, dict[str, Tensor]]:
        x = step.data
        eps = torch.randn(x.shape, generator=step.rng, device=x.device, dtype=x.dtype)
        noisy = (x + self.sigma * eps).requires_grad_(True)
        (grad,) = torch.autograd.grad(step.energy_of(noisy).sum(), noisy, create_graph=True)
        loss = (-grad + eps / self.sigma).pow(2).flatten(1).sum(1).mean()
        return loss, {"dsm": loss.detach()}


class LearnedQuadratic(nn.Module):
    """``0.5 (x - m)^T L L^T (x - m)`` with ``L`` and ``m`` learned."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.L = nn.Parameter(torch.eye(dim, dtype=torch.float64))
        self.m = nn.Parameter(torch.zeros(dim, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        d = x - self.m
        return 0.5 * (d @ self.L).pow(2).sum(1)


class GaussianData(L.LightningDataModule):
    def __init__(self, data: Tensor, batch_size: int) -> None:
        super().__init__()
        self.data, self.batch_size = data, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.data), batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(0))


def test_denoising_score_matching_defined_only_here_trains_to_its_closed_form(tmp_path):
    torch.manual_seed(0)
    dim, sigma = 2, 0.5
    cov = random_spd(dim, seed=4, low=0.5, high=2.0)
    mu = torch.tensor([1.0, -0.5], dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    data = mu + torch.randn(8192, dim, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    sampler = GradientDescent(steps=5, step_size=0.1)  # needed for generation only: training must not run it
    model = EBM(LearnedQuadratic(dim), sampler, Gaussian((dim,)), objective=DenoisingScoreMatching(sigma),
                optimizer=partial(torch.optim.Adam, lr=0.05),
                lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=100, gamma=0.2), rng_seed=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=300, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                        limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(model, GaussianData(data, 1024))
    # the closed form, from the data actually used: its mean and (biased) covariance
    emp_mu = data.mean(0)
    emp_cov = (data - emp_mu).T @ (data - emp_mu) / data.shape[0]
    P_star = torch.linalg.inv(emp_cov + sigma**2 * torch.eye(dim, dtype=torch.float64))
    with torch.no_grad():
        P = model.energy.L @ model.energy.L.T
    assert torch.linalg.norm(P - P_star) / torch.linalg.norm(P_star) < 0.03, (P, P_star)  # 0.005 measured
    assert torch.linalg.norm(model.energy.m.detach() - emp_mu) < 0.03, (model.energy.m, emp_mu)
    # a control: the untrained start is far from the optimum, so the check above can fail
    assert torch.linalg.norm(torch.eye(dim, dtype=torch.float64) - P_star) / torch.linalg.norm(P_star) > 0.3
    metrics = trainer.callback_metrics
    assert "train/dsm" in metrics and math.isfinite(float(metrics["train/loss"]))
    assert sampler.last_nfe == 0 and not any(k.startswith("train/sampler/") for k in metrics), metrics.keys()
    assert "train/nfe" not in metrics and "train/grad_norm_gen" not in metrics


def test_maximum_likelihood_checks_its_arguments():
    with pytest.raises(ValueError, match=r"MaximumLikelihood: alpha must be a finite number >= 0, got -1"):
        MaximumLikelihood(alpha=-1)
    with pytest.raises(ValueError, match=r"MaximumLikelihood: generator_loss_steps must be a positive integer, "
                                         r"got True"):
        MaximumLikelihood(generator_loss_steps=True)


def test_training_step_logs_the_samplers_report(tmp_path):
    from module_helpers import make_trainer, tiny_data

    model = make_model()
    trainer = make_trainer(tmp_path, max_steps=2, val_check_interval=None, limit_val_batches=0)
    trainer.fit(model, tiny_data())
    metrics = trainer.callback_metrics
    assert float(metrics["train/sampler/nfe"]) == model.sampler.steps == float(metrics["train/nfe"])
