"""log Z by annealed importance sampling, and the EBM's own density ``exp(-E)/Z`` built on it.

References no one here wrote: the Gaussian integral ``log Z = d/2 log 2 pi - 1/2 log det A`` of
``E(x) = 0.5 (x - m)^T A (x - m)``, torch.distributions' multivariate normal, and grid
quadrature (midpoint rule) on a model trained here for a few hundred steps.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from conftest import random_spd
from test_density_trained import quiet_trainer, trained  # noqa: F401, F811 - the fixture, trained again here
from torch import nn

from lightning_ebm import EBM
from lightning_ebm import density as dn
from lightning_ebm.data import Toy2DDataModule
from lightning_ebm.energies import MLPEnergy
from lightning_ebm.latents import Gaussian, Latent, ReplayBuffer, Uniform
from lightning_ebm.samplers import HMC, MALA, GradientDescent

BOX = (-5.0, 5.0, -5.0, 5.0)


class ShiftedQuadratic(nn.Module):
    """``E(x) = 0.5 (x - m)^T A (x - m)``: ``exp(-E)`` is ``N(m, A^-1)`` times ``(2 pi)^(d/2) det(A)^(-1/2)``."""

    def __init__(self, A: torch.Tensor, m: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", A)
        self.register_buffer("m", m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.flatten(1) - self.m
        return 0.5 * ((d @ self.A) * d).sum(1)

    def log_z(self) -> float:
        return 0.5 * self.A.shape[0] * math.log(2 * math.pi) - 0.5 * float(torch.logdet(self.A))

    def normal(self) -> torch.distributions.MultivariateNormal:
        return torch.distributions.MultivariateNormal(self.m, precision_matrix=self.A)


def quadratic(dim: int, seed: int = 0) -> ShiftedQuadratic:
    m = 0.5 * torch.randn(dim, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    return ShiftedQuadratic(random_spd(dim, seed), m)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("dim", "transition", "num_temps"), [(2, "mala", 100), (10, "mala", 200),
                                                              (10, "hmc", 100), (64, "mala", 600),
                                                              (64, "hmc", 400)])
def test_gaussian_log_z_in_several_dimensions(dim, transition, num_temps):
    """1024 chains: the standard error is 0.01-0.04 nats at these schedules (over seeds), so 0.1 nats
    is a 2.5-sigma bound or more and 3 standard errors the tighter one."""
    energy = quadratic(dim)
    result = dn.estimate_log_partition(energy, Gaussian((dim,)), num_chains=1024, num_temps=num_temps,
                                       transition=transition, step_size=0.2 if transition == "hmc" else 0.1,
                                       num_leapfrog=3, generator=gen(dim))
    error = result.log_z - energy.log_z()
    assert abs(error) < 3 * result.stderr and abs(error) < 0.1, (error, result)
    assert 0.6 < result.acceptance <= 1.0 and result.ess > 200
    assert result.log_weights.shape == (1024,) and result.log_weights.dtype == torch.float64
    assert result.acceptance_per_temp.shape == (num_temps - 1,) and result.betas.shape == (num_temps + 1,)


def test_from_a_uniform_box_in_2d():
    """Every intermediate target lives on the box; exp(-E)'s mass outside [-6, 6]^2 is below 1e-4."""
    energy = quadratic(2, seed=3)
    result = dn.estimate_log_partition(energy, Uniform((2,), -6.0, 6.0), num_chains=1024, num_temps=400,
                                       step_size=0.1, batch_size=512, generator=gen(1))
    error = result.log_z - energy.log_z()
    assert abs(error) < 3 * result.stderr and abs(error) < 0.1, (error, result)


def test_chains_outside_the_box_are_never_accepted():
    """A narrow box cuts the Gaussian: AIS estimates int over the box, which a grid gives in 2-D."""
    energy = quadratic(2, seed=1)
    box = Uniform((2,), -0.5, 1.0)
    result = dn.estimate_log_partition(energy, box, num_chains=512, num_temps=300, step_size=0.3,
                                       transition="hmc", num_leapfrog=4, generator=gen(2))
    points, area = dn.grid_2d((-0.5, 1.0, -0.5, 1.0), 400, dtype=torch.float64)
    reference = float(dn.log_partition_on_grid(energy, points, area))
    assert abs(result.log_z - reference) < max(3 * result.stderr, 0.01), (result.log_z, reference)
    assert result.log_z < energy.log_z() - 0.5  # the box holds well under the whole mass


