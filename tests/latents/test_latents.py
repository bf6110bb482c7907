"""Latents against torch.distributions, and the replay buffer's bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_ebm._checks import ArgumentError
from lightning_ebm.latents import Gaussian, ReplayBuffer, Uniform, Upsampled


def test_uniform_sample_range_and_log_prob():
    latent = Uniform(shape=(3, 2), low=-2.0, high=3.0)
    z = latent.sample(1000, generator=torch.Generator().manual_seed(0))
    assert z.shape == (1000, 3, 2) and z.min() >= -2.0 and z.max() <= 3.0
    assert abs(z.mean().item() - 0.5) < 0.1
    reference = torch.distributions.Uniform(-2.0, 3.0).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(latent.log_prob(z), reference)
    outside = z.clone()
    outside[0, 0, 0] = 3.5
    assert latent.log_prob(outside)[0] == -math.inf and torch.isfinite(latent.log_prob(outside)[1:]).all()


def test_gaussian_moments_and_log_prob():
    latent = Gaussian(shape=(4,), mean=1.0, std=0.5)
    z = latent.sample(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert z.dtype == torch.float64
    assert abs(z.mean().item() - 1.0) < 0.02 and abs(z.std().item() - 0.5) < 0.02
    reference = torch.distributions.Normal(1.0, 0.5).log_prob(z).sum(1)
    torch.testing.assert_close(latent.log_prob(z), reference)


@pytest.mark.parametrize("latent", [Uniform((2,)), Gaussian((2,))])
def test_generator_makes_draws_reproducible(latent):
    a = latent.sample(5, generator=torch.Generator().manual_seed(1))
    b = latent.sample(5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert latent.has_density


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: Uniform(shape=(2,), low=1.0, high=1.0), "low < high"),
        (lambda: Uniform(shape=(0,)), "shape must be a non-empty sequence of positive integers"),
        (lambda: Uniform(shape=()), "shape"),
        (lambda: Gaussian(shape=(2,), std=0.0), "std must be a positive finite number, got 0.0"),
        (lambda: ReplayBuffer(Uniform((2,)), capacity=0), "capacity must be a positive integer, got 0"),
        (lambda: ReplayBuffer(Uniform((2,)), reinit_prob=1.5),
         "reinit_prob must be a finite number with 0.0 <= x <= 1.0, got 1.5"),
        (lambda: ReplayBuffer(ReplayBuffer(Uniform((2,)))), "non-buffer Latent"),
    ],
)
def test_bad_arguments_are_named(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_sample_checks_n_and_shape():
    with pytest.raises(ValueError, match="positive integer"):
        Uniform((2,)).sample(0)
    with pytest.raises(ValueError, match=r"shape=\(2,\).*\(4, 3\)"):
        Gaussian((2,)).log_prob(torch.zeros(4, 3))


def test_replay_buffer_draw_and_push_round_trip():
    buffer = ReplayBuffer(Uniform((2,), low=-1, high=1), capacity=100, reinit_prob=0.0)
    g = torch.Generator().manual_seed(0)
    z, idx = buffer.draw(10, generator=g)
    assert z.shape == (10, 2) and idx.shape == (10,) and len(set(idx.tolist())) == 10
    torch.testing.assert_close(z, buffer.buffer[idx])  # reinit_prob 0: all from the buffer
    buffer.push(torch.full((10, 2), 7.0), idx)
    assert (buffer.buffer[idx] == 7.0).all() and (buffer.buffer == 7.0).sum() == 20


def test_replay_buffer_reinitialises_the_requested_fraction():
    buffer = ReplayBuffer(Uniform((1,), low=-1, high=1), capacity=5000, reinit_prob=0.3)
    g = torch.Generator().manual_seed(0)
    buffer.draw(1, generator=g)
    buffer.buffer.fill_(10.0)  # anything still 10 came from the buffer
    z, _ = buffer.draw(4000, generator=g)
    fresh = (z != 10.0).float().mean().item()
    assert abs(fresh - 0.3) < 0.03
    all_fresh = ReplayBuffer(Uniform((1,)), capacity=50, reinit_prob=1.0)
    all_fresh.draw(1, generator=g)
    all_fresh.buffer.fill_(10.0)
    assert (all_fresh.draw(50, generator=g)[0] != 10.0).all()


def test_replay_buffer_state_dict_round_trip_and_capacity_errors():
    buffer = ReplayBuffer(Gaussian((3,)), capacity=20)
    buffer.draw(5, generator=torch.Generator().manual_seed(0))
    state = buffer.state_dict()
    restored = ReplayBuffer(Gaussian((3,)), capacity=20)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.buffer, buffer.buffer)
    with pytest.raises(ValueError, match=r"capacity=20 is smaller than the number of chains drawn per step \(32\)"):
        buffer.draw(32)
    small = ReplayBuffer(Gaussian((3,)), capacity=10)
    with pytest.raises(ValueError, match=r"shape \(20, 3\), expected \(10, 3\)"):
        small.load_state_dict(state)
    with pytest.raises(ValueError, match="no density"):
        buffer.log_prob(torch.zeros(2, 3))
    assert not buffer.has_density


def test_replay_buffer_follows_dtype_moves():
    buffer = ReplayBuffer(Uniform((2,)), capacity=8)
    buffer.draw(4)
    buffer.double()
    assert buffer.buffer.dtype == torch.float64


def test_replay_buffer_sample_serves_any_number_without_writing():
    buffer = ReplayBuffer(Uniform((2,)), capacity=8, reinit_prob=0.0)
    g = torch.Generator().manual_seed(0)
    fresh = buffer.sample(3, generator=g, dtype=torch.float64)  # before training: the wrapped latent's
    assert buffer.buffer is None and fresh.dtype == torch.float64 and fresh.shape == (3, 2)
    assert ((fresh >= -1) & (fresh <= 1)).all()
    buffer.draw(8, generator=g)
    z = buffer.sample(100, generator=g)  # more than the capacity: evaluation draws with replacement
    assert z.shape == (100, 2)
    before = buffer.buffer.clone()
    assert all(any(torch.equal(row, slot) for slot in before) for row in z)
    buffer.sample(5, generator=g)
    torch.testing.assert_close(buffer.buffer, before)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: ReplayBuffer(Uniform((2,)), capacity=True),
         r"ReplayBuffer: capacity must be a positive integer, got True"),
        (lambda: Uniform((2,), low="a"), r"Uniform: low must be a finite number, got 'a'"),
        (lambda: Uniform((2,), high=float("nan")), r"Uniform: high must be a finite number, got nan"),
        (lambda: Gaussian("ab"), r"Gaussian: shape must be a non-empty sequence of positive integers, got 'ab'"),
        (lambda: Gaussian((2,), mean=None), r"Gaussian: mean must be a finite number, got None"),
        (lambda: ReplayBuffer("noise"), r"ReplayBuffer: latent must be a Uniform, Gaussian or other non-buffer "
                                        r"Latent, got str 'noise'"),
        (lambda: Uniform((2,)).sample(True), r"Uniform.sample: n \(the number of samples\) must be a positive "
                                             r"integer, got True"),
    ],
)
def test_wrong_types_get_the_librarys_message_not_pythons(build, match):
    with pytest.raises(ArgumentError, match=match):
        build()


def test_upsampled_is_the_coarse_draw_interpolated():
    """Same stream as the coarse latent; bilinear values checked against a by-hand float64 interpolation."""
    coarse = Uniform((1, 2, 2), low=-1.0, high=1.0)
    latent = Upsampled(coarse, size=(4, 4))
    z = latent.sample(3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = coarse.sample(3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert z.shape == (3, 1, 4, 4) and latent.shape == (1, 4, 4) and not latent.has_density
    # half-pixel centres (align_corners=False): output i of 4 reads input (i + 0.5) / 2 - 0.5, clamped to [0, 1]
    w = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(z, torch.einsum("ia,nab,jb->nij", w, c[:, 0], w).unsqueeze(1))
    assert z.min() >= -1.0 and z.max() <= 1.0  # a convex combination stays in the coarse range
    nearest = Upsampled(coarse, size=(4, 4), mode="nearest").sample(3, generator=torch.Generator().manual_seed(0))
    c32 = coarse.sample(3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(nearest, c32.repeat_interleave(2, 2).repeat_interleave(2, 3))
    with pytest.raises(ValueError, match="Upsampled has no density"):
        latent.log_prob(z)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: Upsampled(Uniform((7, 7)), size=(28, 28)), "latent must be a non-buffer Latent of shape"),
        (lambda: Upsampled(ReplayBuffer(Uniform((1, 7, 7))), size=(28, 28)), "non-buffer Latent"),
        (lambda: Upsampled(Uniform((1, 7, 7)), size=(28,)), r"size must be \(height, width\)"),
        (lambda: Upsampled(Uniform((1, 7, 7)), size=(28, 28), mode="linear"), "mode must be one of"),
        (lambda: Upsampled("noise", size=(28, 28)), "latent must be a Uniform, Gaussian"),
    ],
)
def test_upsampled_bad_arguments_are_named(build, match):
    with pytest.raises(ArgumentError, match=match):
        build()
