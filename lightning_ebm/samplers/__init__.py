"""Generator dynamics. One interface: ``sampler(energy, x0) -> x_K``.

``GradientDescent`` (deterministic, the default everywhere), ``Langevin`` (the same plus noise)
and ``ODE`` (the gradient flow through torchdiffeq).
"""

from .base import Sampler, energy_grad
from .descent import GradientDescent, Langevin
from .ode import ODE

__all__ = ["Sampler", "GradientDescent", "Langevin", "ODE", "energy_grad"]
