"""2-D grid tools: cell centres, the EBM's ``exp(-E)/Z`` with ``log Z`` by quadrature, KL and TV on a grid.

Also histogram and kernel density estimates of 2-D samples (``data/toy.py`` reads its
histograms through these).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._checks import ArgumentError, check_int

__all__ = [
    "grid_2d",
    "normalise_on_grid",
    "log_partition_on_grid",
    "ebm_log_density",
    "kl_on_grid",
    "tv_on_grid",
    "histogram_2d",
    "histogram_lookup",
    "kde_log_density",
]

def _is_bounds(bounds: object) -> bool:
    """``(xmin, xmax, ymin, ymax)`` of finite numbers with ``xmin < xmax`` and ``ymin < ymax``."""
    if isinstance(bounds, (str, bytes)) or not isinstance(bounds, Sequence) or len(bounds) != 4:
        return False
    try:
        b = [float(v) for v in bounds]
    except (TypeError, ValueError):
        return False
    return all(math.isfinite(v) for v in b) and b[0] < b[1] and b[2] < b[3]


def grid_2d(bounds: Sequence[float], size: int, device: torch.device | str | None = None,
            dtype: torch.dtype = torch.float32) -> tuple[Tensor, float]:
    """Cell centres ``(size * size, 2)`` of a regular grid on ``(xmin, xmax, ymin, ymax)`` and the cell area.

    Points are ordered row by row (``y`` slow, ``x`` fast), so ``values.reshape(size, size)`` is
    an image with ``y`` along the first axis (``imshow(..., origin="lower")``). Sums over the
    cells times the area are midpoint-rule integrals.
    """
    if not _is_bounds(bounds):
        raise ArgumentError(f"grid_2d: bounds must be (xmin, xmax, ymin, ymax) with xmin < xmax and ymin < ymax, "
                         f"got {bounds!r}")
    size = check_int("grid_2d", "size", size, minimum=2)
    dx, dy = (bounds[1] - bounds[0]) / size, (bounds[3] - bounds[2]) / size
    xs = bounds[0] + dx * (torch.arange(size, dtype=torch.float64) + 0.5)
    ys = bounds[2] + dy * (torch.arange(size, dtype=torch.float64) + 0.5)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1).to(device=device, dtype=dtype)
    return points, dx * dy


def normalise_on_grid(log_f: Tensor, cell_area: float) -> Tensor:
    """``log f - log Z`` with ``Z = sum exp(log f) * cell_area``: a log-density on the grid's domain."""
    log_f = log_f.double()
    return log_f - torch.logsumexp(log_f, 0) - math.log(cell_area)


@torch.no_grad()
def log_partition_on_grid(energy: nn.Module, points: Tensor, cell_area: float, chunk: int = 16384) -> Tensor:
    """``log Z = log int exp(-E)`` over the grid's domain by the midpoint rule (float64, a 0-dim tensor)."""
    e = torch.cat([energy(p) for p in points.split(chunk)]).double()
    return torch.logsumexp(-e, 0) + math.log(cell_area)


@torch.no_grad()
def ebm_log_density(energy: nn.Module, points: Tensor, cell_area: float, chunk: int = 16384) -> Tensor:
    """The EBM's ``log exp(-E)/Z`` at grid ``points``, ``Z`` by quadrature over the grid (float64).

    ``Z`` covers the grid's domain only; choose a domain outside of which ``exp(-E)`` is small.
    """
    e = torch.cat([energy(p) for p in points.split(chunk)])
    return normalise_on_grid(-e, cell_area)


