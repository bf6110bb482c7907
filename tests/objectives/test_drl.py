"""Diffusion recovery likelihood against closed forms, its bad input, and a 2-D toy trained through EBM.

The schedule's marginal is checked in float64 against its product formula; one recovery step
against the gradient of ``E(x, t) + ||x~ - x||^2 / (2 r^2)`` by autograd; the chain's stationary
law, for a quadratic noise-conditioned energy, against the Gaussian posterior of ``x_t`` given
``x_{t+1}`` (exactly: the unadjusted Langevin law of that Gaussian, whose mean is the posterior's
and whose variance is ``1 / (L (1 - h L / 2))``, ``L`` the posterior precision, ``h`` the step).
Tolerances: 5 standard errors of the ``N`` samples.
"""

from __future__ import annotations

import math
import sys
import time
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from integration.test_configs import shrink
from torch import nn

from lightning_ebm import EBM
from lightning_ebm.cli import main
from lightning_ebm.data import Toy2DDataModule, sample_toy
from lightning_ebm.energies import ConvEnergy, MLPEnergy, ResNetEnergy
from lightning_ebm.latents import Gaussian
from lightning_ebm.metrics import mmd_rbf
from lightning_ebm.objectives import DiffusionRecoveryLikelihood, TrainingStep
from lightning_ebm.samplers import DiffusionRecovery, Langevin, NoiseSchedule
from lightning_ebm.samplers.recovery import recovery_update