def test_the_error_bar_shrinks_as_one_over_root_chains_and_is_calibrated():
    """One run of 1024 chains, split: (a) 4x the chains halves the stderr: the full run's against the
    mean of its four quarters' (each a 256-chain estimate; the stderr of a stderr from 256 weights is
    ~5-10% here, so the ratio is 2 within about 0.3); (b) the spread of sixteen 64-chain estimates
    matches their own stderr (the sample std of 16 values is within about +-35% of the truth, 2 sigma)."""
    energy = quadratic(10, seed=2)
    result = dn.estimate_log_partition(energy, Gaussian((10,)), num_chains=1024, num_temps=20, step_size=0.1,
                                       generator=gen(3))
    assert result.ess < 900  # a short schedule: the weights are uneven, the stderr is not tiny
    quarters = [dn.log_mean_exp_stats(w)[1] for w in result.log_weights.chunk(4)]
    assert 1.7 < sum(quarters) / 4 / result.stderr < 2.3
    groups = [dn.log_mean_exp_stats(w) for w in result.log_weights.chunk(16)]
    spread = torch.tensor([g[0] for g in groups]).std().item()
    claimed = sum(g[1] for g in groups) / 16
    assert 0.6 < spread / claimed < 1.45, (spread, claimed)


def test_more_annealing_steps_shrink_the_weights_spread_and_the_bias():
    energy = quadratic(10, seed=4)
    short, long = (dn.estimate_log_partition(energy, Gaussian((10,)), num_chains=256, num_temps=k,
                                             step_size=0.1, generator=gen(4)) for k in (5, 200))
    assert long.stderr < short.stderr / 2 and long.ess > short.ess
    assert abs(long.log_z - energy.log_z()) < 3 * long.stderr


def test_batches_and_seeds():
    """Batches change the random stream's order but not the estimator; a seeded stream repeats it."""
    energy = quadratic(2)
    kw = dict(num_chains=300, num_temps=50, step_size=0.1)
    a = dn.estimate_log_partition(energy, Gaussian((2,)), generator=gen(5), **kw)
    b = dn.estimate_log_partition(energy, Gaussian((2,)), generator=gen(5), **kw)
    c = dn.estimate_log_partition(energy, Gaussian((2,)), generator=gen(5), batch_size=128, **kw)
    assert torch.equal(a.log_weights, b.log_weights)
    assert c.log_weights.shape == (300,)
    assert abs(c.log_z - energy.log_z()) < 3 * c.stderr + 0.02


@pytest.mark.parametrize("schedule", ["linear", "geometric", [0.0, 0.1, 0.3, 0.6, 1.0]])
def test_schedules(schedule):
    b = dn.ais_schedule(4, schedule)
    assert b[0] == 0 and b[-1] == 1 and bool((b.diff() > 0).all()) and b.shape == (5,)


def test_a_trained_model_matches_grid_quadrature(trained):  # noqa: F811
    """From the Uniform box the grid covers: both estimate log int_box exp(-E)."""
    model, _ = trained
    points, area = dn.grid_2d(BOX, 500, dtype=torch.float64)
    reference = float(dn.log_partition_on_grid(model.energy.double(), points, area))
    model.energy.float()
    result = model.estimate_log_partition(latent=Uniform((2,), BOX[0], BOX[1]), num_chains=1024, num_temps=500,
                                          step_size=0.1, generator=gen(6))
    assert abs(result.log_z - reference) < 0.05 and abs(result.log_z - reference) < 3 * result.stderr + 0.01
    assert float(model.log_z) == result.log_z and float(model.log_z_stderr) == result.stderr
    # so exp(-E)/Z integrates to one over the box
    mass = float((model.log_prob(points.float()).exp() * area).sum())
    assert abs(mass - 1) < 0.05
    # bits/dim of held-out data, side by side with the generator's (both are densities on the plane)
    x = trained[1].val_data[:300]
    ebm, gen_q = model.bits_per_dim(x), model.bits_per_dim(x, which="generator")
    assert ebm.value == pytest.approx(float((-model.log_prob(x)).mean()) / (2 * math.log(2)))
    assert ebm.stderr_log_z == pytest.approx(result.stderr / (2 * math.log(2)))
    assert gen_q.stderr_log_z == 0 and math.isfinite(gen_q.value) and gen_q.stderr_data > 0


