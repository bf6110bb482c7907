"""The generator's density by change of variables, and the EBM's own density on a 2-D grid.

With deterministic dynamics the generator ``G(z)``, ``z ~ p0``, is an invertible map, so the
density ``q`` of what it generates follows from ``p0`` and the Jacobians of the dynamics:

* gradient descent, ``x_{k+1} = x_k - s grad E(x_k)`` (``K`` steps)::

      log q(x_K) = log p0(z) - sum_k log|det(I - s H(x_k))|,   H = Hessian of E, x_0 = z

* gradient flow, ``dx/dt = -grad E(x)`` on ``[0, T]``::

      d log p(x_t) / dt = +Laplacian E(x_t),   so   log q(x_T) = log p0(z) + int_0^T Laplacian E(x_t) dt

Traces and log-determinants are exact (``D`` Hessian-vector products per evaluation, for small
dimension ``D``) or Hutchinson estimates with Rademacher probes drawn once per solve (for
gradient descent through the truncated power series ``log det(I - sH) = -sum_j s^j tr(H^j) / j``).
``log_prob`` inverts the dynamics to evaluate ``q`` anywhere. The grid helpers normalise
``exp(-E)`` by quadrature and compare densities (KL, total variation) on a 2-D grid.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchdiffeq import odeint

from .latents import Latent
from .samplers import ODE, GradientDescent, Sampler, energy_grad

__all__ = [
    "TRACE_METHODS",
    "EXACT_TRACE_MAX_DIM",
    "resolve_trace",
    "rademacher",
    "hessian",
    "laplacian",
    "logdet_descent_step",
    "check_density",
    "sample_with_log_prob",
    "log_prob",
    "invert_descent_step",
    "bits_per_dim",
    "grid_2d",
    "normalise_on_grid",
    "ebm_log_density",
    "kl_on_grid",
    "tv_on_grid",
    "histogram_2d",
    "histogram_lookup",
    "kde_log_density",
]

TRACE_METHODS = ("exact", "hutchinson")
#: ``trace=None`` means exact up to this many dimensions, Hutchinson above
EXACT_TRACE_MAX_DIM = 32


# ---------------------------------------------------------------------------------------------- traces
def resolve_trace(trace: str | None, dim: int) -> str:
    """``trace`` checked, or the default for ``dim`` dimensions: exact when ``dim <= EXACT_TRACE_MAX_DIM``."""
    if trace is None:
        return "exact" if dim <= EXACT_TRACE_MAX_DIM else "hutchinson"
    if trace not in TRACE_METHODS:
        raise ValueError(f"trace must be one of {TRACE_METHODS} or None (exact up to {EXACT_TRACE_MAX_DIM} "
                         f"dimensions, hutchinson above), got {trace!r}")
    return trace


def rademacher(num_probes: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``num_probes`` Rademacher (+-1) probes per sample, shape ``(num_probes, *like.shape)``."""
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}")
    bits = torch.randint(0, 2, (num_probes, *like.shape), generator=generator, device=like.device)
    return bits.to(like.dtype) * 2 - 1


def _hvp(g: Tensor, x: Tensor, v: Tensor) -> Tensor:
    """Hessian-vector product ``H v`` per sample, from ``g = grad E(x)`` built with a graph."""
    (hv,) = torch.autograd.grad(g, x, grad_outputs=v, retain_graph=True)
    return hv


def _hessian_from_grad(g: Tensor, x: Tensor) -> Tensor:
    flat = g.flatten(1)
    d = flat.shape[1]
    rows = [torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)[0].flatten(1) for i in range(d)]
    return torch.stack(rows, 1)  # (B, D, D); symmetric up to rounding


def _check_autograd(what: str) -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{what} needs autograd (grad E and its Hessian), which torch.inference_mode forbids. Call it "
            "under torch.no_grad() instead, or build the Trainer with inference_mode=False."
        )


