"""Logger-agnostic callbacks: pictures of the generator and the energy, FID, weight averaging."""

from .ema import EMA
from .fid import FIDCallback
from .images import SampleGrid
from .logging import log_image, run_dir
from .plots import Plot2D

__all__ = ["Plot2D", "log_image", "run_dir", "SampleGrid", "FIDCallback", "EMA"]
