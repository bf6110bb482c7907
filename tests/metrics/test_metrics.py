"""MMD and sliced Wasserstein against float64 recomputations and scipy."""

from __future__ import annotations

import math
import statistics

import pytest
import scipy.stats
import torch

from lightning_ebm.metrics import median_bandwidth, mmd_rbf, sliced_wasserstein


def _naive_mmd(x, y, h):
    x, y = x.double().tolist(), y.double().tolist()

    def k(a, b):
        return math.exp(-sum((ai - bi) ** 2 for ai, bi in zip(a, b, strict=True)) / (2 * h * h))

    kxx = sum(k(a, b) for a in x for b in x) / len(x) ** 2
    kyy = sum(k(a, b) for a in y for b in y) / len(y) ** 2
    kxy = sum(k(a, b) for a in x for b in y) / (len(x) * len(y))
    return math.sqrt(max(kxx + kyy - 2 * kxy, 0.0))


def test_mmd_matches_a_naive_float64_loop():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, generator=g), torch.randn(30, 3, generator=g) + 0.5
    assert mmd_rbf(x, y, bandwidth=1.3).item() == pytest.approx(_naive_mmd(x, y, 1.3), rel=1e-10)
    pooled = torch.cat([x, y]).double()
    dists = [torch.dist(a, b).item() for i, a in enumerate(pooled) for j, b in enumerate(pooled) if i != j]
    h = statistics.median_low(dists)  # torch.median returns the lower middle value too
    assert median_bandwidth(x, y).item() == pytest.approx(h, rel=1e-10)
    assert mmd_rbf(x, y).item() == pytest.approx(_naive_mmd(x, y, h), rel=1e-10)


def test_mmd_is_zero_for_identical_samples_and_grows_with_shift():
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(1))
    assert mmd_rbf(x, x).item() == pytest.approx(0.0, abs=1e-7)
    assert mmd_rbf(x, x + 0.5) < mmd_rbf(x, x + 2.0)


@pytest.mark.parametrize("n, m", [(300, 300), (300, 170)])
def test_sliced_wasserstein_in_one_dimension_is_scipys_wasserstein(n, m):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(n, 1, generator=g), 2 * torch.randn(m, 1, generator=g) + 1
    expected = scipy.stats.wasserstein_distance(x[:, 0].numpy(), y[:, 0].numpy())
    assert sliced_wasserstein(x, y, num_projections=3, p=1).item() == pytest.approx(expected, rel=1e-6)


def test_sliced_wasserstein_of_a_translation_is_the_projected_shift():
    """Translating by v: every projection moves by <v, theta>, so SW_2^2 = E<v,theta>^2 = |v|^2 / d."""
    x = torch.randn(500, 3, generator=torch.Generator().manual_seed(3))
    v = torch.tensor([1.0, -2.0, 0.5])
    sw = sliced_wasserstein(x, x + v, num_projections=20000, p=2).item()
    assert sw == pytest.approx(v.norm().item() / math.sqrt(3), rel=0.02)


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="same number of features"):
        mmd_rbf(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="N >= 2"):
        sliced_wasserstein(torch.zeros(1, 2), torch.zeros(4, 2))
