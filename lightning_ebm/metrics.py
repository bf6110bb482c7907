"""Sample-quality metrics between two point sets: MMD and sliced Wasserstein distance."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mmd_rbf", "median_bandwidth", "sliced_wasserstein"]


def _as_2d(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim < 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must be a tensor (N, *shape) with N >= 2, got {getattr(x, 'shape', x)!r}")
    return x.flatten(1).double()


def median_bandwidth(x: Tensor, y: Tensor) -> Tensor:
    """Median of the pairwise distances of the pooled sample (the median heuristic)."""
    z = torch.cat([_as_2d(x, "x"), _as_2d(y, "y")])
    d = torch.cdist(z, z)
    n = z.shape[0]
    off_diagonal = d[~torch.eye(n, dtype=torch.bool, device=d.device)]
    return off_diagonal.median()


def mmd_rbf(x: Tensor, y: Tensor, bandwidth: float | Tensor | None = None) -> Tensor:
    """Maximum mean discrepancy with a Gaussian kernel ``exp(-|a-b|^2 / (2 h^2))``.

    Returns ``MMD = sqrt(MMD_b^2)``, the biased (V-statistic) estimate, which is never negative
    and has a positive floor of order ``1/sqrt(N)`` even for two samples of one distribution:
    compare it to the same statistic between two data samples of the same sizes. ``bandwidth``
    ``h`` defaults to the median heuristic on the pooled sample. Computed in float64.
    """
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same number of features, got {x.shape[1]} and {y.shape[1]}")
    h = median_bandwidth(x, y) if bandwidth is None else torch.as_tensor(bandwidth, dtype=torch.float64)
    gamma = 1.0 / (2 * h**2)
    kxx = torch.exp(-gamma * torch.cdist(x, x).pow(2)).mean()
    kyy = torch.exp(-gamma * torch.cdist(y, y).pow(2)).mean()
    kxy = torch.exp(-gamma * torch.cdist(x, y).pow(2)).mean()
    return (kxx + kyy - 2 * kxy).clamp_min(0).sqrt()


def sliced_wasserstein(
    x: Tensor, y: Tensor, num_projections: int = 256, p: int = 2, generator: torch.Generator | None = None
) -> Tensor:
    """Sliced ``p``-Wasserstein distance ``(E_theta W_p^p(<x,theta>, <y,theta>))^(1/p)``.

    Directions are uniform on the sphere (seeded by ``generator``, default seed 0 so the value is
    reproducible). The 1-D distances are exact, from quantile functions on a common grid, so
    ``x`` and ``y`` may have different sizes. Computed in float64.
    """
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same number of features, got {x.shape[1]} and {y.shape[1]}")
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    theta = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(x.device)
    px, _ = torch.sort(x @ theta, dim=0)
    py, _ = torch.sort(y @ theta, dim=0)
    return _wasserstein_1d_sorted(px, py, p).mean().pow(1.0 / p)


def _wasserstein_1d_sorted(u: Tensor, v: Tensor, p: int) -> Tensor:
    """``W_p^p`` between the empirical laws of sorted columns ``u`` (n, P) and ``v`` (m, P)."""
    n, m = u.shape[0], v.shape[0]
    # quantile levels where either empirical quantile function jumps
    levels = torch.cat([torch.arange(1, n + 1, device=u.device) / n, torch.arange(1, m + 1, device=u.device) / m])
    levels = torch.unique(levels.double().clamp(max=1.0))
    widths = torch.diff(levels, prepend=levels.new_zeros(1))
    mids = levels - widths / 2
    iu = torch.clamp((mids * n).ceil().long() - 1, 0, n - 1)
    iv = torch.clamp((mids * m).ceil().long() - 1, 0, m - 1)
    return (widths[:, None] * (u[iu] - v[iv]).abs().pow(p)).sum(0)
