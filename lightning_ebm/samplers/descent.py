"""Gradient descent and Langevin dynamics on the energy."""

from __future__ import annotations

import math

import torch

from .base import Sampler, _check_positive, energy_grad
from .compiled import run_descent

__all__ = ["GradientDescent", "Langevin"]


class GradientDescent(Sampler):
    """``x <- x - step_size * grad E(x)``, ``steps`` times: the deterministic generator.

    For small enough steps each update is invertible, so the generator's density follows by
    change of variables (``lightning_ebm.density``).

    Args:
        steps: number of updates K.
        step_size: s > 0.
        grad_clip: clamp every coordinate of ``grad E`` to ``[-grad_clip, grad_clip]``.
        clamp: clamp the state to ``(low, high)`` after every step (e.g. the data range).
        compile: run each step (gradient and update) through ``torch.compile``; equal to the
            eager loop up to float rounding, faster after a one-off compilation
            (``compile_time``).
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
        super().__init__(grad_clip=grad_clip, clamp=clamp, compile=compile)
        _check_positive(type(self).__name__, "steps", steps, integer=True)
        _check_positive(type(self).__name__, "step_size", step_size)
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"{type(self).__name__}: cuda_graph must be True or False, got {cuda_graph!r}")
        self.steps = steps
        self.step_size = float(step_size)
        self.cuda_graph = cuda_graph

    def _noise_std(self) -> float:
        return 0.0

    def _run(self, energy, x0, generator, return_trajectory, callback, differentiable_steps=0):
        if differentiable_steps > self.steps:
            raise ValueError(f"{type(self).__name__}: differentiable_steps must be <= steps={self.steps}, "
                             f"got {differentiable_steps}")
        if (self.compile or self.cuda_graph) and not differentiable_steps:
            return run_descent(self, energy, x0, generator, return_trajectory, callback)
        x = x0
        states = [x] if return_trajectory else None
        s, noise_std = self.step_size, self._noise_std()
        first_unrolled = self.steps - differentiable_steps
        for k in range(self.steps):
            g = self._postprocess_grad(energy_grad(energy, x, create_graph=k >= first_unrolled))
            x = x - s * g
            if noise_std > 0:
                x = x + noise_std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = self._postprocess_x(x)
            if states is not None:
                states.append(x)
            if callback is not None:
                callback({"step": k + 1, "x": x, "grad": g})
        self.last_nfe = self.steps
        return x, (torch.stack(states) if states is not None else None)


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
        compile: run each step through ``torch.compile`` (see ``GradientDescent``); the noise is
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
        if not isinstance(noise_std, (int, float)) or not math.isfinite(noise_std) or noise_std < 0:
            raise ValueError(f"Langevin: noise_std must be a finite number >= 0, got {noise_std!r}")
        self.noise_std = float(noise_std)
        self.deterministic = self.noise_std == 0.0

    @property
    def temperature(self) -> float:
        """The temperature ``T`` of the stationary law ``exp(-E/T)`` in the small-step limit."""
        return self.noise_std**2 / (2 * self.step_size)

    def _noise_std(self) -> float:
        return self.noise_std


