"""Toy 2-D data: closed-form moments, seeding, fresh batches, exact resume, bad names."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_ebm.data import TOY_DATASETS, Toy2DDataModule, sample_toy
from lightning_ebm.data.toy import ToyBatchStream


@pytest.mark.parametrize("name", sorted(TOY_DATASETS))
def test_every_toy_set_is_seeded_2d_and_bounded(name):
    a = sample_toy(name, 2000, seed=0)
    b = sample_toy(name, 2000, seed=0)
    c = sample_toy(name, 2000, seed=1)
    assert a.shape == (2000, 2) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    assert torch.isfinite(a).all() and a.abs().quantile(0.99) < 4.5


def test_eight_gaussians_moments_match_the_mixture():
    """Centres on a circle of radius 2*sqrt(2), std 0.5/sqrt(2): Cov = (R^2/2 + s^2) I, mean 0."""
    x = sample_toy("8gaussians", 200_000, seed=3).double()
    var = (2 * math.sqrt(2)) ** 2 / 2 + (0.5 / math.sqrt(2)) ** 2
    torch.testing.assert_close(torch.cov(x.T), var * torch.eye(2, dtype=torch.float64), atol=0.03, rtol=0.01)
    assert x.mean(0).abs().max() < 0.02


def test_checkerboard_occupies_alternate_squares():
    x = sample_toy("checkerboard", 20000, seed=0)
    cells = (torch.floor(x / 2).long() % 2).sum(1) % 2  # parity of the 2x2 cell
    assert cells.unique().numel() == 1


def test_unknown_name_is_named():
    with pytest.raises(ValueError,
                       match=r"Toy2DDataModule: name \(the toy dataset\) must be one of .*'8gaussians'.*got 'banana'"):
        Toy2DDataModule(name="banana")
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        Toy2DDataModule(batch_size=0)


def test_training_batches_are_fresh_and_the_held_out_set_is_fixed():
    dm = Toy2DDataModule(name="moons", batch_size=64, batches_per_epoch=3, num_val=100)
    epoch1 = list(dm.train_dataloader())
    epoch2 = list(dm.train_dataloader())
    assert len(epoch1) == len(epoch2) == 3 and epoch1[0].shape == (64, 2)
    assert not torch.equal(epoch1[0], epoch1[1]) and not torch.equal(epoch1[0], epoch2[0])
    dm.setup("fit")
    val = torch.cat([b[0] for b in dm.val_dataloader()])
    dm2 = Toy2DDataModule(name="moons", batch_size=64, num_val=100)
    dm2.setup("fit")
    torch.testing.assert_close(val, dm2.val_data)


def test_stream_state_resumes_mid_epoch_exactly():
    reference = ToyBatchStream("rings", batch_size=8, batches_per_epoch=5, seed=4)
    expected = list(reference) + list(reference)
    stream = ToyBatchStream("rings", batch_size=8, batches_per_epoch=5, seed=4)
    it = iter(stream)
    first = [next(it), next(it)]
    state = stream.state_dict()
    resumed = ToyBatchStream("rings", batch_size=8, batches_per_epoch=5, seed=4)
    resumed.load_state_dict(state)
    rest = list(resumed) + list(resumed)
    for got, want in zip(first + rest, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert len(first + rest) == len(expected)
