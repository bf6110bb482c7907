"""Convolutional energies: shapes at the usual image sizes, the paper's layout, input checks."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from lightning_ebm._checks import ArgumentError
from lightning_ebm.energies import ConvEnergy, MLPEnergy, ResNetEnergy, check_energy_output
from lightning_ebm.samplers import GradientDescent

SIZES = [(1, 8), (1, 28), (3, 32), (3, 64)]


@pytest.mark.parametrize(("channels", "size"), SIZES)
@pytest.mark.parametrize("spectral_norm", [False, True])
def test_conv_energy_maps_images_to_scalars(channels, size, spectral_norm):
    energy = ConvEnergy(in_channels=channels, width=4, image_size=size, spectral_norm=spectral_norm).eval()
    x = torch.randn(3, channels, size, size)
    e = energy(x)
    assert e.shape == (3,) and torch.isfinite(e).all()
    # per-sample: energies of a batch are the energies of its samples one by one
    torch.testing.assert_close(e, torch.cat([energy(x[i : i + 1]) for i in range(3)]))


def test_conv_energy_is_the_short_run_convnet_at_32x32():
    """3x3 conv to n, 4x4 stride-2 convs to 2n, 4n, 8n, LeakyReLU(0.2), a final 4x4 conv to 1."""
    net = ConvEnergy(in_channels=3, width=64, image_size=32).net
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    layout = [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs]
    assert layout == [
        (3, 64, (3, 3), (1, 1), (1, 1)),
        (64, 128, (4, 4), (2, 2), (1, 1)),
        (128, 256, (4, 4), (2, 2), (1, 1)),
        (256, 512, (4, 4), (2, 2), (1, 1)),
        (512, 1, (4, 4), (1, 1), (0, 0)),
    ]
    acts = [m for m in net if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == 4 and all(a.negative_slope == 0.2 for a in acts)


def test_conv_energy_final_kernel_covers_the_remaining_map():
    # 28 -> 14 -> 7: the last convolution is 7x7; 8 -> 4: one downsampling, then 4x4
    assert ConvEnergy(1, 4, 28).net[-1].kernel_size == (7, 7)
    assert [m.stride for m in ConvEnergy(1, 4, 8).net if isinstance(m, nn.Conv2d)] == [(1, 1), (2, 2), (1, 1)]


@pytest.mark.parametrize(("channels", "size"), SIZES)
def test_resnet_energy_maps_images_to_scalars(channels, size):
    energy = ResNetEnergy(in_channels=channels, width=4, num_blocks=2)
    e = energy(torch.randn(2, channels, size, size))
    assert e.shape == (2,) and torch.isfinite(e).all()


def test_spectral_norm_bounds_every_layer():
    """After power iterations every normalised weight matrix has largest singular value 1 (exact SVD)."""
    torch.manual_seed(0)
    energy = ResNetEnergy(in_channels=1, width=4, num_blocks=1, spectral_norm=True)
    x = torch.randn(2, 1, 8, 8)
    for _ in range(30):  # power iteration runs in training mode
        energy(x)
    energy.eval()
    layers = [m for m in energy.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers and all(hasattr(m, "parametrizations") for m in layers)
    for m in layers:
        w = m.weight.reshape(m.weight.shape[0], -1)
        assert float(torch.linalg.matrix_norm(w.detach(), ord=2)) == pytest.approx(1.0, abs=0.02)


def test_energies_work_under_the_samplers_and_need_matching_inputs():
    energy = ConvEnergy(in_channels=1, width=4, image_size=8, activation="silu")
    x = GradientDescent(steps=3, step_size=0.1)(energy, torch.rand(4, 1, 8, 8))
    assert x.shape == (4, 1, 8, 8) and all(p.grad is None for p in energy.parameters())
    with pytest.raises(
        ValueError, match=r"ConvEnergy expects images of shape \(B, 1, 8, 8\), got \(4, 1, 16, 16\)"
    ):
        energy(torch.rand(4, 1, 16, 16))
    with pytest.raises(ValueError, match="ResNetEnergy expects images"):
        ResNetEnergy(in_channels=3, width=4)(torch.rand(2, 1, 8, 8))
    x = torch.rand(4, 2)
    for out, fix in ((torch.zeros(4, 1), "Squeeze the last dimension"),
                     (torch.zeros(4, 3), "A network with 3 outputs is a classifier: wrap it in .*ClassifierEnergy"),
                     (torch.zeros(()), "Return one scalar energy per sample")):
        shape = re.escape(str(tuple(out.shape)))
        with pytest.raises(ValueError, match=rf"got input \(4, 2\) -> output {shape}\. {fix}"):
            check_energy_output(out, x)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 0}, "width must be a positive integer"),
        ({"image_size": 2}, "image_size must be"),
        ({"activation": "relu"}, "activation must be one of"),
    ],
)
def test_conv_energy_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConvEnergy(**{"in_channels": 1, "width": 4, "image_size": 8, **kwargs})


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: MLPEnergy(dim=True), r"MLPEnergy: dim must be a positive integer, got True"),
        (lambda: MLPEnergy(dim=2, hidden="64"), r"MLPEnergy: hidden must be a positive integer, got '64'"),
        (lambda: MLPEnergy(dim=2, spectral_norm=1), r"MLPEnergy: spectral_norm must be True or False, got 1"),
        (lambda: ConvEnergy(image_size=True), r"ConvEnergy: image_size must be an integer >= 4 or a pair"),
        (lambda: ConvEnergy(image_size=None), r"ConvEnergy: image_size must be an integer >= 4 or a pair"),
        (lambda: ResNetEnergy(num_blocks=0), r"ResNetEnergy: num_blocks must be a positive integer, got 0"),
        (lambda: ResNetEnergy(activation="gelu"), r"ResNetEnergy: activation must be one of 'leaky_relu', 'silu', "
                                                  r"got 'gelu'"),
    ],
)
def test_energies_reject_bools_and_wrong_types_with_the_librarys_message(build, match):
    with pytest.raises(ArgumentError, match=match):
        build()


def test_integral_floats_from_yaml_are_accepted_as_integers():
    energy = MLPEnergy(dim=2.0, hidden=8.0, num_layers=1.0)
    assert energy(torch.zeros(3, 2)).shape == (3,)
