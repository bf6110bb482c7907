"""Samplers: one shared contract over every sampler, then closed forms on quadratic energies."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from conftest import QuadraticEnergy, random_spd

from lightning_ebm.energies import MLPEnergy
from lightning_ebm.samplers import ODE, GradientDescent, Langevin, Sampler

SAMPLERS = {
    "gd": lambda steps=5: GradientDescent(steps=steps, step_size=0.05),
    "gd_clip_clamp": lambda steps=5: GradientDescent(steps=steps, step_size=0.05, grad_clip=0.5, clamp=(-3, 3)),
    "langevin": lambda steps=5: Langevin(steps=steps, step_size=0.05, noise_std=0.1),
    "ode_euler": lambda steps=5: ODE(t_end=0.05 * steps, method="euler", step_size=0.05),
    "ode_rk4": lambda steps=5: ODE(t_end=0.05 * steps, method="rk4", step_size=0.05),
    "ode_dopri5": lambda steps=5: ODE(t_end=0.05 * steps, method="dopri5", rtol=1e-4, atol=1e-4),
}


@pytest.fixture(params=sorted(SAMPLERS))
def make_sampler(request):
    return SAMPLERS[request.param]


# ---------------------------------------------------------------- the contract, for every sampler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_and_detached(make_sampler, dtype):
    energy = MLPEnergy(dim=6, hidden=16).to(dtype)
    x0 = torch.randn(7, 2, 3, dtype=dtype)
    x = make_sampler()(energy, x0)
    assert x.shape == x0.shape and x.dtype == dtype and x.device == x0.device
    assert not x.requires_grad and x.grad_fn is None
    assert not torch.equal(x, x0)  # it moved


def test_no_parameter_gradients(make_sampler):
    energy = MLPEnergy(dim=2, hidden=16)
    x = make_sampler()(energy, torch.randn(8, 2))
    assert all(p.grad is None for p in energy.parameters())
    assert x.grad_fn is None


def test_works_under_no_grad_and_refuses_inference_mode(make_sampler):
    energy = MLPEnergy(dim=2, hidden=16)
    x0 = torch.randn(8, 2)
    reference = make_sampler()(energy, x0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = make_sampler()(energy, x0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, reference)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode=False"):
        make_sampler()(energy, x0)
    with torch.inference_mode():
        x_inf = torch.randn(8, 2)  # an inference tensor made earlier is accepted outside
    assert make_sampler()(energy, x_inf).shape == (8, 2)


def test_trajectory_and_callback(make_sampler):
    energy = MLPEnergy(dim=2, hidden=16)
    x0 = torch.randn(4, 2)
    seen = []
    sampler = make_sampler()
    x, traj = sampler(energy, x0, return_trajectory=True, callback=lambda info: seen.append(info["step"]))
    assert traj.shape[1:] == (4, 2) and traj.shape[0] >= 2
    torch.testing.assert_close(traj[0], x0)
    torch.testing.assert_close(traj[-1], x)
    assert not traj.requires_grad
    assert seen == list(range(1, len(seen) + 1)) and len(seen) == traj.shape[0] - 1
    assert sampler.last_nfe >= len(seen)


def _live_tensor_bytes() -> int:
    gc.collect()
    total = 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                size = obj.untyped_storage().nbytes()
                total += size if isinstance(size, int) else 0  # torch.compile leaves symbolic fakes
        except Exception:  # noqa: BLE001 - objects can vanish while scanning
            pass
    return total


class _PeakProbe(torch.nn.Module):
    """Wraps an energy; every ``every``-th evaluation records the bytes held by live tensors."""

    def __init__(self, energy, every: int = 10):
        super().__init__()
        self.energy, self.every, self.calls, self.peak = energy, every, 0, 0

    def forward(self, x):
        out = self.energy(x)
        self.calls += 1
        if self.calls % self.every == 0:
            self.peak = max(self.peak, _live_tensor_bytes())
        return out


def test_memory_does_not_grow_with_steps(make_sampler):
    energy = MLPEnergy(dim=64, hidden=32)
    x0 = torch.randn(256, 64)
    state = x0.numel() * 4  # 64 KiB: a graph kept across steps would add at least this per step
    peaks = []
    for steps in (10, 40):
        probe = _PeakProbe(energy)
        make_sampler(steps)(probe, x0)
        peaks.append(probe.peak)
    # 30 more steps: a leak would add >= 30 states; allow a few for solver bookkeeping
    assert peaks[1] - peaks[0] < 4 * state, peaks


def test_bad_energy_output_is_named(make_sampler):
    class Wrong(torch.nn.Module):
        def forward(self, x):
            return (x**2).sum(1, keepdim=True)  # (B, 1) instead of (B,)

    with pytest.raises(ValueError, match=r"shape \(B,\).*\(4, 1\)"):
        make_sampler()(Wrong(), torch.randn(4, 2))


def test_rejects_non_float_start(make_sampler):
    with pytest.raises(TypeError, match="floating-point"):
        make_sampler()(MLPEnergy(dim=2), torch.ones(3, 2, dtype=torch.long))


# ---------------------------------------------------------------- closed forms
@pytest.mark.parametrize("dim", [2, 10])
def test_gradient_descent_is_matrix_power(dim):
    A = random_spd(dim, seed=dim)
    z = torch.randn(50, dim, dtype=torch.float64)
    s, K = 0.1, 25
    x = GradientDescent(steps=K, step_size=s)(QuadraticEnergy(A), z)
    expected = z @ torch.linalg.matrix_power(torch.eye(dim, dtype=torch.float64) - s * A, K).T
    torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dim", [2, 10])
def test_ode_rk4_is_matrix_exponential(dim):
    A = random_spd(dim, seed=dim)
    z = torch.randn(50, dim, dtype=torch.float64)
    t = 1.5
    sampler = ODE(t_end=t, method="rk4", step_size=0.05)
    x = sampler(QuadraticEnergy(A), z)
    expected = z @ torch.linalg.matrix_exp(-A * t).T
    assert (x - expected).abs().max() < 1e-5
    assert sampler.last_nfe == 4 * 30  # rk4: four evaluations per step, 30 steps


def test_ode_dopri5_meets_tolerance_and_counts_evaluations():
    A = random_spd(3, seed=1)
    z = torch.randn(20, 3, dtype=torch.float64)
    sampler = ODE(t_end=2.0, method="dopri5", rtol=1e-8, atol=1e-8)
    x = sampler(QuadraticEnergy(A), z)
    assert (x - z @ torch.linalg.matrix_exp(-2.0 * A).T).abs().max() < 1e-6
    assert sampler.last_nfe > 6


def test_euler_ode_equals_gradient_descent():
    A = random_spd(4, seed=2)
    z = torch.randn(10, 4, dtype=torch.float64)
    gd = GradientDescent(steps=20, step_size=0.05)(QuadraticEnergy(A), z)
    ode = ODE(t_end=1.0, method="euler", step_size=0.05)(QuadraticEnergy(A), z)
    torch.testing.assert_close(gd, ode, rtol=1e-12, atol=1e-12)


def test_langevin_reaches_the_boltzmann_covariance():
    """noise_std = sqrt(2 s) targets exp(-E): covariance A^-1 (up to the O(s) discretisation bias)."""
    A = torch.tensor([[2.0, 0.6], [0.6, 1.0]], dtype=torch.float64)
    s = 0.01
    sampler = Langevin(steps=1500, step_size=s, noise_std=math.sqrt(2 * s))
    x = sampler(QuadraticEnergy(A), torch.zeros(20000, 2, dtype=torch.float64),
                generator=torch.Generator().manual_seed(0))
    cov = torch.cov(x.T)
    target = torch.linalg.inv(A)
    assert torch.allclose(cov, target, rtol=0.04, atol=0.02), (cov, target)
    assert sampler.temperature == pytest.approx(1.0)


def test_langevin_without_noise_is_gradient_descent_and_deterministic():
    energy = MLPEnergy(dim=2, hidden=16)
    z = torch.randn(16, 2)
    lang = Langevin(steps=10, step_size=0.05, noise_std=0.0)
    assert lang.deterministic and not Langevin(steps=1, step_size=0.1, noise_std=0.1).deterministic
    torch.testing.assert_close(lang(energy, z), GradientDescent(steps=10, step_size=0.05)(energy, z))


def test_langevin_noise_follows_the_generator():
    energy = MLPEnergy(dim=2, hidden=16)
    z = torch.randn(16, 2)
    sampler = Langevin(steps=5, step_size=0.05, noise_std=0.1)
    a = sampler(energy, z, generator=torch.Generator().manual_seed(3))
    b = sampler(energy, z, generator=torch.Generator().manual_seed(3))
    c = sampler(energy, z, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


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
    ],
)
def test_bad_arguments_are_named(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_every_sampler_is_a_sampler():
    assert all(isinstance(make(), Sampler) for make in SAMPLERS.values())