N = 40_000
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class LevelGaussian(nn.Module):
    """``E(x, t) = 0.5 p_t |x - m_t|^2``: the closed-form noise-conditioned energy."""

    def __init__(self, precisions: list[float], means: list[float]) -> None:
        super().__init__()
        self.num_levels = len(precisions)
        self.p = nn.Parameter(torch.tensor(precisions, dtype=torch.float64))
        self.m = nn.Parameter(torch.tensor(means, dtype=torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.zeros(x.shape[0], dtype=torch.long) if t is None else t
        return 0.5 * self.p[t] * (x.flatten(1) - self.m[t, None]).pow(2).sum(1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_schedule_rule_and_marginal_variance():
    s = NoiseSchedule("test", num_levels=4, sigma_min=0.1, sigma_max=0.8)
    assert s.sigmas == pytest.approx([0.1, 0.1 * 8 ** (1 / 3), 0.1 * 8 ** (2 / 3), 0.8])
    assert s.alpha_bars[-1] == pytest.approx(math.prod(math.sqrt(1 - x * x) for x in s.sigmas))
    var0 = 2.5
    x0 = math.sqrt(var0) * torch.randn(N, 3, generator=gen(0), dtype=torch.float64)
    for t in range(s.num_levels):
        level = torch.full((N,), t)
        x_t = s.marginal(x0, level, torch.randn(N, 3, generator=gen(t + 1), dtype=torch.float64))
        x_next = s.noise_step(x_t, level, torch.randn(N, 3, generator=gen(t + 9), dtype=torch.float64))
        for x, ab in ((x_t, s.alpha_bars[t]), (x_next, s.alpha_bars[t + 1])):  # variance preserving
            expected = ab**2 * var0 + 1 - ab**2
            assert float(x.var(0).mean()) == pytest.approx(expected, rel=5 * math.sqrt(2 / (3 * N)))
        # and x_t's correlation with x_0 is alpha_bar_t's
        assert float((x_t * x0).mean() / var0) == pytest.approx(s.alpha_bars[t], abs=5 / math.sqrt(N))
    assert NoiseSchedule("a", sigmas=[0.1, 0.2]) == NoiseSchedule("b", num_levels=2, sigma_min=0.1, sigma_max=0.2)


def test_one_recovery_step_follows_the_conditional_energy_gradient():
    energy = LevelGaussian([1.5, 0.7, 0.3], [0.2, -0.5, 1.0])
    sampler = DiffusionRecovery(steps=1, b=0.4, sigmas=[0.1, 0.3, 0.6])
    t = torch.tensor([0, 1, 2, 1, 0])
    x_next = torch.randn(5, 2, generator=gen(0), dtype=torch.float64)
    x = torch.randn(5, 2, generator=gen(1), dtype=torch.float64)
    anchor, r = sampler.schedule.anchor_and_scale(x_next, t)
    h = 0.5 * (sampler.b * r) ** 2
    xr = x.clone().requires_grad_(True)
    conditional = energy(xr, t) + (anchor - xr).pow(2).sum(1) / (2 * r.squeeze(1) ** 2)
    (g,) = torch.autograd.grad(conditional.sum(), xr)
    noise = torch.randn(5, 2, generator=gen(2), dtype=torch.float64)
    grad = lambda y: torch.autograd.grad(energy(y.requires_grad_(True), t).sum(), y)[0]  # noqa: E731
    (out, *_), _ = recovery_update(grad, (x, anchor, h, sampler.b * r), (noise,), torch.tensor(0),
                                   0.5 * sampler.b**2, None, None)
    torch.testing.assert_close(out, x - h * g + sampler.b * r * noise, rtol=1e-12, atol=1e-12)


def test_recovery_chain_reaches_the_gaussian_posterior():
    """Data N(mu, v) at a level has, by the quadratic energy E = 0.5 p (x - m)^2, p = 1/v, m = mu,
    exactly the right prior; x_t | x_{t+1} is then Gaussian with precision L = p + 1/r^2 and mean
    (p m + x~ / r^2) / L. A long chain at a small b reaches it up to the O(h) Langevin bias, which
    the discrete law 1 / (L (1 - h L / 2)) accounts for exactly."""
    sigmas = [0.2, 0.5]
    energy = LevelGaussian([1 / 0.8, 1 / 1.3], [0.4, -0.3])
    sampler = DiffusionRecovery(steps=400, b=0.2, sigmas=sigmas)
    for level in (0, 1):
        t = torch.full((N,), level)
        x_next = torch.full((N, 1), 0.9, dtype=torch.float64)
        x = sampler.recover(energy, x_next, t, gen(level)).state[0]
        s = sigmas[level]
        a = math.sqrt(1 - s * s)
        r2, p, m = (s / a) ** 2, float(energy.p[level].detach()), float(energy.m[level].detach())
        lam, h = p + 1 / r2, 0.5 * sampler.b**2 * r2
        mean, var = (p * m + 0.9 / a / r2) / lam, 1 / (lam * (1 - h * lam / 2))
        assert abs(float(x.mean()) - mean) < 5 * math.sqrt(var / N)
        assert float(x.var()) == pytest.approx(var, rel=5 * math.sqrt(2 / N))
        assert float(x.var()) == pytest.approx(1 / lam, rel=0.02)  # the posterior itself, up to h L / 2
        assert all(p.grad is None for p in energy.parameters())


def test_the_loss_is_the_conditional_maximum_likelihood_gap():
    """The loss and its parts recomputed from the same random draws, in the documented order."""
    energy = LevelGaussian([1.0, 0.5, 0.2], [0.0, 0.1, -0.1])
    objective = DiffusionRecoveryLikelihood(steps=3, b=0.3, sigmas=[0.1, 0.3, 0.6], alpha=0.2)
    data = torch.randn(64, 2, generator=gen(5), dtype=torch.float64)
    step = TrainingStep(energy, Langevin(1, 0.1, 0.1), Gaussian((2,)), gen(3), data, 64)
    loss, parts = objective(step)
    rng, s = gen(3), objective.schedule
    t = torch.randint(3, (64,), generator=rng)
    eps = torch.randn((2, 64, 2), generator=rng, dtype=torch.float64)
    x_t = s.marginal(data, t, eps[0])
    x_neg = objective.recovery.recover(energy, s.noise_step(x_t, t, eps[1]), t, rng).state[0]
    e_pos, e_neg = energy(x_t, t), energy(x_neg, t)
    expected = e_pos.mean() - e_neg.mean() + 0.2 * (e_pos.pow(2).mean() + e_neg.pow(2).mean())
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert float(parts["recovery_mse"]) > 0 and step.generated is None  # the module's sampler did not run


def test_library_energies_take_a_noise_level_and_stay_unchanged_without():
    for make in (lambda **k: MLPEnergy(2, 16, 2, **k),
                 lambda **k: ConvEnergy(1, 4, 8, **k),
                 lambda **k: ResNetEnergy(1, 4, 2, **k)):
        torch.manual_seed(0)
        plain = make()
        torch.manual_seed(0)
        unconditional = make(num_levels=None)
        torch.manual_seed(0)
        conditioned = make(num_levels=3)
        assert unconditional.num_levels is None and conditioned.num_levels == 3
        assert plain.state_dict().keys() == unconditional.state_dict().keys()
        for k, v in plain.state_dict().items():  # the same parameters, the same draws
            assert torch.equal(v, unconditional.state_dict()[k]) and torch.equal(v, conditioned.state_dict()[k])
        x = torch.randn(4, 2) if isinstance(plain, MLPEnergy) else torch.randn(4, 1, 8, 8)
        conditioned.eval()  # (spectral normalisation's power iteration would move between calls)
        with torch.no_grad():
            nn.init.normal_(conditioned.level_embedding.weight)
            e0, e_none = conditioned(x, t=torch.zeros(4, dtype=torch.long)), conditioned(x)
            e2 = conditioned(x, t=2)
        torch.testing.assert_close(e_none, e0)  # t=None is the data level
        assert not torch.allclose(e0, e2)
        with pytest.raises(ValueError, match="without noise levels"):
            plain(x, t=torch.zeros(4, dtype=torch.long))
        with pytest.raises(ValueError, match="t must be an int or an integer tensor"):
            conditioned(x, t=torch.zeros(4))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="DiffusionRecoveryLikelihood: steps must be a positive integer, got 0"):
        DiffusionRecoveryLikelihood(steps=0)
    with pytest.raises(ValueError, match="DiffusionRecoveryLikelihood: b must be a positive finite number"):
        DiffusionRecoveryLikelihood(b=0)
    with pytest.raises(ValueError, match="DiffusionRecovery: num_levels must be a positive integer, got -2"):
        DiffusionRecovery(num_levels=-2)
    with pytest.raises(ValueError, match=r"sigmas\[1\] must be a finite number with 0 < x < 1, got 1.0"):
        DiffusionRecovery(sigmas=[0.5, 1.0])
    with pytest.raises(ValueError, match="sigmas must be a non-empty list"):
        DiffusionRecoveryLikelihood(sigmas=[])
    with pytest.raises(ValueError, match="MLPEnergy: num_levels must be"):
        MLPEnergy(2, num_levels=-1)
    data = torch.randn(8, 2)
    step = TrainingStep(MLPEnergy(2), Langevin(1, 0.1, 0.1), Gaussian((2,)), gen(0), data, 8)
    with pytest.raises(ValueError, match="MLPEnergy takes no noise level.*num_levels=6"):
        DiffusionRecoveryLikelihood()(step)
    with pytest.raises(ValueError, match="MLPEnergy takes no noise level"):
        DiffusionRecovery()(MLPEnergy(2), data)
    with pytest.raises(ValueError, match="has num_levels=3 but the noise schedule has 6 levels"):
        DiffusionRecovery()(MLPEnergy(2, num_levels=3), data)
    # at setup, before any training step: the energy, and the generator's schedule against the objective's
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, inference_mode=False)
    for energy, sampler, match in ((MLPEnergy(2), DiffusionRecovery(), "takes no noise level"),
                                   (MLPEnergy(2, num_levels=6), DiffusionRecovery(sigma_max=0.5),
                                    "the sampler's noise schedule")):
        model = EBM(energy=energy, sampler=sampler, latent=Gaussian((2,)), objective=DiffusionRecoveryLikelihood())
        with pytest.raises(ValueError, match=match):
            trainer.fit(model, Toy2DDataModule(batch_size=8, batches_per_epoch=1, num_val=8))


def test_drl_on_a_2d_toy_reaches_three_times_the_data_floor():
    """8gaussians, 600 steps through EBM + Trainer (about 15 s on one thread), generated by running
    the levels down from N(0, I); the MMD of 2000 samples against 2000 held-out data points must be
    within 3x the same statistic between two independent data samples (measured: 1.5x)."""
    L.seed_everything(0)
    schedule = dict(num_levels=6, sigma_min=0.05, sigma_max=0.9)
    model = EBM(energy=MLPEnergy(2, 64, 3, num_levels=6), sampler=DiffusionRecovery(steps=20, b=0.35, **schedule),
                latent=Gaussian((2,)), objective=DiffusionRecoveryLikelihood(steps=20, b=0.35, alpha=0.1, **schedule),
                optimizer=partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.999)))
    trainer = L.Trainer(max_steps=600, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                        inference_mode=False)
    start = time.perf_counter()
    trainer.fit(model, Toy2DDataModule("8gaussians", batch_size=256, batches_per_epoch=600, num_val=64))
    wall = time.perf_counter() - start
    n = 2000
    data = sample_toy("8gaussians", n, generator=gen(11))
    floor = float(mmd_rbf(sample_toy("8gaussians", n, generator=gen(12)), data))
    with torch.no_grad():
        x = model.generate(n, generator=gen(1))  # the module's own generation path
    mmd = float(mmd_rbf(x, data))
    print(f"DRL 8gaussians: mmd {mmd:.4f}, floor {floor:.4f}, ratio {mmd / floor:.2f}, training {wall:.1f} s")
    assert mmd < 3 * floor, (mmd, floor, wall)


