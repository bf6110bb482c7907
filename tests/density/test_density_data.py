"""Exact log-densities of the toy sets, the histogram fallback, and the density configs."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from torch import distributions as D

from lightning_ebm import density as dn
from lightning_ebm.callbacks import DensityPanel2D, LongRunDiagnostic
from lightning_ebm.cli import EBMCLI
from lightning_ebm.data import TOY_LOG_DENSITIES, Toy2DDataModule, sample_toy, toy_log_density
from lightning_ebm.samplers import ODE, GradientDescent


def test_eight_gaussians_matches_torch_distributions():
    angle = torch.arange(8, dtype=torch.float64) * math.pi / 4
    centres = 2 * math.sqrt(2) * torch.stack([angle.cos(), angle.sin()], 1)
    components = D.Independent(D.Normal(centres, torch.full_like(centres, 0.5 / math.sqrt(2))), 1)
    mixture = D.MixtureSameFamily(D.Categorical(torch.full((8,), 1 / 8, dtype=torch.float64)), components)
    x = torch.cat([sample_toy("8gaussians", 500).double(), 3 * torch.randn(200, 2, dtype=torch.float64)])
    torch.testing.assert_close(toy_log_density("8gaussians", x), mixture.log_prob(x))
    # the sampler draws from that law: the mean log-density of samples estimates -entropy (Monte Carlo)
    s = sample_toy("8gaussians", 20000, seed=1)
    torch.manual_seed(0)
    mc = mixture.log_prob(mixture.sample((20000,)))
    lp = toy_log_density("8gaussians", s)
    assert abs(float(lp.mean() - mc.mean())) < 3 * math.hypot(lp.std(), mc.std()) / math.sqrt(20000)


def test_checkerboard_density():
    x = sample_toy("checkerboard", 32000, seed=2)
    lp = toy_log_density("checkerboard", x)
    assert (lp == -math.log(32)).all()  # every sample lies on the support
    # the 8 squares of side 2 in [-4, 4)^2 with even floor(x/2) + floor(y/2) each hold 1/8 of the mass
    cell = torch.floor(x.double() / 2)
    idx = ((cell[:, 1] + 2) * 4 + (cell[:, 0] + 2)).long()
    counts = torch.bincount(idx, minlength=16).double()
    support = counts > 0
    assert int(support.sum()) == 8
    expected = x.shape[0] / 8
    assert ((counts[support] - expected).abs() < 4 * math.sqrt(expected)).all()
    # an aligned grid integrates it to one exactly; off the support it is -inf
    pts, area = dn.grid_2d((-4.0, 4.0, -4.0, 4.0), 64, dtype=torch.float64)
    assert float(toy_log_density("checkerboard", pts).exp().sum() * area) == pytest.approx(1.0, abs=1e-12)
    assert toy_log_density("checkerboard", torch.tensor([[1.0, -1.0], [5.0, 0.5]])).isinf().all()


def test_histogram_fallback():
    assert set(TOY_LOG_DENSITIES) == {"8gaussians", "checkerboard"}
    dm = Toy2DDataModule("moons")
    assert not dm.exact_density and Toy2DDataModule("8gaussians").exact_density
    x = sample_toy("moons", 5000, seed=7)
    assert torch.isfinite(dm.log_density(x)).double().mean() > 0.995  # fresh samples land on filled cells
    # a histogram of the exact-density set is close to the exact density (TV on a grid)
    pts, area = dn.grid_2d((-4.5, 4.5, -4.5, 4.5), 180, dtype=torch.float64)
    bounds = (-4.6, 4.6, -4.6, 4.6)
    table = dn.histogram_2d(sample_toy("8gaussians", 1_000_000, seed=3).double(), bounds, bins=100)
    tv = dn.tv_on_grid(toy_log_density("8gaussians", pts), dn.histogram_lookup(table, pts, bounds), area)
    assert float(tv) < 0.06
    with pytest.raises(ValueError, match="points"):
        toy_log_density("moons", torch.zeros(3))


@pytest.mark.parametrize("path, sampler", [("configs/toy2d_density.yaml", GradientDescent),
                                           ("configs/toy2d_density_ode.yaml", ODE)])
def test_density_configs_parse(path, sampler):
    with mock.patch("sys.argv", ["lightning-ebm"]):
        cli = EBMCLI(args=["--config", path, "--trainer.logger=false"], run=False)
    assert isinstance(cli.model.sampler, sampler)
    assert cli.model.latent.has_density
    kinds = {type(c) for c in cli.trainer.callbacks}
    assert {DensityPanel2D, LongRunDiagnostic} <= kinds
