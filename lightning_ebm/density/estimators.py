"""Traces and log-determinants of Hessians of the energy: exact, or Hutchinson estimates.

Exact uses ``D`` Hessian-vector products per evaluation (small dimension ``D``); Hutchinson
uses Rademacher probes ``v`` (``E[v^T H v] = tr H``), for gradient descent through the truncated
power series ``log det(I - sH) = -sum_j s^j tr(H^j) / j``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._checks import ArgumentError, check_int
from ..samplers import energy_grad

__all__ = [
    "TRACE_METHODS",
    "EXACT_TRACE_MAX_DIM",
    "Estimator",
    "resolve_trace",
    "rademacher",
    "hessian",
    "laplacian",
    "logdet_descent_step",
]

TRACE_METHODS = ("exact", "hutchinson")
#: ``trace=None`` means exact up to this many dimensions, Hutchinson above
EXACT_TRACE_MAX_DIM = 32


def resolve_trace(trace: str | None, dim: int) -> str:
    """``trace`` checked, or the default for ``dim`` dimensions: exact when ``dim <= EXACT_TRACE_MAX_DIM``."""
    if trace is None:
        return "exact" if dim <= EXACT_TRACE_MAX_DIM else "hutchinson"
    if isinstance(trace, bool) or trace not in TRACE_METHODS:
        raise ArgumentError(f"trace must be one of {TRACE_METHODS} or None (exact up to {EXACT_TRACE_MAX_DIM} "
                            f"dimensions, hutchinson above), got {trace!r}")
    return trace


def rademacher(num_probes: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``num_probes`` Rademacher (+-1) probes per sample, shape ``(num_probes, *like.shape)``."""
    check_int("rademacher", "num_probes", num_probes, minimum=1)
    bits = torch.randint(0, 2, (num_probes, *like.shape), generator=generator, device=like.device)
    return bits.to(like.dtype) * 2 - 1


def check_autograd(what: str) -> None:
    """Refuse ``torch.inference_mode`` clearly: Hessians need autograd."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{what} needs autograd (grad E and its Hessian), which torch.inference_mode forbids. Call it "
            "under torch.no_grad() instead, or build the Trainer with inference_mode=False."
        )


def _hvp(g: Tensor, x: Tensor, v: Tensor) -> Tensor:
    """Hessian-vector product ``H v`` per sample, from ``g = grad E(x)`` built with a graph."""
    (hv,) = torch.autograd.grad(g, x, grad_outputs=v, retain_graph=True)
    return hv


def _hessian_from_grad(g: Tensor, x: Tensor) -> Tensor:
    flat = g.flatten(1)
    d = flat.shape[1]
    rows = [torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)[0].flatten(1) for i in range(d)]
    return torch.stack(rows, 1)  # (B, D, D); symmetric up to rounding


@dataclass(frozen=True)
class Estimator:
    """How traces and log-determinants are computed for one solve: exact, or Hutchinson over fixed probes.

    The methods take ``g = grad E(x)`` built with ``create_graph=True`` at ``x`` (requiring grad).
    """

    trace: str
    probes: Tensor | None = None
    series_terms: int = 16

    def trace_hessian(self, g: Tensor, x: Tensor) -> Tensor:
        """``tr H(x)`` per sample (exact), or ``mean_p v_p^T H v_p`` (Hutchinson)."""
        if self.trace == "exact":
            flat = g.flatten(1)
            return sum(torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)[0].flatten(1)[:, i]
                       for i in range(flat.shape[1]))
        est = [(_hvp(g, x, v) * v).flatten(1).sum(1) for v in self.probes]
        return torch.stack(est).mean(0)

    def logdet_step(self, g: Tensor, x: Tensor, step_size: float) -> tuple[Tensor, Tensor]:
        """``log|det(I - s H(x))|`` and the determinant's sign (ones for Hutchinson)."""
        if self.trace == "exact":
            h = _hessian_from_grad(g, x)
            eye = torch.eye(h.shape[1], dtype=h.dtype, device=h.device)
            sign, logabs = torch.linalg.slogdet(eye - step_size * h)
            return logabs, sign
        # log det(I - sH) = -sum_j s^j tr(H^j) / j, each trace estimated by v^T H^j v
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for v in self.probes:
            w = v
            for j in range(1, self.series_terms + 1):
                w = _hvp(g, x, w)
                total = total - step_size**j / j * (w * v).flatten(1).sum(1)
        return total / self.probes.shape[0], torch.ones_like(total)

    @staticmethod
    def build(trace: str | None, x: Tensor, num_probes: int = 1, series_terms: int = 16,
              generator: torch.Generator | None = None) -> Estimator:
        """The estimator for points like ``x``: ``trace`` resolved by dimension, probes drawn once."""
        check_int("density", "num_probes", num_probes, minimum=1)
        check_int("density", "series_terms", series_terms, minimum=1)
        trace = resolve_trace(trace, x[0].numel())
        probes = rademacher(num_probes, x, generator) if trace == "hutchinson" else None
        return Estimator(trace, probes, series_terms)


def _with_grad(energy: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    x = x.detach().requires_grad_(True)
    return energy_grad(energy, x, create_graph=True), x


def hessian(energy: nn.Module, x: Tensor) -> Tensor:
    """The Hessian of ``E`` per sample, ``(B, D, D)``, ``D = prod(x.shape[1:])`` (``D`` backward passes)."""
    check_autograd("hessian")
    with torch.enable_grad():
        g, x = _with_grad(energy, x)
        return _hessian_from_grad(g, x).detach()


def _needs_probes(what: str, trace: str, probes: Tensor | None) -> None:
    if trace == "hutchinson" and probes is None:
        raise ArgumentError(f"{what}(trace='hutchinson') needs probes (see rademacher)")


def laplacian(energy: nn.Module, x: Tensor, trace: str = "exact", probes: Tensor | None = None) -> Tensor:
    """``Laplacian E(x) = tr H(x)`` per sample: exact, or Hutchinson's ``mean_p v_p^T H v_p`` (``probes``)."""
    check_autograd("laplacian")
    trace = resolve_trace(trace, x[0].numel())
    _needs_probes("laplacian", trace, probes)
    with torch.enable_grad():
        g, x = _with_grad(energy, x)
        return Estimator(trace, probes).trace_hessian(g, x).detach()


def logdet_descent_step(energy: nn.Module, x: Tensor, step_size: float, trace: str = "exact",
                        probes: Tensor | None = None, series_terms: int = 16) -> Tensor:
    """``log|det(I - s H(x))|`` per sample: the log-Jacobian of one gradient-descent step at ``x``.

    Exact (``slogdet`` of the full Hessian) or Hutchinson over ``probes`` with ``series_terms``
    terms of the power series, which converges when ``s * |eigenvalues of H| < 1`` and then
    errs by at most ``D * sum_{j > series_terms} (s * rho(H))^j / j`` in expectation.
    """
    check_autograd("logdet_descent_step")
    trace = resolve_trace(trace, x[0].numel())
    _needs_probes("logdet_descent_step", trace, probes)
    with torch.enable_grad():
        g, x = _with_grad(energy, x)
        return Estimator(trace, probes, series_terms).logdet_step(g, x, step_size)[0].detach()

