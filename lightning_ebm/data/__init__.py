"""LightningDataModules: two-dimensional toy distributions, the embedded digits, torchvision images."""

from .digits import DigitsDataModule, digits_split, load_digits
from .toy import TOY_DATASETS, Toy2DDataModule, sample_toy
from .vision import VISION_DATASETS, VisionDataModule

__all__ = ["TOY_DATASETS", "Toy2DDataModule", "sample_toy", "DigitsDataModule", "digits_split", "load_digits",
           "VISION_DATASETS", "VisionDataModule"]
