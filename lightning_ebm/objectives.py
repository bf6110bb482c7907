"""Training objectives: what one training step of an ``EBM`` minimises.

An objective is a small swappable piece, not a branch inside the training loop. ``EBM`` hands it
a ``TrainingStep`` (the module's energy, sampler, latent and random stream, and one checked data
batch) and logs what it returns: the loss and its named parts. A new objective is one class
here or in user code; ``module.py`` needs no edit. From YAML::

    model:
      init_args:
        objective:
          class_path: lightning_ebm.objectives.MaximumLikelihood
          init_args: {alpha: 0.1}

Negatives (generator samples) are drawn only through ``TrainingStep.negatives``, which draws the
starting points from the latent (a persistent latent's chains are taken back afterwards), runs
the sampler on the module's stream and records what it did, so the module logs the sampler's
telemetry only for objectives that ran it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ._checks import check_float, check_int
from ._config import RecordInit
from .energies import check_energy_output
from .latents import Latent, PersistentLatent
from .samplers import Sampler

__all__ = ["Objective", "MaximumLikelihood", "TrainingStep"]


@dataclass
class TrainingStep:
    """What an objective sees of one training step.

    Attributes:
        energy: the critic ``(B, *shape) -> (B,)`` (the module's ``energy``).
        sampler: the generator's dynamics.
        latent: where the dynamics start.
        rng: the module's training random stream (per rank, saved in checkpoints); draw every
            random number of the step from it, so that a resumed run is the same run.
        data: the data batch ``(B, *shape)``, checked, in the module's memory format.
        num_negatives: how many generator samples the step should use.
        data_noise: standard deviation of the Gaussian jitter ``jittered_data`` adds (0 = none).
        memory_format: puts a tensor in the module's memory format (channels-last or not).
        generated: the detached negatives of the last ``negatives`` call, ``None`` if the sampler
            did not run (the module logs the sampler's telemetry only then).
    """

    energy: nn.Module
    sampler: Sampler
    latent: Latent
    rng: torch.Generator
    data: Tensor
    num_negatives: int
    data_noise: float = 0.0
    memory_format: Callable[[Tensor], Tensor] = field(default=lambda x: x)
    generated: Tensor | None = None

    def energy_of(self, x: Tensor) -> Tensor:
        """``E(x)``, shape ``(B,)`` (checked)."""
        e = self.energy(x)
        check_energy_output(e, x)
        return e

    def negatives(self, differentiable_steps: int = 0) -> Tensor:
        """``num_negatives`` generator samples ``G(z)``, ``z ~ latent``, drawn on ``rng``.

        Detached unless ``differentiable_steps > 0``: then the graph of the last that many steps
        is kept (see ``Sampler.__call__``). A persistent latent gets the end points back.
        """
        like, n = self.data, self.num_negatives
        slots = None
        if isinstance(self.latent, PersistentLatent):
            z, slots = self.latent.draw(n, generator=self.rng, device=like.device, dtype=like.dtype)
        else:
            z = self.latent.sample(n, generator=self.rng, device=like.device, dtype=like.dtype)
        z = self.memory_format(z)
        if differentiable_steps > 0:
            x = self.sampler(self.energy, z, generator=self.rng, differentiable_steps=differentiable_steps)
        else:
            x = self.sampler(self.energy, z, generator=self.rng)
        self.generated = x.detach()
        if slots is not None:
            self.latent.push(self.generated, slots)
        return x

    def jittered_data(self) -> Tensor:
        """The data plus ``data_noise`` Gaussian jitter drawn on ``rng`` (the data itself when 0)."""
        x = self.data
        if self.data_noise > 0:
            noise = torch.randn(x.shape, generator=self.rng, device=x.device, dtype=x.dtype)
            x = x + self.data_noise * noise
        return x


class Objective(RecordInit):
    """Base class of training objectives: ``objective(step) -> (loss, parts)``.

    ``loss`` is the scalar to minimise; ``parts`` are named scalars the module logs as
    ``train/<name>``. Subclasses set ``needs_negatives`` to say whether training runs the
    sampler (``step.negatives``); an objective without negatives (score matching, say) must not
    touch it.
    """

    #: whether the objective draws generator samples (runs the sampler) in training
    needs_negatives: bool = True

    def __call__(self, step: TrainingStep) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def generator_loss(energy: nn.Module, x_gen: Tensor) -> Tensor:
    """``mean E(x_gen)`` with the critic's parameters held fixed (detached).

    ``x_gen`` must come from the sampler with ``differentiable_steps > 0``: the gradient then
    reaches the parameters only through the dynamics, moving the generator towards lower energy
    under the current critic, as a GAN's generator step does.
    """
    frozen = {name: p.detach() for name, p in energy.named_parameters()}
    return torch.func.functional_call(energy, frozen, (x_gen,)).mean()


class MaximumLikelihood(Objective):
    """The "maximum-likelihood" EBM loss, seen as the critic of a self-adversarial game.

    ``mean E(x_data) - mean E(sg(G(z))) + alpha * (mean E(x_data)^2 + mean E(G(z))^2)``, with the
    generated samples detached (``sg``), plus, when ``generator_loss_weight > 0``,
    ``generator_loss_weight * mean E_sg(G(z))``: the energy of the generated samples under the
    critic held fixed, differentiated through the last ``generator_loss_steps`` steps of the
    dynamics (the GAN generator objective).

    Args:
        alpha: weight of the energy-magnitude regulariser (keeps energies near 0).
        generator_loss_weight: weight of the generator loss; ``0`` trains the critic alone.
        generator_loss_steps: how many final steps of the dynamics the generator loss unrolls.
    """

    def __init__(self, alpha: float = 0.1, generator_loss_weight: float = 0.0, generator_loss_steps: int = 1) -> None:
        self.alpha = check_float("MaximumLikelihood", "alpha", alpha, minimum=0)
        self.generator_loss_weight = check_float("MaximumLikelihood", "generator_loss_weight",
                                                 generator_loss_weight, minimum=0)
        self.generator_loss_steps = check_int("MaximumLikelihood", "generator_loss_steps",
                                              generator_loss_steps, minimum=1)

    def critic_loss(self, e_data: Tensor, e_gen: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The critic loss and its parts; ``e_gen`` are energies of detached generator samples."""
        gap = e_data.mean() - e_gen.mean()
        reg = e_data.pow(2).mean() + e_gen.pow(2).mean()
        return gap + self.alpha * reg, {"energy_data": e_data.mean(), "energy_gen": e_gen.mean(),
                                        "energy_gap": gap, "energy_reg": reg}

    def __call__(self, step: TrainingStep) -> tuple[Tensor, dict[str, Tensor]]:
        if self.generator_loss_weight > 0:  # keep the graph of the last steps for the generator loss
            x_unrolled = step.negatives(differentiable_steps=self.generator_loss_steps)
            x_gen = x_unrolled.detach()
        else:
            x_gen = step.negatives()
        x_data = step.jittered_data()
        loss, parts = self.critic_loss(step.energy_of(x_data), step.energy_of(x_gen))
        if self.generator_loss_weight > 0:
            parts["generator_loss"] = generator_loss(step.energy, x_unrolled)
            loss = loss + self.generator_loss_weight * parts["generator_loss"]
        return loss, parts