def hessian(energy: nn.Module, x: Tensor) -> Tensor:
    """The Hessian of ``E`` per sample, ``(B, D, D)``, ``D = prod(x.shape[1:])`` (``D`` backward passes)."""
    _check_autograd("hessian")
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        return _hessian_from_grad(energy_grad(energy, x, create_graph=True), x).detach()


def _trace_from_grad(g: Tensor, x: Tensor, trace: str, probes: Tensor | None) -> Tensor:
    if trace == "exact":
        flat = g.flatten(1)
        return sum(torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)[0].flatten(1)[:, i]
                   for i in range(flat.shape[1]))
    est = [(_hvp(g, x, v) * v).flatten(1).sum(1) for v in probes]
    return torch.stack(est).mean(0)


def laplacian(energy: nn.Module, x: Tensor, trace: str = "exact", probes: Tensor | None = None) -> Tensor:
    """``Laplacian E(x) = tr H(x)`` per sample: exact, or Hutchinson's ``mean_p v_p^T H v_p`` (``probes``)."""
    _check_autograd("laplacian")
    trace = resolve_trace(trace, x[0].numel())
    if trace == "hutchinson" and probes is None:
        raise ValueError("laplacian(trace='hutchinson') needs probes (see rademacher)")
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        return _trace_from_grad(energy_grad(energy, x, create_graph=True), x, trace, probes).detach()


def _logdet_from_grad(g: Tensor, x: Tensor, step_size: float, trace: str, probes: Tensor | None,
                      series_terms: int) -> tuple[Tensor, Tensor]:
    """``log|det(I - s H)|`` and the sign of the determinant (ones for Hutchinson)."""
    if trace == "exact":
        h = _hessian_from_grad(g, x)
        eye = torch.eye(h.shape[1], dtype=h.dtype, device=h.device)
        sign, logabs = torch.linalg.slogdet(eye - step_size * h)
        return logabs, sign
    # log det(I - sH) = -sum_j s^j tr(H^j) / j, each trace estimated by v^T H^j v
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for v in probes:
        w = v
        for j in range(1, series_terms + 1):
            w = _hvp(g, x, w)
            total = total - step_size**j / j * (w * v).flatten(1).sum(1)
    return total / probes.shape[0], torch.ones_like(total)


def logdet_descent_step(energy: nn.Module, x: Tensor, step_size: float, trace: str = "exact",
                        probes: Tensor | None = None, series_terms: int = 16) -> Tensor:
    """``log|det(I - s H(x))|`` per sample: the log-Jacobian of one gradient-descent step at ``x``.

    Exact (``slogdet`` of the full Hessian) or Hutchinson over ``probes`` with ``series_terms``
    terms of the power series, which converges when ``s * |eigenvalues of H| < 1`` and then
    errs by at most ``D * sum_{j > series_terms} (s * rho(H))^j / j`` in expectation.
    """
    _check_autograd("logdet_descent_step")
    trace = resolve_trace(trace, x[0].numel())
    if trace == "hutchinson" and probes is None:
        raise ValueError("logdet_descent_step(trace='hutchinson') needs probes (see rademacher)")
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        g = energy_grad(energy, x, create_graph=True)
        return _logdet_from_grad(g, x, step_size, trace, probes, series_terms)[0].detach()


