"""Small energies and inputs shared by the sampler, density and module tests (importable: tests/ is on the path)."""

from __future__ import annotations

import torch
from torch import nn


class ScaledSquare(nn.Module):
    """``E(x) = theta / 2 * |x|^2`` with a learnable scalar ``theta``: unrolled dynamics in closed form."""

    def __init__(self, theta: float) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.theta * x.pow(2).flatten(1).sum(1)


def z_batch(n: int = 5, dim: int = 3) -> torch.Tensor:
    """A fixed float64 batch of standard normal starting points."""
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def x0(shape=(256, 2), seed=0, dtype=torch.float32) -> torch.Tensor:
    """A seeded standard normal batch."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class TinyConv(nn.Module):
    """A small smooth conv energy ``(B, 3, 8, 8) -> (B,)`` (stands in for any conv energy)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.SiLU(), nn.Conv2d(8, 16, 4, 2, 1), nn.SiLU(),
                                 nn.Conv2d(16, 1, 4, 1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1).sum(1)
