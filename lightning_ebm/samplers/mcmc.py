"""Samplers that are exact at temperature ``T``: Metropolis-adjusted Langevin (MALA) and Hamiltonian Monte Carlo.

Unadjusted Langevin's stationary law is only close to ``exp(-E/T)`` (its bias grows with the step
size); a Metropolis-Hastings accept/reject per chain removes the bias, so that ``exp(-E/T)/Z`` is
exactly invariant for any step size. Each step is one update function run by the shared backends
(eager, compiled, CUDA graph): the accept/reject is a ``torch.where`` per chain, with no host
sync in the loop. The acceptance rate of a call is reported in ``last_info["acceptance"]``.

Optional warm-up adaptation (``adapt_steps``) moves each chain's step size towards
``target_acceptance`` during the first steps (Robbins-Monro on the log step size, from the
chain's own acceptance probability); the chain is exact only after the warm-up, and the
acceptance reported is that of the steps after it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_float, check_int
from .base import GradFn, Sampler, State, Steps, clip_grad

__all__ = ["MALA", "HMC", "mala_update", "hmc_update", "mala_log_accept", "metropolis_state"]


def _per_sample(t: Tensor) -> Tensor:
    return t.flatten(1).sum(1)


def _view(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def mala_log_accept(x: Tensor, y: Tensor, e_x: Tensor, e_y: Tensor, g_x: Tensor, g_y: Tensor, step: Tensor,
                    temperature: float) -> Tensor:
    """``log`` of the Metropolis-Hastings ratio of the MALA move ``x -> y``, per chain.

    Target ``exp(-E/T)``; proposal ``y ~ N(x - s grad E(x) / T, 2 s I)``, so
    ``log q(y | x) = -||y - x + s g_x / T||^2 / (4 s)`` up to a constant that cancels.
    """
    s = _view(step, x)
    forward = _per_sample((y - x + s * g_x / temperature) ** 2) / (4 * step)
    backward = _per_sample((x - y + s * g_y / temperature) ** 2) / (4 * step)
    return (e_x - e_y) / temperature + forward - backward


def _adapt(log_step: Tensor, log_ratio: Tensor, k: Tensor, adapt_steps: int, target: float,
           rate: float) -> Tensor:
    """Robbins-Monro on each chain's log step size during the first ``adapt_steps`` steps."""
    prob = log_ratio.clamp(max=0.0).exp()
    gain = rate / (k.to(log_step.dtype) + 1.0).sqrt()
    moved = log_step + gain * (prob - target)
    return torch.where(k < adapt_steps, moved, log_step)


def _metropolis(state: State, proposal: Tensor, e_old: Tensor, e_new: Tensor, log_ratio: Tensor, u: Tensor,
                k: Tensor, adapt_steps: int, target: float, rate: float) -> tuple[State, dict[str, Tensor]]:
    """The accept/reject both samplers share: per chain, keep ``proposal`` where ``log u < log_ratio``;
    count acceptances after the warm-up and adapt the step sizes during it. A NaN ratio (the proposal's
    energy or gradient is not a number, e.g. outside the energy's domain) is a rejection, also for the
    adaptation, whose step size would otherwise turn NaN and freeze the chain."""
    x, log_step, accepted = state
    log_ratio = torch.nan_to_num(log_ratio, nan=-math.inf)
    accept = u.log() < log_ratio
    x = torch.where(_view(accept, x), proposal, x)
    counted = accept & (k >= adapt_steps)
    log_step = _adapt(log_step, log_ratio, k, adapt_steps, target, rate)
    return (x, log_step, accepted + counted.to(accepted.dtype)), {"accept": accept,
                                                                   "energy": torch.where(accept, e_new, e_old)}