# ---------------------------------------------------------------------------------------------- generator
def check_density(sampler: Sampler, latent: Latent) -> None:
    """Raise, saying why, when the generator ``sampler(energy, z ~ latent)`` has no computable density."""
    if not getattr(latent, "has_density", False):
        raise ValueError(
            f"the generator's density is undefined with latent {type(latent).__name__}: it has no density "
            "p0 to push forward (a ReplayBuffer's chains start from earlier end points, whose law depends "
            "on the whole training history). Use a Uniform or Gaussian latent."
        )
    if not getattr(sampler, "deterministic", False):
        raise ValueError(
            f"the generator's density is undefined for {sampler!r}: it injects noise, so G(z) is not a "
            "function of z and change of variables does not apply. Use GradientDescent or ODE (or "
            "Langevin with noise_std=0)."
        )
    if not isinstance(sampler, (GradientDescent, ODE)):
        raise NotImplementedError(
            f"no change-of-variables rule for sampler {type(sampler).__name__}; the generator's density "
            "is implemented for GradientDescent (and noise-free Langevin) and ODE"
        )
    if getattr(sampler, "grad_clip", None) is not None:
        raise ValueError(
            f"the generator's density is not computed with grad_clip={sampler.grad_clip}: clipping makes "
            "the vector field non-differentiable where it clips, so the Jacobian of the dynamics is not "
            "the Hessian of E. Use grad_clip=None."
        )
    if getattr(sampler, "clamp", None) is not None:
        raise ValueError(
            f"the generator's density is undefined with clamp={sampler.clamp}: clamping maps a region of "
            "positive volume onto the boundary, so the generator is not invertible. Use clamp=None."
        )


def _check_options(num_probes: int, series_terms: int) -> None:
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}")
    if not isinstance(series_terms, int) or series_terms < 1:
        raise ValueError(f"series_terms must be a positive integer, got {series_terms!r}")


class _FlowWithLogDensity(nn.Module):
    """``(x, a) -> (direction * -grad E(x), Laplacian E(x))``: the flow and the rate of ``log p``."""

    def __init__(self, energy: nn.Module, direction: float, trace: str, probes: Tensor | None) -> None:
        super().__init__()
        self.energy, self.direction, self.trace, self.probes = energy, direction, trace, probes

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            x = state[0].detach().requires_grad_(True)
            g = energy_grad(self.energy, x, create_graph=True)
            lap = _trace_from_grad(g, x, self.trace, self.probes)
        return -self.direction * g.detach(), lap.detach()


def _integrate_laplacian(energy: nn.Module, sampler: ODE, x0: Tensor, direction: float, trace: str,
                         probes: Tensor | None) -> tuple[Tensor, Tensor]:
    """Solve the flow (forward, or backward in time with ``direction=-1``) and ``int Laplacian E dt``."""
    func = _FlowWithLogDensity(energy, direction, trace, probes)
    t = torch.tensor([0.0, sampler.t_end], device=x0.device, dtype=x0.dtype)
    acc0 = torch.zeros(x0.shape[0], device=x0.device, dtype=x0.dtype)
    with torch.no_grad():
        xs, accs = odeint(func, (x0, acc0), t, **sampler.solver_options())
    return xs[-1], accs[-1]


