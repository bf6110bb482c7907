"""Logger-agnostic callbacks: pictures of the generator and the energy, density diagnostics, FID,
weight averaging, and reliability (divergence guard, crash-safe checkpoint writing)."""

from .checkpoint import AtomicCheckpointIO
from .classifier import ClassifierMetrics, ConditionalSampleGrid, OODDetection
from .density import DensityPanel2D, LongRunDiagnostic
from .ema import EMA
from .fid import FIDCallback
from .guard import DivergenceError, DivergenceGuard
from .images import SampleGrid
from .logging import log_image, run_dir
from .mcmc import MCMCDiagnostic
from .plots import Plot2D
from .preemption import PreemptionCheckpoint

__all__ = [
    "AtomicCheckpointIO",
    "ClassifierMetrics",
    "ConditionalSampleGrid",
    "DensityPanel2D",
    "DivergenceError",
    "DivergenceGuard",
    "EMA",
    "FIDCallback",
    "LongRunDiagnostic",
    "MCMCDiagnostic",
    "OODDetection",
    "Plot2D",
    "PreemptionCheckpoint",
    "SampleGrid",
    "log_image",
    "run_dir",
]
