"""LightningDataModules: two-dimensional toy distributions, the embedded digits, torchvision images."""

from .digits import DigitsDataModule, digits_split, load_digits
from .toy import TOY_DATASETS, TOY_LOG_DENSITIES, Toy2DDataModule, sample_toy, toy_log_density
from .vision import VISION_DATASETS, VisionDataModule

__all__ = [
    "TOY_DATASETS",
    "TOY_LOG_DENSITIES",
    "Toy2DDataModule",
    "sample_toy",
    "toy_log_density",
    "DigitsDataModule",
    "digits_split",
    "load_digits",
    "VISION_DATASETS",
    "VisionDataModule",
]
