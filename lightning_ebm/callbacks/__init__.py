"""Logger-agnostic callbacks: pictures of the generator and the energy, density diagnostics."""

from .density import DensityPanel2D, LongRunDiagnostic
from .logging import log_image, run_dir
from .plots import Plot2D

__all__ = ["Plot2D", "DensityPanel2D", "LongRunDiagnostic", "log_image", "run_dir"]
