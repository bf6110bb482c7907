"""LightningDataModules: two-dimensional toy distributions."""

from .toy import TOY_DATASETS, Toy2DDataModule, sample_toy

__all__ = ["TOY_DATASETS", "Toy2DDataModule", "sample_toy"]
