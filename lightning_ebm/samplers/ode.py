"""The gradient flow ``dx/dt = -grad E(x)`` solved with torchdiffeq."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

from .base import Sampler, _check_positive, energy_grad
from .compiled import CompiledFlow

__all__ = ["ODE", "FIXED_GRID_METHODS", "ADAPTIVE_METHODS"]

#: torchdiffeq 0.2.5 solvers that step on a fixed grid (need a step size)
FIXED_GRID_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams")
#: torchdiffeq 0.2.5 solvers with error control (use rtol/atol)
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


class GradientFlow(nn.Module):
    """``f(t, x) = -grad E(x)``, counting evaluations."""

    def __init__(self, energy: nn.Module, grad_clip: float | None = None, create_graph: bool = False) -> None:
        super().__init__()
        self.energy = energy
        self.grad_clip = grad_clip
        self.create_graph = create_graph
        self.nfe = 0

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.nfe += 1
        g = energy_grad(self.energy, x, create_graph=self.create_graph)
        return -(g if self.grad_clip is None else g.clamp(-self.grad_clip, self.grad_clip))


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
        _check_positive("ODE", "t_end", t_end)
        if method not in FIXED_GRID_METHODS + ADAPTIVE_METHODS:
            raise ValueError(
                f"ODE: method must be one of {FIXED_GRID_METHODS + ADAPTIVE_METHODS}, got {method!r}"
            )
        if step_size is not None:
            _check_positive("ODE", "step_size", step_size)
        _check_positive("ODE", "rtol", rtol)
        _check_positive("ODE", "atol", atol)
        self.t_end = float(t_end)
        self.method = method
        self.step_size = None if step_size is None else float(step_size)
        self.rtol, self.atol = float(rtol), float(atol)
        self.adjoint = bool(adjoint)

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

    def _run(self, energy, x0, generator, return_trajectory, callback, differentiable_steps=0):
        if differentiable_steps:
            if return_trajectory or callback is not None:
                raise ValueError("ODE: return_trajectory and callback are not supported with "
                                 "differentiable_steps")
            return self._run_unrolled(energy, x0, differentiable_steps), None
        flow = GradientFlow(energy, self.grad_clip)
        if self.compile:
            flow = CompiledFlow(self, energy, self.grad_clip)
        t = self.time_grid(device=x0.device, dtype=x0.dtype)
        if not return_trajectory and callback is None:
            t = t[[0, -1]]
        with torch.no_grad():
            states = odeint(flow, x0, t, **self.solver_options())
        self.last_nfe = flow.nfe
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
            raise ValueError(f"ODE: differentiable_steps must be <= the {n} step(s) of the time grid "
                             f"(method={self.method!r}), got {k}")
        # step exactly on the given grid points (a fixed-grid method); adaptive methods ignore this
        opts = ({"method": self.method, "options": {"grid_constructor": lambda f, y0, tt: tt}}
                if self.fixed_grid else self.solver_options())
        flow = GradientFlow(energy, self.grad_clip)
        x = x0
        if n > k:
            with torch.no_grad():
                x = odeint(flow, x0, t[: n - k + 1], **opts)[-1]
        unrolled = GradientFlow(energy, self.grad_clip, create_graph=True)
        solve = odeint_adjoint if self.adjoint else odeint
        x = solve(unrolled, x, t[n - k :], **opts)[-1]
        self.last_nfe = flow.nfe + unrolled.nfe
        return x