def mala_update(grad: GradFn, state: State, noise: tuple[Tensor, ...], k: Tensor, temperature: float,
                grad_clip: float | None, adapt_steps: int, target: float, rate: float
                ) -> tuple[State, dict[str, Tensor]]:
    """One MALA step for every chain: a Langevin proposal, accepted with the Metropolis-Hastings probability.

    ``state = (x, log_step, accepted)``: positions, each chain's log step size and its count of
    accepted moves after the warm-up. ``noise = (xi, u)``: the proposal's standard normal and the
    uniform of the accept test. ``grad_clip`` (if set) clips the proposal's drift only; the
    accept ratio uses the same clipped drift both ways, so the chain stays exact.
    """
    x, log_step, _ = state
    xi, u = noise
    step = log_step.exp()
    g_x, e_x = grad(x, with_energy=True)
    g_x = clip_grad(g_x, grad_clip)
    y = x - _view(step, x) * g_x / temperature + _view((2 * step).sqrt(), x) * xi
    g_y, e_y = grad(y, with_energy=True)
    g_y = clip_grad(g_y, grad_clip)
    log_ratio = mala_log_accept(x, y, e_x, e_y, g_x, g_y, step, temperature)
    return _metropolis(state, y, e_x, e_y, log_ratio, u, k, adapt_steps, target, rate)


def hmc_update(grad: GradFn, state: State, noise: tuple[Tensor, ...], k: Tensor, temperature: float,
               num_leapfrog: int, grad_clip: float | None, adapt_steps: int, target: float, rate: float
               ) -> tuple[State, dict[str, Tensor]]:
    """One HMC step for every chain: fresh momentum, ``num_leapfrog`` leapfrog steps, accept/reject.

    ``state = (x, log_step, accepted)`` as in ``mala_update``; ``noise = (p, u)``: the momentum
    draw and the uniform of the accept test. The Hamiltonian is ``E(x) / T + ||p||^2 / 2``.
    """
    x, log_step, _ = state
    p0, u = noise
    step = _view(log_step.exp(), x)
    g, e0 = grad(x, with_energy=True)
    g = clip_grad(g, grad_clip) / temperature
    q, p = x, p0 - 0.5 * step * g
    for i in range(num_leapfrog):
        q = q + step * p
        g, e1 = grad(q, with_energy=True)
        g = clip_grad(g, grad_clip) / temperature
        p = p - (step if i < num_leapfrog - 1 else 0.5 * step) * g
    log_ratio = (e0 - e1) / temperature + 0.5 * (_per_sample(p0**2) - _per_sample(p**2))
    return _metropolis(state, q, e0, e1, log_ratio, u, k, adapt_steps, target, rate)


def metropolis_state(x0: Tensor, step_size: float) -> State:
    """The state ``(x, log_step, accepted)`` both updates start from: ``x0``, ``log(step_size)`` per chain
    and no acceptance yet. The count is an integer: in ``x0``'s dtype a half-precision count would stop
    at 256 (bfloat16) or 2048 (float16) and under-report the acceptance of longer runs."""
    n = x0.shape[0]
    log_step = torch.full((n,), math.log(step_size), device=x0.device, dtype=x0.dtype)
    return x0, log_step, torch.zeros(n, device=x0.device, dtype=torch.int64)


