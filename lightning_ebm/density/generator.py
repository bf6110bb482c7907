"""The generator's density ``q`` by change of variables, forward along the dynamics and by inversion.

With deterministic dynamics the generator ``G(z)``, ``z ~ p0``, is an invertible map, so::

    gradient descent  x_{k+1} = x_k - s grad E(x_k):  log q(x_K) = log p0(z) - sum_k log|det(I - s H(x_k))|
    gradient flow     dx/dt = -grad E(x):             log q(x_T) = log p0(z) + int_0^T Laplacian E(x_t) dt

The per-sampler part (one step's log-Jacobian and inverse, or a flow's divergence) is a rule in
``rules.RULES``; this module runs the dynamics through the sampler itself (its own step and
backend, its own solver), so ``x`` from ``sample_with_log_prob`` is the sampler's output.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from .._checks import ArgumentError, check_int, check_pair
from ..latents import Latent
from ..samplers import Sampler
from .estimators import Estimator, check_autograd
from .rules import FlowRule, StepRule, rule_for

__all__ = ["check_density", "sample_with_log_prob", "log_prob", "bits_per_dim"]


def check_density(sampler: Sampler, latent: Latent) -> None:
    """Raise, saying why, when the generator ``sampler(energy, z ~ latent)`` has no computable density."""
    if not getattr(latent, "has_density", False):
        raise ValueError(f"the generator's density is undefined with latent {type(latent).__name__}, which has "
                         f"no density p0 to push forward: {_why_no_density(latent)}")
    if not getattr(sampler, "deterministic", False):
        raise ValueError(
            f"the generator's density is undefined for {sampler!r}: it injects noise, so G(z) is not a "
            "function of z and change of variables does not apply. Use GradientDescent or ODE (or "
            "Langevin with noise_std=0)."
        )
    rule_for(sampler)
    if getattr(sampler, "grad_clip", None) is not None:
        raise ValueError(
            f"the generator's density is not computed with grad_clip={sampler.grad_clip}: clipping makes "
            "the vector field non-differentiable where it clips, so the Jacobian of the dynamics is not "
            "the Hessian of E. Use grad_clip=None."
        )
    if getattr(sampler, "clamp", None) is not None:
        raise ValueError(
            f"the generator's density is undefined with clamp={sampler.clamp}: clamping maps a region of "
            "positive volume onto the boundary, so the generator is not invertible. Use clamp=None."
        )


def _why_no_density(latent: Latent) -> str:
    """The latent's own word on why it has no density (what its ``log_prob`` raises)."""
    try:
        latent.log_prob(torch.zeros(1, *latent.shape))
    except (ValueError, NotImplementedError) as err:
        if str(err):
            return str(err)
    return "use a Uniform or Gaussian latent"


def _setup(sampler: Sampler, latent: Latent, x: Tensor, trace: str | None, num_probes: int,
           series_terms: int, generator: torch.Generator | None, what: str) -> Estimator:
    check_autograd(what)
    check_density(sampler, latent)
    check_int(what, "num_probes", num_probes, minimum=1)
    check_int(what, "series_terms", series_terms, minimum=1)
    if not isinstance(x, Tensor) or not x.is_floating_point() or tuple(x.shape[1:]) != tuple(latent.shape):
        raise ArgumentError(f"{what}: expected a floating-point tensor of shape (B, *{tuple(latent.shape)}), "
                            f"got {getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    return Estimator.build(trace, x, num_probes, series_terms, generator)


class _WithLogDensity(nn.Module):
    """``(x, a) -> (direction * f(x), -div f(x))``: a flow and the rate of ``log p`` along it."""

    def __init__(self, rule: FlowRule, sampler: Sampler, energy: nn.Module, est: Estimator, direction: float):
        super().__init__()
        self.rule, self.sampler, self.energy, self.est, self.direction = rule, sampler, energy, est, direction
        self.field = rule.field(sampler, energy)

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        f = self.field(t, state[0])
        div = self.rule.divergence(self.sampler, self.energy, state[0], self.est)
        return (f if self.direction > 0 else -f), -div


def _flow(rule: FlowRule, sampler: Sampler, energy: nn.Module, x0: Tensor, est: Estimator,
          direction: float) -> tuple[Tensor, Tensor]:
    """Solve the flow forward (``direction=1``) or backward in time, with ``int -div f dt`` along it."""
    acc0 = torch.zeros(x0.shape[0], device=x0.device, dtype=x0.dtype)
    xs, accs = rule.solve(sampler, _WithLogDensity(rule, sampler, energy, est, direction), (x0, acc0))
    return xs[-1], accs[-1]


def _forward_steps(rule: StepRule, sampler: Sampler, energy: nn.Module, z: Tensor,
                   est: Estimator) -> tuple[Tensor, Tensor]:
    """Run the sampler from ``z``; sum the log-Jacobians of its steps (at each step's starting point)."""
    acc = {"before": z, "total": torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)}
    acc["folded"] = torch.zeros_like(acc["total"], dtype=torch.bool)

    def on_step(info: dict) -> None:
        logdet, sign = rule.log_det(sampler, energy, acc["before"], est)
        acc["total"] = acc["total"] + logdet
        acc["folded"] = acc["folded"] | (sign <= 0)
        acc["before"] = info["x"]

    x = sampler(energy, z, callback=on_step)
    folded = acc["folded"]
    if bool(folded.any()):
        warnings.warn(
            f"det(I - step_size * Hessian) <= 0 along {int(folded.sum())} of {folded.numel()} trajectories: "
            f"the step size of {sampler!r} exceeds 1 / (largest Hessian eigenvalue) there, the step may fold "
            "space onto itself, and log q then counts one preimage only (an underestimate). Use a smaller "
            "step_size.",
            stacklevel=3,
        )
    return x, -acc["total"]


