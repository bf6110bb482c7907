"""MALA and HMC sample ``exp(-E/T)`` exactly: Gaussians in 2, 10 and 100 dimensions, a banana, detailed balance.

The chains run in parallel and independently, so their end points are independent draws; once a
chain has mixed its end point is a draw from the target, and the Monte Carlo error of a mean over
``N`` chains is ``sqrt(var / N)``, of a variance ``var * sqrt(2 / N)`` (Gaussian fourth moments).
The tolerances below are 5 of those standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import QuadraticEnergy, random_spd
from torch import nn

from lightning_ebm import EBM
from lightning_ebm.latents import Gaussian
from lightning_ebm.samplers import HMC, MALA, Langevin
from lightning_ebm.samplers.mcmc import mala_log_accept

N = 4000


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_gaussian(x: torch.Tensor, cov: torch.Tensor) -> None:
    n = x.shape[0]
    var = torch.diagonal(cov)
    mean_err = x.mean(0).abs() / (var / n).sqrt()
    assert float(mean_err.max()) < 5 + 0.5 * math.log(x.shape[1]), float(mean_err.max())  # max over d coords
    sample_var = x.var(0)
    var_err = (sample_var - var).abs() / (var * math.sqrt(2 / n))
    assert float(var_err.max()) < 5 + 0.5 * math.log(x.shape[1]), float(var_err.max())


@pytest.mark.parametrize("dim", [2, 10, 100])
@pytest.mark.parametrize("kind", ["mala", "hmc"])
def test_gaussians_in_several_dimensions(kind, dim):
    a = random_spd(dim, seed=dim)  # precision with eigenvalues in [0.5, 2]
    energy = QuadraticEnergy(a)
    step = {2: 0.4, 10: 0.25, 100: 0.12}[dim]
    # HMC: a trajectory (step x leapfrog) well short of the half-period pi / sqrt(2) of the stiffest
    # direction, so no direction comes back to where it started (fixed-length HMC's resonance)
    sampler = (MALA(steps=150, step_size=step) if kind == "mala"
               else HMC(steps=60, step_size={2: 0.35, 10: 0.3, 100: 0.2}[dim], num_leapfrog=5))
    x = sampler(energy, torch.zeros(N, dim, dtype=torch.float64), generator=gen(dim))
    check_gaussian(x, torch.linalg.inv(a))
    assert 0.3 < sampler.last_info["acceptance"] < 1.0, sampler.last_info
    if dim == 2:  # and the cross-covariance
        torch.testing.assert_close(torch.cov(x.T), torch.linalg.inv(a), atol=6 * math.sqrt(2 / N), rtol=0)


def test_exact_at_a_step_size_where_unadjusted_langevin_is_biased():
    """1-D standard normal, s = 0.5: unadjusted Langevin's stationary variance is 1 / (1 - s/2) = 4/3."""
    energy = QuadraticEnergy(torch.ones(1, 1, dtype=torch.float64))
    x0 = torch.zeros(N, 1, dtype=torch.float64)
    ula = Langevin(steps=200, step_size=0.5, noise_std=1.0)(energy, x0, generator=gen(0))
    mala = MALA(steps=200, step_size=0.5)(energy, x0, generator=gen(0))
    se = math.sqrt(2 / N)
    assert abs(float(ula.var()) - 4 / 3) < 5 * se * 4 / 3
    assert abs(float(mala.var()) - 1.0) < 5 * se


def test_temperature_scales_the_target():
    energy = QuadraticEnergy(torch.eye(2, dtype=torch.float64))
    x = MALA(steps=150, step_size=0.5, temperature=2.0)(energy, torch.zeros(N, 2, dtype=torch.float64),
                                                        generator=gen(1))
    check_gaussian(x, 2.0 * torch.eye(2, dtype=torch.float64))


class Banana(nn.Module):
    """x1 ~ N(0, 4), x2 | x1 ~ N(b (x1^2 - 4), 1): E = x1^2 / 8 + (x2 - b (x1^2 - 4))^2 / 2."""

    def __init__(self, b: float = 0.3) -> None:
        super().__init__()
        self.b = b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] ** 2 / 8 + (x[:, 1] - self.b * (x[:, 0] ** 2 - 4)) ** 2 / 2


@pytest.mark.parametrize("sampler", [MALA(steps=400, step_size=0.15), HMC(steps=80, step_size=0.25, num_leapfrog=8)],
                         ids=["mala", "hmc"])
def test_a_banana_matches_its_exact_draws_in_quantiles(sampler):
    x = sampler(Banana(), torch.zeros(N, 2, dtype=torch.float64), generator=gen(5))
    g = gen(6)
    x1 = 2 * torch.randn(N, generator=g, dtype=torch.float64)
    exact = torch.stack([x1, 0.3 * (x1**2 - 4) + torch.randn(N, generator=g, dtype=torch.float64)], 1)
    qs = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    for d in range(2):
        got, ref = torch.quantile(x[:, d], qs), torch.quantile(exact[:, d], qs)
        # the standard error of a quantile is sqrt(q(1-q)/N)/density; compare two samples with a generous 0.15 sd
        assert float((got - ref).abs().max()) < 0.15 * float(exact[:, d].std()), (d, got, ref)


