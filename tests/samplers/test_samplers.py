"""Samplers beyond the shared contract (tests/contracts): closed forms, equivalences, argument checks."""

from __future__ import annotations

import pytest
import torch
from conftest import QuadraticEnergy, random_spd

from lightning_ebm.energies import MLPEnergy
from lightning_ebm.samplers import ODE, GradientDescent, Langevin


# ---------------------------------------------------------------- closed forms
@pytest.mark.parametrize("dim", [2, 10])
def test_gradient_descent_is_matrix_power(dim):
    A = random_spd(dim, seed=dim)
    z = torch.randn(50, dim, dtype=torch.float64)
    s, K = 0.1, 25
    x = GradientDescent(steps=K, step_size=s)(QuadraticEnergy(A), z)
    expected = z @ torch.linalg.matrix_power(torch.eye(dim, dtype=torch.float64) - s * A, K).T
    torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)




def test_euler_ode_equals_gradient_descent():
    A = random_spd(4, seed=2)
    z = torch.randn(10, 4, dtype=torch.float64)
    gd = GradientDescent(steps=20, step_size=0.05)(QuadraticEnergy(A), z)
    ode = ODE(t_end=1.0, method="euler", step_size=0.05)(QuadraticEnergy(A), z)
    torch.testing.assert_close(gd, ode, rtol=1e-12, atol=1e-12)



def test_langevin_without_noise_is_gradient_descent_and_deterministic():
    energy = MLPEnergy(dim=2, hidden=16)
    z = torch.randn(16, 2)
    lang = Langevin(steps=10, step_size=0.05, noise_std=0.0)
    assert lang.deterministic and not Langevin(steps=1, step_size=0.1, noise_std=0.1).deterministic
    torch.testing.assert_close(lang(energy, z), GradientDescent(steps=10, step_size=0.05)(energy, z))



def test_grad_clip_and_clamp_act_as_documented():
    A = torch.eye(2, dtype=torch.float64) * 10
    z = torch.tensor([[1.0, -0.01]], dtype=torch.float64)
    x = GradientDescent(steps=1, step_size=0.1, grad_clip=0.5)(QuadraticEnergy(A), z)
    # grad = (10, -0.1) -> clipped to (0.5, -0.1)
    torch.testing.assert_close(x, torch.tensor([[0.95, -0.0]], dtype=torch.float64), atol=1e-12, rtol=0)
    far = torch.tensor([[5.0, -5.0]], dtype=torch.float64)
    x = GradientDescent(steps=1, step_size=0.01, clamp=(-1.0, 1.0))(QuadraticEnergy(A), far)
    assert x.abs().max() <= 1.0


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: GradientDescent(steps=0, step_size=0.1), "steps must be a positive integer, got 0"),
        (lambda: GradientDescent(steps=2.5, step_size=0.1), "steps must be a positive integer"),
        (lambda: GradientDescent(steps=10, step_size=0.0), "step_size must be a positive finite number, got 0.0"),
        (lambda: GradientDescent(steps=10, step_size=-1), "step_size"),
        (lambda: GradientDescent(steps=10, step_size=float("nan")), "step_size"),
        (lambda: Langevin(steps=10, step_size=0.1, noise_std=-0.1), "noise_std must be a finite number >= 0"),
        (lambda: Langevin(steps=-3, step_size=0.1, noise_std=0.1), "steps"),
        (lambda: ODE(t_end=0.0), "t_end must be a positive"),
        (lambda: ODE(t_end=1.0, method="leapfrog"), r"method must be one of .*'rk4'.*got 'leapfrog'"),
        (lambda: ODE(t_end=1.0, step_size=-0.1), "step_size"),
        (lambda: GradientDescent(steps=1, step_size=0.1, grad_clip=0), "grad_clip"),
        (lambda: GradientDescent(steps=1, step_size=0.1, clamp=(1.0, -1.0)), "clamp"),
        (lambda: GradientDescent(steps=1, step_size=0.1, clamp=1.0), r"clamp must be a pair \(low, high\)"),
        (lambda: Langevin(steps=1, step_size=0.1, noise_std=0.0, clamp="ab"), "clamp must be a pair"),
        (lambda: GradientDescent(steps=True, step_size=0.1),
         "GradientDescent: steps must be a positive integer, got True"),
        (lambda: Langevin(steps=2, step_size=0.1, noise_std=False), "Langevin: noise_std must be a finite number >= 0"),
        (lambda: ODE(t_end="a"), "ODE: t_end must be a positive finite number, got 'a'"),
        (lambda: ODE(t_end=1.0, adjoint="yes"), "ODE: adjoint must be True or False, got 'yes'"),
        (lambda: ODE(t_end=1.0, rtol=True), "ODE: rtol must be a positive finite number, got True"),
    ],
)
def test_bad_arguments_are_named(build, match):
    with pytest.raises(ValueError, match=match):
        build()
