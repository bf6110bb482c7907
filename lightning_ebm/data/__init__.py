"""LightningDataModules: two-dimensional toy distributions."""

from .toy import TOY_DATASETS, TOY_LOG_DENSITIES, Toy2DDataModule, sample_toy, toy_log_density

__all__ = ["TOY_DATASETS", "TOY_LOG_DENSITIES", "Toy2DDataModule", "sample_toy", "toy_log_density"]
