"""Generator dynamics. One interface: ``sampler(energy, x0) -> x_K``.

``GradientDescent`` (deterministic, the default everywhere), ``Langevin`` (the same plus noise),
``ODE`` (the gradient flow through torchdiffeq), the exact MCMC samplers ``MALA`` and ``HMC``
(Metropolis-adjusted: their stationary law is exactly ``exp(-E/T)/Z``) and ``DiffusionRecovery``
(generation by diffusion recovery, level by level, for noise-conditioned energies). A new sampler
subclasses ``Sampler``, returns its update from ``dynamics()`` as ``Steps`` (or its vector field as a ``Flow``), and
is exported here; the eager, compiled and CUDA-graph backends run it unchanged.
"""

from .base import Flow, GradFn, Sampler, State, Steps, clip_grad, energy_and_grad, energy_grad
from .descent import GradientDescent, Langevin
from .mcmc import HMC, MALA
from .ode import ODE
from .recovery import DiffusionRecovery, NoiseSchedule

__all__ = ["Sampler", "GradientDescent", "Langevin", "ODE", "MALA", "HMC", "DiffusionRecovery", "NoiseSchedule",
           "energy_grad", "energy_and_grad", "clip_grad", "Steps", "Flow", "State", "GradFn"]
