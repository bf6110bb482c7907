"""FID, KID and Inception Score of the generator, through torchmetrics, on validation."""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

# from the submodules: the package ``torchmetrics.image`` exports these only when torch-fidelity is
# installed, which they need only for their default Inception network (this callback gives features)
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm

from ..metrics import InceptionFeatures
from .ema import averaged_weights
from .logging import Evaluation

__all__ = ["FIDCallback", "fid_score"]


class _Given(nn.Module):
    """The identity, posing as a feature extractor: the callback extracts features itself, once
    per batch, and hands them to every torchmetrics metric."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def _features(feature: nn.Module, images: Tensor) -> Tensor:
    """``feature(images)`` with the images moved to the extractor's device and dtype."""
    param = next(feature.parameters(), None)
    return feature(images if param is None else images.to(param.device, param.dtype))


def _num_features(feature: nn.Module, example: Tensor) -> int:
    d = getattr(feature, "num_features", None)
    if isinstance(d, int):
        return d
    with torch.no_grad():
        out = _features(feature, example)
    if out.ndim != 2:
        raise ValueError(f"a feature extractor must map images (B, C, H, W) to features (B, d); "
                         f"{type(feature).__name__} returned shape {tuple(out.shape)}")
    return out.shape[1]


@torch.no_grad()
def fid_score(real: Tensor, fake: Tensor, feature: nn.Module, batch_size: int = 500) -> float:
    """FID between two image sets ``(N, C, H, W)`` (data range) in the features of ``feature``."""
    feature = feature.to(real.device).eval()
    fid = FrechetInceptionDistance(feature=_Given(_num_features(feature, real[:2]))).to(real.device)
    for images, is_real in ((real, True), (fake, False)):
        for chunk in images.split(batch_size):
            fid.update(_features(feature, chunk), real=is_real)
    return float(fid.compute())