def test_detailed_balance_of_the_mala_ratio():
    """``log r(x -> y)`` equals ``log pi(y) q(x|y) - log pi(x) q(y|x)`` computed independently, and is
    antisymmetric: the reversed proposal's ratio is its negative."""
    torch.manual_seed(0)
    energy = lambda x: (x**4).sum(1) / 4 - (x**2).sum(1)  # noqa: E731 - a double well
    x, y = torch.randn(50, 3, dtype=torch.float64), torch.randn(50, 3, dtype=torch.float64)
    gx = torch.func.vmap(torch.func.grad(lambda v: energy(v[None])[0]))(x)
    gy = torch.func.vmap(torch.func.grad(lambda v: energy(v[None])[0]))(y)
    s, t = torch.full((50,), 0.3, dtype=torch.float64), 1.5
    forward = mala_log_accept(x, y, energy(x), energy(y), gx, gy, s, t)
    backward = mala_log_accept(y, x, energy(y), energy(x), gy, gx, s, t)
    torch.testing.assert_close(forward, -backward)
    normal = torch.distributions.Normal
    log_q = lambda to, frm, g: normal(frm - 0.3 * g / t, math.sqrt(2 * 0.3)).log_prob(to).sum(1)  # noqa: E731
    expected = (-energy(y) / t + log_q(x, y, gy)) - (-energy(x) / t + log_q(y, x, gx))
    torch.testing.assert_close(forward, expected)


def test_warm_up_adapts_the_step_size_towards_the_target_acceptance():
    energy = QuadraticEnergy(random_spd(10, seed=3))
    sampler = MALA(steps=400, step_size=1e-3, adapt_steps=300, target_acceptance=0.574)
    sampler(energy, torch.zeros(500, 10, dtype=torch.float64), generator=gen(2))
    assert abs(sampler.last_info["acceptance"] - 0.574) < 0.1, sampler.last_info
    assert sampler.last_info["step_size"] > 0.05  # it grew from 1e-3
    fixed = MALA(steps=100, step_size=1e-3)
    fixed(energy, torch.zeros(500, 10, dtype=torch.float64), generator=gen(2))
    assert fixed.last_info["acceptance"] > 0.95 and "step_size" not in fixed.last_info


def test_bad_arguments_and_no_density():
    with pytest.raises(ValueError, match="MALA: step_size must be a positive finite number, got 0"):
        MALA(steps=10, step_size=0)
    with pytest.raises(ValueError, match="HMC: num_leapfrog must be a positive integer, got 0"):
        HMC(steps=10, step_size=0.1, num_leapfrog=0)
    with pytest.raises(ValueError, match=r"MALA: adapt_steps must be an integer in \[0, 9\], got 10"):
        MALA(steps=10, step_size=0.1, adapt_steps=10)
    with pytest.raises(ValueError, match="HMC: temperature must be a positive finite number"):
        HMC(steps=10, step_size=0.1, temperature=-1)
    model = EBM(QuadraticEnergy(torch.eye(2)), MALA(steps=5, step_size=0.1), Gaussian((2,)))
    with pytest.raises((ValueError, NotImplementedError), match="MALA"):
        model.generate(4, return_log_prob=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_acceptance_is_counted_exactly_in_half_precision(dtype):
    """The accept count is an integer: in bfloat16 it stopped at 256 accepted steps (float16: 2048)."""
    energy = QuadraticEnergy(torch.eye(2, dtype=dtype))
    sampler = MALA(steps=2500, step_size=0.01)  # step 0.01 on N(0, I): nearly every move is accepted
    sampler(energy, torch.zeros(4, 2, dtype=dtype), generator=gen(0))
    assert sampler.last_info["acceptance"] > 0.95, sampler.last_info


class Barrier(nn.Module):
    """``exp(-E) = 1 - x^2`` on ``(-1, 1)`` (variance 1/5); ``E`` is NaN outside."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.log1p(-x.pow(2)).sum(1)


@pytest.mark.parametrize("sampler", [MALA(steps=300, step_size=0.05, adapt_steps=100),
                                     HMC(steps=300, step_size=0.05, num_leapfrog=3, adapt_steps=100)],
                         ids=["mala", "hmc"])
def test_a_nan_energy_outside_the_domain_is_a_rejection_also_while_adapting(sampler):
    x = sampler(Barrier(), torch.zeros(N, 1, dtype=torch.float64), generator=gen(7))
    assert math.isfinite(sampler.last_info["step_size"]) and sampler.last_info["acceptance"] > 0.3, sampler.last_info
    assert abs(float(x.var()) - 0.2) < 0.02
