"""Gradient descent and Langevin dynamics on the energy."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_float, check_int
from .base import GradFn, Sampler, State, Steps, clip_grad

__all__ = ["GradientDescent", "Langevin", "descent_update", "gaussian_noise"]


def descent_update(grad: GradFn, state: State, noise: tuple[Tensor, ...], k: Tensor, step_size: float,
                   noise_std: float, grad_clip: float | None, clamp: tuple[float, float] | None
                   ) -> tuple[State, dict[str, Tensor]]:
    """One GradientDescent / Langevin step: ``x - s clip(grad E(x)) (+ noise_std * noise)``, clamped.

    The one gradient-descent update of the library; every backend runs it (see ``Steps``).
    """
    (x,) = state
    g = clip_grad(grad(x), grad_clip)
    x = x - step_size * g
    if noise:
        x = x + noise_std * noise[0]
    if clamp is not None:
        x = x.clamp(*clamp)
    return (x,), {"grad": g}


def gaussian_noise(x: Tensor, generator: torch.Generator | None) -> tuple[Tensor]:
    """One standard normal draw of ``x``'s shape, dtype and device, from ``generator``."""
    return (torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype),)


class GradientDescent(Sampler):
    """``x <- x - step_size * grad E(x)``, ``steps`` times: the deterministic generator.

    For small enough steps each update is invertible, so the generator's density follows by
    change of variables (``lightning_ebm.density``).

    Args:
        steps: number of updates K.
        step_size: s > 0.
        grad_clip: clamp every coordinate of ``grad E`` to ``[-grad_clip, grad_clip]``.
        clamp: clamp the state to ``(low, high)`` after every step (e.g. the data range).
        compile: run the steps (gradient and update) through ``torch.compile``, about ten
            steps per compiled call; equal to the eager loop up to float rounding, faster after a
            one-off compilation (``compile_time``).
        cuda_graph: on CUDA, capture the whole K-step loop in a CUDA graph on first use and
            replay it (no per-kernel launch cost); calls asking for a trajectory or a callback
            run step by step. Raises on other devices.
    """

    def __init__(
        self,
        steps: int,
        step_size: float,
        grad_clip: float | None = None,
        clamp: tuple[float, float] | None = None,
        compile: bool = False,
        cuda_graph: bool = False,
    ) -> None:
        super().__init__(grad_clip=grad_clip, clamp=clamp, compile=compile, cuda_graph=cuda_graph)
        name = type(self).__name__
        self.steps = check_int(name, "steps", steps, minimum=1)
        self.step_size = check_float(name, "step_size", step_size, minimum=0, strict=True)

    def dynamics(self) -> Steps:
        """``descent_update`` with this sampler's constants (no noise)."""
        return Steps(descent_update, self.steps, (self.step_size, 0.0, self.grad_clip, self.clamp))


class Langevin(GradientDescent):
    """``x <- x - step_size * grad E(x) + noise_std * N(0, I)``, ``steps`` times.

    Step size and noise are decoupled, as in short-run EBM practice. ``noise_std =
    sqrt(2 * step_size)`` is the unadjusted Langevin algorithm, whose stationary law approaches
    ``exp(-E)/Z`` (temperature 1) as the step size goes to 0; smaller noise samples a colder
    ``exp(-E/T)`` with ``T = noise_std**2 / (2 * step_size)``; ``noise_std = 0`` is
    ``GradientDescent``. With noise the generator is stochastic and has no computable density.

    Args:
        steps: number of updates K.
        step_size: s > 0.
        noise_std: standard deviation of the Gaussian noise added at every step (>= 0).
        grad_clip: clamp every coordinate of ``grad E`` to ``[-grad_clip, grad_clip]``.
        clamp: clamp the state to ``(low, high)`` after every step (e.g. the data range).
        compile: run the steps through ``torch.compile`` (see ``GradientDescent``); the noise is
            drawn outside the compiled step, from the same stream, so results equal eager.
        cuda_graph: on CUDA, replay the K-step loop from a CUDA graph (see ``GradientDescent``);
            the noise then comes from ``generator`` registered with the graph.
    """

    def __init__(
        self,
        steps: int,
        step_size: float,
        noise_std: float,
        grad_clip: float | None = None,
        clamp: tuple[float, float] | None = None,
        compile: bool = False,
        cuda_graph: bool = False,
    ) -> None:
        super().__init__(steps=steps, step_size=step_size, grad_clip=grad_clip, clamp=clamp, compile=compile,
                         cuda_graph=cuda_graph)
        self.noise_std = check_float(type(self).__name__, "noise_std", noise_std, minimum=0)
        self.deterministic = self.noise_std == 0.0

    @property
    def temperature(self) -> float:
        """The temperature ``T`` of the stationary law ``exp(-E/T)`` in the small-step limit."""
        return self.noise_std**2 / (2 * self.step_size)

    def dynamics(self) -> Steps:
        """``descent_update`` with this sampler's constants, a standard normal drawn per step (if noisy)."""
        constants = (self.step_size, self.noise_std, self.grad_clip, self.clamp)
        return Steps(descent_update, self.steps, constants, draw=gaussian_noise if self.noise_std > 0 else None)
