"""A persistent latent written only here (no edit of the module or the run state) trains, checkpoints
and resumes through ``EBM``: the ``PersistentLatent`` interface is all the module needs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from module_helpers import make_trainer, tiny_data
from torch import Tensor

from lightning_ebm import EBM
from lightning_ebm.energies import MLPEnergy
from lightning_ebm.latents import Gaussian, Latent, PersistentLatent
from lightning_ebm.samplers import GradientDescent


class FixedChains(PersistentLatent):
    """``size`` chains, all drawn every step (``n`` must equal ``size``), never re-initialised."""

    def __init__(self, latent: Latent, size: int) -> None:
        super().__init__()
        self.noise, self.size, self.shape = latent, size, latent.shape
        self.chains: Tensor | None = None
        self.pushes = 0

    @property
    def base(self) -> Latent:
        return self.noise

    def draw(self, n, *, generator=None, device=None, dtype=None):
        self.prepare(n)
        if self.chains is None:
            self.chains = self.noise.sample(self.size, generator=generator, device=device, dtype=dtype)
        return self.chains.clone(), torch.arange(self.size)

    def push(self, x: Tensor, slots: Tensor) -> None:
        self.chains[slots] = x.detach()
        self.pushes += 1

    def sample(self, n, *, generator=None, device=None, dtype=None) -> Tensor:
        return self.noise.sample(n, generator=generator, device=device, dtype=dtype)

    def prepare(self, batch_size: int | None) -> None:
        if batch_size is not None and batch_size != self.size:
            raise ValueError(f"FixedChains: draws exactly {self.size} chains, not {batch_size}")

    def rank_state(self) -> Tensor | None:
        return self.chains

    def extra_state_for(self, chains: Tensor) -> Any:
        return {"chains": chains}

    def without_chains(self) -> FixedChains:
        return FixedChains(self.noise, self.size)

    def get_extra_state(self) -> Any:
        return {"chains": self.chains}

    def set_extra_state(self, state: Any) -> None:
        self.chains = state["chains"]


def make(size: int = 32) -> EBM:
    torch.manual_seed(0)
    return EBM(MLPEnergy(dim=2, hidden=16, num_layers=2), GradientDescent(steps=3, step_size=0.05),
               FixedChains(Gaussian((2,)), size), rng_seed=1)


def test_a_new_persistent_latent_trains_checkpoints_and_resumes_through_the_module(tmp_path):
    model = make()
    trainer = make_trainer(tmp_path, max_steps=3, val_check_interval=None, limit_val_batches=0)
    trainer.fit(model, tiny_data())
    assert model.latent.pushes == 3  # the module gave the chains back after every step
    ckpt = tmp_path / "fixed.ckpt"
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, weights_only=False)
    stored = raw["hyper_parameters"]["latent"]  # a plain config (or, if not describable, the stripped copy)
    if isinstance(stored, dict):
        assert stored["class_path"].endswith("FixedChains") and "chains" not in repr(stored["init_args"])
    else:
        assert stored.chains is None  # stripped through without_chains
    loaded = EBM.load_from_checkpoint(ckpt)
    assert torch.equal(loaded.latent.chains, model.latent.chains)
    # resuming continues the run: 3 + 3 steps equal 6 in one go
    straight = make()
    make_trainer(tmp_path / "straight", max_steps=6, val_check_interval=None, limit_val_batches=0).fit(
        straight, tiny_data())
    resumed = make()
    make_trainer(tmp_path / "resumed", max_steps=6, val_check_interval=None, limit_val_batches=0).fit(
        resumed, tiny_data(), ckpt_path=ckpt, weights_only=False)
    assert torch.equal(resumed.latent.chains, straight.latent.chains)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        if isinstance(a, Tensor):
            assert torch.equal(a, b), name


def test_the_module_asks_the_latent_to_prepare(tmp_path):
    with pytest.raises(ValueError, match=r"FixedChains: draws exactly 16 chains, not 32"):
        make_trainer(tmp_path).fit(make(size=16), tiny_data())