class FIDCallback(Evaluation):
    """FID (and optionally KID, Inception Score) of generated samples against validation data.

    Real features: from the validation batches of the first validation run (not the sanity
    check), computed once and kept for the rest of the run (``reset_real_features=False``).
    Generated features: every ``every_n_validations``-th validation, ``num_samples`` images from
    a fixed seeded stream (the same ``z`` every time, split across DDP ranks), with a progress
    bar. torchmetrics sums the statistics over ranks when computing. Logged as ``val/fid``,
    ``val/kid_mean``, ``val/kid_std``, ``val/is_mean``, ``val/is_std``. With an ``EMA``
    callback the averaged weights generate. A test run (``trainer.test``) takes its real
    features from the test batches and logs ``test/fid`` and so on; the next validation run
    computes its real features again.

    The metrics and the feature network belong to this callback, not to the LightningModule, so
    they never enter checkpoints (nor get wrapped by DDP).

    The feature extractor is any ``nn.Module`` mapping images in the data's range to features
    ``(B, d)``; ``lightning_ebm.metrics.DigitsFeatures`` for the embedded digits. By default,
    torchmetrics' FID Inception-v3 (``InceptionFeatures``): it needs ``torch-fidelity`` and its
    weights, downloaded once or given by ``inception_weights_path``. The Inception Score needs an
    extractor with a ``head`` (features to class logits); both shipped extractors have one.

    Args:
        feature: the feature extractor (default: Inception-v3).
        num_samples: generated images per evaluation (over all ranks).
        batch_size: generation and feature batch size.
        every_n_validations: evaluate at every this-many-th validation run.
        kid: also the kernel inception distance (stores all features).
        kid_subset_size: KID subset size (at most the number of generated images; with fewer real
            images than this, a warning, and the subsets hold all the real images).
        kid_subsets: KID subsets.
        inception_score: also the Inception Score.
        is_splits: Inception Score splits.
        inception_weights_path: local Inception weights (offline use), when ``feature`` is None.
        max_real: cap on the real images used (per rank).
        seed: seed of the generated samples' latents.
        progress_bar: show a progress bar while generating (rank 0, if the trainer has one).
    """

    def __init__(
        self,
        feature: nn.Module | None = None,
        num_samples: int = 10000,
        batch_size: int = 500,
        every_n_validations: int = 1,
        kid: bool = False,
        kid_subset_size: int = 1000,
        kid_subsets: int = 100,
        inception_score: bool = False,
        is_splits: int = 10,
        inception_weights_path: str | None = None,
        max_real: int | None = None,
        seed: int = 0,
        progress_bar: bool = True,
    ) -> None:
        positive = {"num_samples": num_samples, "batch_size": batch_size,
                    "every_n_validations": every_n_validations, "kid_subset_size": kid_subset_size,
                    "kid_subsets": kid_subsets, "is_splits": is_splits}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"FIDCallback: {name} must be a positive integer, got {value!r}")
        if num_samples < 2:
            raise ValueError(f"FIDCallback: num_samples must be >= 2, got {num_samples!r}")
        if max_real is not None and (not isinstance(max_real, int) or max_real < 2):
            raise ValueError(f"FIDCallback: max_real must be an integer >= 2 or None, got {max_real!r}")
        if kid and kid_subset_size > num_samples:
            raise ValueError(f"FIDCallback: kid_subset_size={kid_subset_size} exceeds "
                             f"num_samples={num_samples}")
        if feature is not None and not isinstance(feature, nn.Module):
            raise TypeError(f"FIDCallback: feature must be an nn.Module or None, got "
                            f"{type(feature).__name__}")
        if inception_score and feature is not None and not callable(getattr(feature, "head", None)):
            raise ValueError(f"FIDCallback: inception_score=True needs a feature extractor with a `head` "
                             f"(features -> class logits); {type(feature).__name__} has none")
        super().__init__(every_n_validations)
        self.feature = feature
        self.num_samples, self.batch_size = num_samples, batch_size
        self.kid, self.kid_subset_size, self.kid_subsets = kid, kid_subset_size, kid_subsets
        self.inception_score, self.is_splits = inception_score, is_splits
        self.inception_weights_path, self.max_real = inception_weights_path, max_real
        self.seed, self.progress_bar = seed, progress_bar
        self.metrics: nn.ModuleDict | None = None
        self.num_real = 0  # real images seen on this rank
        self.real_done = False
        self.last: dict[str, float] = {}

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        if self.metrics is None:
            self._build_metrics(pl_module)

    def _build_metrics(self, pl_module: Any) -> None:
        """Fresh metrics (no real or generated statistics)."""
        self.num_real, self.real_done = 0, False
        if self.feature is None:  # fails here, before any training, when the weights are missing
            self.feature = InceptionFeatures(weights_path=self.inception_weights_path)
        self.feature.eval().requires_grad_(False)
        d = _num_features(self.feature, torch.zeros(2, *pl_module.latent.shape))
        metrics = {"fid": FrechetInceptionDistance(feature=_Given(d), reset_real_features=False)}
        with warnings.catch_warnings():  # "will save all extracted features in buffer": intended
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            if self.kid:
                metrics["kid"] = KernelInceptionDistance(
                    feature=_Given(d), subsets=self.kid_subsets, subset_size=self.kid_subset_size,
                    reset_real_features=False,
                )
            if self.inception_score:
                metrics["is"] = InceptionScore(feature=_Given(1), splits=self.is_splits)
        self.metrics = nn.ModuleDict(metrics)

    def _to(self, device: torch.device) -> None:
        self.feature.to(device)
        self.metrics.to(device)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._build_metrics(pl_module)  # the real statistics of the test split, not the validation's

    # ------------------------------------------------------------------ real images
    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or self.real_done:
            return
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if self.max_real is not None:
            x = x[: max(0, self.max_real - self.num_real)]
        if x.shape[0] == 0:
            return
        self._to(pl_module.device)
        with torch.no_grad():
            f = _features(self.feature, x)
        self.metrics["fid"].update(f, real=True)
        if "kid" in self.metrics:
            self.metrics["kid"].update(f, real=True)
        self.num_real += x.shape[0]

    # ------------------------------------------------------------------ generated images
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        if not self.real_done:
            if self.num_real < 2 and trainer.world_size == 1:
                split = "test" if trainer.testing else "validation"
                raise RuntimeError(f"FIDCallback saw fewer than 2 real images in the {split} run; it takes "
                                   f"its real images from the {split} dataloader (check limit_"
                                   f"{'test' if trainer.testing else 'val'}_batches)")
            self.real_done = True
        self.count(trainer)
        if not self.due(trainer, finished=True):
            return
        self._to(pl_module.device)
        with averaged_weights(trainer, pl_module):
            self._update_generated(trainer, pl_module)
        values = self.compute()
        stage = self.stage(trainer)
        for name, value in values.items():
            pl_module.log(f"{stage}/{name}", value, sync_dist=False)
        self.last = {k: float(v) for k, v in values.items()}
        if trainer.testing:
            self._build_metrics(pl_module)  # a later validation run takes its own real images again

    def _update_generated(self, trainer: L.Trainer, pl_module: Any) -> None:
        world, rank = trainer.world_size, trainer.global_rank
        n = self.num_samples // world + (rank < self.num_samples % world)
        gen = torch.Generator(device=pl_module.device).manual_seed(self.seed * 1_000_003 + rank)
        show = self.progress_bar and trainer.is_global_zero and trainer.progress_bar_callback is not None
        with tqdm(total=n, desc="FID: generating", unit="img", leave=False, disable=not show) as bar:
            for start in range(0, n, self.batch_size):
                m = min(self.batch_size, n - start)
                x = pl_module.generate(m, generator=gen)
                with torch.no_grad():
                    f = _features(self.feature, x)
                    self.metrics["fid"].update(f, real=False)
                    if "kid" in self.metrics:
                        self.metrics["kid"].update(f, real=False)
                    if "is" in self.metrics:
                        self.metrics["is"].update(self.feature.head(f))
                bar.update(m)

    def compute(self) -> dict[str, Tensor]:
        """The metrics over all ranks (a collective under DDP: every rank must call it), then reset
        the generated side (the real statistics stay)."""
        out = {"fid": self.metrics["fid"].compute()}
        if "kid" in self.metrics:
            kid = self.metrics["kid"]
            if self.kid_subset_size > self.num_real and not torch.distributed.is_initialized():
                # fewer real images than asked (a short limit_val_batches): KID is unbiased at any subset
                # size, so a smaller subset gives a noisier estimate of the same distance, not a wrong one
                warnings.warn(f"FIDCallback: kid_subset_size={self.kid_subset_size} exceeds the {self.num_real} "
                              f"real images; KID uses subsets of {self.num_real} (lower kid_subset_size, or give "
                              "the validation more images)", stacklevel=2)
                kid.subset_size = self.num_real
            try:
                out["kid_mean"], out["kid_std"] = kid.compute()
            finally:
                kid.subset_size = self.kid_subset_size
        if "is" in self.metrics:
            out["is_mean"], out["is_std"] = self.metrics["is"].compute()
        for metric in self.metrics.values():
            metric.reset()
        return {k: v.float() for k, v in out.items()}
