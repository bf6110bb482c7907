"""Every sampler exported by ``lightning_ebm.samplers`` (found from ``__all__``) passes the contract,
eagerly and with ``compile=True``; an exported sampler without a case here fails the first test.

Closed forms on ``E = 0.5 x^T A x``: gradient descent contracts as ``(I - sA)^K``; Langevin with
``noise_std = sqrt(2 s)`` reaches the Boltzmann covariance ``A^-1`` (up to its O(s) bias); the ODE
is ``expm(-A t)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import QuadraticEnergy, random_spd
from contracts.sampler_contract import Case, SamplerContract, check_matrix_power, exported_samplers, gen, start

from lightning_ebm.samplers import HMC, MALA, ODE, DiffusionRecovery, GradientDescent, Langevin


def _descent_closed_form(compile: bool) -> None:
    s, k = 0.1, 20
    check_matrix_power(GradientDescent(steps=k, step_size=s, compile=compile),
                       lambda a: torch.eye(a.shape[0], dtype=a.dtype) - s * a, k)


def _langevin_closed_form(compile: bool) -> None:
    a = torch.tensor([[2.0, 0.6], [0.6, 1.0]], dtype=torch.float64)
    s = 0.01
    sampler = Langevin(steps=1500, step_size=s, noise_std=math.sqrt(2 * s), compile=compile)
    x = sampler(QuadraticEnergy(a), torch.zeros(20000, 2, dtype=torch.float64), generator=gen(0))
    cov, target = torch.cov(x.T), torch.linalg.inv(a)
    assert torch.allclose(cov, target, rtol=0.04, atol=0.02), (cov, target)
    assert sampler.temperature == pytest.approx(1.0)


def _ode_closed_form(compile: bool) -> None:
    a = random_spd(3, seed=3)
    z = start(shape=(40, 3), dtype=torch.float64)
    sampler = ODE(t_end=1.5, method="rk4", step_size=0.05, compile=compile)
    x = sampler(QuadraticEnergy(a), z)
    assert (x - z @ torch.linalg.matrix_exp(-a * 1.5).T).abs().max() < 1e-5
    assert sampler.last_nfe == 4 * 30  # rk4: four evaluations per step, 30 steps


def _ode_dopri5_closed_form(compile: bool) -> None:
    a = random_spd(3, seed=1)
    z = start(shape=(20, 3), dtype=torch.float64)
    sampler = ODE(t_end=2.0, method="dopri5", rtol=1e-8, atol=1e-8, compile=compile)
    x = sampler(QuadraticEnergy(a), z)
    assert (x - z @ torch.linalg.matrix_exp(-2.0 * a).T).abs().max() < 1e-6
    assert sampler.last_nfe > 6


def _metropolis_closed_form(make) -> None:
    """Exact at a step size where unadjusted Langevin is visibly biased: the Boltzmann covariance ``A^-1``."""
    a = torch.tensor([[2.0, 0.6], [0.6, 1.0]], dtype=torch.float64)
    sampler = make()
    x = sampler(QuadraticEnergy(a), torch.zeros(8000, 2, dtype=torch.float64), generator=gen(0))
    assert torch.allclose(torch.cov(x.T), torch.linalg.inv(a), rtol=0, atol=6 * math.sqrt(2 / 8000) * 1.2)
    assert 0.3 < sampler.last_info["acceptance"] < 1.0


def _mala_closed_form(compile: bool) -> None:
    _metropolis_closed_form(lambda: MALA(steps=150, step_size=0.4, compile=compile))


def _hmc_closed_form(compile: bool) -> None:
    _metropolis_closed_form(lambda: HMC(steps=50, step_size=0.3, num_leapfrog=4, compile=compile))


class LevelQuadratic(torch.nn.Module):
    """``E(x, t) = 0.5 p_t |x|^2``: a noise-conditioned quadratic (``num_levels`` protocol)."""

    def __init__(self, precisions: list[float]) -> None:
        super().__init__()
        self.num_levels = len(precisions)
        self.register_buffer("p", torch.tensor(precisions, dtype=torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.zeros(x.shape[0], dtype=torch.long) if t is None else t
        return 0.5 * self.p[t].to(x.dtype) * x.flatten(1).pow(2).sum(1)


def _recovery_closed_form(compile: bool) -> None:
    """Each level is a linear Gaussian step: with E = 0.5 p_t |x|^2 and the chain long enough to mix,
    x_t given x_{t+1} is Gaussian with the unadjusted-Langevin law of precision L = p_t + 1/r^2: mean
    (x~ / r^2) / L, variance 1 / (L (1 - h L / 2)); composed over the levels from x_T ~ N(0, 1) the
    output is N(0, v_0) with v recursed in closed form (float64, 40000 samples)."""
    sampler = DiffusionRecovery(steps=200, b=0.3, sigmas=[0.3, 0.6], compile=compile)
    p = [2.0, 1.0]
    v = 1.0  # the variance of x_T
    for t in (1, 0):
        s = sampler.schedule.sigmas[t]
        a = math.sqrt(1 - s * s)
        r2 = (s / a) ** 2
        lam, h = p[t] + 1 / r2, 0.5 * sampler.b**2 * r2
        gain = (1 / r2) / lam / a  # the mean is gain * x_{t+1}
        v = gain**2 * v + 1 / (lam * (1 - h * lam / 2))
    x = sampler(LevelQuadratic(p), start(shape=(40000, 1), dtype=torch.float64), generator=gen(0))
    assert abs(float(x.mean())) < 5 * math.sqrt(v / 40000)
    assert float(x.var()) == pytest.approx(v, rel=5 * math.sqrt(2 / 40000)), (float(x.var()), v)
    assert sampler.last_nfe == 400


#: exported class name -> its configurations (each also runs compiled)
CASES: dict[str, dict[str, Case]] = {
    "GradientDescent": {
        "gd": Case(lambda n, c: GradientDescent(steps=5 * n, step_size=0.05, compile=c), _descent_closed_form),
        "gd_clip_clamp": Case(lambda n, c: GradientDescent(steps=5 * n, step_size=0.05, grad_clip=0.5,
                                                           clamp=(-3, 3), compile=c), _descent_closed_form),
    },
    "Langevin": {
        "langevin": Case(lambda n, c: Langevin(steps=5 * n, step_size=0.05, noise_std=0.1, grad_clip=0.5,
                                               clamp=(-2.0, 2.0), compile=c), _langevin_closed_form, noisy=True),
    },
    "MALA": {
        "mala": Case(lambda n, c: MALA(steps=5 * n, step_size=0.05, compile=c), _mala_closed_form, noisy=True),
        "mala_adapt_clip": Case(lambda n, c: MALA(steps=5 * n, step_size=0.05, adapt_steps=2, grad_clip=0.5,
                                                  compile=c), _mala_closed_form, noisy=True),
    },
    "HMC": {
        "hmc": Case(lambda n, c: HMC(steps=2 * n, step_size=0.05, num_leapfrog=3, compile=c), _hmc_closed_form,
                    noisy=True),
    },
    "DiffusionRecovery": {
        "drl": Case(lambda n, c: DiffusionRecovery(steps=2 * n, b=0.5, num_levels=3, sigma_min=0.1, sigma_max=0.5,
                                                   grad_clip=5.0, clamp=(-3.0, 3.0), compile=c),
                    _recovery_closed_form, noisy=True, num_levels=3),
    },
    "ODE": {
        "ode_rk4": Case(lambda n, c: ODE(t_end=0.25 * n, method="rk4", step_size=0.05, compile=c),
                        _ode_closed_form),
        "ode_dopri5": Case(lambda n, c: ODE(t_end=0.25 * n, method="dopri5", rtol=1e-4, atol=1e-4, compile=c),
                           _ode_dopri5_closed_form),
    },
}

PARAMS = [pytest.param((cls, name, compile), id=f"{name}-{'compiled' if compile else 'eager'}")
          for cls, cases in sorted(CASES.items()) for name in sorted(cases) for compile in (False, True)]


def test_every_exported_sampler_has_a_case():
    exported = exported_samplers()
    assert exported, "no sampler found in lightning_ebm.samplers.__all__"
    missing = sorted(set(exported) - set(CASES))
    assert not missing, f"exported samplers without a contract case in {__file__}: {missing}"
    assert not set(CASES) - set(exported), "a case for a sampler that is no longer exported"


@pytest.fixture(params=PARAMS)
def case(request) -> Case:
    cls, name, compile = request.param
    base = CASES[cls][name]
    return Case(base.make, base.closed_form, noisy=base.noisy, compile=compile, num_levels=base.num_levels)


class TestExportedSamplers(SamplerContract):
    pass
