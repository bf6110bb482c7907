"""Unrolled dynamics (``differentiable_steps``), against closed forms for ``E_theta(x) = theta/2 |x|^2``.

Gradient descent: ``x_K = (1 - s theta)^K z``; unrolling the last ``k`` steps (the state before
them detached) gives ``d x_K / d theta = -s k (1 - s theta)^(K-1) z``. RK4 on the flow
``dx/dt = -theta x`` multiplies by ``R(theta h) = 1 - a + a^2/2 - a^3/6 + a^4/24`` per step,
``a = theta h``; the adaptive solve of the whole flow gives ``z exp(-theta T)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from sampler_helpers import ScaledSquare, z_batch

from lightning_ebm.samplers import ODE, GradientDescent, Langevin

THETA, S, K = 1.3, 0.1, 8


def test_default_call_keeps_no_graph():
    energy, z = ScaledSquare(THETA), z_batch()
    for sampler in (GradientDescent(K, S), ODE(1.0, step_size=0.25), Langevin(K, S, 0.1)):
        x = sampler(energy, z)
        assert not x.requires_grad and x.grad_fn is None
    assert energy.theta.grad is None


@pytest.mark.parametrize("k", [1, 3, K])
def test_gradient_descent_unroll_matches_closed_form(k):
    energy, z = ScaledSquare(THETA), z_batch()
    sampler = GradientDescent(K, S)
    x = sampler(energy, z, differentiable_steps=k)
    torch.testing.assert_close(x.detach(), sampler(energy, z))
    torch.testing.assert_close(x.detach(), (1 - S * THETA) ** K * z)
    (g,) = torch.autograd.grad(x.sum(), energy.theta)
    expected = -S * k * (1 - S * THETA) ** (K - 1) * z.sum()
    assert math.isclose(float(g), float(expected), rel_tol=1e-10)


def test_langevin_unroll_differentiates_the_drift_only():
    energy, z = ScaledSquare(THETA), z_batch()
    sampler = Langevin(K, S, noise_std=0.1)
    x = sampler(energy, z, generator=torch.Generator().manual_seed(1), differentiable_steps=K)
    torch.testing.assert_close(x.detach(), sampler(energy, z, generator=torch.Generator().manual_seed(1)))
    # x_K = c^K z + sum_j c^(K-1-j) sigma eps_j, c = 1 - s theta: d/dtheta by autograd on the formula
    theta = torch.tensor(THETA, dtype=torch.float64, requires_grad=True)
    gen = torch.Generator().manual_seed(1)
    ref = z
    for _ in range(K):
        ref = ref - S * theta * ref + 0.1 * torch.randn(z.shape, generator=gen, dtype=z.dtype)
    (g_ref,) = torch.autograd.grad(ref.sum(), theta)
    (g,) = torch.autograd.grad(x.sum(), energy.theta)
    assert math.isclose(float(g), float(g_ref), rel_tol=1e-10)


def rk4_factor(a: float) -> tuple[float, float]:
    """RK4's one-step factor for ``dx/dt = -theta x`` with ``a = theta h``, and its derivative in ``a``."""
    return 1 - a + a**2 / 2 - a**3 / 6 + a**4 / 24, -1 + a - a**2 / 2 + a**3 / 6


@pytest.mark.parametrize("k", [1, 4])
def test_ode_unroll_matches_rk4_closed_form(k):
    energy, z = ScaledSquare(THETA), z_batch()
    n, h = 4, 0.25
    sampler = ODE(1.0, method="rk4", step_size=h)
    x = sampler(energy, z, differentiable_steps=k)
    r, dr = rk4_factor(THETA * h)
    torch.testing.assert_close(x.detach(), r**n * z)
    torch.testing.assert_close(x.detach(), sampler(energy, z))
    (g,) = torch.autograd.grad(x.sum(), energy.theta)
    expected = k * r ** (n - 1) * dr * h * z.sum()
    assert math.isclose(float(g), float(expected), rel_tol=1e-10)


def test_ode_unroll_adaptive_and_adjoint():
    energy, z = ScaledSquare(THETA), z_batch()
    t = 1.0
    adaptive = ODE(t, method="dopri5", rtol=1e-10, atol=1e-10)
    x = adaptive(energy, z, differentiable_steps=1)  # adaptive: the whole solve is one step
    (g,) = torch.autograd.grad(x.sum(), energy.theta)
    assert math.isclose(float(g), -t * math.exp(-THETA * t) * float(z.sum()), rel_tol=1e-7)
    with pytest.raises(ValueError, match="differentiable_steps must be <= the 1 step"):
        adaptive(energy, z, differentiable_steps=2)
    fine = dict(t_end=t, method="rk4", step_size=0.01)
    x_direct = ODE(**fine)(energy, z, differentiable_steps=100)
    x_adjoint = ODE(**fine, adjoint=True)(energy, z, differentiable_steps=100)
    (g_direct,) = torch.autograd.grad(x_direct.sum(), energy.theta)
    (g_adjoint,) = torch.autograd.grad(x_adjoint.sum(), energy.theta)
    assert math.isclose(float(g_adjoint), float(g_direct), rel_tol=1e-6)
    assert math.isclose(float(g_direct), -t * math.exp(-THETA * t) * float(z.sum()), rel_tol=1e-6)


def test_unroll_errors():
    energy, z = ScaledSquare(THETA), z_batch()
    with pytest.raises(ValueError, match="differentiable_steps must be <= steps=8"):
        GradientDescent(K, S)(energy, z, differentiable_steps=K + 1)
    with pytest.raises(ValueError, match="integer >= 0"):
        GradientDescent(K, S)(energy, z, differentiable_steps=-1)
    with pytest.raises(ValueError, match="not supported with differentiable_steps"):
        ODE(1.0)(energy, z, differentiable_steps=1, return_trajectory=True)
    with torch.no_grad(), pytest.raises(RuntimeError, match="needs grad mode"):
        GradientDescent(K, S)(energy, z, differentiable_steps=1)
