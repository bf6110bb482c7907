"""The generator's density against closed forms: quadratic energies push Gaussians to Gaussians.

For ``E(x) = 1/2 (x - m)^T A (x - m)`` and ``z ~ N(mu0, sd^2 I)``:
gradient descent gives ``x_K = m + M (z - m)`` with ``M = (I - sA)^K``, the flow ``dx/dt = -A(x - m)``
gives ``M = expm(-A t_end)``; in both cases ``x_K ~ N(m + M (mu0 - m), sd^2 M M^T)``. References:
scipy's ``multivariate_normal`` and ``expm``, numpy's ``matrix_power``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.linalg import expm
from scipy.stats import gaussian_kde, multivariate_normal, norm
from torch import nn

from lightning_ebm import EBM
from lightning_ebm import density as dn
from lightning_ebm.energies import ConvEnergy, MLPEnergy
from lightning_ebm.latents import Gaussian, ReplayBuffer, Uniform, Upsampled
from lightning_ebm.samplers import ODE, GradientDescent, Langevin


class Quadratic(nn.Module):
    """``E(x) = 1/2 (x - m)^T A (x - m)``."""

    def __init__(self, a: torch.Tensor, m: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("m", m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x - self.m
        return 0.5 * ((d @ self.a) * d).sum(1)


def random_spd(dim: int, seed: int, low: float = 0.3, high: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.linspace(low, high, dim, dtype=torch.float64)) @ q.T


MU0, SD = 0.2, 1.5
STEPS, STEP_SIZE, T_END = 20, 0.1, 1.0


def make_case(dim: int, kind: str) -> tuple[EBM, multivariate_normal]:
    a = random_spd(dim, seed=dim)
    m = 0.5 * torch.randn(dim, generator=torch.Generator().manual_seed(100 + dim), dtype=torch.float64)
    if kind == "descent":
        sampler = GradientDescent(steps=STEPS, step_size=STEP_SIZE)
        mat = np.linalg.matrix_power(np.eye(dim) - STEP_SIZE * a.numpy(), STEPS)
    else:
        sampler = ODE(t_end=T_END, method="dopri5", rtol=1e-10, atol=1e-10)
        mat = expm(-T_END * a.numpy())
    model = EBM(Quadratic(a, m), sampler, Gaussian((dim,), mean=MU0, std=SD)).double()
    mean = m.numpy() + mat @ (MU0 * np.ones(dim) - m.numpy())
    return model, multivariate_normal(mean, SD**2 * mat @ mat.T)


@pytest.mark.parametrize("kind", ["descent", "ode"])
@pytest.mark.parametrize("dim", [2, 10])
def test_generate_and_inverse_match_gaussian_pushforward(dim, kind):
    model, ref = make_case(dim, kind)
    x, log_q = model.generate(128, return_log_prob=True, trace="exact",
                              generator=torch.Generator().manual_seed(1))
    assert x.dtype == log_q.dtype == torch.float64 and log_q.shape == (128,)
    np.testing.assert_allclose(log_q.numpy(), ref.logpdf(x.numpy()), rtol=0, atol=1e-4)
    # the samples themselves follow the closed form, and equal the plain sampler's
    z = model.latent.sample(128, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(x, model.generate(0, z=z), rtol=0, atol=0)  # the sampler's own output
    # density anywhere: fresh points from the reference law plus a few far out in its tails
    pts = torch.from_numpy(ref.rvs(size=96, random_state=2))
    pts = torch.cat([pts, pts[:8] + 3 * torch.from_numpy(np.sqrt(np.diag(ref.cov)))])
    np.testing.assert_allclose(model.generator_log_prob(pts, trace="exact").numpy(), ref.logpdf(pts.numpy()),
                               rtol=1e-8, atol=1e-4)
    # and generate / generator_log_prob agree on the generated points
    torch.testing.assert_close(model.generator_log_prob(x), log_q, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["descent", "ode"])
@pytest.mark.parametrize("dim", [2, 10])
def test_hutchinson_is_unbiased(dim, kind):
    model, ref = make_case(dim, kind)
    n = 3000
    z = torch.full((n, dim), 0.3, dtype=torch.float64)  # one point, n independent probe draws
    x, est = model.generate(0, z=z, return_log_prob=True, trace="hutchinson", series_terms=60,
                            generator=torch.Generator().manual_seed(3))
    exact = ref.logpdf(x[0].numpy())
    se = float(est.std()) / math.sqrt(n)
    assert se > 0  # the probes do vary: the estimator is random
    assert abs(float(est.mean()) - exact) < 3 * se + 1e-6
    # more probes per sample: still unbiased, and the spread shrinks like 1/sqrt(probes)
    _, est4 = model.generate(0, z=z[:1000], return_log_prob=True, trace="hutchinson", num_probes=4,
                             series_terms=60, generator=torch.Generator().manual_seed(4))
    assert abs(float(est4.mean()) - exact) < 3 * float(est4.std()) / math.sqrt(1000) + 1e-6
    assert 0.35 < float(est4.std()) / float(est.std()) < 0.65
    pts = torch.from_numpy(ref.rvs(size=1, random_state=5)).reshape(1, dim).expand(n, dim).contiguous()
    est_inv = model.generator_log_prob(pts, trace="hutchinson", series_terms=60,
                                       generator=torch.Generator().manual_seed(6))
    se_inv = float(est_inv.std()) / math.sqrt(n)
    assert abs(float(est_inv.mean()) - ref.logpdf(pts[0].numpy())) < 3 * se_inv + 1e-6


@pytest.mark.parametrize("sampler", [GradientDescent(8, 0.05), ODE(0.5, method="rk4", step_size=0.1),
                                     ODE(0.5, method="dopri5", rtol=1e-6, atol=1e-6),
                                     ODE(0.5, method="bosh3", rtol=1e-3, atol=1e-3)],
                         ids=["gd", "rk4", "dopri5", "bosh3"])
def test_generate_with_log_prob_returns_exactly_the_samplers_x(sampler):
    """The dynamics run through the sampler itself: the same x bit for bit (adaptive solvers too,
    whose error control sees x alone), and the same number of gradient evaluations."""
    torch.manual_seed(0)
    energy = MLPEnergy(2, hidden=16, num_layers=2).double()
    z = torch.randn(32, 2, dtype=torch.float64)
    plain = sampler(energy, z)
    nfe = sampler.last_nfe
    for trace in ("exact", "hutchinson"):
        x, log_q = dn.sample_with_log_prob(energy, sampler, Gaussian((2,)), z, trace=trace,
                                           generator=torch.Generator().manual_seed(0))
        assert torch.equal(x, plain) and torch.isfinite(log_q).all()
    if isinstance(sampler, GradientDescent):
        assert sampler.last_nfe == nfe  # it ran the sampler again, one call of K steps


def test_hutchinson_series_on_a_non_quadratic_energy():
    """Varying Hessian: Hutchinson's mean of each step's log-det matches the exact slogdet."""
    torch.manual_seed(0)
    energy = MLPEnergy(3, hidden=16, num_layers=2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    s = 0.2
    exact = dn.logdet_descent_step(energy, x, s, trace="exact")
    h = dn.hessian(energy, x)
    ref = torch.linalg.slogdet(torch.eye(3, dtype=torch.float64) - s * h)[1]
    torch.testing.assert_close(exact, ref)
    assert float((s * torch.linalg.eigvalsh(h).abs()).max()) < 0.5  # the series converges fast here
    n = 4000
    xs = x.repeat_interleave(n, 0)
    probes = dn.rademacher(1, xs, torch.Generator().manual_seed(0))
    est = dn.logdet_descent_step(energy, xs, s, trace="hutchinson", probes=probes, series_terms=30).view(5, n)
    se = est.std(1) / math.sqrt(n)
    assert ((est.mean(1) - exact).abs() < 3 * se + 1e-9).all()
    lap = dn.laplacian(energy, xs, trace="hutchinson", probes=probes).view(5, n)
    lap_exact = torch.diagonal(h, dim1=1, dim2=2).sum(1)
    torch.testing.assert_close(dn.laplacian(energy, x), lap_exact)
    assert ((lap.mean(1) - lap_exact).abs() < 3 * lap.std(1) / math.sqrt(n) + 1e-9).all()


def test_truncated_series_matches_its_closed_form():
    """``series_terms`` terms give ``-sum_j s^j tr(A^j)/j`` exactly in expectation (bias is the tail)."""
    a = random_spd(4, seed=7, low=0.5, high=4.0)
    energy = Quadratic(a, torch.zeros(4, dtype=torch.float64))
    s, terms, n = 0.2, 3, 20000
    lam = torch.linalg.eigvalsh(a)
    truncated = -sum(float((s * lam).pow(j).sum()) / j for j in range(1, terms + 1))
    exact = float(torch.log1p(-s * lam).sum())
    x = torch.zeros(n, 4, dtype=torch.float64)
    probes = dn.rademacher(1, x, torch.Generator().manual_seed(0))
    est = dn.logdet_descent_step(energy, x, s, trace="hutchinson", probes=probes, series_terms=terms)
    se = float(est.std()) / math.sqrt(n)
    assert abs(float(est.mean()) - truncated) < 3 * se
    assert abs(truncated - exact) > 10 * se  # the truncation bias is real and visible at 3 terms


def test_trace_default_by_dimension():
    assert dn.resolve_trace(None, 2) == "exact"
    assert dn.resolve_trace(None, dn.EXACT_TRACE_MAX_DIM) == "exact"
    assert dn.resolve_trace(None, dn.EXACT_TRACE_MAX_DIM + 1) == "hutchinson"
    with pytest.raises(ValueError, match="trace must be one of"):
        dn.resolve_trace("approx", 2)


def test_uniform_latent_outside_support_is_minus_inf():
    a = torch.eye(2, dtype=torch.float64)
    model = EBM(Quadratic(a, torch.zeros(2, dtype=torch.float64)), GradientDescent(5, 0.1),
                Uniform((2,), low=-1.0, high=1.0)).double()
    # x_K = 0.9^5 z: inside 0.9^5 * [-1, 1]^2 the density is 1/4 / 0.9^10, outside 0
    pts = torch.tensor([[0.1, -0.2], [0.7, 0.0]], dtype=torch.float64)
    log_q = model.generator_log_prob(pts)
    assert math.isclose(float(log_q[0]), -math.log(4) - 10 * math.log(0.9), abs_tol=1e-10)
    assert log_q[1] == -math.inf


def test_undefined_density_errors():
    energy = MLPEnergy(2, hidden=8, num_layers=1)
    with pytest.raises(ValueError, match="injects noise"):
        EBM(energy, Langevin(5, 0.1, noise_std=0.1), Gaussian((2,))).generate(4, return_log_prob=True)
    with pytest.raises(ValueError, match="ReplayBuffer.*earlier end points"):
        EBM(energy, GradientDescent(5, 0.1), ReplayBuffer(Gaussian((2,)), capacity=16)).generator_log_prob(
            torch.zeros(3, 2))
    conv = ConvEnergy(1, width=8)
    with pytest.raises(ValueError, match="Upsampled.*low-dimensional subspace"):  # its own reason, not the buffer's
        EBM(conv, GradientDescent(5, 0.1), Upsampled(Uniform((1, 4, 4)), (8, 8))).generate(2, return_log_prob=True)
    with pytest.raises(ValueError, match="clamp"):
        EBM(energy, GradientDescent(5, 0.1, clamp=(-1, 1)), Gaussian((2,))).generate(4, return_log_prob=True)
    with pytest.raises(ValueError, match="grad_clip"):
        EBM(energy, ODE(1.0, grad_clip=1.0), Gaussian((2,))).generator_log_prob(torch.zeros(3, 2))
    model = EBM(energy, GradientDescent(5, 0.1), Gaussian((2,)))
    with pytest.raises(ValueError, match="shape"):
        model.generator_log_prob(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="num_probes"):
        model.generator_log_prob(torch.zeros(3, 2), trace="hutchinson", num_probes=0)
    with pytest.raises(ValueError, match="cannot be combined"):
        model.generate(4, return_log_prob=True, return_trajectory=True)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        model.generator_log_prob(torch.zeros(3, 2))
    # noise-free Langevin is gradient descent: its density is defined and equal
    lang = EBM(energy, Langevin(5, 0.1, noise_std=0.0), Gaussian((2,)))
    pts = torch.randn(6, 2)
    torch.testing.assert_close(lang.generator_log_prob(pts), model.generator_log_prob(pts))


def test_non_invertible_step_names_the_step():
    # s * lambda = 2.5 > 1 on one axis: x -> (1 - 2.5) x expands, the fixed point iteration diverges
    a = torch.diag(torch.tensor([0.5, 25.0], dtype=torch.float64))
    energy = Quadratic(a, torch.zeros(2, dtype=torch.float64))
    model = EBM(energy, GradientDescent(3, 0.1), Gaussian((2,))).double()
    with pytest.raises(ValueError, match=r"step 3 of 3 is not invertible.*step_size \* Lip"):
        model.generator_log_prob(torch.randn(4, 2, dtype=torch.float64), max_iter=50)
    with pytest.warns(UserWarning, match="det\\(I - step_size \\* Hessian\\) <= 0"):
        model.generate(4, return_log_prob=True)


def test_density_keeps_parameter_grads_untouched_and_works_under_no_grad():
    model = EBM(MLPEnergy(2, hidden=8, num_layers=1), ODE(0.5, step_size=0.1), Gaussian((2,)))
    with torch.no_grad():
        x, log_q = model.generate(8, return_log_prob=True)
        log_q2 = model.generator_log_prob(x)
    assert all(p.grad is None for p in model.parameters())
    assert not log_q.requires_grad and not x.requires_grad
    torch.testing.assert_close(log_q2, log_q, atol=1e-4, rtol=0)


def test_bits_per_dim_closed_form():
    # a uniform density on [low, high]^D is exactly log2(levels) bits per dimension
    d = 3 * 8 * 8
    log_q = torch.full((5,), -d * math.log(2.0), dtype=torch.float64)
    torch.testing.assert_close(dn.bits_per_dim(log_q, d), torch.full((5,), 8.0, dtype=torch.float64))
    log_q01 = torch.zeros(2, dtype=torch.float64)  # uniform on [0, 1]^D, 32 levels
    torch.testing.assert_close(dn.bits_per_dim(log_q01, d, (0.0, 1.0), 32), torch.full((2,), 5.0,
                                                                                          dtype=torch.float64))
    with pytest.raises(ValueError, match="data_range"):
        dn.bits_per_dim(log_q, d, (1.0, -1.0))


# ---------------------------------------------------------------------------------------------- grids
def test_grid_quadrature_normalises_a_gaussian_energy():
    pts, area = dn.grid_2d((-7, 7, -6, 8), 280, dtype=torch.float64)
    energy = Quadratic(torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64),
                       torch.tensor([0.2, 1.0], dtype=torch.float64))
    log_p = dn.ebm_log_density(energy, pts, area)
    ref = multivariate_normal([0.2, 1.0], np.linalg.inv([[1.0, 0.3], [0.3, 0.5]]))
    np.testing.assert_allclose(log_p.numpy(), ref.logpdf(pts.numpy()), atol=1e-3)
    assert math.isclose(float(log_p.exp().sum() * area), 1.0, abs_tol=1e-9)


def test_kl_and_tv_on_grid_match_closed_forms():
    pts, area = dn.grid_2d((-8, 8, -8, 8), 320, dtype=torch.float64)
    p = multivariate_normal([0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]])
    q = multivariate_normal([1.0, -0.5], [[1.0, 0.0], [0.0, 1.0]])
    log_p, log_q = torch.from_numpy(p.logpdf(pts.numpy())), torch.from_numpy(q.logpdf(pts.numpy()))
    delta = math.hypot(1.0, 0.5)
    assert math.isclose(float(dn.kl_on_grid(log_p, log_q, area)), delta**2 / 2, abs_tol=1e-4)
    assert math.isclose(float(dn.tv_on_grid(log_p, log_q, area)), 2 * norm.cdf(delta / 2) - 1, abs_tol=1e-4)
    assert float(dn.kl_on_grid(log_p, log_p, area)) == pytest.approx(0.0, abs=1e-12)
    # q = 0 where p > 0: infinite; p = 0 where q > 0: finite (0 log 0 = 0)
    cut = torch.where(pts[:, 0] > 0, log_q, torch.full_like(log_q, -math.inf))
    assert float(dn.kl_on_grid(log_p, cut, area)) == math.inf
    assert math.isfinite(float(dn.kl_on_grid(cut, log_p, area)))


def test_grid_and_histogram():
    pts, area = dn.grid_2d((0.0, 2.0, -1.0, 1.0), 4)
    assert area == pytest.approx(0.25) and pts.shape == (16, 2)
    first = [[0.25, -0.75], [0.75, -0.75], [1.25, -0.75], [1.75, -0.75], [0.25, -0.25]]
    torch.testing.assert_close(pts[:5], torch.tensor(first))
    samples = torch.tensor([[0.1, -0.9], [0.2, -0.8], [1.9, 0.9], [5.0, 5.0]])  # the last one falls outside
    box = (0.0, 2.0, -1.0, 1.0)
    log_h = dn.histogram_lookup(dn.histogram_2d(samples, box, bins=4), pts, box)
    expected = torch.full((16,), -math.inf, dtype=torch.float64)
    expected[0], expected[15] = math.log(2 / 4 / 0.25), math.log(1 / 4 / 0.25)
    torch.testing.assert_close(log_h, expected)
    with pytest.raises(ValueError, match="bounds"):
        dn.grid_2d((1.0, 0.0, 0.0, 1.0), 10)


def test_kde_matches_scipy():
    samples = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    samples = samples @ torch.tensor([[1.0, 0.4], [0.0, 0.5]], dtype=torch.float64) + 1.0
    points = torch.randn(50, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    ref = gaussian_kde(samples.numpy().T).logpdf(points.numpy().T)
    np.testing.assert_allclose(dn.kde_log_density(samples, points, chunk=16).numpy(), ref, rtol=1e-10)


def test_log_partition_on_grid_is_the_gaussian_normaliser():
    """``E = 1/2 (x - m)^T A (x - m)``: ``log Z = log(2 pi) - 1/2 log det A`` in 2-D (grid to +-9 sd)."""
    a = random_spd(2, seed=3)
    energy = Quadratic(a, torch.tensor([0.3, -0.2], dtype=torch.float64))
    points, area = dn.grid_2d((-9.0, 9.0, -9.0, 9.0), 600, dtype=torch.float64)
    log_z = dn.log_partition_on_grid(energy, points, area)
    expected = math.log(2 * math.pi) - 0.5 * float(torch.logdet(a))
    assert abs(float(log_z) - expected) < 1e-6
    # consistent with ebm_log_density, which normalises by the same quadrature
    torch.testing.assert_close(dn.ebm_log_density(energy, points, area), -energy(points) - log_z)

