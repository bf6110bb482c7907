"""Labels through the data: ``labels=True`` yields ``(x, y)`` with the very images/points of ``labels=False``."""

from __future__ import annotations

import math

import pytest
import torch
from test_vision_data import no_md5, write_cifar10, write_mnist  # noqa: F401 - the fixture is used by name

from lightning_ebm.data import DigitsDataModule, Toy2DDataModule, VisionDataModule, digits_split, load_digits
from lightning_ebm.data.toy import TOY_DATASETS, TOY_LABELLED, sample_toy, sample_toy_labelled


@pytest.mark.parametrize("name", sorted(TOY_LABELLED))
def test_toy_labels_are_the_mode_index_and_the_points_unchanged(name):
    x, y = sample_toy_labelled(name, 4000, seed=5)
    assert torch.equal(x, sample_toy(name, 4000, seed=5)) and y.dtype == torch.int64
    k = TOY_LABELLED[name][0]
    assert set(y.tolist()) == set(range(k))
    if name == "8gaussians":  # each point lies nearest its own centre (std 0.35, centres 2.2 apart)
        angle = torch.arange(8) * (math.pi / 4)
        centres = 2 * math.sqrt(2) * torch.stack([angle.cos(), angle.sin()], 1)
        assert (torch.cdist(x, centres).argmin(1) == y).float().mean() > 0.99
    if name == "rings":  # radius 0.9 (label + 1), noise 0.08
        assert ((x.norm(dim=1) / 0.9 - 1).round().long() == y).float().mean() > 0.99


def test_toy_datamodule_yields_labelled_batches_with_the_same_points():
    plain, labelled = Toy2DDataModule(batches_per_epoch=2, num_val=50), Toy2DDataModule(
        batches_per_epoch=2, num_val=50, labels=True)
    for a, (x, y) in zip(plain.train_dataloader(), labelled.train_dataloader(), strict=True):
        assert torch.equal(a, x) and y.shape == (x.shape[0],) and y.dtype == torch.int64
    (va,), (vx, vy) = next(iter(plain.val_dataloader())), next(iter(labelled.val_dataloader()))
    assert torch.equal(va, vx) and vy.max() < labelled.num_classes == 8
    assert plain.num_classes is None


@pytest.mark.parametrize("name", sorted(set(TOY_DATASETS) - set(TOY_LABELLED)))
def test_toy_sets_without_modes_refuse_labels(name):
    with pytest.raises(ValueError, match=f"labels=True needs a toy set made of modes.*{name}"):
        Toy2DDataModule(name=name, labels=True)


def test_digits_labels_match_the_embedded_classes():
    plain, labelled = DigitsDataModule(batch_size=500), DigitsDataModule(batch_size=500, labels=True)
    labelled.setup()
    x, y = next(iter(labelled.val_dataloader()))
    assert torch.equal(next(iter(plain.val_dataloader())), x)
    _, labels = load_digits()
    assert torch.equal(y, labels[digits_split()[1]])
    assert labelled.num_classes == 10 and len(next(iter(labelled.train_dataloader()))) == 2


def test_vision_labels(tmp_path, no_md5):  # noqa: F811
    write_mnist(tmp_path)
    dm = VisionDataModule(name="mnist", root=str(tmp_path), batch_size=4, val_fraction=0.25, labels=True)
    dm.setup("fit")
    xs, ys = zip(*dm.test_dataloader(), strict=True)
    assert torch.cat(ys).tolist() == [i % 10 for i in range(6)] and torch.cat(xs).shape == (6, 1, 28, 28)
    plain = VisionDataModule(name="mnist", root=str(tmp_path), batch_size=4, val_fraction=0.25)
    plain.setup("fit")
    assert torch.equal(torch.cat(list(plain.test_dataloader())), torch.cat(xs))
    with pytest.raises(ValueError, match="celeba has none"):
        VisionDataModule(name="celeba", labels=True)