def _normal_and_uniform(x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """One standard normal of ``x``'s shape and one uniform per chain, from ``generator``."""
    xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    u = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
    return xi, u.clamp_min(torch.finfo(x.dtype).tiny)


class _Metropolis(Sampler):
    """What MALA and HMC share: temperature, warm-up adaptation, the acceptance report."""

    deterministic = False

    def __init__(self, steps: int, step_size: float, temperature: float, adapt_steps: int,
                 target_acceptance: float, adapt_rate: float, grad_clip: float | None, compile: bool,
                 cuda_graph: bool) -> None:
        super().__init__(grad_clip=grad_clip, compile=compile, cuda_graph=cuda_graph)
        name = type(self).__name__
        self.steps = check_int(name, "steps", steps, minimum=1)
        self.step_size = check_float(name, "step_size", step_size, minimum=0, strict=True)
        self.temperature = check_float(name, "temperature", temperature, minimum=0, strict=True)
        self.adapt_steps = check_int(name, "adapt_steps", adapt_steps, minimum=0, maximum=self.steps - 1)
        self.target_acceptance = check_float(name, "target_acceptance", target_acceptance, minimum=0,
                                             maximum=1, strict=True)
        self.adapt_rate = check_float(name, "adapt_rate", adapt_rate, minimum=0, strict=True)

    def init_state(self, x0: Tensor) -> State:
        return metropolis_state(x0, self.step_size)

    def info(self, state: State) -> dict[str, float]:
        """The acceptance rate after the warm-up and, when adapting, the mean adapted step size."""
        out = {"acceptance": float(state[2].double().mean()) / (self.steps - self.adapt_steps)}
        if self.adapt_steps:
            out["step_size"] = float(state[1].exp().mean())
        return out

    def _adaptation(self) -> tuple:
        return self.adapt_steps, self.target_acceptance, self.adapt_rate


class MALA(_Metropolis):
    """Metropolis-adjusted Langevin: exact ``exp(-E/T)`` sampling at any step size.

    Each step proposes ``y = x - s grad E(x) / T + sqrt(2 s) N(0, I)`` (the Langevin step at
    temperature ``T``) and accepts it with probability ``min(1, pi(y) q(x|y) / (pi(x) q(y|x)))``
    per chain. Two energy-gradient evaluations per step. Good acceptance for smooth energies
    is 0.5-0.6 (``target_acceptance`` for the warm-up adaptation).

    Args:
        steps: number of MH steps (including ``adapt_steps``).
        step_size: s > 0 (the proposal's drift step; its noise has variance ``2 s``).
        temperature: T > 0; the target is ``exp(-E/T)``.
        adapt_steps: warm-up steps adapting each chain's step size towards ``target_acceptance``
            (0 = none; the chain is exact after them).
        target_acceptance: in (0, 1); 0.574 is the optimal-scaling value for MALA.
        adapt_rate: gain of the adaptation.
        grad_clip: clip the drift's gradient coordinates (the MH ratio keeps the chain exact).
        compile: run each step through ``torch.compile``.
        cuda_graph: on CUDA, replay the loop from a CUDA graph.
    """

    def __init__(self, steps: int, step_size: float, temperature: float = 1.0, adapt_steps: int = 0,
                 target_acceptance: float = 0.574, adapt_rate: float = 0.5, grad_clip: float | None = None,
                 compile: bool = False, cuda_graph: bool = False) -> None:
        super().__init__(steps, step_size, temperature, adapt_steps, target_acceptance, adapt_rate, grad_clip,
                         compile, cuda_graph)

    def dynamics(self) -> Steps:
        constants = (self.temperature, self.grad_clip, *self._adaptation())
        return Steps(mala_update, self.steps, constants, draw=_normal_and_uniform, evaluations=2)


class HMC(_Metropolis):
    """Hamiltonian Monte Carlo: exact ``exp(-E/T)`` sampling with ``num_leapfrog`` leapfrog steps per move.

    Each step draws a momentum ``p ~ N(0, I)``, integrates Hamilton's equations for
    ``H = E(x)/T + ||p||^2/2`` with ``num_leapfrog`` leapfrog steps of size ``step_size``, and
    accepts the end point with probability ``min(1, exp(H_start - H_end))`` per chain.
    ``num_leapfrog + 1`` energy-gradient evaluations per step. Good acceptance is about 0.65-0.8.

    Args:
        steps: number of HMC moves (including ``adapt_steps``).
        step_size: the leapfrog step size > 0.
        num_leapfrog: leapfrog steps per move (>= 1; 1 is MALA with a different scaling).
        temperature: T > 0; the target is ``exp(-E/T)``.
        adapt_steps: warm-up steps adapting each chain's step size (as in ``MALA``).
        target_acceptance: in (0, 1); 0.65 by default.
        adapt_rate: gain of the adaptation.
        grad_clip: clip the force's gradient coordinates (the MH ratio keeps the chain exact).
        compile: run each step through ``torch.compile``.
        cuda_graph: on CUDA, replay the loop from a CUDA graph.
    """

    def __init__(self, steps: int, step_size: float, num_leapfrog: int = 10, temperature: float = 1.0,
                 adapt_steps: int = 0, target_acceptance: float = 0.65, adapt_rate: float = 0.5,
                 grad_clip: float | None = None, compile: bool = False, cuda_graph: bool = False) -> None:
        super().__init__(steps, step_size, temperature, adapt_steps, target_acceptance, adapt_rate, grad_clip,
                         compile, cuda_graph)
        self.num_leapfrog = check_int(type(self).__name__, "num_leapfrog", num_leapfrog, minimum=1)

    def dynamics(self) -> Steps:
        constants = (self.temperature, self.num_leapfrog, self.grad_clip, *self._adaptation())
        return Steps(hmc_update, self.steps, constants, draw=_normal_and_uniform,
                     evaluations=self.num_leapfrog + 1)
