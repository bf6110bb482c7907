"""Class-conditional energies, conditional sampling, per-class chains, and their bad-input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_ebm import EBM
from lightning_ebm.energies import ClassifierEnergy, ConditionedEnergy, ConvEnergy, MLPEnergy, ResNetEnergy
from lightning_ebm.latents import ReplayBuffer, Uniform
from lightning_ebm.samplers import GradientDescent, Langevin


class GaussianClasses(nn.Module):
    """Logits of C isotropic Gaussians N(mu_c, s^2 I) with equal priors: f(x)[c] = -|x - mu_c|^2 / (2 s^2).

    E(x, c) is a quadratic whose gradient-descent flow has a closed form, and E(x) is the mixture's
    negative log-density up to a constant: references no library code computes.
    """

    def __init__(self, means: torch.Tensor, s: float) -> None:
        super().__init__()
        self.means, self.s = nn.Parameter(means.clone()), s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(x, self.means).pow(2) / (2 * self.s**2)


MEANS = torch.tensor([[2.0, 0.0], [-2.0, 1.0], [0.0, -3.0]], dtype=torch.float64)


def gaussian_energy(s: float = 1.0) -> ClassifierEnergy:
    return ClassifierEnergy(GaussianClasses(MEANS, s), 3).double()


def test_classifier_energy_is_minus_logit_and_minus_logsumexp():
    energy = gaussian_energy(0.7)
    x = torch.randn(5, 2, dtype=torch.float64)
    sq = ((x[:, None, :] - MEANS) ** 2).sum(-1)
    torch.testing.assert_close(energy(x, y=torch.tensor([0, 1, 2, 0, 1])),
                               sq[torch.arange(5), [0, 1, 2, 0, 1]] / (2 * 0.49))
    torch.testing.assert_close(energy(x), -torch.logsumexp(-sq / (2 * 0.49), 1))
    torch.testing.assert_close(energy(x, y=2), sq[:, 2] / (2 * 0.49))
    torch.testing.assert_close(energy.logits(x).softmax(1), torch.softmax(-sq / (2 * 0.49), 1))


@pytest.mark.parametrize("backbone", [
    lambda: MLPEnergy(dim=64, hidden=8, num_layers=1, num_outputs=4),
    lambda: ConvEnergy(in_channels=1, width=4, image_size=8, num_outputs=4),
    lambda: ResNetEnergy(in_channels=1, width=4, num_blocks=1, num_outputs=4),
])
def test_library_energies_are_backbones_with_num_outputs(backbone):
    energy = ClassifierEnergy(backbone(), 4)
    x = torch.randn(3, 1, 8, 8)
    assert energy.logits(x).shape == (3, 4) and energy(x).shape == (3,)
    assert energy(x, y=torch.tensor([0, 3, 1])).shape == (3,)


def test_a_feature_network_gets_a_linear_head_and_wrong_widths_are_named():
    energy = ClassifierEnergy(nn.Sequential(nn.Flatten(), nn.Linear(4, 6)), 3, feature_dim=6)
    assert energy.logits(torch.randn(2, 4)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"maps \(2, 4\) to \(2, 6\), expected \(2, 3\)"):
        ClassifierEnergy(nn.Linear(4, 6), 3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="y must be an int or an integer tensor of shape"):
        energy(torch.randn(2, 4), y=torch.tensor([0.0, 1.0]))


def test_num_outputs_default_keeps_the_networks_parameter_for_parameter():
    torch.manual_seed(0)
    a = ConvEnergy(in_channels=1, width=4, image_size=8)
    torch.manual_seed(0)
    b = ConvEnergy(in_channels=1, width=4, image_size=8, num_outputs=1)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_conditional_gradient_descent_follows_the_closed_form_flow():
    """x_{k+1} = x_k - h (x_k - mu_c) / s^2, so x_K - mu_c = (1 - h / s^2)^K (x_0 - mu_c)."""
    s, h, steps = 1.0, 0.1, 25
    model = EBM(energy=gaussian_energy(s), sampler=GradientDescent(steps=steps, step_size=h),
                latent=Uniform((2,), low=-4.0, high=4.0)).double()
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    z = torch.rand(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 8 - 4
    x = model.generate(6, z=z, y=y)
    torch.testing.assert_close(x - MEANS[y], (1 - h / s**2) ** steps * (z - MEANS[y]))
    # an int asks for one class; batch_size chunks keep each sample's class
    torch.testing.assert_close(model.generate(6, z=z, y=1, batch_size=4),
                               MEANS[1] + (1 - h / s**2) ** steps * (z - MEANS[1]))
    torch.testing.assert_close(model.generate(6, z=z, y=y, batch_size=4), x)
    for one in (torch.tensor(1), np.int64(1)):  # a 0-dim tensor and a NumPy integer mean the int
        torch.testing.assert_close(model.generate(6, z=z, y=one), model.generate(6, z=z, y=1))


def test_conditional_langevin_samples_each_class_gaussian():
    """Langevin on E(x, c) = |x - mu_c|^2 / 2 (s = 1) is an AR(1) whose law is Gaussian: mean and variance
    after K steps in closed form."""
    h, noise, steps = 0.1, math.sqrt(0.2), 60
    model = EBM(energy=gaussian_energy(1.0), sampler=Langevin(steps=steps, step_size=h, noise_std=noise),
                latent=Uniform((2,), low=-1.0, high=1.0)).double()
    a = 1 - h
    var = a ** (2 * steps) / 3 + noise**2 * (1 - a ** (2 * steps)) / (1 - a**2)  # Uniform(-1, 1) has variance 1/3
    g = torch.Generator().manual_seed(0)
    for c in range(3):
        x = model.generate(4000, y=c, generator=g)
        mean = MEANS[c] * (1 - a**steps)
        torch.testing.assert_close(x.mean(0), mean, atol=4 * math.sqrt(var / 4000), rtol=0)
        torch.testing.assert_close(x.var(0), torch.full((2,), var, dtype=torch.float64), atol=0.08 * var, rtol=0)


def test_replay_buffer_keeps_chains_per_class():
    buf = ReplayBuffer(Uniform((2,)), capacity=30, reinit_prob=0.0, num_classes=3)
    z, slots = buf.draw(12, y=torch.tensor([0, 1, 2] * 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(slots // 10, torch.tensor([0, 1, 2] * 4))
    buf.push(torch.full((12, 2), 7.0), slots)
    z = buf.sample(50, y=torch.full((50,), 1))
    assert (buf.buffer[10:20] == 7.0).all(1).sum() >= 1  # class 1's pushed chains sit in its own block
    block = buf.buffer[10:20]  # evaluation draws of class 1 come from that block only
    assert all(any(torch.equal(row, b) for b in block) for row in z)
    assert not all(any(torch.equal(row, b) for b in buf.buffer[:10]) for row in z)
    with pytest.raises(ValueError, match="chains per class; build it with num_classes"):
        ReplayBuffer(Uniform((2,)), capacity=8).draw(2, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels in \[0, 5\].*num_classes=3"):
        buf.draw(2, y=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="capacity=2 gives no slot"):
        ReplayBuffer(Uniform((2,)), capacity=2, num_classes=3)


def test_generate_bad_inputs_are_named():
    model = EBM(energy=gaussian_energy(), sampler=GradientDescent(steps=2, step_size=0.1),
                latent=Uniform((2,))).double()
    with pytest.raises(ValueError, match=r"y must be an integer tensor of shape \(4,\)"):
        model.generate(4, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"y must be an integer tensor of shape \(4,\)"):
        model.generate(4, y=torch.zeros(4))
    with pytest.raises(ValueError, match=r"labels in \[3, 3\].*num_classes=3: labels must be in \[0, 2\]"):
        model.generate(4, y=3)
    plain = EBM(energy=MLPEnergy(dim=2), sampler=GradientDescent(steps=2, step_size=0.1), latent=Uniform((2,)))
    with pytest.raises(ValueError, match="the energy MLPEnergy is not class-conditional"):
        plain.generate(4, y=1)
    with pytest.raises(ValueError, match="needs a class-conditional energy.*MLPEnergy has no num_classes"):
        ConditionedEnergy(MLPEnergy(dim=2), 1)
    with pytest.raises(ValueError, match="EBM.logits needs a classifier energy"):
        plain.classify(torch.randn(3, 2))
    assert torch.equal(model.classify(MEANS + 0.1), torch.arange(3))