def test_toy_config_trains_checkpoints_and_generates(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-ebm"])
    main(["fit", "--config", str(CONFIGS / "toy2d_drl.yaml"), "--trainer.max_steps=4",
          "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
          f"--trainer.logger.init_args.save_dir={tmp_path}", "--data.init_args.batches_per_epoch=4",
          "--data.init_args.num_val=64", "--model.init_args.objective.init_args.steps=2",
          "--model.init_args.sampler.init_args.steps=2"])
    run = tmp_path / "toy2d_drl" / "version_0"
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert {"val/mmd", "val/mmd_floor", "train/recovery_mse", "train/energy_gap"} <= set(header.split(","))
    model = EBM.load_from_checkpoint(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert isinstance(model.sampler, DiffusionRecovery) and model.sampler.schedule == model.objective.schedule
    x = model.generate(7)
    assert x.shape == (7, 2) and torch.isfinite(x).all() and model.sampler.last_nfe == 6 * 2


def test_digits_config_starts_and_trains(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-ebm"])
    config = shrink(yaml.safe_load((CONFIGS / "digits_drl.yaml").read_text()), tmp_path)
    config["model"]["init_args"]["objective"]["init_args"]["steps"] = 2
    path = tmp_path / "digits_drl.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    (run,) = (tmp_path / "runs" / "digits_drl").glob("version_*")
    header, *rows = (run / "metrics.csv").read_text().splitlines()
    columns = header.split(",")
    assert {"train/loss", "val/fid", "val/mmd"} <= set(columns)
    column = columns.index("train/loss")
    losses = [float(r.split(",")[column]) for r in rows if r.split(",")[column]]
    assert losses and all(math.isfinite(v) for v in losses)
