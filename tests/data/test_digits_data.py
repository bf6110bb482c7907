"""The embedded digits: the shipped pixels, the split, the scaling, and the digits feature network."""

from __future__ import annotations

import pytest
import torch

from lightning_ebm.data import DigitsDataModule, digits_split, load_digits
from lightning_ebm.data.digits import digits_to_images

# class counts of the UCI optdigits test set (sklearn's load_digits documents 1797 instances, ~180 per class)
CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_shipped_pixels_are_the_uci_digits():
    pixels, labels = load_digits()
    assert pixels.shape == (1797, 8, 8) and pixels.dtype == torch.uint8
    assert int(pixels.min()) == 0 and int(pixels.max()) == 16
    assert torch.bincount(labels).tolist() == CLASS_COUNTS


def test_shipped_pixels_equal_scikit_learns_copy():
    datasets = pytest.importorskip("sklearn.datasets")
    reference = datasets.load_digits()
    pixels, labels = load_digits()
    assert (pixels.numpy() == reference.images).all() and (labels.numpy() == reference.target).all()


def test_split_is_seeded_disjoint_and_complete():
    train, val = digits_split()
    assert len(val) == round(1797 * 0.2) and len(train) + len(val) == 1797
    assert not set(train.tolist()) & set(val.tolist())
    again, _ = digits_split()
    assert torch.equal(train, again)
    other, _ = digits_split(seed=1)
    assert not torch.equal(train, other)
    with pytest.raises(ValueError, match=r"digits_split: val_fraction must be a finite number with 0.0 < x < 1.0"):
        digits_split(val_fraction=1.5)


def test_scaling_padding_and_resizing():
    pixels = torch.tensor([[0, 8, 16, 4] * 16], dtype=torch.uint8).reshape(1, 8, 8)
    x = digits_to_images(pixels)
    assert x.shape == (1, 1, 8, 8)
    torch.testing.assert_close(x[0, 0, 0, :4], torch.tensor([-1.0, 0.0, 1.0, -0.5]))
    padded = digits_to_images(pixels, image_size=12)
    assert padded.shape == (1, 1, 12, 12)
    torch.testing.assert_close(padded[:, :, 2:10, 2:10], x)
    assert (padded[:, :, :2] == -1).all() and (padded[:, :, :, 10:] == -1).all()
    resized = digits_to_images(pixels, image_size=16, resize_mode="resize")
    assert resized.shape == (1, 1, 16, 16) and resized.min() >= -1 and resized.max() <= 1
    # dequantised levels stay inside their bin: (v + u) / 17 with u in [0, 1)
    noise = torch.rand(pixels.shape, generator=torch.Generator().manual_seed(0))
    deq = (digits_to_images(pixels, noise=noise)[:, 0] + 1) / 2 * 17
    assert ((deq - pixels.float()) >= 0).all() and ((deq - pixels.float()) < 1).all()


def test_datamodule_batches_and_held_out_part():
    dm = DigitsDataModule(image_size=16, batch_size=32, dequantize=True)
    assert dm.sample_shape == (1, 16, 16)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (32, 1, 16, 16) and batch.min() >= -1 and batch.max() <= 1
    assert len(dm.train_dataloader()) == (1797 - 359) // 32  # drop_last
    val = torch.cat(list(dm.val_dataloader()))
    _, val_idx = digits_split()
    pixels, _ = load_digits()
    torch.testing.assert_close(val, digits_to_images(pixels[val_idx], 16))  # never dequantised
    torch.testing.assert_close(dm.val_data, val)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 4}, "image_size must be an integer >= 8"),
        ({"resize_mode": "crop"}, "resize_mode must be one of"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
    ],
)
def test_datamodule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)
