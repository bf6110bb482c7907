"""DigitsFeatures, the digits-FID feature network: it classifies held-out digits and undoes padding/resizing."""

from __future__ import annotations

import pytest
import torch

from lightning_ebm.data import DigitsDataModule
from lightning_ebm.data.digits import digits_to_images
from lightning_ebm.metrics import DigitsFeatures


def test_digits_features_classify_held_out_digits():
    """The shipped network never saw the held-out part; it must still classify it well."""
    dm = DigitsDataModule()
    dm.setup()
    features = DigitsFeatures()
    with torch.no_grad():
        f = features(dm.val_data)
        accuracy = (features.head(f).argmax(1) == dm.val_labels).float().mean()
    assert f.shape == (359, 64) and accuracy > 0.93
    assert all(not p.requires_grad for p in features.parameters())
    features.train()
    assert not features.training  # a measuring instrument stays in eval mode


@pytest.mark.parametrize("mode", ["pad", "resize"])
def test_digits_features_undo_padding_and_resizing(mode):
    dm = DigitsDataModule()
    dm.setup()
    x8 = dm.val_data[:16]
    big = digits_to_images(dm.val_pixels[:16], 16, mode)
    with torch.no_grad():
        f8, f16 = DigitsFeatures()(x8), DigitsFeatures(image_size=16, resize_mode=mode)(big)
    if mode == "pad":
        torch.testing.assert_close(f16, f8)
    else:  # bilinear up then area down is close to, not exactly, the identity
        assert (f16 - f8).norm() / f8.norm() < 0.25
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 1, 16, 16\)"):
        DigitsFeatures(image_size=16)(x8)
