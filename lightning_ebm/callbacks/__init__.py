"""Logger-agnostic callbacks: pictures of the generator and the energy, density diagnostics, and
reliability (divergence guard, crash-safe checkpoint writing)."""

from .checkpoint import AtomicCheckpointIO
from .density import DensityPanel2D, LongRunDiagnostic
from .guard import DivergenceError, DivergenceGuard
from .logging import log_image, run_dir
from .plots import Plot2D

__all__ = [
    "AtomicCheckpointIO",
    "DensityPanel2D",
    "DivergenceError",
    "DivergenceGuard",
    "LongRunDiagnostic",
    "Plot2D",
    "log_image",
    "run_dir",
]