def sample_with_log_prob(
    energy: nn.Module,
    sampler: Sampler,
    latent: Latent,
    z: Tensor,
    *,
    trace: str | None = None,
    num_probes: int = 1,
    series_terms: int = 16,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the dynamics from ``z`` and return ``(x, log q(x))``, both detached.

    Args:
        energy: the critic whose gradient drives the dynamics.
        sampler: the deterministic dynamics; the generator is ``x = sampler(energy, z)``.
        latent: ``p0``, where ``z`` comes from (needs ``log_prob``).
        z: starting points ``(B, *shape)``.
        trace: ``"exact"``, ``"hutchinson"`` or ``None`` (exact up to ``EXACT_TRACE_MAX_DIM``
            dimensions).
        num_probes: Rademacher probes per sample (Hutchinson), drawn once for the whole solve.
        series_terms: terms of the log-det power series (Hutchinson, gradient descent).
        generator: random stream of the probes.

    ``x`` is the sampler's own output: a step sampler runs through its own backend (the
    log-Jacobians are taken at each step's start), an ODE solves the augmented state
    ``[x, log p]`` with its own solver and error control on ``x`` alone, so an adaptive solver
    takes the same steps as a plain ``sampler(energy, z)``.
    """
    est = _setup(sampler, latent, z, trace, num_probes, series_terms, generator, "sample_with_log_prob")
    z = z.detach()
    log_p0 = latent.log_prob(z)
    rule = rule_for(sampler)
    if isinstance(rule, FlowRule):
        x, delta = _flow(rule, sampler, energy, z, est, 1.0)
    else:
        x, delta = _forward_steps(rule, sampler, energy, z, est)
    return x, log_p0 + delta


def log_prob(
    energy: nn.Module,
    sampler: Sampler,
    latent: Latent,
    x: Tensor,
    *,
    trace: str | None = None,
    num_probes: int = 1,
    series_terms: int = 16,
    generator: torch.Generator | None = None,
    tol: float | None = None,
    max_iter: int = 500,
) -> Tensor:
    """``log q(x)``, the generator's log-density at arbitrary points ``x``, by inverting the dynamics.

    A flow is solved backwards in time; a step sampler is undone step by step with its rule's
    inverse (gradient descent: ``invert_descent_step``, ``tol``, ``max_iter``). Points whose
    preimage falls outside the latent's support get ``-inf``. Other arguments as in
    ``sample_with_log_prob``.
    """
    est = _setup(sampler, latent, x, trace, num_probes, series_terms, generator, "log_prob")
    x = x.detach()
    rule = rule_for(sampler)
    if isinstance(rule, FlowRule):
        z, delta = _flow(rule, sampler, energy, x, est, -1.0)
        return latent.log_prob(z) + delta
    n = sampler.dynamics().num_steps
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for k in range(n, 0, -1):
        x = rule.invert(sampler, energy, x, k, tol, max_iter)
        total = total + rule.log_det(sampler, energy, x, est)[0]
    return latent.log_prob(x) - total


def bits_per_dim(log_prob: Tensor, num_dims: int, data_range: tuple[float, float] = (-1.0, 1.0),
                 num_levels: int = 256) -> Tensor:
    """Bits per dimension of discrete data from a continuous log-density on dequantised data.

    Convention: integer levels ``k`` in ``{0, ..., num_levels - 1}`` are mapped to
    ``x = low + (k + u) * (high - low) / num_levels`` with ``u ~ U[0, 1)^D`` (uniform
    dequantisation), so ``-log2 P(k) <= -(log q(x) + D log((high - low) / num_levels)) / ln 2``
    and this returns that bound divided by ``D``. A uniform ``q`` on ``[low, high]^D`` gives
    exactly ``log2(num_levels)``.
    """
    low, high = check_pair("bits_per_dim", "data_range", data_range)
    num_dims = check_int("bits_per_dim", "num_dims", num_dims, minimum=1)
    num_levels = check_int("bits_per_dim", "num_levels", num_levels, minimum=2)
    log_bin = num_dims * math.log((high - low) / num_levels)
    return -(log_prob + log_bin) / (num_dims * math.log(2.0))
