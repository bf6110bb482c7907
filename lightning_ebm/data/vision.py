"""torchvision image datasets (MNIST, FashionMNIST, CIFAR-10, SVHN, CelebA) as one LightningDataModule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

from .._checks import check_bool, check_float, check_int

__all__ = ["VisionDataModule", "VISION_DATASETS"]

_MNIST_FILES = "train-images-idx3-ubyte and train-labels-idx1-ubyte (uncompressed)"

#: name -> (torchvision class, channels, native (H, W), what to place where under ``root``)
VISION_DATASETS: dict[str, tuple[type, int, tuple[int, int], str]] = {
    "mnist": (datasets.MNIST, 1, (28, 28), f"{{root}}/MNIST/raw/ holding {_MNIST_FILES}"),
    "fashion_mnist": (datasets.FashionMNIST, 1, (28, 28),
                      f"{{root}}/FashionMNIST/raw/ holding {_MNIST_FILES}"),
    "cifar10": (datasets.CIFAR10, 3, (32, 32),
                "{root}/cifar-10-batches-py/ holding data_batch_1..5, test_batch and batches.meta (the "
                "extracted cifar-10-python.tar.gz)"),
    "svhn": (datasets.SVHN, 3, (32, 32), "{root}/train_32x32.mat"),
    "celeba": (datasets.CelebA, 3, (218, 178),
               "{root}/celeba/ holding img_align_celeba/ (the extracted img_align_celeba.zip) and "
               "list_eval_partition.txt, identity_CelebA.txt, list_attr_celeba.txt, list_bbox_celeba.txt, "
               "list_landmarks_align_celeba.txt"),
}


class _ToSignedUnit:
    """uint8 image tensor -> float in [-1, 1]; dequantised ``(v + u) / 256`` when asked."""

    def __init__(self, dequantize: bool) -> None:
        self.dequantize = dequantize

    def __call__(self, x: Tensor) -> Tensor:
        x = x.float()
        x = (x + torch.rand_like(x)) / 256 if self.dequantize else x / 255
        return 2 * x - 1


class _Split(Dataset):
    """The images of ``indices`` of a torchvision dataset, through ``transform``; with their class
    (an int64 0-dim tensor) when ``labels``."""

    def __init__(self, base: Dataset, indices: Tensor, transform: Any, labels: bool = False) -> None:
        self.base, self.indices, self.transform, self.labels = base, indices, transform, labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Tensor | tuple[Tensor, Tensor]:
        image, target = self.base[int(self.indices[i])][:2]
        x = self.transform(image)
        return (x, torch.as_tensor(target, dtype=torch.long)) if self.labels else x


class VisionDataModule(L.LightningDataModule):
    """MNIST, FashionMNIST, CIFAR-10, SVHN or CelebA, scaled to [-1, 1], as image batches.

    The training split of the dataset is split again (seeded) into training and validation
    parts; test uses the dataset's own test split. Batches are image tensors ``(B, C, S, S)``
    (or ``(x, y)`` with the class ``y`` when ``labels=True``; not for CelebA, which has no
    classes here). With ``download=True`` the files are fetched once in ``prepare_data`` (rank 0);
    without it they must already be under ``root``, and a missing file is reported with the
    layout to put in place.

    Args:
        name: ``mnist``, ``fashion_mnist``, ``cifar10``, ``svhn`` or ``celeba``.
        root: directory holding (or receiving) the dataset.
        download: fetch missing files (needs network access).
        image_size: resize the shorter side to this, then centre-crop a square of it (default:
            native size; required for CelebA unless ``center_crop`` is given).
        center_crop: first centre-crop a square of this side (CelebA's usual face crop is 140).
        batch_size: per-device batch size.
        val_fraction: share of the training split held out for validation.
        split_seed: seed of that split.
        dequantize: uniform dequantisation of training images, ``(v + u) / 256``.
        num_workers: DataLoader workers.
        pin_memory: DataLoader ``pin_memory``.
        labels: yield ``(x, y)`` batches with the class labels (``num_classes`` is then 10).
    """

    def __init__(
        self,
        name: str = "cifar10",
        root: str = "data",
        download: bool = False,
        image_size: int | None = None,
        center_crop: int | None = None,
        batch_size: int = 128,
        val_fraction: float = 0.05,
        split_seed: int = 0,
        dequantize: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        labels: bool = False,
    ) -> None:
        super().__init__()
        if name not in VISION_DATASETS:
            raise ValueError(f"VisionDataModule: unknown name={name!r}; choose one of "
                             f"{sorted(VISION_DATASETS)}")
        labels = check_bool("VisionDataModule", "labels", labels)
        if labels and name == "celeba":
            raise ValueError("VisionDataModule: labels=True needs a dataset with classes (mnist, fashion_mnist, "
                             "cifar10, svhn); celeba has none here")
        self.labels = labels
        self.num_classes = 10 if labels else None
        image_size = check_int("VisionDataModule", "image_size", image_size, minimum=4, allow_none=True)
        center_crop = check_int("VisionDataModule", "center_crop", center_crop, minimum=4, allow_none=True)
        batch_size = check_int("VisionDataModule", "batch_size", batch_size, minimum=1)
        num_workers = check_int("VisionDataModule", "num_workers", num_workers, minimum=0)
        val_fraction = check_float("VisionDataModule", "val_fraction", val_fraction, minimum=0.0, maximum=1.0,
                                   strict=True)
        split_seed = check_int("VisionDataModule", "split_seed", split_seed)
        download = check_bool("VisionDataModule", "download", download)
        dequantize = check_bool("VisionDataModule", "dequantize", dequantize)
        pin_memory = check_bool("VisionDataModule", "pin_memory", pin_memory)
        self.save_hyperparameters()
        self.name, self.root, self.download = name, str(root), download
        self.image_size, self.center_crop, self.batch_size = image_size, center_crop, batch_size
        self.val_fraction, self.split_seed, self.dequantize = val_fraction, split_seed, dequantize
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._train: Dataset | None = None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        _, channels, (h, w), _ = VISION_DATASETS[self.name]
        side = self.image_size or self.center_crop
        return (channels, side, side) if side else (channels, h, w)

    # ------------------------------------------------------------------ files
    def _open(self, train: bool, download: bool) -> Dataset:
        cls, _, _, layout = VISION_DATASETS[self.name]
        by_split = self.name in ("svhn", "celeba")  # these take split=..., the others train=...
        split: dict = {"split": "train" if train else "test"} if by_split else {"train": train}
        if self.name == "celeba":
            split["target_type"] = []
        where = layout.format(root=Path(self.root).resolve())
        try:
            return cls(self.root, download=download, **split)
        except RuntimeError as err:
            if download or "not found" not in str(err).lower():
                raise
            raise FileNotFoundError(
                f"{self.name} not found (or corrupted) under root={self.root!r}: expected {where}. Pass "
                f"download=True to fetch it (needs network access), or place the files there."
            ) from err

    def prepare_data(self) -> None:
        if not self.download:
            return
        try:
            self._open(train=True, download=True)
            self._open(train=False, download=True)
        except Exception as err:
            where = VISION_DATASETS[self.name][3].format(root=Path(self.root).resolve())
            raise RuntimeError(
                f"downloading {self.name} into root={self.root!r} failed ({type(err).__name__}: {err}). "
                f"Fetch it on a machine with network access and place it as {where}, then use download=False."
            ) from err

    def _transform(self, dequantize: bool) -> transforms.Compose:
        steps: list[Any] = []
        if self.center_crop:
            steps.append(transforms.CenterCrop(self.center_crop))
        if self.image_size:
            steps += [transforms.Resize(self.image_size, antialias=True),
                      transforms.CenterCrop(self.image_size)]
        return transforms.Compose([*steps, transforms.PILToTensor(), _ToSignedUnit(dequantize)])

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        if self.name == "celeba" and not (self.image_size or self.center_crop):
            raise ValueError("VisionDataModule: CelebA images are 218x178; set image_size (e.g. 64) "
                             "and/or center_crop (e.g. 140) to get square images")
        base = self._open(train=True, download=False)
        n = len(base)
        num_val = max(1, round(n * self.val_fraction))
        if num_val >= n:
            raise ValueError(f"VisionDataModule: val_fraction={self.val_fraction} leaves no training images "
                             f"out of {n}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        self._train = _Split(base, perm[num_val:], self._transform(self.dequantize), self.labels)
        self._val = _Split(base, perm[:num_val], self._transform(False), self.labels)
        self._test: Dataset | None = None

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=train,
                          drop_last=train and len(dataset) >= self.batch_size, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self._train, True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self._val, False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        if self._test is None:
            base = self._open(train=False, download=False)
            self._test = _Split(base, torch.arange(len(base)), self._transform(False), self.labels)
        return self._loader(self._test, False)

    def predict_dataloader(self) -> DataLoader:
        """The test split (``lightning-ebm predict`` writes its energies and, for a classifier, logits)."""
        return self.test_dataloader()
