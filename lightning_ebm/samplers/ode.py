"""The gradient flow ``dx/dt = -grad E(x)`` solved with torchdiffeq."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

from .._checks import ArgumentError, check_bool, check_choice, check_float
from ._backends import VectorField
from .base import Flow, GradFn, Sampler, clip_grad

__all__ = ["ODE", "FIXED_GRID_METHODS", "ADAPTIVE_METHODS", "gradient_flow"]

#: torchdiffeq 0.2.5 solvers that step on a fixed grid (need a step size)
FIXED_GRID_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams")
#: torchdiffeq 0.2.5 solvers with error control (use rtol/atol)
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


def gradient_flow(grad: GradFn, x: Tensor, grad_clip: float | None) -> Tensor:
    """The gradient flow's vector field ``dx/dt = -clip(grad E(x))``; every backend evaluates it."""
    return -clip_grad(grad(x), grad_clip)


class ODE(Sampler):
    """Solve ``dx/dt = -grad E(x)`` from ``t = 0`` to ``t_end``: the continuous-time generator.

    Gradient descent with step ``s`` for ``K`` steps is the Euler method for this ODE with
    ``t_end = K * s``. The flow is invertible for any energy, so its density is always defined.

    Args:
        t_end: integration time (> 0).
        method: a torchdiffeq solver: fixed-grid ``euler``, ``midpoint``, ``heun2``, ``heun3``,
            ``rk4``, ``explicit_adams``, ``implicit_adams``, or adaptive ``dopri5``, ``dopri8``,
            ``bosh3``, ``fehlberg2``, ``adaptive_heun``.
        step_size: step of the fixed-grid methods, rounded down so that ``ceil(t_end / step_size)``
            equal steps cover ``[0, t_end]``; ``None`` means 10 steps. Ignored by adaptive methods.
        rtol: relative tolerance of the adaptive methods.
        atol: absolute tolerance of the adaptive methods.
        adjoint: use ``odeint_adjoint`` when the solve is differentiated through (the
            generator-loss option); plain sampling never keeps a graph either way.
        grad_clip: clamp every coordinate of ``grad E`` to ``[-grad_clip, grad_clip]``.
        compile: evaluate ``-grad E`` through ``torch.compile`` (the solver stays torchdiffeq's);
            equal to eager up to float rounding; ``compile_time`` holds the compilation seconds.

    After each call ``last_nfe`` holds the number of energy-gradient evaluations.
    """

    def __init__(
        self,
        t_end: float,
        method: str = "rk4",
        step_size: float | None = None,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        adjoint: bool = False,
        grad_clip: float | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__(grad_clip=grad_clip, compile=compile)
        name = type(self).__name__
        self.t_end = check_float(name, "t_end", t_end, minimum=0, strict=True)
        self.method = check_choice(name, "method", method, FIXED_GRID_METHODS + ADAPTIVE_METHODS)
        self.step_size = check_float(name, "step_size", step_size, minimum=0, strict=True, allow_none=True)
        self.rtol = check_float(name, "rtol", rtol, minimum=0, strict=True)
        self.atol = check_float(name, "atol", atol, minimum=0, strict=True)
        self.adjoint = check_bool(name, "adjoint", adjoint)

    @property
    def fixed_grid(self) -> bool:
        return self.method in FIXED_GRID_METHODS

    @property
    def num_steps(self) -> int | None:
        """Number of solver steps of a fixed-grid method (``None`` for adaptive ones)."""
        if not self.fixed_grid:
            return None
        h = self.step_size if self.step_size is not None else self.t_end / 10
        return max(1, math.ceil(self.t_end / h - 1e-9))

    def time_grid(self, device=None, dtype=None) -> Tensor:
        """The output times: the solver grid for fixed-grid methods, ``[0, t_end]`` otherwise."""
        n = self.num_steps or 1
        return torch.linspace(0.0, self.t_end, n + 1, device=device, dtype=dtype)

    def solver_options(self) -> dict:
        """torchdiffeq keyword arguments (method, options, tolerances) for this configuration."""
        if self.fixed_grid:
            # step exactly on an even grid of [0, t_end] (torchdiffeq's step_size option can add a
            # spurious tiny last step when t_end / step_size rounds up)
            n, t_end = self.num_steps, self.t_end

            def grid(func, y0, t):
                return torch.linspace(0.0, t_end, n + 1, device=t.device, dtype=t.dtype)

            return {"method": self.method, "options": {"grid_constructor": grid}}
        return {"method": self.method, "rtol": self.rtol, "atol": self.atol}

    def flow(self) -> Flow:
        """``gradient_flow`` with this sampler's gradient clipping."""
        return Flow(gradient_flow, (self.grad_clip,))

    def vector_field(self, energy: nn.Module) -> VectorField:
        """``f(t, x)`` for ``energy`` on this sampler's backend (eager or compiled), counting evaluations."""
        return VectorField(self.flow(), energy, compile=self.compile, owner=type(self).__name__)

    def _run(self, energy, x0, generator, return_trajectory, callback, differentiable_steps=0):
        if differentiable_steps:
            if return_trajectory or callback is not None:
                raise ValueError("ODE: return_trajectory and callback are not supported with "
                                 "differentiable_steps")
            return self._run_unrolled(energy, x0, differentiable_steps), None
        field = self.vector_field(energy)
        t = self.time_grid(device=x0.device, dtype=x0.dtype)
        if not return_trajectory and callback is None:
            t = t[[0, -1]]
        with torch.no_grad():
            states = odeint(field, x0, t, **self.solver_options())
        self._record(field)
        if callback is not None:
            for k in range(1, len(t)):
                callback({"step": k, "x": states[k], "t": float(t[k])})
        return states[-1], (states if return_trajectory else None)

    def _run_unrolled(self, energy, x0, k):
        """Solve without a graph up to the last ``k`` steps of the time grid, then with one.

        Adaptive methods have the one-step grid ``[0, t_end]``: the whole solve is unrolled.
        """
        t = self.time_grid(device=x0.device, dtype=x0.dtype)
        n = len(t) - 1
        if k > n:
            raise ArgumentError(f"ODE: differentiable_steps must be <= the {n} step(s) of the time grid "
                             f"(method={self.method!r}), got {k}")
        # step exactly on the given grid points (a fixed-grid method); adaptive methods ignore this
        opts = ({"method": self.method, "options": {"grid_constructor": lambda f, y0, tt: tt}}
                if self.fixed_grid else self.solver_options())
        name = type(self).__name__
        field = VectorField(self.flow(), energy, owner=name)
        x = x0
        if n > k:
            with torch.no_grad():
                x = odeint(field, x0, t[: n - k + 1], **opts)[-1]
        unrolled = VectorField(self.flow(), energy, create_graph=True, owner=name)
        solve = odeint_adjoint if self.adjoint else odeint
        x = solve(unrolled, x, t[n - k :], **opts)[-1]
        field.nfe += unrolled.nfe
        self._record(field)
        return x
