"""Logger-agnostic callbacks: pictures of the generator and the energy."""

from .logging import log_image, run_dir
from .plots import Plot2D

__all__ = ["Plot2D", "log_image", "run_dir"]
