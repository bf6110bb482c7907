"""Logger-agnostic callbacks: pictures of the generator and the energy; reliability (divergence
guard, crash-safe checkpoint writing)."""

from .checkpoint import AtomicCheckpointIO
from .guard import DivergenceError, DivergenceGuard
from .logging import log_image, run_dir
from .plots import Plot2D

__all__ = ["AtomicCheckpointIO", "DivergenceError", "DivergenceGuard", "Plot2D", "log_image", "run_dir"]