def _setup(sampler: Sampler, latent: Latent, x: Tensor, trace: str | None, num_probes: int,
           series_terms: int, generator: torch.Generator | None, what: str) -> tuple[str, Tensor | None]:
    _check_autograd(what)
    check_density(sampler, latent)
    _check_options(num_probes, series_terms)
    if not isinstance(x, Tensor) or not x.is_floating_point() or tuple(x.shape[1:]) != tuple(latent.shape):
        raise ValueError(f"{what}: expected a floating-point tensor of shape (B, *{tuple(latent.shape)}), "
                         f"got {getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    trace = resolve_trace(trace, x[0].numel())
    probes = rademacher(num_probes, x, generator) if trace == "hutchinson" else None
    return trace, probes


def sample_with_log_prob(
    energy: nn.Module,
    sampler: Sampler,
    latent: Latent,
    z: Tensor,
    *,
    trace: str | None = None,
    num_probes: int = 1,
    series_terms: int = 16,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the dynamics from ``z`` and return ``(x, log q(x))``, both detached.

    Args:
        energy: the critic whose gradient drives the dynamics.
        sampler: the deterministic dynamics; the generator is ``x = sampler(energy, z)``.
        latent: ``p0``, where ``z`` comes from (needs ``log_prob``).
        z: starting points ``(B, *shape)``.
        trace: ``"exact"``, ``"hutchinson"`` or ``None`` (exact up to ``EXACT_TRACE_MAX_DIM``
            dimensions).
        num_probes: Rademacher probes per sample (Hutchinson), drawn once for the whole solve.
        series_terms: terms of the log-det power series (Hutchinson, gradient descent).
        generator: random stream of the probes.

    For an ODE the pair comes from one solve of the augmented state ``[x, log p]``; with a
    fixed-grid method ``x`` is exactly the sampler's output, with an adaptive one the step sizes
    also control the error of ``log p``, so ``x`` differs from the sampler's within tolerance.
    """
    trace, probes = _setup(sampler, latent, z, trace, num_probes, series_terms, generator,
                           "sample_with_log_prob")
    z = z.detach()
    log_p0 = latent.log_prob(z)
    if isinstance(sampler, ODE):
        x, acc = _integrate_laplacian(energy, sampler, z, 1.0, trace, probes)
        return x, log_p0 + acc
    x, s = z, sampler.step_size
    total = torch.zeros_like(log_p0)
    folded = torch.zeros_like(log_p0, dtype=torch.bool)
    for _ in range(sampler.steps):
        with torch.enable_grad():
            xk = x.detach().requires_grad_(True)
            g = energy_grad(energy, xk, create_graph=True)
            logdet, sign = _logdet_from_grad(g, xk, s, trace, probes, series_terms)
        total = total + logdet.detach()
        folded = folded | (sign <= 0)
        x = (xk - s * g).detach()
    if bool(folded.any()):
        warnings.warn(
            f"det(I - step_size * Hessian) <= 0 along {int(folded.sum())} of {folded.numel()} trajectories: "
            f"step_size={s} exceeds 1 / (largest Hessian eigenvalue) there, the step may fold space onto "
            "itself, and log q then counts one preimage only (an underestimate). Use a smaller step_size.",
            stacklevel=2,
        )
    return x, log_p0 - total


def _default_tol(dtype: torch.dtype) -> float:
    return 32 * torch.finfo(dtype).eps


def invert_descent_step(
    energy: nn.Module,
    y: Tensor,
    step_size: float,
    *,
    tol: float | None = None,
    max_iter: int = 500,
    step_index: int | None = None,
    num_steps: int | None = None,
) -> Tensor:
    """Solve ``y = x - s grad E(x)`` for ``x`` by the fixed-point iteration ``x <- y + s grad E(x)``.

    The iteration contracts when ``s * Lip(grad E) < 1`` (which also makes the step invertible).
    It stops when every point moves by at most ``tol * (1 + max|x|)`` (default ``32 * eps`` of
    the dtype) and raises a ``ValueError`` naming the step when it does not within ``max_iter``.
    """
    tol = _default_tol(y.dtype) if tol is None else tol
    y = y.detach()
    x = y + step_size * energy_grad(energy, y)
    delta = None
    for _ in range(max_iter):
        x_new = y + step_size * energy_grad(energy, x)
        delta = (x_new - x).flatten(1).abs().amax(1)
        x = x_new
        if bool((delta <= tol * (1 + x.flatten(1).abs().amax(1))).all()):
            return x
    where = "a step" if step_index is None else f"step {step_index}"
    where += "" if num_steps is None else f" of {num_steps}"
    bad = ~(delta <= tol * (1 + x.flatten(1).abs().amax(1)))
    raise ValueError(
        f"GradientDescent {where} is not invertible at {int(bad.sum())} of {y.shape[0]} points: the "
        f"fixed-point iteration x = y + step_size * grad E(x) did not converge in {max_iter} iterations "
        f"(largest last change {float(delta.max()):.3g}, tolerance {tol:.3g}). The step is a contraction, "
        f"hence invertible, only when step_size * Lip(grad E) < 1, here step_size={step_size}; use a smaller "
        "step_size, a smoother energy (e.g. MLPEnergy(spectral_norm=True)) or the ODE sampler, whose flow is "
        "always invertible."
    )




def log_prob(
    energy: nn.Module,
    sampler: Sampler,
    latent: Latent,
    x: Tensor,
    *,
    trace: str | None = None,
    num_probes: int = 1,
    series_terms: int = 16,
    generator: torch.Generator | None = None,
    tol: float | None = None,
    max_iter: int = 500,
) -> Tensor:
    """``log q(x)``, the generator's log-density at arbitrary points ``x``, by inverting the dynamics.

    The ODE is solved backwards from ``t_end`` to 0; gradient descent is undone step by step
    with ``invert_descent_step`` (``tol``, ``max_iter``). Points whose preimage falls outside
    the latent's support get ``-inf``. Other arguments as in ``sample_with_log_prob``.
    """
    trace, probes = _setup(sampler, latent, x, trace, num_probes, series_terms, generator, "log_prob")
    x = x.detach()
    if isinstance(sampler, ODE):
        z, acc = _integrate_laplacian(energy, sampler, x, -1.0, trace, probes)
        return latent.log_prob(z) + acc
    s, total = sampler.step_size, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for k in range(sampler.steps, 0, -1):
        x = invert_descent_step(energy, x, s, tol=tol, max_iter=max_iter, step_index=k,
                                num_steps=sampler.steps)
        with torch.enable_grad():
            xk = x.detach().requires_grad_(True)
            g = energy_grad(energy, xk, create_graph=True)
            logdet, _ = _logdet_from_grad(g, xk, s, trace, probes, series_terms)
        total = total + logdet.detach()
    return latent.log_prob(x) - total


def bits_per_dim(log_prob: Tensor, num_dims: int, data_range: tuple[float, float] = (-1.0, 1.0),
                 num_levels: int = 256) -> Tensor:
    """Bits per dimension of discrete data from a continuous log-density on dequantised data.

    Convention: integer levels ``k`` in ``{0, ..., num_levels - 1}`` are mapped to
    ``x = low + (k + u) * (high - low) / num_levels`` with ``u ~ U[0, 1)^D`` (uniform
    dequantisation), so ``-log2 P(k) <= -(log q(x) + D log((high - low) / num_levels)) / ln 2``
    and this returns that bound divided by ``D``. A uniform ``q`` on ``[low, high]^D`` gives
    exactly ``log2(num_levels)``.
    """
    low, high = float(data_range[0]), float(data_range[1])
    if not high > low:
        raise ValueError(f"data_range must be (low, high) with low < high, got {data_range!r}")
    if not isinstance(num_dims, int) or num_dims < 1 or not isinstance(num_levels, int) or num_levels < 2:
        raise ValueError(f"num_dims must be a positive integer and num_levels an integer >= 2, got "
                         f"num_dims={num_dims!r}, num_levels={num_levels!r}")
    log_bin = num_dims * math.log((high - low) / num_levels)
    return -(log_prob + log_bin) / (num_dims * math.log(2.0))


# ---------------------------------------------------------------------------------------------- 2-D grids
def grid_2d(bounds: Sequence[float], size: int, device: torch.device | str | None = None,
            dtype: torch.dtype = torch.float32) -> tuple[Tensor, float]:
    """Cell centres ``(size * size, 2)`` of a regular grid on ``(xmin, xmax, ymin, ymax)`` and the cell area.

    Points are ordered row by row (``y`` slow, ``x`` fast), so ``values.reshape(size, size)`` is
    an image with ``y`` along the first axis (``imshow(..., origin="lower")``). Sums over the
    cells times the area are midpoint-rule integrals.
    """
    if len(bounds) != 4 or not (bounds[0] < bounds[1] and bounds[2] < bounds[3]):
        raise ValueError(f"bounds must be (xmin, xmax, ymin, ymax) with xmin < xmax and ymin < ymax, "
                         f"got {bounds!r}")
    if not isinstance(size, int) or size < 2:
        raise ValueError(f"size must be an integer >= 2, got {size!r}")
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
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
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