def test_log_prob_is_the_gaussian_density():
    energy = quadratic(3, seed=5).float()
    model = EBM(energy, GradientDescent(5, 0.05), Gaussian((3,)))
    with pytest.raises(RuntimeError, match="log Z has not been estimated.*estimate_log_partition"):
        model.log_prob(torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="log Z has not been estimated"):
        model.bits_per_dim(torch.zeros(2, 3))
    result = model.estimate_log_partition(num_chains=512, num_temps=200, step_size=0.1, generator=gen(7))
    x = torch.randn(50, 3, generator=gen(8))
    reference = energy.double().normal().log_prob(x.double())
    error = model.log_prob(x, batch_size=16) - reference  # the same constant at every point: log Z's error
    assert torch.allclose(error, error[0].expand(50), atol=1e-4)
    assert abs(float(error[0])) < 3 * result.stderr + 1e-4


def test_bits_per_dim_conventions_for_both_densities():
    """A quadratic energy, a gradient-descent generator from N(0, I): q is N(0, M M^T), M = (I - sA)^K."""
    d, s, k = 4, 0.1, 3
    energy = ShiftedQuadratic(random_spd(d, 6), torch.zeros(d, dtype=torch.float64))
    model = EBM(energy, GradientDescent(k, s), Gaussian((d,))).double()
    model.estimate_log_partition(num_chains=512, num_temps=200, step_size=0.1, generator=gen(9))
    x = 0.5 * torch.randn(64, d, generator=gen(10), dtype=torch.float64)
    M = torch.linalg.matrix_power(torch.eye(d, dtype=torch.float64) - s * energy.A, k)
    log_q = torch.distributions.MultivariateNormal(torch.zeros(d, dtype=torch.float64), M @ M.T).log_prob(x)
    gen_bpd = model.bits_per_dim(x, which="generator")
    assert gen_bpd.value == pytest.approx(float((-log_q).mean()) / (d * math.log(2)), rel=1e-6)
    # the discrete convention: 256 levels on [-1, 1] add D log(2/256) nats, i.e. log2(128) bits per dim
    discrete = model.bits_per_dim(x, which="generator", num_levels=256)
    assert discrete.value == pytest.approx(gen_bpd.value + math.log2(128), rel=1e-9)
    assert torch.allclose(discrete.per_example, dn.bits_per_dim(log_q, d, num_levels=256), atol=1e-6)
    ebm_bpd = model.bits_per_dim(x)
    ref = float((-energy.normal().log_prob(x)).mean()) / (d * math.log(2))
    assert abs(ebm_bpd.value - ref) < 3 * ebm_bpd.stderr_log_z + 1e-6
    assert ebm_bpd.stderr == pytest.approx(math.hypot(ebm_bpd.stderr_data, ebm_bpd.stderr_log_z))
    with pytest.raises(ValueError, match="which must be one of 'ebm', 'generator'"):
        model.bits_per_dim(x, which="q")