def _check_pair(log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
    if log_p.shape != log_q.shape or log_p.ndim != 1:
        raise ValueError(f"log_p and log_q must be 1-D with the same shape, got {tuple(log_p.shape)} and "
                         f"{tuple(log_q.shape)}")
    if torch.isnan(log_p).any() or torch.isnan(log_q).any():
        raise ValueError("log-densities on the grid contain NaN")
    return log_p.double(), log_q.double()


def kl_on_grid(log_p: Tensor, log_q: Tensor, cell_area: float) -> Tensor:
    """``KL(p || q) = int p log(p / q)`` on the grid, both densities renormalised on the grid first.

    ``0 log 0 = 0``; the result is ``inf`` when ``q = 0`` on a cell where ``p > 0``.
    """
    log_p, log_q = _check_pair(log_p, log_q)
    log_p, log_q = normalise_on_grid(log_p, cell_area), normalise_on_grid(log_q, cell_area)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum() * cell_area


def tv_on_grid(log_p: Tensor, log_q: Tensor, cell_area: float) -> Tensor:
    """Total variation ``1/2 int |p - q|`` on the grid (in [0, 1]), both renormalised on the grid."""
    log_p, log_q = _check_pair(log_p, log_q)
    p, q = normalise_on_grid(log_p, cell_area).exp(), normalise_on_grid(log_q, cell_area).exp()
    return 0.5 * (p - q).abs().sum() * cell_area


def _cells(p: Tensor, bounds: Sequence[float], bins: int) -> tuple[Tensor, Tensor]:
    """Flat cell index (``y`` slow, ``x`` fast) of 2-D points and whether they fall inside ``bounds``."""
    lo = torch.tensor([bounds[0], bounds[2]], dtype=torch.float64)
    width = torch.tensor([bounds[1] - bounds[0], bounds[3] - bounds[2]], dtype=torch.float64) / bins
    idx = torch.floor((p.detach().cpu().double() - lo) / width).long()
    inside = ((idx >= 0) & (idx < bins)).all(1)
    idx = idx.clamp(0, bins - 1)
    return idx[:, 1] * bins + idx[:, 0], inside


def histogram_2d(samples: Tensor, bounds: Sequence[float], bins: int) -> Tensor:
    """Log-density of a ``bins x bins`` histogram of 2-D ``samples`` on ``bounds``: ``(bins, bins)``, y first.

    Normalised by all samples (those outside ``bounds`` included), so it integrates to the
    fraction of samples inside; empty cells hold ``-inf``. A consistent estimate whose bias is
    of the order of the bin width.
    """
    if samples.ndim != 2 or samples.shape[1] != 2:
        raise ValueError(f"samples must be (N, 2), got {tuple(samples.shape)}")
    bins = check_int("histogram_2d", "bins", bins, minimum=1)
    flat, inside = _cells(samples, bounds, bins)
    counts = torch.bincount(flat[inside], minlength=bins * bins).double()
    area = (bounds[1] - bounds[0]) * (bounds[3] - bounds[2]) / bins**2
    return (counts / (samples.shape[0] * area)).log().reshape(bins, bins)


def histogram_lookup(table: Tensor, points: Tensor, bounds: Sequence[float]) -> Tensor:
    """Read a ``histogram_2d`` table at 2-D ``points``; ``-inf`` outside ``bounds``."""
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must be (N, 2), got {tuple(points.shape)}")
    flat, inside = _cells(points, bounds, table.shape[0])
    out = table.reshape(-1)[flat]
    return torch.where(inside, out, torch.full_like(out, -math.inf)).to(points.device)


def kde_log_density(samples: Tensor, points: Tensor, chunk: int = 4096) -> Tensor:
    """Gaussian kernel density estimate of ``samples`` ``(N, D)`` read at ``points``, float64.

    Kernel covariance ``cov(samples) * N^(-2 / (D + 4))`` (Scott's rule, as ``scipy.stats.gaussian_kde``);
    a smooth fallback for data without a known density.
    """
    if samples.ndim != 2 or points.ndim != 2 or samples.shape[1] != points.shape[1] or samples.shape[0] < 2:
        raise ValueError(f"samples (N >= 2, D) and points (M, D) must share D, got {tuple(samples.shape)} "
                         f"and {tuple(points.shape)}")
    data = samples.detach().cpu().double()
    n, d = data.shape
    chol = torch.linalg.cholesky(torch.atleast_2d(torch.cov(data.T)) * n ** (-2.0 / (d + 4)))
    white = torch.linalg.solve_triangular(chol, data.T, upper=False).T
    norm = math.log(n) + 0.5 * d * math.log(2 * math.pi) + torch.log(torch.diagonal(chol)).sum()
    out = []
    for p in points.detach().cpu().double().split(chunk):
        q = torch.linalg.solve_triangular(chol, p.T, upper=False).T
        out.append(torch.logsumexp(-0.5 * torch.cdist(q, white).pow(2), 1) - norm)
    return torch.cat(out).to(points.device)
