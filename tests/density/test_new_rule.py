"""A new density rule is one entry: preconditioned descent ``x <- x - s D grad E(x)``, written only here.

With ``D = diag(d)`` fixed and ``E = 0.5 x^T A x``: ``x_K = M z`` with ``M = (I - s D A)^K``, so
``z ~ N(mu0, sd^2 I)`` gives ``x_K ~ N(M mu0, sd^2 M M^T)`` (scipy's reference). One entry in
``density.RULES`` (the step's log-Jacobian ``log|det(I - s D H)|`` and its inverse, the fixed
point ``x = y + s D grad E(x)``) gives the sampler a density forward and by inversion.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import QuadraticEnergy, random_spd
from scipy.stats import multivariate_normal
from torch import Tensor

from lightning_ebm import density
from lightning_ebm.latents import Gaussian
from lightning_ebm.samplers import GradFn, Sampler, State, Steps, energy_grad

D, S, K, MU0, SD = (1.0, 0.5, 2.0), 0.1, 12, 0.3, 1.2


def preconditioned_update(grad: GradFn, state: State, noise: tuple, k: Tensor, step_size: float,
                          scale: tuple[float, ...]) -> tuple[State, dict]:
    (x,) = state
    g = grad(x)
    return (x - step_size * x.new_tensor(scale) * g,), {"grad": g}


class PreconditionedDescent(Sampler):
    def __init__(self, steps: int, step_size: float, scale: tuple[float, ...]) -> None:
        super().__init__()
        self.steps, self.step_size, self.scale = steps, step_size, tuple(scale)

    def dynamics(self) -> Steps:
        return Steps(preconditioned_update, self.steps, (self.step_size, self.scale))


def _log_det(sampler, energy, x, est):
    h = density.hessian(energy, x)
    eye = torch.eye(h.shape[1], dtype=h.dtype)
    sign, logabs = torch.linalg.slogdet(eye - sampler.step_size * x.new_tensor(sampler.scale)[:, None] * h)
    return logabs, sign


def _invert(sampler, energy, y, step, tol, max_iter):
    x, d = y, y.new_tensor(sampler.scale)
    for _ in range(max_iter):
        x = y + sampler.step_size * d * energy_grad(energy, x)
    return x


@pytest.fixture
def rule(monkeypatch):
    monkeypatch.setitem(density.RULES, PreconditionedDescent, density.StepRule(log_det=_log_det, invert=_invert))


def test_one_rule_entry_gives_the_density_forward_and_by_inversion(rule):
    a = random_spd(3, seed=4)
    energy, sampler, latent = QuadraticEnergy(a), PreconditionedDescent(K, S, D), Gaussian((3,), mean=MU0, std=SD)
    m = np.linalg.matrix_power(np.eye(3) - S * np.diag(D) @ a.numpy(), K)
    ref = multivariate_normal(m @ (MU0 * np.ones(3)), SD**2 * m @ m.T)
    z = latent.sample(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x, log_q = density.sample_with_log_prob(energy, sampler, latent, z)
    torch.testing.assert_close(x, sampler(energy, z), rtol=0, atol=0)  # the sampler's own output
    np.testing.assert_allclose(log_q.numpy(), ref.logpdf(x.numpy()), rtol=0, atol=1e-9)
    pts = torch.from_numpy(ref.rvs(size=32, random_state=1))
    np.testing.assert_allclose(density.log_prob(energy, sampler, latent, pts, max_iter=200).numpy(),
                               ref.logpdf(pts.numpy()), rtol=0, atol=1e-8)


def test_without_the_entry_there_is_no_density():
    with pytest.raises(NotImplementedError, match="no change-of-variables rule for sampler PreconditionedDescent"):
        density.check_density(PreconditionedDescent(K, S, D), Gaussian((3,)))