def test_log_z_travels_in_checkpoints_and_old_ones_still_load(tmp_path):
    L.seed_everything(0, verbose=False)
    model = EBM(MLPEnergy(2, hidden=8, num_layers=1), GradientDescent(3, 0.05), Uniform((2,), -4.0, 4.0))
    trainer = quiet_trainer(max_steps=1, default_root_dir=tmp_path)
    trainer.fit(model, Toy2DDataModule("8gaussians", batch_size=32, batches_per_epoch=1, num_val=64))
    model.estimate_log_partition(num_chains=64, num_temps=20, generator=gen(11))
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    loaded = EBM.load_from_checkpoint(tmp_path / "a.ckpt", weights_only=True)
    assert float(loaded.log_z) == float(model.log_z) and float(loaded.log_z_stderr) == float(model.log_z_stderr)
    assert torch.equal(loaded.log_prob(torch.zeros(3, 2)), model.log_prob(torch.zeros(3, 2)))
    # a checkpoint written before log Z existed: loads (strictly), not estimated
    raw = torch.load(tmp_path / "a.ckpt", weights_only=True)
    del raw["state_dict"]["log_z"], raw["state_dict"]["log_z_stderr"]
    torch.save(raw, tmp_path / "old.ckpt")
    old = EBM.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=True)
    with pytest.raises(RuntimeError, match="log Z has not been estimated"):
        old.log_prob(torch.zeros(1, 2))
    fresh = EBM(MLPEnergy(2, hidden=8, num_layers=1), GradientDescent(3, 0.05), Uniform((2,), -4.0, 4.0))
    fresh.load_state_dict(model.state_dict())
    assert float(fresh.log_z) == float(model.log_z)


class NoDensity(Latent):
    has_density = False

    def __init__(self) -> None:
        super().__init__()
        self.shape = (2,)


def test_bad_input():
    energy = quadratic(2)
    with pytest.raises(ValueError, match=r"ReplayBuffer has no log_prob.*latent=buffer.base \(Uniform\)"):
        dn.estimate_log_partition(energy, ReplayBuffer(Uniform((2,))))
    with pytest.raises(ValueError, match="latent must be a Latent with a log_prob"):
        dn.estimate_log_partition(energy, NoDensity())
    with pytest.raises(ValueError, match="num_chains must be an integer >= 2, got 0"):
        dn.estimate_log_partition(energy, Gaussian((2,)), num_chains=0)
    with pytest.raises(ValueError, match="num_temps must be a positive integer, got -1"):
        dn.estimate_log_partition(energy, Gaussian((2,)), num_temps=-1)
    with pytest.raises(ValueError, match="steps_per_temp must be a positive integer, got 0"):
        dn.estimate_log_partition(energy, Gaussian((2,)), steps_per_temp=0)
    with pytest.raises(ValueError, match="num_leapfrog must be a positive integer, got 0"):
        dn.estimate_log_partition(energy, Gaussian((2,)), transition="hmc", num_leapfrog=0)
    with pytest.raises(ValueError, match="step_size must be a positive finite number, got 0"):
        dn.estimate_log_partition(energy, Gaussian((2,)), step_size=0)
    with pytest.raises(ValueError, match="step_size must be a positive number or a sequence of num_temps=10"):
        dn.estimate_log_partition(energy, Gaussian((2,)), num_temps=10, step_size=[0.1, 0.2])
    with pytest.raises(ValueError, match="transition must be one of 'mala', 'hmc', got 'nuts'"):
        dn.estimate_log_partition(energy, Gaussian((2,)), transition="nuts")
    with pytest.raises(ValueError, match="schedule sequence must hold num_temps \\+ 1 = 4"):
        dn.estimate_log_partition(energy, Gaussian((2,)), num_temps=3, schedule=[0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="schedule must be one of 'sigmoid', 'linear', 'geometric'"):
        dn.estimate_log_partition(energy, Gaussian((2,)), schedule="cosine")
    with pytest.raises(ValueError, match=r"dtype must be None or a floating torch.dtype .*, got 'float32'"):
        dn.estimate_log_partition(energy, Gaussian((2,)), dtype="float32")


@pytest.mark.parametrize("sampler", [MALA(steps=5, step_size=0.1), HMC(steps=5, step_size=0.1)])
def test_exact_mcmc_generators_have_no_density(sampler):
    model = EBM(quadratic(2).float(), sampler, Gaussian((2,)))
    with pytest.raises(ValueError, match=f"undefined for {type(sampler).__name__}.*injects noise"):
        model.generate(4, return_log_prob=True)
    with pytest.raises(ValueError, match="injects noise"):
        model.generator_log_prob(torch.zeros(2, 2))
