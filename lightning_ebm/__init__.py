"""lightning_ebm: energy-based models as self-adversarial games, as PyTorch Lightning modules.

The energy is the critic; its sampler's dynamics, started from latent noise, are the generator.
"""

__version__ = "0.1.0"

from . import callbacks, data, energies, latents, metrics, samplers  # noqa: E402
from .module import EBM  # noqa: E402

__all__ = ["EBM", "callbacks", "data", "energies", "latents", "metrics", "samplers", "__version__"]
