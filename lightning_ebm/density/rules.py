"""Change-of-variables rules, one entry per deterministic sampler type, looked up by the sampler's type.

A ``StepRule`` serves a sampler made of invertible steps: the log-Jacobian of one step at a
point, and the inverse of one step. A ``FlowRule`` serves a continuous flow ``dx/dt = f(x)``:
the field and its divergence at a point (``d log p / dt = -div f``), and how the sampler solves
an ODE. A sampler type with no entry (and no entry for a base class) has no generator density.
Adding a rule is one entry: ``RULES[MySampler] = StepRule(log_det=..., invert=...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchdiffeq import odeint

from .._checks import check_float, check_int
from ..samplers import ODE, GradientDescent, Sampler, energy_grad
from .estimators import Estimator

__all__ = ["StepRule", "FlowRule", "RULES", "rule_for", "invert_descent_step"]


@dataclass(frozen=True)
class StepRule:
    """A discrete sampler's change of variables.

    ``log_det(sampler, energy, x, estimator) -> (log|det J|, sign of det J)``: the Jacobian of
    one step taken at ``x``. ``invert(sampler, energy, y, step, tol, max_iter) -> x``: the point
    that step ``step`` (1-based) maps to ``y``; raises when it does not converge.
    """

    log_det: Callable[[Sampler, nn.Module, Tensor, Estimator], tuple[Tensor, Tensor]]
    invert: Callable[[Sampler, nn.Module, Tensor, int, float | None, int], Tensor]


@dataclass(frozen=True)
class FlowRule:
    """A continuous sampler's change of variables: ``d log p(x_t) / dt = -div f(x_t)``.

    ``field(sampler, energy) -> f``: the sampler's own ``f(t, x)`` (its backend, eager or
    compiled); ``divergence(sampler, energy, x, estimator) -> div f(x)``; ``solve(sampler, func,
    state) -> states`` integrates ``func(t, state)`` over the sampler's time span with its own
    solver, controlling the error of the position ``state[0]`` only, so that the position takes
    exactly the steps the sampler itself takes.
    """

    field: Callable[[Sampler, nn.Module], Callable[[Tensor, Tensor], Tensor]]
    divergence: Callable[[Sampler, nn.Module, Tensor, Estimator], Tensor]
    solve: Callable[[Sampler, nn.Module, tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]


def _default_tol(dtype: torch.dtype) -> float:
    return 32 * torch.finfo(dtype).eps


def invert_descent_step(
    energy: nn.Module,
    y: Tensor,
    step_size: float,
    *,
    tol: float | None = None,
    max_iter: int = 500,
    step_index: int | None = None,
    num_steps: int | None = None,
) -> Tensor:
    """Solve ``y = x - s grad E(x)`` for ``x`` by the fixed-point iteration ``x <- y + s grad E(x)``.

    The iteration contracts when ``s * Lip(grad E) < 1`` (which also makes the step invertible).
    It stops when every point moves by at most ``tol * (1 + max|x|)`` (default ``32 * eps`` of
    the dtype) and raises a ``ValueError`` naming the step when it does not within ``max_iter``.
    """
    tol = check_float("invert_descent_step", "tol", tol, minimum=0, strict=True, allow_none=True)
    max_iter = check_int("invert_descent_step", "max_iter", max_iter, minimum=1)
    tol = _default_tol(y.dtype) if tol is None else tol
    y = y.detach()
    x = y + step_size * energy_grad(energy, y)
    delta = None
    for _ in range(max_iter):
        x_new = y + step_size * energy_grad(energy, x)
        delta = (x_new - x).flatten(1).abs().amax(1)
        x = x_new
        if bool((delta <= tol * (1 + x.flatten(1).abs().amax(1))).all()):
            return x
    where = "a step" if step_index is None else f"step {step_index}"
    where += "" if num_steps is None else f" of {num_steps}"
    bad = ~(delta <= tol * (1 + x.flatten(1).abs().amax(1)))
    raise ValueError(
        f"GradientDescent {where} is not invertible at {int(bad.sum())} of {y.shape[0]} points: the "
        f"fixed-point iteration x = y + step_size * grad E(x) did not converge in {max_iter} iterations "
        f"(largest last change {float(delta.max()):.3g}, tolerance {tol:.3g}). The step is a contraction, "
        f"hence invertible, only when step_size * Lip(grad E) < 1, here step_size={step_size}; use a smaller "
        "step_size, a smoother energy (e.g. MLPEnergy(spectral_norm=True)) or the ODE sampler, whose flow is "
        "always invertible."
    )


# ---------------------------------------------------------------------------------------------- gradient descent
def _descent_log_det(sampler: Any, energy: nn.Module, x: Tensor, est: Estimator) -> tuple[Tensor, Tensor]:
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        g = energy_grad(energy, x, create_graph=True)
        logdet, sign = est.logdet_step(g, x, sampler.step_size)
    return logdet.detach(), sign.detach()


def _descent_invert(sampler: Any, energy: nn.Module, y: Tensor, step: int, tol: float | None,
                    max_iter: int) -> Tensor:
    return invert_descent_step(energy, y, sampler.step_size, tol=tol, max_iter=max_iter, step_index=step,
                               num_steps=sampler.steps)


# ---------------------------------------------------------------------------------------------- the ODE
def _gradient_flow_divergence(sampler: Any, energy: nn.Module, x: Tensor, est: Estimator) -> Tensor:
    """``div(-grad E) = -Laplacian E`` at ``x`` (the rule refuses grad_clip, so the field is ``-grad E``)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        g = energy_grad(energy, x, create_graph=True)
        return -est.trace_hessian(g, x).detach()


def _rms_of_position(state: tuple[Tensor, ...]) -> Tensor:
    # torchdiffeq's own root-mean-square norm, on the position alone
    return state[0].abs().pow(2).mean().sqrt()


def _ode_solve(sampler: Any, func: nn.Module, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    x0 = state[0]
    t = torch.tensor([0.0, sampler.t_end], device=x0.device, dtype=x0.dtype)
    opts = sampler.solver_options()
    if not sampler.fixed_grid:  # error control on x alone: the same adaptive steps as the plain solve
        opts = {**opts, "options": {**opts.get("options", {}), "norm": _rms_of_position}}
    with torch.no_grad():
        return odeint(func, state, t, **opts)


#: sampler type -> its rule (looked up along the type's method resolution order)
RULES: dict[type, StepRule | FlowRule] = {
    GradientDescent: StepRule(log_det=_descent_log_det, invert=_descent_invert),
    ODE: FlowRule(field=lambda sampler, energy: sampler.vector_field(energy), divergence=_gradient_flow_divergence,
                  solve=_ode_solve),
}


def rule_for(sampler: Sampler) -> StepRule | FlowRule:
    """The rule of ``sampler``'s type (or of its nearest base class with one); raises when there is none."""
    for cls in type(sampler).__mro__:
        if cls in RULES:
            return RULES[cls]
    known = ", ".join(sorted(c.__name__ for c in RULES))
    raise NotImplementedError(
        f"no change-of-variables rule for sampler {type(sampler).__name__}, so its generator has no density "
        f"here; rules exist for {known} (and their subclasses). Add one entry to "
        "lightning_ebm.density.RULES (a StepRule or FlowRule) to give it one."
    )
