"""A new sampler is one file plus one export line: heavy-ball momentum descent, written only here.

It defines its update once (``dynamics()``) with a state of two tensors (position, velocity),
and passes the shared sampler contract eagerly and through the compiled backend, with no edit of
the library. On ``E = 0.5 x^T A x`` one step is linear in ``(x, v)``::

    v' = mu v - s A x,   x' = x + v'   =>   [x'; v'] = [[I - sA, mu I], [-sA, mu I]] [x; v]

so ``x_K`` is the top block of that matrix's K-th power applied to ``(z, 0)``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import QuadraticEnergy, random_spd
from contracts.sampler_contract import Case, SamplerContract, exported_samplers, start
from torch import Tensor

import lightning_ebm.samplers as samplers_module
from lightning_ebm import density
from lightning_ebm.latents import Gaussian
from lightning_ebm.samplers import GradFn, Sampler, State, Steps, clip_grad


def heavy_ball_update(grad: GradFn, state: State, noise: tuple, k: Tensor, step_size: float, momentum: float,
                      grad_clip: float | None, clamp: tuple[float, float] | None) -> tuple[State, dict]:
    x, v = state
    g = clip_grad(grad(x), grad_clip)
    v = momentum * v - step_size * g
    x = x + v
    if clamp is not None:
        x = x.clamp(*clamp)
    return (x, v), {"grad": g, "velocity": v}


class HeavyBall(Sampler):
    """``v <- mu v - s grad E(x)``, ``x <- x + v``, ``steps`` times (Polyak's heavy ball)."""

    def __init__(self, steps: int, step_size: float, momentum: float = 0.5, grad_clip: float | None = None,
                 clamp: tuple[float, float] | None = None, compile: bool = False) -> None:
        super().__init__(grad_clip=grad_clip, clamp=clamp, compile=compile)
        self.steps, self.step_size, self.momentum = steps, step_size, momentum

    def dynamics(self) -> Steps:
        return Steps(heavy_ball_update, self.steps, (self.step_size, self.momentum, self.grad_clip, self.clamp))

    def init_state(self, x0: Tensor) -> State:
        return (x0, torch.zeros_like(x0))

    def info(self, state: State) -> dict[str, float]:
        return {"speed": float(state[1].flatten(1).norm(dim=1).mean())}


def _heavy_ball_closed_form(compile: bool) -> None:
    s, mu, k, dim = 0.1, 0.6, 25, 3
    a = random_spd(dim, seed=dim)
    eye = torch.eye(dim, dtype=torch.float64)
    block = torch.cat([torch.cat([eye - s * a, mu * eye], 1), torch.cat([-s * a, mu * eye], 1)], 0)
    z = start(shape=(40, dim), dtype=torch.float64)
    x = HeavyBall(steps=k, step_size=s, momentum=mu, compile=compile)(QuadraticEnergy(a), z)
    expected = (torch.cat([z, torch.zeros_like(z)], 1) @ torch.linalg.matrix_power(block, k).T)[:, :dim]
    torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)


@pytest.fixture(params=[False, True], ids=["eager", "compiled"])
def case(request) -> Case:
    return Case(lambda n, c: HeavyBall(steps=5 * n, step_size=0.05, momentum=0.5, grad_clip=0.5, compile=c),
                _heavy_ball_closed_form, compile=request.param)


class TestHeavyBallContract(SamplerContract):
    def test_its_own_report_reaches_last_info(self, case):
        a = random_spd(2, seed=0)
        sampler = case.build()
        sampler(QuadraticEnergy(a), start(dtype=torch.float64))
        assert set(sampler.last_info) == {"nfe", "speed"} | ({"compile_time"} if case.compile else set())
        assert sampler.last_info["nfe"] == 5.0 and sampler.last_info["speed"] > 0

    def test_the_callback_sees_its_extras(self, case):
        seen = []
        case.build()(QuadraticEnergy(random_spd(2, seed=0)), start(dtype=torch.float64),
                     callback=lambda info: seen.append(sorted(info)))
        assert seen == [["grad", "step", "velocity", "x"]] * 5


# ---------------------------------------------------------------- a sampler with an accept/reject
def monotone_update(grad: GradFn, state: State, noise: tuple, k: Tensor, step_size: float) -> tuple[State, dict]:
    """Propose a descent step; keep it per chain only if it lowers the energy (no host sync)."""
    x, accepted = state
    g, e = grad(x, with_energy=True)
    proposal = x - step_size * g
    _, e_new = grad(proposal, with_energy=True)
    accept = e_new <= e
    x = torch.where(accept.view(-1, *([1] * (x.dim() - 1))), proposal, x)
    return (x, accepted + accept.to(x.dtype)), {"accept": accept}


class MonotoneDescent(Sampler):
    """Gradient descent that rejects steps raising the energy; reports its acceptance rate."""

    def __init__(self, steps: int, step_size: float, compile: bool = False) -> None:
        super().__init__(compile=compile)
        self.steps, self.step_size = steps, step_size

    def dynamics(self) -> Steps:
        return Steps(monotone_update, self.steps, (self.step_size,), evaluations=2)

    def init_state(self, x0: Tensor) -> State:
        return (x0, x0.new_zeros(x0.shape[0]))

    def info(self, state: State) -> dict[str, float]:
        return {"acceptance": float(state[1].mean()) / self.steps}


def _monotone_closed_form(compile: bool) -> None:
    """Small steps always lower a quadratic energy: ``(I - sA)^K z``, acceptance 1; far too large
    steps (``s * lambda_min > 2``) always raise it: ``x = z``, acceptance 0."""
    a = random_spd(3, seed=3)
    z = start(shape=(40, 3), dtype=torch.float64)
    small = MonotoneDescent(steps=20, step_size=0.1, compile=compile)
    expected = z @ torch.linalg.matrix_power(torch.eye(3, dtype=torch.float64) - 0.1 * a, 20).T
    torch.testing.assert_close(small(QuadraticEnergy(a), z), expected, rtol=1e-12, atol=1e-12)
    assert small.last_info["acceptance"] == 1.0 and small.last_info["nfe"] == 40.0
    large = MonotoneDescent(steps=20, step_size=10.0, compile=compile)
    torch.testing.assert_close(large(QuadraticEnergy(a), z), z, rtol=0, atol=0)
    assert large.last_info["acceptance"] == 0.0


@pytest.fixture(params=[False, True], ids=["eager", "compiled"])
def monotone(request) -> Case:
    return Case(lambda n, c: MonotoneDescent(steps=5 * n, step_size=0.05, compile=c), _monotone_closed_form,
                compile=request.param)


class TestMonotoneDescentContract(SamplerContract):
    @pytest.fixture
    def case(self, monotone):
        return monotone

    def test_acceptance_reaches_last_info(self, case, mlp):
        sampler = case.build()
        sampler(mlp, start())
        assert 0.0 < sampler.last_info["acceptance"] <= 1.0


def test_one_export_line_puts_it_under_the_contract(monkeypatch):
    """Exported, it is found from ``__all__`` (so the exported-sampler contract would demand a case)."""
    assert "HeavyBall" not in exported_samplers()
    monkeypatch.setattr(samplers_module, "HeavyBall", HeavyBall, raising=False)
    monkeypatch.setattr(samplers_module, "__all__", [*samplers_module.__all__, "HeavyBall"])
    assert "HeavyBall" in exported_samplers()


def test_without_a_density_rule_it_says_it_has_no_density():
    with pytest.raises(NotImplementedError, match="no change-of-variables rule for sampler HeavyBall"):
        density.check_density(HeavyBall(steps=2, step_size=0.1), Gaussian((2,)))
