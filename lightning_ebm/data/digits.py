"""The embedded 8x8 handwritten digits: a real image dataset that needs no download.

1,797 greyscale images, 8x8 pixels with 17 grey levels (0..16), labels 0..9: the test set of
the UCI "Optical Recognition of Handwritten Digits" data (E. Alpaydin, C. Kaynak, 1998;
licence CC BY 4.0), as bundled with scikit-learn. The pixels ship with this package in
``lightning_ebm/assets/digits.npz`` (written by ``scripts/make_digits_asset.py``), so neither
scikit-learn nor a network is needed.
"""

from __future__ import annotations

from importlib import resources

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .._checks import check_bool, check_choice, check_float, check_int

__all__ = ["DigitsDataModule", "load_digits", "digits_split", "digits_to_images", "DIGITS_LEVELS"]

#: grey levels of the digits' pixels (0..16)
DIGITS_LEVELS = 17
RESIZE_MODES = ("pad", "resize")


def load_digits() -> tuple[Tensor, Tensor]:
    """All 1,797 digits: pixels ``(1797, 8, 8)`` uint8 in ``0..16`` and labels ``(1797,)`` int64."""
    with resources.files("lightning_ebm").joinpath("assets/digits.npz").open("rb") as f, np.load(f) as data:
        return torch.from_numpy(data["images"].copy()), torch.from_numpy(data["labels"].astype(np.int64))


def digits_split(n: int = 1797, val_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices ``(train, val)`` of a seeded random split; ``round(n * val_fraction)`` held out.

    The default split is the one the shipped digits feature network was trained on (its
    training part), so the digits FID against the held-out part uses images that network never
    saw.
    """
    n = check_int("digits_split", "n", n, minimum=4)
    val_fraction = check_float("digits_split", "val_fraction", val_fraction, minimum=0.0, maximum=1.0, strict=True)
    seed = check_int("digits_split", "seed", seed)
    num_val = round(n * val_fraction)
    if not 2 <= num_val <= n - 2:
        raise ValueError(f"val_fraction={val_fraction!r} holds out {num_val} of {n} images; need 2..{n - 2}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[num_val:].sort().values, perm[:num_val].sort().values


def digits_to_images(
    pixels: Tensor, image_size: int = 8, resize_mode: str = "pad", noise: Tensor | None = None
) -> Tensor:
    """Grey levels ``(N, 8, 8)`` in 0..16 to images ``(N, 1, S, S)`` in [-1, 1].

    Without ``noise`` a level ``v`` maps to ``2 v / 16 - 1`` (so 0 is -1, the background, and 16
    is 1). With ``noise`` (uniform in [0, 1), same shape as ``pixels``) the levels are
    dequantised: ``2 (v + u) / 17 - 1``. ``resize_mode="pad"`` centres the 8x8 digit on a
    background of -1; ``"resize"`` scales it bilinearly to ``S x S``.
    """
    check_choice("digits_to_images", "resize_mode", resize_mode, RESIZE_MODES)
    image_size = check_int("digits_to_images", "image_size", image_size, minimum=8)
    v = pixels.float()
    x = v / (DIGITS_LEVELS - 1) if noise is None else (v + noise) / DIGITS_LEVELS
    x = (2 * x - 1).unsqueeze(1)
    if image_size == 8:
        return x
    if resize_mode == "pad":
        lo = (image_size - 8) // 2
        hi = image_size - 8 - lo
        return F.pad(x, (lo, hi, lo, hi), value=-1.0)
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)


class _DigitImages(Dataset):
    """Digits as ``(1, S, S)`` images; dequantised afresh at every access when asked."""

    def __init__(self, pixels: Tensor, image_size: int, resize_mode: str, dequantize: bool,
                 labels: Tensor | None = None) -> None:
        self.pixels, self.image_size, self.resize_mode, self.labels = pixels, image_size, resize_mode, labels
        self.fixed = None if dequantize else digits_to_images(pixels, image_size, resize_mode)

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __getitem__(self, i: int) -> Tensor | tuple[Tensor, Tensor]:
        if self.fixed is not None:
            x = self.fixed[i]
        else:
            p = self.pixels[i : i + 1]
            x = digits_to_images(p, self.image_size, self.resize_mode, torch.rand(p.shape))[0]
        return x if self.labels is None else (x, self.labels[i])


class DigitsDataModule(L.LightningDataModule):
    """The embedded 8x8 digits, scaled to [-1, 1], padded or resized to ``image_size``.

    Batches are image tensors ``(B, 1, S, S)``, or ``(x, y)`` with the digit classes ``y``
    (int64, 0..9) when ``labels=True`` (``num_classes`` is then 10). The split is a seeded random one
    (``digits_split``); validation and test use the held-out part, never dequantised.

    Args:
        image_size: side ``S`` of the images (>= 8; 8 is native).
        resize_mode: ``"pad"`` (centre the 8x8 digit on background) or ``"resize"`` (bilinear).
        batch_size: per-device batch size.
        val_fraction: share of the 1,797 images held out for validation.
        split_seed: seed of the split. Keep the defaults of both for the digits FID: the shipped
            feature network was trained on that split's training part.
        dequantize: add uniform noise within each grey level to training images.
        num_workers: DataLoader workers.
        pin_memory: DataLoader ``pin_memory``.
        labels: yield ``(x, y)`` batches with the digit classes (the images are the same).
    """

    def __init__(
        self,
        image_size: int = 8,
        resize_mode: str = "pad",
        batch_size: int = 64,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        dequantize: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        labels: bool = False,
    ) -> None:
        super().__init__()
        labels = check_bool("DigitsDataModule", "labels", labels)
        self.labels = labels
        self.num_classes = 10 if labels else None
        check_choice("DigitsDataModule", "resize_mode", resize_mode, RESIZE_MODES)
        image_size = check_int("DigitsDataModule", "image_size", image_size, minimum=8)
        batch_size = check_int("DigitsDataModule", "batch_size", batch_size, minimum=1)
        num_workers = check_int("DigitsDataModule", "num_workers", num_workers, minimum=0)
        dequantize = check_bool("DigitsDataModule", "dequantize", dequantize)
        pin_memory = check_bool("DigitsDataModule", "pin_memory", pin_memory)
        digits_split(val_fraction=val_fraction, seed=split_seed)  # validates val_fraction and split_seed
        self.save_hyperparameters()
        self.image_size, self.resize_mode, self.batch_size = image_size, resize_mode, batch_size
        self.val_fraction, self.split_seed, self.dequantize = val_fraction, split_seed, dequantize
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.train_pixels: Tensor | None = None
        self.val_data: Tensor | None = None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (1, self.image_size, self.image_size)

    def setup(self, stage: str | None = None) -> None:
        if self.train_pixels is not None:
            return
        pixels, labels = load_digits()
        train, val = digits_split(pixels.shape[0], self.val_fraction, self.split_seed)
        self.train_pixels, self.train_labels = pixels[train], labels[train]
        self.val_pixels, self.val_labels = pixels[val], labels[val]
        self.val_data = digits_to_images(self.val_pixels, self.image_size, self.resize_mode)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=train, drop_last=train and
                          len(dataset) >= self.batch_size, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        images = _DigitImages(self.train_pixels, self.image_size, self.resize_mode, self.dequantize,
                              self.train_labels if self.labels else None)
        return self._loader(images, True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        images = _DigitImages(self.val_pixels, self.image_size, self.resize_mode, False,
                              self.val_labels if self.labels else None)
        return self._loader(images, False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The test split (``lightning-ebm predict`` writes its energies and, for a classifier, logits)."""
        return self.test_dataloader()
