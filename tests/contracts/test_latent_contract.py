"""The latent contract, run over every name in ``lightning_ebm.latents.__all__``.

Every exported latent has factories in ``LATENTS`` (or is an interface in ``INTERFACES``); a new
export without one fails ``test_every_exported_latent_is_in_the_contract``. Each latent must
draw ``(n, *shape)`` in the requested dtype and device, reproducibly from a ``torch.Generator``
(and never from torch's global stream when one is given), reject a bad ``n`` with the library's
message, and either match its float64 closed-form log-density or say it has none. Persistent
latents also keep the ``PersistentLatent`` promises the module's run state relies on.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lightning_ebm import latents
from lightning_ebm._checks import ArgumentError
from lightning_ebm.latents import Gaussian, Latent, PersistentLatent, ReplayBuffer, Uniform, Upsampled

LATENTS = {
    "Uniform": [lambda: Uniform((2,), low=-2.0, high=3.0), lambda: Uniform((1, 3, 3))],
    "Gaussian": [lambda: Gaussian((3,), mean=1.0, std=0.5), lambda: Gaussian((2, 2))],
    "Upsampled": [lambda: Upsampled(Uniform((1, 3, 3)), size=(6, 5)),
                  lambda: Upsampled(Gaussian((2, 2, 2)), size=(4, 4), mode="nearest")],
    "ReplayBuffer": [lambda: ReplayBuffer(Gaussian((2,)), capacity=32, reinit_prob=0.25),
                     lambda: ReplayBuffer(Upsampled(Uniform((1, 2, 2)), size=(4, 4)), capacity=8),
                     lambda: ReplayBuffer(Uniform((1, 2, 2), low=-1.0, high=1.0), capacity=16, reinit_prob=0.0)],
}
#: exported interfaces: no instances, every method a subclass must define raises NotImplementedError
INTERFACES = {"Latent", "PersistentLatent"}

CASES = [(name, i) for name, builds in LATENTS.items() for i in range(len(builds))]


def _log_prob_float64(latent: Latent, z: torch.Tensor) -> torch.Tensor:
    """The closed form, by hand in float64 (independent of the classes' own code)."""
    flat = z.double().flatten(1)
    d = flat.shape[1]
    if isinstance(latent, Uniform):
        inside = ((flat >= latent.low) & (flat <= latent.high)).all(1)
        value = -d * math.log(latent.high - latent.low)
        return torch.where(inside, torch.full((flat.shape[0],), value, dtype=torch.float64),
                           torch.full((flat.shape[0],), -math.inf, dtype=torch.float64))
    if isinstance(latent, Gaussian):
        u = (flat - latent.mean) / latent.std
        return (-0.5 * u.pow(2) - math.log(latent.std) - 0.5 * math.log(2 * math.pi)).sum(1)
    raise AssertionError(f"no closed form written for {type(latent).__name__}: add one here")


@pytest.fixture(params=CASES, ids=[f"{n}-{i}" for n, i in CASES])
def latent(request) -> Latent:
    name, i = request.param
    return LATENTS[name][i]()


def test_every_exported_latent_is_in_the_contract():
    exported = set(latents.__all__)
    assert exported == set(LATENTS) | INTERFACES, (
        f"latents without a contract fixture: {sorted(exported - set(LATENTS) - INTERFACES)}; "
        f"fixtures for names not exported: {sorted(set(LATENTS) | INTERFACES - exported)}")
    for name in LATENTS:
        assert all(type(build()) is getattr(latents, name) for build in LATENTS[name]), name


def test_interfaces_define_nothing_concrete():
    with pytest.raises(NotImplementedError):
        Latent().sample(2)
    persistent = PersistentLatent()
    for call in (lambda: persistent.base, lambda: persistent.draw(2), lambda: persistent.push(None, None),
                 lambda: persistent.prepare(2), persistent.rank_state, lambda: persistent.extra_state_for(None),
                 persistent.without_chains):
        with pytest.raises(NotImplementedError):
            call()
    assert not PersistentLatent.has_density


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_and_device(latent, dtype):
    z = latent.sample(5, generator=torch.Generator().manual_seed(0), dtype=dtype, device="cpu")
    assert z.shape == (5, *latent.shape) and z.dtype == dtype and z.device.type == "cpu"
    assert torch.isfinite(z).all()
    assert latent.sample(3).dtype == torch.get_default_dtype()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_follows_a_cuda_device(latent):
    z = latent.sample(4, generator=torch.Generator(device="cuda").manual_seed(0), device="cuda")
    assert z.device.type == "cuda" and z.shape == (4, *latent.shape)


def test_draws_are_reproducible_from_the_generator_alone(latent):
    state = torch.get_rng_state()
    a = latent.sample(8, generator=torch.Generator().manual_seed(1))
    b = latent.sample(8, generator=torch.Generator().manual_seed(1))
    c = latent.sample(8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)  # torch's global stream untouched


@pytest.mark.parametrize("n", [0, -1, 2.0, True, "3"])
def test_a_bad_n_gets_the_librarys_message(latent, n):
    with pytest.raises(ArgumentError, match=r"n \(the number of samples\) must be a positive integer"):
        latent.sample(n)


def test_log_prob_is_the_float64_closed_form_or_refused(latent):
    z = latent.sample(64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    if not latent.has_density:
        with pytest.raises(ValueError, match="no density"):
            latent.log_prob(z)
        return
    outside = z + 100.0  # outside a uniform's box; far in a Gaussian's tail
    for points in (z, outside):
        got = latent.log_prob(points)
        assert got.shape == (points.shape[0],)
        torch.testing.assert_close(got.double(), _log_prob_float64(latent, points), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"got z of shape"):
        latent.log_prob(torch.zeros(2, 7))


# ------------------------------------------------------------------ persistent latents
@pytest.fixture(params=[c for c in CASES if issubclass(getattr(latents, c[0]), PersistentLatent)],
                ids=lambda c: f"{c[0]}-{c[1]}")
def persistent(request) -> PersistentLatent:
    name, i = request.param
    return LATENTS[name][i]()


def test_draw_and_push_take_the_chains_back(persistent):
    g = torch.Generator().manual_seed(0)
    z, slots = persistent.draw(6, generator=g)
    assert z.shape == (6, *persistent.shape) and slots.shape[0] == 6
    end = torch.full_like(z, 7.0)
    persistent.push(end, slots)
    chains = persistent.rank_state()
    assert chains is not None and (chains == 7.0).flatten(1).all(1).sum() == 6


def test_draws_are_reproducible(persistent):
    twin = copy.deepcopy(persistent.without_chains())
    a, sa = persistent.draw(5, generator=torch.Generator().manual_seed(4))
    b, sb = twin.draw(5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and torch.equal(sa, sb)


def test_chains_travel_in_state_dict_and_per_rank(persistent):
    persistent.draw(4, generator=torch.Generator().manual_seed(0))
    chains = persistent.rank_state().clone()
    stripped = persistent.without_chains()
    assert stripped.rank_state() is None and torch.equal(persistent.rank_state(), chains)  # the original keeps its
    # the module's state_dict carries the chains ...
    restored = copy.deepcopy(stripped)
    restored.load_state_dict(persistent.state_dict())
    assert torch.equal(restored.rank_state(), chains)
    # ... and what a DDP checkpoint puts there for one rank restores exactly that rank's chains
    other_rank = torch.randn_like(chains)
    restored.load_state_dict({**persistent.state_dict(), "_extra_state": persistent.extra_state_for(other_rank)})
    assert torch.equal(restored.rank_state(), other_rank)


def test_base_is_a_fresh_noise_latent_of_the_same_shape(persistent):
    base = persistent.base
    assert isinstance(base, Latent) and not isinstance(base, PersistentLatent) and base.shape == persistent.shape
    before = persistent.rank_state()
    persistent.sample(3, generator=torch.Generator().manual_seed(0))  # evaluation never writes
    assert persistent.rank_state() is before


@pytest.mark.parametrize("n", [1, 10**6])
def test_prepare_refuses_exactly_what_draw_would(persistent, n):
    def outcome(call):
        try:
            call()
        except ValueError as err:
            return str(err)
        return None

    prepared = outcome(lambda: persistent.prepare(n))
    drawn = outcome(lambda: persistent.draw(n))
    assert (prepared is None) == (drawn is None), (prepared, drawn)
