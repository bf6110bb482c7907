"""Score matching and NCE against closed forms: Gaussian data, a quadratic energy with a constant.

``E(x) = 0.5 (x - m)^T P (x - m) + c`` on ``N(mu, Sigma)`` data has known optima: denoising score
matching at noise ``sigma`` gives ``P = (Sigma + sigma^2 I)^-1``, ``m = mu``; exact and sliced score
matching give ``P = Sigma^-1``; NCE gives those and ``c = log Z`` of the normalised Gaussian,
``c = (d/2) log(2 pi) - 0.5 log det P``. Each is minimised here to convergence (L-BFGS on one fixed
draw of the data and of every random number the objective uses), so what remains is the sampling
error of ``N`` data points: the relative error of a covariance entry estimated from ``N`` Gaussian
samples has standard deviation about ``sqrt(2 / N)`` (0.7 % for ``N = 40000``); the tolerances
below are about 5 of those.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_ebm.energies import MLPEnergy
from lightning_ebm.latents import Gaussian, ReplayBuffer, Uniform
from lightning_ebm.objectives import (
    DenoisingScoreMatching,
    ExactScoreMatching,
    MultiLevelDenoisingScoreMatching,
    NoiseContrastiveEstimation,
    SlicedScoreMatching,
    TrainingStep,
)
from lightning_ebm.samplers import GradientDescent

N = 40_000
MU = torch.tensor([0.7, -0.4], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=torch.float64)  # eigenvalues 0.29 and 1.51
REL = 5 * math.sqrt(2 / N)


class Quadratic(nn.Module):
    """``0.5 (x - m)^T P (x - m) + c`` with ``P = L L^T`` (L lower triangular, positive diagonal)."""

    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        self.raw = nn.Parameter(torch.zeros(dim, dim, dtype=torch.float64))
        self.m = nn.Parameter(torch.zeros(dim, dtype=torch.float64))
        self.c = nn.Parameter(torch.zeros((), dtype=torch.float64))

    @property
    def P(self) -> torch.Tensor:
        low = torch.tril(self.raw, -1) + torch.diag(torch.exp(torch.diagonal(self.raw)))
        return low @ low.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x - self.m
        return 0.5 * ((d @ self.P) * d).sum(1) + self.c


def gaussian_data(n: int = N, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return MU + torch.randn(n, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(SIGMA).T


def fit(objective, data: torch.Tensor, iters: int = 200) -> Quadratic:
    energy = Quadratic()
    sampler = GradientDescent(steps=1, step_size=0.1)
    latent = Uniform((2,), low=-3.0, high=3.0)
    params = list(energy.parameters())
    opt = torch.optim.LBFGS(params, lr=1, max_iter=iters, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        step = TrainingStep(energy, sampler, latent, torch.Generator().manual_seed(7), data, data.shape[0])
        loss, _ = objective(step)
        loss.backward()
        return loss

    opt.step(closure)
    return energy


def assert_matrix_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    scale = float(expected.abs().max())
    assert float((actual - expected).abs().max()) <= rel * scale, (actual, expected)


def test_denoising_score_matching_recovers_the_noised_precision():
    sigma = 0.5
    energy = fit(DenoisingScoreMatching(sigma), gaussian_data().repeat(2, 1))  # two noise draws per point
    expected = torch.linalg.inv(SIGMA + sigma**2 * torch.eye(2, dtype=torch.float64))
    assert_matrix_close(energy.P.detach(), expected, REL)
    torch.testing.assert_close(energy.m.detach(), MU, atol=5 * math.sqrt(float(SIGMA.max()) / N) * 2, rtol=0)


def test_multilevel_denoising_score_matching_with_one_level_is_the_single_level_loss():
    data = gaussian_data(500)
    step = lambda: TrainingStep(Quadratic(), GradientDescent(1, 0.1), Uniform((2,)),  # noqa: E731
                                torch.Generator().manual_seed(3), data, 500)
    multi = MultiLevelDenoisingScoreMatching(sigmas=[0.3])(step())[0].detach()
    # one level: the level index draws consume the stream first, so the noise differs; compare in law
    single = DenoisingScoreMatching(0.3)(step())[0].detach()
    assert abs(float(multi) - float(single)) < 0.1 * float(single)
    levels = MultiLevelDenoisingScoreMatching(sigma_min=0.01, sigma_max=1.0, num_levels=3).sigmas
    assert levels == pytest.approx([1.0, 0.1, 0.01])


def test_multilevel_dsm_optimum_is_the_mixture_of_noise_levels_for_a_quadratic():
    """With levels s_i drawn uniformly and sigma^2 weights, the quadratic optimum solves
    sum_i s_i^2 (P (Sigma + s_i^2 I) - I) = 0, i.e. P = (sum s_i^2 I)(sum s_i^2 (Sigma + s_i^2 I))^-1."""
    sigmas = [0.2, 0.8]
    energy = fit(MultiLevelDenoisingScoreMatching(sigmas=sigmas), gaussian_data().repeat(2, 1))
    eye = torch.eye(2, dtype=torch.float64)
    w = sum(s**2 for s in sigmas)
    expected = w * torch.linalg.inv(sum(s**2 * (SIGMA + s**2 * eye) for s in sigmas))
    assert_matrix_close(energy.P.detach(), expected, 2 * REL)  # level draws add their own sampling error


@pytest.mark.parametrize("objective", [ExactScoreMatching(), SlicedScoreMatching(num_projections=2),
                                       SlicedScoreMatching(projection="gaussian", variance_reduced=False)],
                         ids=["exact", "sliced-rademacher", "sliced-gaussian"])
def test_score_matching_recovers_the_precision_and_mean(objective):
    energy = fit(objective, gaussian_data())
    assert_matrix_close(energy.P.detach(), torch.linalg.inv(SIGMA), 1.5 * REL)
    torch.testing.assert_close(energy.m.detach(), MU, atol=0.03, rtol=0)


def test_exact_and_sliced_losses_agree_in_expectation():
    data = gaussian_data(2000)
    energy = Quadratic()
    with torch.no_grad():
        energy.raw.copy_(torch.tensor([[0.2, 0.0], [0.5, -0.1]]))
    make = lambda seed: TrainingStep(energy, GradientDescent(1, 0.1), Uniform((2,)),  # noqa: E731
                                     torch.Generator().manual_seed(seed), data, 2000)
    exact = ExactScoreMatching()(make(0))[0].detach()
    sliced = SlicedScoreMatching(num_projections=64, projection="gaussian")(make(0))[0].detach()
    # for a quadratic the Hessian is P everywhere: the sliced trace is v^T P v, exact in mean
    assert float(sliced) == pytest.approx(float(exact), rel=0.05)


def test_noise_contrastive_estimation_recovers_precision_mean_and_the_log_normaliser():
    noise = Gaussian((2,), mean=0.0, std=2.0)
    energy = fit(NoiseContrastiveEstimation(noise=noise, noise_ratio=2), gaussian_data(), iters=400)
    P = energy.P.detach()
    assert_matrix_close(P, torch.linalg.inv(SIGMA), 3 * REL)  # NCE is less efficient than ML: wider
    torch.testing.assert_close(energy.m.detach(), MU, atol=0.05, rtol=0)
    log_z = math.log(2 * math.pi) - 0.5 * float(torch.logdet(torch.linalg.inv(SIGMA)))
    assert float(energy.c) == pytest.approx(log_z, abs=0.05)


def test_fitted_noise_is_the_first_batch_mean_and_covariance_and_its_density_is_gaussian():
    data = gaussian_data(n=500, seed=3)
    objective = NoiseContrastiveEstimation(fit_noise=True, shrinkage=0.0)
    step = TrainingStep(Quadratic(), GradientDescent(1, 0.1), Uniform((2,)), torch.Generator(), data, 500)
    objective(step)
    state = objective.state_dict()
    torch.testing.assert_close(state["mean"], data.mean(0))
    torch.testing.assert_close(state["scale_tril"] @ state["scale_tril"].T, torch.cov(data.T))
    reference = torch.distributions.MultivariateNormal(data.mean(0), torch.cov(data.T))
    points = torch.randn(7, 2, dtype=torch.float64)
    torch.testing.assert_close(objective.noise.log_prob(points), reference.log_prob(points))
    draws = objective.noise.sample(200_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(torch.cov(draws.T), torch.cov(data.T), atol=0.02, rtol=0)  # ~5 SE of 200k draws
    # held fixed: a second, different batch does not refit it
    objective(TrainingStep(Quadratic(), GradientDescent(1, 0.1), Uniform((2,)), torch.Generator(), data + 5.0, 500))
    torch.testing.assert_close(objective.state_dict()["mean"], data.mean(0))


def test_noise_contrastive_estimation_with_fitted_noise_recovers_the_gaussian():
    energy = fit(NoiseContrastiveEstimation(fit_noise=True, noise_ratio=2), gaussian_data(), iters=400)
    assert_matrix_close(energy.P.detach(), torch.linalg.inv(SIGMA), 3 * REL)
    torch.testing.assert_close(energy.m.detach(), MU, atol=0.05, rtol=0)
    log_z = math.log(2 * math.pi) - 0.5 * float(torch.logdet(torch.linalg.inv(SIGMA)))
    assert float(energy.c) == pytest.approx(log_z, abs=0.05)


def test_fitted_noise_in_more_dimensions_than_samples_needs_shrinkage():
    data = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    step = TrainingStep(MLPEnergy(10).double(), GradientDescent(1, 0.1), Uniform((10,)), torch.Generator(), data, 4)
    loss, _ = NoiseContrastiveEstimation(fit_noise=True)(step)  # default shrinkage: positive definite
    assert math.isfinite(float(loss))
    with pytest.raises(ValueError, match="covariance is singular; raise shrinkage"):
        NoiseContrastiveEstimation(fit_noise=True, shrinkage=0.0)(step)


def test_fitted_noise_state_is_checked_on_load():
    with pytest.raises(ValueError, match="give either noise=Gaussian"):
        NoiseContrastiveEstimation(noise=Gaussian((2,)), fit_noise=True)
    with pytest.raises(ValueError, match="written with fitted noise"):
        NoiseContrastiveEstimation().load_state_dict({"mean": torch.zeros(2), "scale_tril": torch.eye(2)})
    with pytest.raises(ValueError, match="keeps no state"):
        DenoisingScoreMatching(0.1).load_state_dict({"x": torch.zeros(1)})


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"DenoisingScoreMatching: sigma must be a positive finite number, got -1"):
        DenoisingScoreMatching(-1)
    with pytest.raises(ValueError, match=r"sigmas\[1\] must be a positive finite number, got 0"):
        MultiLevelDenoisingScoreMatching(sigmas=[0.1, 0])
    with pytest.raises(ValueError, match="sigmas must be a non-empty list"):
        MultiLevelDenoisingScoreMatching(sigmas=[])
    with pytest.raises(ValueError, match="sigma_min must be <= sigma_max"):
        MultiLevelDenoisingScoreMatching(sigma_min=2.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="num_projections must be a positive integer, got True"):
        SlicedScoreMatching(num_projections=True)
    with pytest.raises(ValueError, match="projection must be one of 'rademacher', 'gaussian'"):
        SlicedScoreMatching(projection="normal")
    with pytest.raises(ValueError, match="noise must be a latent with a log_prob"):
        NoiseContrastiveEstimation(noise=ReplayBuffer(Uniform((2,))))
    narrow = NoiseContrastiveEstimation(noise=Uniform((2,), low=-0.1, high=0.1))
    data = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"has no density at \d+ of 8 data points \(outside its support\)"):
        narrow(TrainingStep(MLPEnergy(2), GradientDescent(1, 0.1), Uniform((2,)), torch.Generator(), data, 8))
    with pytest.raises(ValueError, match="max_dim=2"):
        data = torch.randn(4, 3)
        ExactScoreMatching(max_dim=2)(TrainingStep(MLPEnergy(3), GradientDescent(1, 0.1), Uniform((3,)),
                                                   torch.Generator(), data, 4))
